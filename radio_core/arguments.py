"""Argument schemas of plugin factories: names, types, defaults and one-line help.

A factory's schema comes from its signature (types from its annotations) with per-argument help
from its docstring (``name: help`` at the start of a line or a sentence, Google-style ``Args:``
included) or from ``Annotated[T, "help"]`` / ``Annotated[T, Field(description=...)]``. A factory
may instead carry a pydantic model as ``factory.args_model``: its fields are the schema and it
validates the arguments.

``check_args`` binds a recipe's ``args`` to the factory without calling it: unknown names,
missing required arguments, arguments the framework supplies itself, and values of the wrong
type are reported in one line naming the recipe field and the plugin.
"""
from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .utils import closest

#: arguments the framework passes to each kind of factory (CONTRIBUTING.md, "Factory calling conventions")
FRAMEWORK_ARGS: dict[str, dict[str, str]] = {
    "teacher": {"resolution": "the teacher's `resolution` field", "meta": "set by the framework for dry runs"},
    "student": {"num_cls_tokens": "one per teacher with a summary target"},
    "adaptor": {"in_dim": "the student's width", "out_dim": "the teacher's dimension",
                "hidden_dim": "the recipe's adaptor hidden size"},
    "loss": {}, "dataset": {}, "evaluator": {},
}
REQUIRED = inspect.Parameter.empty


@dataclass
class Argument:
    name: str
    type: str
    default: Any = REQUIRED
    help: str = ""
    #: supplied by the framework, not by the recipe's ``args``
    framework: bool = False
    annotation: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.framework

    def describe(self) -> str:
        if self.framework:
            default = "(set by the framework)"
        elif self.default is REQUIRED:
            default = "(required)"
        else:
            default = f"= {self.default!r}"
        return f"{self.name}: {self.type} {default}"


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty or annotation is None:
        return "any"
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = str(annotation).replace("NoneType", "None")
    for prefix in ("typing.", "collections.abc.", "pathlib."):
        text = text.replace(prefix, "")
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text)
    return re.sub(r"Union\[(.*)\]$", lambda m: " | ".join(p.strip() for p in m[1].split(",")), text)


def _annotated_help(annotation: Any) -> str:
    if typing.get_origin(annotation) is not typing.Annotated:
        return ""
    for meta in typing.get_args(annotation)[1:]:
        if isinstance(meta, str):
            return meta
        description = getattr(meta, "description", None)
        if description:
            return str(description)
    return ""


def doc_help(doc: str, names: list[str]) -> dict[str, str]:
    """``{name: first sentence}`` for parameters documented as ``name: text`` (or ````name````:)
    at the start of a line, bullet or sentence of the docstring."""
    if not doc or not names:
        return {}
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    flat = " ".join(doc.split())
    pattern = re.compile(r"(?:^|(?<=\. )|(?<=\* )|(?<=- )|(?<=: ))``?(" + alternatives + r")``?(?: \([^)]*\))?: |"
                         r"(?:^|(?<=\. )|(?<=\* )|(?<=- )|(?<=: ))(" + alternatives + r")(?: \([^)]*\))?: ")
    matches = list(pattern.finditer(flat))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        name = m.group(1) or m.group(2)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(flat)
        text = flat[m.end():end].strip().rstrip("*- ")
        sentence = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")
        if name not in out and sentence:
            sentence = sentence.replace("``", "`")
            out[name] = sentence if len(sentence) <= 110 else sentence[:107].rstrip() + "..."
    return out


def factory_arguments(kind: str, factory: Callable[..., Any]) -> list[Argument]:
    """The schema of ``factory`` (see the module docstring); ``**kwargs`` shows as one entry."""
    model = getattr(factory, "args_model", None)
    framework = FRAMEWORK_ARGS.get(kind, {})
    if model is not None:
        return [Argument(name, _type_name(field.annotation),
                         REQUIRED if field.is_required() else field.get_default(call_default_factory=True),
                         field.description or "", name in framework, field.annotation)
                for name, field in model.model_fields.items()]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    try:
        hints = typing.get_type_hints(factory, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: show them as written
        hints = {}
    names = [p.name for p in signature.parameters.values()]
    helps = doc_help(inspect.getdoc(factory) or "", names)
    args = []
    for p in signature.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            args.append(Argument(f"**{p.name}", "any", None, "further arguments, passed on"))
            continue
        annotation = hints.get(p.name, p.annotation)
        help_text = _annotated_help(annotation) or helps.get(p.name, "") or framework.get(p.name, "")
        args.append(Argument(p.name, _type_name(annotation), p.default, help_text, p.name in framework,
                             annotation if annotation is not inspect.Parameter.empty else None))
    return args


def _type_error(annotation: Any, value: Any) -> Optional[str]:
    """None when ``value`` fits ``annotation`` (pydantic, lax mode), else why not."""
    if annotation is None:
        return None
    try:
        from pydantic import TypeAdapter, ValidationError

        adapter = TypeAdapter(annotation)
    except Exception:  # noqa: BLE001 - a type pydantic cannot check (e.g. torch.dtype): skip it
        return None
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return exc.errors()[0].get("msg", str(exc))
    except Exception:  # noqa: BLE001
        return None
    return None


def check_args(kind: str, name: str, factory: Callable[..., Any], args: dict, field: str) -> list[str]:
    """Problems binding ``args`` (the recipe's ``field``, e.g. ``teachers.dino.args``) to the
    ``kind`` plugin ``name``'s factory, one line each; empty when they bind."""
    schema = factory_arguments(kind, factory)
    if not schema and getattr(factory, "args_model", None) is None and not _inspectable(factory):
        return []  # a factory whose signature cannot be read: its own call will judge the args
    by_name = {a.name: a for a in schema}
    open_ended = any(a.name.startswith("**") for a in schema)
    accepted = [a.name for a in schema if not a.framework and not a.name.startswith("**")]
    where = f"{field} ({kind} {name!r})"
    problems = []
    for key, value in args.items():
        arg = by_name.get(key)
        if arg is not None and arg.framework:
            problems.append(f"{where}: {key!r} is set by the framework ({FRAMEWORK_ARGS[kind][key]}); "
                            f"remove it from args")
        elif arg is None and not open_ended:
            guess = closest(key, accepted)
            hint = f" Did you mean {guess!r}?" if guess else ""
            problems.append(f"{where}: unknown argument {key!r}.{hint} Arguments: {', '.join(accepted) or '(none)'}")
        elif arg is not None:
            why = _type_error(arg.annotation, value)
            if why:
                problems.append(f"{where}: {key}={value!r} does not fit {arg.type}: {why}")
    for arg in schema:
        if arg.required and arg.name not in args and not arg.name.startswith("**"):
            problems.append(f"{where}: missing required argument {arg.name!r} ({arg.type})")
    model = getattr(factory, "args_model", None)
    if model is not None and not problems:
        from pydantic import ValidationError

        try:
            model(**args)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            problems.append(f"{where}: {loc}: {err.get('msg')}")
    return problems


def _inspectable(factory: Callable[..., Any]) -> bool:
    try:
        inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    return True


def format_arguments(kind: str, factory: Callable[..., Any], indent: str = "    ") -> list[str]:
    """Lines for ``radio plugins --verbose``: ``name: type = default  help``."""
    schema = factory_arguments(kind, factory)
    if not schema:
        return [f"{indent}(no arguments)"]
    heads = [a.describe() for a in schema]
    width = min(max(len(h) for h in heads), 60)
    return [f"{indent}{h.ljust(width)}  {a.help}".rstrip() for h, a in zip(heads, schema)]


__all__ = ["Argument", "FRAMEWORK_ARGS", "factory_arguments", "check_args", "format_arguments", "doc_help"]

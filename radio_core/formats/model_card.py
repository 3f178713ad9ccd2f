"""Model cards: the ``README.md`` written into every export.

The card says what the model is and how it was made, from what the run left on disk: the
resolved recipe (``recipe.yaml``), the teachers and their dimensions (the export config), the
training steps and final losses (``metrics.jsonl``), fidelity to each teacher
(``report/fidelity.json``, else the last ``fidelity/*`` numbers logged in training), the scores
of ``radio eval`` tasks saved under ``eval/`` (proxy benchmarks), and how to load it. Missing
pieces are left out, never invented. The YAML front matter is the Hugging Face Hub's card metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

CARD_NAME = "README.md"


def _read(path: Path, json_file: bool = False) -> Any:
    """A file the run left (text, or parsed JSON), or None when it is missing or unusable (not a
    regular file, too large, not UTF-8, malformed): a card leaves out what it cannot read."""
    from ..utils import UserFileError, read_user_json, read_user_text

    if not path.is_file():
        return None
    try:
        return read_user_json(path, "run file") if json_file else read_user_text(path, "run file")
    except UserFileError:
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _last_metrics(run_dir: Path) -> dict:
    """The last logged line of ``metrics.jsonl`` and the last fidelity numbers logged (rows that
    are not JSON objects, values that are not numbers: skipped)."""
    from ..utils import UserFileError, read_user_jsonl

    last: dict = {}
    fidelity: dict = {}
    try:
        rows = read_user_jsonl(run_dir / "metrics.jsonl", "training log") if (run_dir / "metrics.jsonl").is_file() \
            else []
    except UserFileError:
        rows = []
    for row in rows:
        last = row
        found = {k: v for k, v in row.items() if k.startswith("fidelity/") and _number(v)}
        if found:
            fidelity = found
    return {"last": last, "fidelity": fidelity}


def _fidelity_rows(run_dir: Path, logged: dict) -> list[tuple[str, str, Any, Any]]:
    """(resolution, head, cosine, relative MSE) from the report, else from the training log."""
    rows = []
    report = _read(run_dir / "report" / "fidelity.json", json_file=True)
    if isinstance(report, dict):
        for res, heads in report.items():
            for head, m in (heads.items() if isinstance(heads, dict) else []):
                if isinstance(m, dict):
                    rows.append((str(res), str(head), m.get("cosine"), m.get("rel_mse")))
        return rows
    by_key: dict[tuple[str, str], dict] = {}
    for key, value in logged.items():  # fidelity/<res>/<teacher>/<head>/<metric>
        parts = key.split("/")
        if len(parts) >= 4:
            by_key.setdefault((parts[1], "/".join(parts[2:-1])), {})[parts[-1]] = value
    return [(res, head, m.get("cosine"), m.get("rel_mse")) for (res, head), m in by_key.items()]


def _eval_results(run_dir: Path) -> list[tuple[str, dict]]:
    folder = run_dir / "eval"
    out = []
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            result = _read(f, json_file=True)
            if isinstance(result, dict):
                out.append((f.stem, result))
    return out


def _fmt(v: Any) -> str:
    """A value for the card's text: numbers formatted, everything else escaped (``_text``)."""
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else _text(v)


def _text(v: Any) -> str:
    """Text from a recipe or a run's files, safe in Markdown and in the HTML it renders to: HTML
    special characters as entities (no tag, script or attribute survives), and the Markdown
    characters that could break a table row, start a link or code, or a new line, escaped."""
    import html

    text = html.escape(" ".join(str(v).split()), quote=True)
    for char, entity in (("|", "&#124;"), ("`", "&#96;"), ("[", "&#91;"), ("]", "&#93;"), ("*", "&#42;"),
                         ("_", "&#95;"), ("\\", "&#92;"), ("!", "&#33;")):
        text = text.replace(char, entity)
    return text


def _code_block(language: str, body: str) -> str:
    """A fenced code block that ``body`` cannot close: the fence is longer than any run of
    backticks in it (CommonMark)."""
    import re

    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", body)), default=0))
    return f"{fence}{language}\n{body}\n{fence}"


def render_model_card(config: dict, run_dir: Optional[Path] = None, fmt: str = "radio-distill",
                      location: str = "EXPORT_DIR") -> str:
    """The card's text for an export ``config`` (``radio_core.model.export_config``) of the run in
    ``run_dir`` (None: only what the config tells); ``fmt``: radio-distill | transformers | radio | onnx."""
    student = config.get("student", {})
    teachers = config.get("teachers", {})
    run_dir = Path(run_dir) if run_dir is not None else None
    recipe_text = (_read(run_dir / "recipe.yaml") or "") if run_dir is not None else ""
    logged = _last_metrics(run_dir) if run_dir is not None else {"last": {}, "fidelity": {}}
    tags = ["radio-distill", "agglomerative-distillation", "vision", "feature-extraction"]
    lines = ["---", f"library_name: {'transformers' if fmt == 'transformers' else 'radio-distill'}",
             "pipeline_tag: image-feature-extraction", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    name = student.get("name", "?")
    args = student.get("args", {})
    lines += [f"# {_text(args.get('model', name))} student distilled with radio-distill", "",
              f"An agglomerative student (plugin {_text(name)}, {_fmt(student.get('num_cls_tokens', 1))} summary "
              f"token(s)) "
              f"trained without labels to reproduce {len(teachers)} frozen teacher(s) through per-teacher "
              f"adaptor heads (AM-RADIO, Ranzinger et al., CVPR 2024).", ""]

    lines += ["## Teachers", "", "| teacher | plugin | model | summary dim | spatial dim | input |",
              "|---|---|---|---|---|---|"]
    recipe_teachers = _recipe_teachers(recipe_text)
    for tname, t in teachers.items():
        targs = recipe_teachers.get(tname, {})
        model = targs.get("model") or ("tiny random-init (offline)" if targs.get("tiny") not in (None, False) else "")
        if targs.get("pretrained"):
            model = f"{model} ({targs['pretrained']})"
        size = "x".join(_fmt(s) for s in t.get("input_size", [])) or ""
        lines.append(f"| {_text(tname)} | {_fmt(t.get('plugin'))} | {_fmt(model)} | {_fmt(t.get('summary_dim'))} | "
                     f"{_fmt(t.get('spatial_dim'))} | {size} |")
    lines.append("")

    last = logged["last"]
    lines += ["## Training", ""]
    if last:
        losses = ", ".join(f"{_text(k)} = {_fmt(float(v))}" for k, v in last.items()
                           if k.startswith("loss/") and _number(v))
        lines.append(f"{_fmt(last.get('step', '?'))} optimiser steps, {_fmt(last.get('samples', '?'))} images seen; "
                     f"final losses: {losses or 'not logged'}.")
    else:
        lines.append("No training log was found beside this export.")
    sizes = _student_resolutions(recipe_text) or ([config["resolution"]] if config.get("resolution") else [])
    if sizes:
        plural = "s" if len(sizes) > 1 else ""
        lines.append(f"Student resolution{plural} in training: {', '.join(f'{_fmt(h)}x{_fmt(w)}' for h, w in sizes)}.")
    lines.append("")

    rows = _fidelity_rows(run_dir, logged["fidelity"]) if run_dir is not None else []
    if rows:
        lines += ["## Fidelity to the teachers", "",
                  "Cosine similarity and relative MSE of each adaptor head against its teacher on held-out images.",
                  "", "| resolution | head | cosine | relative MSE |", "|---|---|---|---|"]
        lines += [f"| {_text(r)} | {_text(h)} | {_fmt(c)} | {_fmt(m)} |" for r, h, c, m in rows]
        lines.append("")
    results = _eval_results(run_dir) if run_dir is not None else []
    if results:
        lines += ["## Benchmarks", "", "| task | result |", "|---|---|"]
        for task, result in results:
            for row in result.get("rows") or [result]:  # radio eval: one row per subject
                shown = ", ".join(f"{_text(k)}={_fmt(v)}" for k, v in row.items() if not isinstance(v, (dict, list)))
                lines.append(f"| {_text(task)} | {shown} |")
        lines.append("")

    lines += ["## How to load", "", _how_to_load(fmt, location), ""]
    if recipe_text:
        lines += ["## Recipe", "", "The resolved recipe of the run (`radio train` input after `base:` and overrides):",
                  "", _code_block("yaml", recipe_text.rstrip()), ""]
    return "\n".join(lines)


def _how_to_load(fmt: str, location: str) -> str:
    where = json.dumps(location)  # a Python string literal, whatever the path holds
    ours = _code_block("python", "from radio_core.model import RadioModel\n\n"
                       f"model = RadioModel.load({where})            # or RadioModel.from_pretrained(...)\n"
                       "summary, spatial = model(images)                  # [0, 1] RGB, sides multiples of "
                       "model.size_multiple\n"
                       "per_teacher = model.adaptor_outputs(images)       # {\"backbone\": ..., teacher: (summary, spatial)}")
    if fmt == "transformers":
        return ("The backbone loads in transformers (no remote code):\n\n" + _code_block(
            "python", "from transformers import AutoModel\n\n"
            f"model = AutoModel.from_pretrained({where})\n"
            "out = model(pixel_values=images)                  # [0, 1] RGB\n"
            "out.summary, out.features                         # (B, k*D), (B, h*w, D)")
            + "\n\nWith the adaptor heads (radio_adaptors.safetensors), through radio-distill:\n\n" + ours)
    if fmt == "radio":
        return ("An official-RADIO-layout checkpoint: `RadioModel.load(\"model.pth.tar\")` here, or the official "
                "loader (`torch.hub.load(\"NVlabs/RADIO\", \"radio_model\", version=PATH)`).")
    if fmt == "onnx":
        return ("```python\nimport onnxruntime\n\n"
                f"session = onnxruntime.InferenceSession(\"{location}/model.onnx\")\n"
                "outputs = session.run(None, {\"images\": images})   # float32 (B, 3, H, W) RGB in [0, 1]\n```\n\n"
                "The outputs are named in `model.onnx.json`: the backbone's summary and spatial features, then "
                "each teacher's heads.")
    return ours


def _student_resolutions(recipe_text: str) -> list:
    """Every student input size of the run's resolved recipe (groups, stages, sets); [] if unreadable."""
    if not recipe_text:
        return []
    try:
        import yaml

        from ..recipe.schema import Recipe

        return Recipe.model_validate(yaml.safe_load(recipe_text)).student_resolutions()
    except Exception:  # noqa: BLE001 - the export config's resolution stands in
        return []


def _recipe_teachers(recipe_text: str) -> dict:
    if not recipe_text:
        return {}
    try:
        import yaml

        data = yaml.safe_load(recipe_text) or {}
        return {k: dict((v or {}).get("args") or {}) for k, v in (data.get("teachers") or {}).items()}
    except Exception:  # noqa: BLE001 - a card without model names beats no card
        return {}


def write_model_card(directory: str | Path, config: dict, run_dir: Optional[str | Path] = None,
                     fmt: str = "radio-distill") -> Path:
    """Write ``README.md`` into ``directory`` (replacing an older card); returns its path."""
    directory = Path(directory)
    path = directory / CARD_NAME
    text = render_model_card(config, Path(run_dir) if run_dir is not None else None, fmt, location=str(directory))
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


__all__ = ["render_model_card", "write_model_card", "CARD_NAME"]

"""Plugin argument schemas: names, types, defaults and help from factory signatures, docstrings
or a pydantic model; `radio plugins --verbose` shows them; recipes are checked against them."""
import types

import pydantic

from radio_core.arguments import check_args, doc_help, factory_arguments
from radio_core.cli import main as radio
from radio_core.registry import Registry


def test_teacher_schema_from_signature_and_docstring(registry):
    args = {a.name: a for a in factory_arguments("teacher", registry.get("teacher", "dinov2").factory)}
    assert list(args)[:2] == ["model", "pretrained"]
    assert args["model"].type == "str | None" and args["model"].default is None
    assert args["model"].help.startswith("hub id (`facebook/dinov2-giant`")
    assert args["upsample_to"].type == "int | Sequence[int] | None"
    assert args["resolution"].framework and args["meta"].framework and not args["model"].required
    vit = {a.name: a for a in factory_arguments("student", registry.get("student", "vit").factory)}
    assert vit["final_norm"].default is True and vit["final_norm"].help == "LayerNorm after the last block"
    assert vit["num_cls_tokens"].framework
    folder = {a.name: a for a in factory_arguments("dataset", registry.get("dataset", "image_folder").factory)}
    assert folder["root"].required and folder["root"].type == "str"


def test_doc_help_reads_lines_bullets_and_sentences():
    doc = "Build it.\n\nArgs:\n    alpha: the first. More.\n    beta (int): second one\n* ``gamma``: third. delta: fourth."
    assert doc_help(doc, ["alpha", "beta", "gamma", "delta"]) == {
        "alpha": "the first", "beta": "second one", "gamma": "third", "delta": "fourth"}


def test_plugins_verbose_lists_arguments(capsys):
    assert radio(["plugins", "--verbose", "--kind", "teacher", "dinov2"]) == 0
    out = capsys.readouterr().out
    assert "teacher  dinov2" in out and "clip" not in out.split("\n", 2)[1]
    assert "model: str | None = None" in out and "resolution: Sequence[int] | None (set by the framework)" in out
    assert "upsample_to: int | Sequence[int] | None = None" in out


def test_a_pydantic_args_model_is_the_schema_and_the_check():
    class Args(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        width: int = pydantic.Field(64, ge=8, description="channels")
        name: str = pydantic.Field(description="what to call it")

    def build_thing(**kwargs):
        return Args(**kwargs)

    build_thing.args_model = Args

    plugin = types.SimpleNamespace()

    def radio_register(registry):
        registry.add("loss", "thing", build_thing)

    plugin.radio_register = radio_register
    reg = Registry()
    reg.register_plugin(plugin, "thing_plugin")
    factory = reg.get("loss", "thing").factory
    schema = {a.name: a for a in factory_arguments("loss", factory)}
    assert schema["width"].describe() == "width: int = 64" and schema["width"].help == "channels"
    assert schema["name"].required
    assert check_args("loss", "thing", factory, {"name": "x", "width": 64}, "f.args") == []
    assert check_args("loss", "thing", factory, {"name": "x", "width": 4}, "f.args") == [
        "f.args (loss 'thing'): width: Input should be greater than or equal to 8"]
    assert check_args("loss", "thing", factory, {"width": 64}, "f.args") == [
        "f.args (loss 'thing'): missing required argument 'name' (str)"]
    assert "unknown argument 'widht'. Did you mean 'width'?" in check_args("loss", "thing", factory,
                                                                          {"name": "x", "widht": 1}, "f.args")[0]


def test_unknown_component_name_is_an_error(capsys):
    assert radio(["plugins", "--kind", "teacher", "dinov9"]) == 2
    assert "no registered teacher named 'dinov9'" in capsys.readouterr().err

"""Every loading path speaks in one line naming the file and what is wrong: RadioModel.load
(exports and RADIO checkpoints), safetensors headers that lie, integer / mixed dtypes,
non-finite weights, malformed config.json, ``pretrained=`` paths of students and teachers, and
the eval CLI."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from radio_core.model import ExportError, RadioModel, save_export
from radio_core.formats.radio_checkpoint import RadioFormatError
from radio_core.registry import PluginError

from test_model_api import make_recipe, trained_distiller


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from radio_core.registry import get_registry

    recipe = make_recipe()
    path = tmp_path_factory.mktemp("export") / "export"
    save_export(trained_distiller(recipe, get_registry()), recipe, None, path)
    return path


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, data):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _retensor(path, fn):
    state = load_file(str(path))
    key = next(k for k, v in sorted(state.items()) if v.is_floating_point() and v.numel() > 4)
    state[key] = fn(state[key])
    save_file(state, str(path))


def lie_about_shape(p):
    h, d = _header(p)
    k = next(k for k in h if k != "__metadata__")
    h[k]["shape"] = [s * 2 for s in h[k]["shape"]]
    _write_header(p, h, d)


def lie_about_offsets(p):
    h, d = _header(p)
    k = next(k for k in h if k != "__metadata__")
    h[k]["data_offsets"] = [0, 10**12]
    _write_header(p, h, d)


def lie_about_length(p):
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**40) + raw[8:])


def set_config(**changes):
    def edit(p):
        config = json.loads(p.read_text())
        for dotted, value in changes.items():
            node = config
            *parents, last = dotted.split("/")
            for part in parents:
                node = node[part]
            node[last] = value
        p.write_text(json.dumps(config))
    return edit


W, C = "model.safetensors", "config.json"
CASES = [
    ("truncated_weights", W, lambda p: p.write_bytes(p.read_bytes()[:200]), "not a valid safetensors"),
    ("garbage_weights", W, lambda p: p.write_bytes(b"\x00" * 3), "not a valid safetensors"),
    ("header_shape_lies", W, lie_about_shape, "not a valid safetensors"),
    ("header_offsets_lie", W, lie_about_offsets, "not a valid safetensors"),
    ("header_length_lies", W, lie_about_length, "not a valid safetensors"),
    ("weights_dir", W, lambda p: (p.unlink(), p.mkdir()), "missing model.safetensors"),
    ("int_weights", W, lambda p: _retensor(p, lambda t: (t * 100).to(torch.int32)), "holds int32 values"),
    ("mixed_dtypes", W, lambda p: _retensor(p, lambda t: t.half()), "mixed floating dtypes"),
    ("nan_weights", W, lambda p: _retensor(p, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
     "non-finite values"),
    ("inf_weights", W, lambda p: _retensor(p, lambda t: t * float("inf")), "non-finite values"),
    ("config_not_json", C, lambda p: p.write_text("{not json"), "not valid JSON"),
    ("config_not_utf8", C, lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    ("config_a_list", C, lambda p: p.write_text("[1, 2]"), "must be a JSON object"),
    ("config_deep", C, lambda p: p.write_text("[" * 100000 + "]" * 100000), "not valid JSON"),
    ("wrong_format", C, set_config(format="other"), "format"),
    ("no_teachers", C, set_config(teachers={}), "teachers"),
    ("str_dim", C, set_config(**{"teachers/clip/summary_dim": "24"}), "teachers.clip"),
    ("bool_dim", C, set_config(**{"teachers/clip/spatial_dim": True}), "teachers.clip"),
    ("bad_teacher_name", C, set_config(teachers={"a.b": {"summary_dim": 4, "spatial_dim": 4}}), "module key"),
    ("unknown_student", C, set_config(**{"student/name": "nosuch"}), "unknown student 'nosuch'"),
    ("student_name_not_str", C, set_config(**{"student/name": 5}), "student"),
    ("student_args_refused", C, set_config(**{"student/args/depth": "two"}), "student 'vit'"),
    ("zero_cls_tokens", C, set_config(**{"student/num_cls_tokens": 0}), "num_cls_tokens"),
    ("bad_slot", C, set_config(summary_slots={"clip": 7}), "summary_slots"),
    ("negative_hidden", C, set_config(hidden_dim=-1), "hidden_dim"),
    ("dims_disagree", C, set_config(**{"teachers/clip/spatial_dim": 99}), "weights do not match the config"),
]


@pytest.mark.parametrize("case,target,mutate,fragment", CASES, ids=[c[0] for c in CASES])
def test_a_bad_export_is_one_line_naming_the_file(case, target, mutate, fragment, export_dir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(export_dir, out)
    mutate(out / target)
    with pytest.raises(ExportError) as e:
        RadioModel.load(out)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1500, msg
    assert fragment in msg and str(out) in msg, msg


@pytest.mark.parametrize("name,content", [("missing", None), ("garbage.pth.tar", b"garbage"),
                                          ("empty.pth", b""), ("adir", "dir")])
def test_radio_model_load_of_what_is_not_a_model(name, content, tmp_path):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises((ExportError, RadioFormatError)) as e:
        RadioModel.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_a_radio_checkpoint_with_nan_weights_is_refused(tmp_path):
    import argparse

    torch.save({"args": argparse.Namespace(model="vit_base_patch16_224"),
                "state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "nan.pth.tar")
    with pytest.raises(RadioFormatError, match=r"nan\.pth\.tar: non-finite values in 1 tensor\(s\), e\.g\. 'w'"):
        RadioModel.load(tmp_path / "nan.pth.tar")


def _timm_like(tmp_path, name, fn):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0, img_size=64)
    state = {k: fn(k, v) for k, v in vit.state_dict().items()}
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/radio-evil-marker", "w"))


STUDENT_PRETRAINED = [
    ("missing.pth", lambda p: None, "no such checkpoint file"),
    ("adir", lambda p: p.mkdir(), "not a transformers model directory (no config.json)"),  # a folder = transformers RADIO
    ("garbage.pth", lambda p: p.write_bytes(b"garbage"), "not a readable checkpoint"),
    ("evil.pth", lambda p: torch.save({"x": Evil()}, p), "not a readable checkpoint"),
    ("list.pth", lambda p: torch.save([torch.zeros(1)], p), "not a state dict"),
    ("lying.safetensors", lambda p: (save_file({"a": torch.zeros(4)}, str(p)), lie_about_shape(p)),
     "not a valid safetensors"),
    ("nan.safetensors", "nan", "non-finite"),
    ("int.pth", "int", "one floating dtype"),
    ("mixed.safetensors", "mixed", "one floating dtype"),
]


@pytest.mark.parametrize("name,make,fragment", STUDENT_PRETRAINED, ids=[c[0] for c in STUDENT_PRETRAINED])
def test_student_pretrained_paths_speak_in_one_line(name, make, fragment, tmp_path, registry):
    path = tmp_path / name
    if make == "nan":
        path = _timm_like(tmp_path, name, lambda k, v: v * float("nan") if k == "norm.weight" else v)
    elif make == "int":
        path = _timm_like(tmp_path, name, lambda k, v: v.to(torch.int64) if k == "norm.weight" else v)
    elif make == "mixed":
        path = _timm_like(tmp_path, name, lambda k, v: v.half() if k.startswith("blocks.0") else v)
    else:
        make(path)
    with pytest.raises(PluginError) as e:
        registry.build("student", "vit", model="vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2,
                       pretrained=str(path), num_cls_tokens=1)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and fragment in msg, msg
    from pathlib import Path

    assert not Path("/tmp/radio-evil-marker").exists()


@pytest.mark.parametrize("plugin,args", [
    ("clip", {"model": "ViT-B-16", "pretrained": "GARBAGE"}),
    ("clip", {"model": "ViT-B-16", "pretrained": "MISSING"}),
    ("dinov2", {"model": "facebook/dinov2-small", "pretrained": "EMPTYDIR"}),
    ("sam", {"model": "facebook/sam-vit-base", "pretrained": "GARBAGE"}),
])
def test_teacher_pretrained_paths_speak_in_one_line(plugin, args, tmp_path, registry):
    files = {"GARBAGE": tmp_path / "garbage.bin", "MISSING": tmp_path / "missing.bin", "EMPTYDIR": tmp_path / "d"}
    files["GARBAGE"].write_bytes(b"garbage")
    files["EMPTYDIR"].mkdir()
    args = {k: str(files.get(v, v)) for k, v in args.items()}
    with pytest.raises(PluginError) as e:
        registry.build("teacher", plugin, **args, resolution=None)
    msg = str(e.value)
    assert "\n" not in msg and args["pretrained"] in msg and f"teacher {plugin!r}" in msg, msg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as the trainer leaves it (recipe.yaml + export weights), built without
    training: the weights are a freshly initialised distiller's."""
    from radio_core.recipe import dump_recipe, load_recipe
    from radio_core.registry import get_registry
    from radio_core.models.distiller import build_distiller
    from radio_core.models.teachers import build_teacher

    from helpers import tiny_recipe

    root = tmp_path_factory.mktemp("run")
    recipe = load_recipe(tiny_recipe(root))
    reg = get_registry()
    dims = {}
    for name in recipe.teachers:
        t = build_teacher(recipe, name, reg, meta=True)
        dims[name] = (t.summary_dim, t.spatial_dim)
    run = root / "run"
    (run / "export").mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    state = {k: v.contiguous() for k, v in build_distiller(recipe, dims, reg).state_dict().items()}
    save_file(state, str(run / "export" / "model.safetensors"))
    return run


EVAL_CASES = [
    ("ok", None, None),
    ("no_such_run", "rm", "not a run directory"),
    ("nan_weights", lambda p: _retensor(p, lambda t: t * float("nan")), "non-finite values"),
    ("int_weights", lambda p: _retensor(p, lambda t: t.to(torch.int16)), "holds int16 values"),
    ("lying_header", lie_about_shape, "not a valid safetensors"),
    ("wrong_recipe", "recipe", "does not match the run's recipe"),
]


@pytest.mark.parametrize("case,mutate,fragment", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_cli_speaks_in_one_line(case, mutate, fragment, run_dir, tmp_path, capsys):
    from radio_core.eval.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    weights = run / "export" / "model.safetensors"
    if mutate == "rm":
        shutil.rmtree(run)
    elif mutate == "recipe":
        (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace("embed_dim: 48", "embed_dim: 64"))
    elif mutate is not None:
        mutate(weights)
    code = main([str(run), "knn", "--data", str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    if fragment is None:  # the run loads; the missing --data folder is what is reported
        assert "no-data" in errors[0], err
    else:
        assert fragment in errors[0] and str(run) in errors[0], err

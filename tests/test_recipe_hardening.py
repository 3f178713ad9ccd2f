"""Recipes as a careless or hostile user writes them: strict types, ranges, duplicate keys,
paths that are directories, output dirs that cannot exist, teachers without a target or with a
name that cannot be a module key, unbounded values. Each case ends with exactly one ``error:``
line naming the file and the field, exit status 2, no traceback, and nothing written."""
import os
from pathlib import Path

import pytest
import yaml

from radio_core.recipe import apply_overrides, load_recipe
from radio_core.run import main

GOOD = """\
output_dir: out/run
student: {name: vit, args: {model: vit_tiny_patch16_224}, resolution: 224}
teachers:
  clip: {plugin: clip, args: {model: ViT-B-16, pretrained: openai}}
  dino: {plugin: dinov2, args: {model: facebook/dinov2-small}}
"""


def with_lines(*extra: str) -> str:
    return GOOD + "".join(line + "\n" for line in extra)


# (id, recipe text, overrides, fragments the single error line set must contain)
CASES = [
    # strict types: a boolean is not a count, a string is not a number, a float is not an int
    ("bool_steps", with_lines("train: {steps: true}"), [], ["train.steps", "valid integer", "True"]),
    ("bool_batch", with_lines("data: {batch_size: false}"), [], ["data.batch_size", "valid integer"]),
    ("str_batch", with_lines("data: {batch_size: '8'}"), [], ["data.batch_size", "'8'"]),
    ("float_steps", with_lines("train: {steps: 10.0}"), [], ["train.steps", "10.0"]),
    ("bool_resolution", GOOD.replace("resolution: 224", "resolution: true"), [], ["student.resolution"]),
    ("bool_lr", with_lines("optim: {lr: true}"), [], ["optim.lr", "valid number"]),
    ("str_flag", with_lines("train: {compile: 'yes'}"), [], ["train.compile", "valid boolean"]),
    ("yaml11_yes_is_not_bool", with_lines("logging: {jsonl: yes}"), [], ["logging.jsonl", "'yes'"]),
    ("bool_override", GOOD, ["train.steps=true"], ["train.steps", "True"]),
    ("str_seed", with_lines("train: {seed: '0'}"), [], ["train.seed"]),
    # ranges, with the field named
    ("nan_lr", with_lines("optim: {lr: .nan}"), [], ["optim.lr", "finite"]),
    ("inf_weight", GOOD.replace("pretrained: openai}", "pretrained: openai}, weight: .inf"), [],
     ["teachers.clip.weight", "finite"]),
    ("huge_lr", GOOD, ["optim.lr=5"], ["optim.lr", "less than or equal to 1"]),
    ("zero_eps", with_lines("optim: {eps: 0}"), [], ["optim.eps", "greater than 0"]),
    ("beta_one", with_lines("optim: {betas: [0.9, 1.0]}"), [], ["optim.betas.1", "less than 1"]),
    ("beta_negative", with_lines("optim: {betas: [-0.1, 0.99]}"), [], ["optim.betas.0"]),
    ("beta_bool", with_lines("optim: {betas: [true, 0.99]}"), [], ["optim.betas.0"]),
    ("three_betas", with_lines("optim: {betas: [0.9, 0.99, 0.999]}"), [], ["optim.betas"]),
    ("zero_resolution", GOOD.replace("resolution: 224", "resolution: 0"), [], ["student.resolution", "0"]),
    ("huge_resolution", GOOD.replace("resolution: 224", "resolution: 1000000"), [],
     ["student.resolution", "less than or equal to 16384"]),
    ("empty_resolution_list", GOOD, ["student.resolution=[]"], ["student.resolution", "at least 1"]),
    ("teacher_resolution_negative", GOOD, ["teachers.dino.resolution=[-224, 224]"], ["teachers.dino.resolution"]),
    ("crop_zero", with_lines("data: {crop_size: 0}"), [], ["data.crop_size"]),
    ("steps_overflow", GOOD, ["train.steps=100000000000000"], ["train.steps", "less than or equal to"]),
    ("negative_seed", GOOD, ["train.seed=-1"], ["train.seed"]),
    ("empty_stages", GOOD, ["stages=[]"], ["stages", "at least 1"]),
    ("empty_group", GOOD, ["groups={a: {teachers: []}}"], ["groups.a.teachers", "at least 1"]),
    ("empty_eval_resolutions", GOOD, ["eval.resolutions=[]"], ["eval.resolutions"]),
    ("empty_output_dir", GOOD, ["output_dir="], ["output_dir"]),
    # duplicate YAML keys are errors, at any depth
    ("dup_teachers", with_lines("teachers:", "  sam: {plugin: sam}"), [], ["duplicate key 'teachers'", "line"]),
    ("dup_nested", GOOD.replace("plugin: dinov2,", "plugin: dinov2, plugin: clip,"), [],
     ["duplicate key 'plugin'"]),
    ("dup_in_override_value", GOOD, ["teachers.dino.args={a: 1, a: 2}"], ["override", "duplicate key 'a'"]),
    # teachers with nothing to learn, or names that cannot be module keys
    ("no_target", GOOD.replace("plugin: dinov2,", "plugin: dinov2, use_summary: false, use_spatial: false,"),
     [], ["teachers.dino", "no target"]),
    ("dotted_teacher_name", GOOD.replace("  dino:", "  dino.v2:"), [], ["teachers", "'dino.v2'", "module key"]),
    ("reserved_teacher_name", GOOD.replace("  dino:", "  training:"), [], ["teachers", "'training'", "reserved"]),
    ("moduledict_method_name", GOOD.replace("  dino:", "  keys:"), [], ["'keys'", "reserved"]),
    ("spaced_teacher_name", GOOD.replace("  dino:", "  'di no':"), [], ["'di no'", "module key"]),
    ("int_teacher_name", GOOD.replace("  dino:", "  7:"), [], ["teachers"]),
    # YAML that is not a recipe
    ("python_tag", "student: !!python/object/apply:os.system ['touch pwned']\n", [], ["not valid YAML"]),
    ("not_a_mapping", "- 1\n- 2\n", [], ["must be a mapping"]),
    ("truncated", GOOD[:60], [], ["not valid YAML", "line"]),
    ("deep_nesting", "student: " + "[" * 5000 + "]" * 5000 + "\n", [], ["nested too deeply"]),
    ("alias_bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")) + GOOD, [], ["too large"]),
    ("bad_override_yaml", GOOD, ["train.steps=[1, 2"], ["override", "not valid YAML"]),
    ("override_empty_part", GOOD, ["train..steps=1"], ["override", "empty part"]),
]


def _files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def run_validate(tmp_path, capsys, text, overrides, name="recipe.yaml", write=True):
    path = tmp_path / name
    if write:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = _files(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative output_dirs land here, if anything were written
    try:
        code = main([str(path), *overrides, "--validate"])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert _files(tmp_path) == before, "validation wrote something"
    return path, code, out, err


def assert_one_error(code, err, *fragments):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err) < 4000, len(err)
    for f in fragments:
        assert f in err, (f, err)


@pytest.mark.parametrize("case_id,text,overrides,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_is_one_error_line_naming_file_and_field(case_id, text, overrides, fragments, tmp_path, capsys):
    path, code, _, err = run_validate(tmp_path, capsys, text, overrides)
    origin = str(path) if not any("override" in f for f in fragments) else "command line"
    assert_one_error(code, err, origin, *fragments)
    assert not (tmp_path / "pwned").exists()


def test_good_recipe_passes_and_yaml12_scalars_read_as_written(tmp_path, capsys):
    text = with_lines("train: {mixed_precision: no, steps: 5}", "optim: {lr: 3e-4}")
    _, code, out, err = run_validate(tmp_path, capsys, text, ["schedule.min_lr_ratio=1e-2"])
    assert code == 0, err
    r = load_recipe(tmp_path / "recipe.yaml", ["schedule.min_lr_ratio=1e-2"])
    assert r.train.mixed_precision == "no" and r.optim.lr == 3e-4 and r.schedule.min_lr_ratio == 0.01


def test_null_override_drops_a_teacher(tmp_path, capsys):
    _, code, out, err = run_validate(tmp_path, capsys, GOOD, ["teachers.clip=null"])
    assert code == 0, err
    assert "OK (1 teachers: dino)" in out
    assert list(apply_overrides(yaml.safe_load(GOOD), ["teachers.clip=null"])["teachers"]) == ["dino"]


@pytest.mark.parametrize("kind", ["recipe_dir", "base_dir", "base_missing", "base_not_text"])
def test_recipe_or_base_that_is_not_a_file(kind, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "blob.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    if kind == "recipe_dir":
        path, code, _, err = run_validate(tmp_path, capsys, None, [], name="adir", write=False)
        assert_one_error(code, err, str(path), "is a directory")
        return
    base = {"base_dir": "adir", "base_missing": "nope.yaml", "base_not_text": "blob.yaml"}[kind]
    path, code, _, err = run_validate(tmp_path, capsys, f"base: {base}\n" + GOOD, [])
    assert_one_error(code, err, str(path), f"base: {base}",
                     {"base_dir": "is a directory", "base_missing": "not found", "base_not_text": "UTF-8"}[kind])


@pytest.mark.parametrize("kind", ["file_in_the_way", "is_a_file", "broken_link"])
def test_output_dir_that_cannot_be_created(kind, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing-target")
    target = {"file_in_the_way": "afile/run", "is_a_file": "afile", "broken_link": "dangling/run"}[kind]
    path, code, _, err = run_validate(tmp_path, capsys, GOOD, [f"output_dir={tmp_path / target}"])
    assert_one_error(code, err, str(path), "output_dir:", str(tmp_path / target))


def test_error_messages_are_bounded_whatever_the_recipe_holds(tmp_path, capsys):
    many = "".join(f"unknown_{i}: {i}\n" for i in range(5000))
    huge = "x" * 200_000
    for text in (GOOD + many, GOOD.replace("plugin: dinov2", f"plugin: {huge}"),
                 GOOD + f"train: {{steps: {huge}}}\n", GOOD.replace("  dino:", f"  {huge}:")):
        _, code, _, err = run_validate(tmp_path, capsys, text, [])
        assert_one_error(code, err)
        assert len(err) < 4000

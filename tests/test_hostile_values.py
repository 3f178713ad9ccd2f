"""Recipe and command-line values a careless or hostile user gives, and files that are not files:
each is one ``error:`` line (status 2) from ``radio validate`` / ``plan`` / ``train`` alike, before
anything is built or written. A recipe, a ``base:``, a sweep file that is a FIFO, ``/dev/zero``
or a symlink loop never hangs or exhausts memory; include chains are bounded."""
import os
import subprocess
import sys

import pytest

from helpers import env, tiny_recipe

from radio_core.cli import main as radio
from radio_core.registry import Registry


def run(args: list[str]) -> int:
    """``radio ARGS`` in this process; argparse's refusals exit (status 2), as in a shell."""
    try:
        return radio(args)
    except SystemExit as exc:
        return exc.code


def one_error(capsys, code, status=2) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == status and len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert len(err) < 3000, err
    return lines[0]


BAD_OPTIONS = [
    (["plan", "--world-size", "0"], "--world-size: must be a positive integer, got '0'"),
    (["plan", "--world-size", "-3"], "--world-size: must be a positive integer, got '-3'"),
    (["plan", "--world-size", "9" * 5000], "--world-size: must be a positive integer"),
    (["validate", "--world-size", "0"], "--world-size: must be a positive integer"),
    (["plan", "--gpu-memory", "-5"], "--gpu-memory: must be a positive finite number, got '-5'"),
    (["plan", "--gpu-memory", "0"], "--gpu-memory: must be a positive finite number"),
    (["plan", "--gpu-memory", "nan"], "--gpu-memory: must be a positive finite number"),
    (["plan", "--gpu-memory", "1e999"], "--gpu-memory: must be a positive finite number"),
    (["train", "--world-size", "0"], "--world-size: must be a positive integer"),
]


@pytest.mark.parametrize("args,fragment", BAD_OPTIONS, ids=[" ".join(a)[:40] for a, _ in BAD_OPTIONS])
def test_bad_numbers_on_the_command_line(args, fragment, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    line = one_error(capsys, run([args[0], str(recipe), *args[1:]]))
    assert fragment in line, line


def test_world_size_from_the_environment_is_checked(tmp_path):
    out = subprocess.run([sys.executable, "-m", "radio_core.cli", "validate", str(tiny_recipe(tmp_path))],
                         env={**env(), "WORLD_SIZE": "0"}, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2 and "WORLD_SIZE='0' in the environment" in out.stderr, out.stderr[-2000:]


BAD_RECIPE_VALUES = [
    (["teachers.clip.weight=0", "teachers.dino.weight=0", "teachers.sam.weight=0"],
     "every teacher's loss weight is 0"),
    (["teachers.clip.summary_weight=0", "teachers.clip.spatial_weight=0", "teachers.dino.weight=0",
      "teachers.sam.spatial_weight=0", "teachers.sam.summary_weight=0"], "every teacher's loss weight is 0"),
    (["stages=[{steps: 10, teachers: [sam]}, {steps: 10}]", "teachers.sam.weight=0"],
     "stages.0.teachers: every teacher's loss weight is 0"),
    (["teachers.clip.summary_loss={name: cosine, args: {bogus: 1}}"],
     "teachers.clip.summary_loss.args (loss 'cosine'): unknown argument 'bogus'"),
    (["output_dir=/proc/self/run"], "output_dir: /proc/self/run is on the kernel file system /proc"),
    (["output_dir=/sys/run"], "is on the kernel file system /sys"),
    (["output_dir=/dev/run"], "is on the kernel file system /dev"),
    (['output_dir="runs/a\\0b"'], "output_dir: contains a NUL or another control character"),
    ([f"train.steps={'9' * 5000}"], "not a usable value: Exceeds the limit"),
    ([f"optim.lr=1{'0' * 5000}.0"], "optim.lr"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_RECIPE_VALUES, ids=[o[0][:40] for o, _ in BAD_RECIPE_VALUES])
@pytest.mark.parametrize("command", ["validate", "train"])
def test_bad_recipe_values_are_one_line_from_validate_and_train(command, overrides, fragment, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    line = one_error(capsys, radio([command, str(recipe), *overrides]))
    assert fragment in line, line
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_huge_number_inside_a_recipe_file_or_its_base(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(f"notes: {'7' * 5000}\n")
    recipe = tiny_recipe(tmp_path)
    recipe.write_text("base: base.yaml\n" + recipe.read_text())
    assert "base.yaml: not a usable value" in one_error(capsys, radio(["validate", str(recipe)]))


def test_dev_shm_is_a_file_system_a_run_may_use(tmp_path, capsys):
    assert radio(["validate", str(tiny_recipe(tmp_path)), "output_dir=/dev/shm/radio-test-run"]) == 0


def test_a_plugin_argument_called_name_or_kind_reaches_the_factory(tmp_path):
    """``Registry.build(kind, name, /, **args)``: a data source's own ``name`` argument (hf_datasets
    has one) no longer collides with the registry's parameter."""
    reg = Registry()

    def source(name: str, kind: str = "x"):
        return (name, kind)

    reg.add("dataset", "named", source)
    assert reg.build("dataset", "named", name="imagenet", kind="val") == ("imagenet", "val")
    reg.load_entry_points()
    from radio_core.registry import PluginError

    with pytest.raises(PluginError) as e:  # the real plugin gets its argument (and fails on its own terms)
        reg.build("dataset", "hf_datasets", name="no-such-dataset-here", path=str(tmp_path / "missing"))
    assert "multiple values" not in str(e.value)


# ------------------------------------------------------------------------ files that are not files
def _loop(path):
    (path.parent / "other.yaml").symlink_to(path)
    path.symlink_to(path.parent / "other.yaml")


NOT_FILES = {
    "fifo": (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    "dev_zero": (lambda p: p.symlink_to("/dev/zero"), "is a character device, not a regular file"),
    "symlink_loop": (_loop, "a symlink loop"),
    "huge": (lambda p: p.write_bytes(b"#" * ((1 << 20) + 1)), "larger than"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
}


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("role", ["recipe", "base", "sweep"])
def test_a_named_file_that_is_not_a_file_is_one_line(role, kind, tmp_path, capsys):
    make, fragment = NOT_FILES[kind]
    target = tmp_path / "odd.yaml"
    make(target)
    if role == "recipe":
        code = radio(["validate", str(target)])
    elif role == "base":
        recipe = tiny_recipe(tmp_path)
        recipe.write_text("base: odd.yaml\n" + recipe.read_text())
        code = radio(["validate", str(recipe)])
    else:
        code = radio(["sweep", str(target), "--dry-run"])
    line = one_error(capsys, code)
    assert fragment in line and "odd.yaml" in line, line


def test_base_includes_are_bounded_in_depth_and_count(tmp_path, capsys):
    for i in range(40):  # a chain of distinct files, each including the next
        (tmp_path / f"b{i}.yaml").write_text(f"base: b{i + 1}.yaml\n")
    (tmp_path / "b40.yaml").write_text("{}\n")
    assert "includes nest deeper than 16 files" in one_error(capsys, radio(["validate", str(tmp_path / "b0.yaml")]))
    fan = "base: [" + ", ".join(["leaf.yaml"] * 100) + "]\n"  # one file read a hundred times
    (tmp_path / "leaf.yaml").write_text("{}\n")
    (tmp_path / "fan.yaml").write_text(fan)
    assert "read more than 64 files" in one_error(capsys, radio(["validate", str(tmp_path / "fan.yaml")]))

"""Docs that match behaviour: every fenced ``bash`` command of README.md and CONTRIBUTING.md runs
(shortened to tiny settings, as the table below says), and the README's plugin examples work.

A command the table does not know fails ``test_every_command_is_in_the_table``: say how to run it
(``Run``) or why it cannot run here (``Skip``: cluster-only, package installs, this suite itself).
Commands run in a temp directory with ``recipes/`` and ``examples/`` linked in, so nothing lands
in the checkout; ``radio ...`` runs in-process through ``radio_core.cli.main``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import REPO, TINY

DOCS = ("README.md", "CONTRIBUTING.md")


@dataclass
class Run:
    """Run ``command`` (``{name}`` fields filled from the test's context); ``why``: how it
    differs from the documented command."""
    command: str
    why: str = "as documented"
    expect: str = ""  # a fragment its output must contain


@dataclass
class Skip:
    why: str


QUICK = " ".join(TINY) + " eval.report=false"
TABLE: dict[str, Run | Skip] = {
    # README: set up and run
    "python3 -m venv .venv && .venv/bin/pip install torch torchvision $(nvidia-smi -L >/dev/null 2>&1 || echo "
    "--index-url https://download.pytorch.org/whl/cpu) && .venv/bin/pip install -e '.[test]' && .venv/bin/radio "
    "train recipes/quickstart.yaml && .venv/bin/radio eval runs/quickstart proxy --teachers --baselines pixels random":
        Run(f"radio train recipes/tiny_random.yaml {QUICK} output_dir=runs/quickstart",
            "the install is the environment this suite runs in; the quickstart's proxy teachers, training and "
            "proxy scoring run in tests/test_proxy.py (tiny world, the smoke sweep); here the tiny random-teacher "
            "recipe, 20 steps, gives the run that the eval and export commands below read",
            expect="done: step 20"),
    "radio sweep recipes/proxy/ablations.yaml --jobs 2":
        Skip("about two hours on 2 cores; tests/test_proxy.py runs recipes/proxy/ablations_smoke.yaml (--jobs 2)"),
    "radio sweep recipes/proxy/ablations_smoke.yaml --jobs 2":
        Skip("run by tests/test_proxy.py::test_ablation_sweep_smoke_runs_end_to_end (a subset of its arms)"),
    "python -m radio_proxy.report runs/proxy/ablations --into README.md --into docs/proxy_benchmark.md --archive "
    "docs/proxy_results":
        Skip("needs the finished benchmark sweep; tests/test_proxy_report.py checks the docs against its archive"),
    "python -m radio_core.data index /data/other_shards":
        Skip("run by tests/test_shards.py::test_index_command_writes_a_manifest_for_foreign_shards"),
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d "
    "--rdzv_endpoint $HEAD:29400 --rdzv_id $JOB --max_restarts 3 -m radio_core.run recipes/dfn_dino_sam.yaml --resume":
        Skip("cluster-only; tests/test_elastic.py runs the same elastic launch on two localhost nodes"),
    ".venv/bin/python -m pytest -q": Skip("the test suite this test is part of"),
    ".venv/bin/python -m pytest -q -m slow": Skip("the slow tests, of which this test is one (CI runs them)"),
    # README: the paper's recipe
    "radio plan recipes/dfn_dino_sam.yaml --world-size 64 --gpu-memory 80":
        Run("radio plan recipes/dfn_dino_sam.yaml --world-size 64 --gpu-memory 80",
            expect="group sam: 32 rank(s) [32-63]"),
    "accelerate launch --multi_gpu --num_processes 8 -m radio_core.run recipes/dfn_dino_sam.yaml "
    "data.source.args.shards=/data/shards":
        Run("radio validate recipes/dfn_dino_sam.yaml data.source.args.shards=/data/shards --world-size 8",
            "cluster-only (8 GPUs, DataComp shards, hub weights): its recipe and overrides are validated instead",
            expect="OK (4 teachers"),
    "radio featsharp recipes/c_radio_v4.yaml --teacher siglip2 data.source.args.shards=/data/shards":
        Run("radio featsharp recipes/tiny_random.yaml --teacher dino teachers.dino.resolution=56 "
            "'teachers.dino.upsampler={{name: featsharp, factor: 2}}' --steps 2 --norm-batches 1 "
            "--out dino.safetensors",
            "SigLIP2-g and DataComp are cluster-scale: the tiny random DINOv2 at 56 px, 2x, 2 steps, written to "
            "the temp directory", expect="wrote dino.safetensors"),
    # README: plugins, data, cache
    "radio plugins --verbose --kind teacher dinov2":
        Run("radio plugins --verbose --kind teacher dinov2", expect="upsample_to: int | Sequence[int] | None"),
    "radio pack /data/images /data/shards --shard-size 1000":
        Run("radio pack {photos} shards --shard-size 2", "the photos of scikit-image, 2 per shard",
            expect="packed 4 images"),
    "radio cache RECIPE --views 4 --out runs/cache":
        Run("radio cache {recipe} --views 2 --out runs/cache", "the tiny quickstart recipe, 2 views"),
    "radio train RECIPE cache.path=runs/cache":
        Run("radio train {recipe} cache.path=runs/cache output_dir=runs/cached augment.views=2 train.steps=4",
            "the tiny recipe, 4 steps", expect="done: step 4"),
    # README: sweeps
    "radio sweep recipes/ablations/loss_choice.yaml --dry-run":
        Run("radio sweep recipes/ablations/loss_choice.yaml --dry-run", expect="4 run(s), 0 invalid"),
    "radio sweep recipes/ablations/loss_choice.yaml":
        Run("radio sweep {sweep} --only *cosine*",
            "the same grid on the tiny quickstart, 2 steps, 1 view, one run (--only)"),
    "radio sweep ablations/cpe.yaml": Skip("cluster-only: the README's cpe.yaml submits SLURM jobs (8 GPUs each)"),
    "radio sweep ablations/cpe.yaml --status": Skip("cluster-only: asks the SLURM scheduler about those jobs"),
    # README: evaluation (RUN_DIR: the quickstart run above)
    "radio eval RUN_DIR report": Run("radio eval runs/quickstart report --resolutions 64 --images 2",
                                     "one resolution, two images", expect="report written to"),
    "radio eval RUN_DIR sweep": Run("radio eval runs/quickstart sweep --resolutions 64 96 --images 2",
                                    "two resolutions, two images", expect="plot:"),
    "radio eval RUN_DIR fidelity": Run("radio eval runs/quickstart fidelity --images 2", "two images",
                                       expect="student@64"),
    "radio eval RUN_DIR knn --data PATH --teachers --baselines pixels random":
        Run("radio eval runs/quickstart knn --data {digits} --k 5 --teachers --baselines pixels random",
            "scikit-learn digits, k=5", expect="pixels@64"),
    "radio eval RUN_DIR linear --data PATH --resolutions 224 448":
        Run("radio eval runs/quickstart linear --data {digits} --resolutions 64 96 --epochs 20",
            "scikit-learn digits, the tiny student at 64 and 96 px, 20 epochs", expect="student@96"),
    "radio eval RUN_DIR zeroshot --data PATH": Run("radio eval runs/quickstart zeroshot --data {digits}",
                                                   "scikit-learn digits", expect="prompts: openai_imagenet"),
    "radio eval RUN_DIR seg --data PATH":
        Run("radio eval runs/quickstart seg --data {segmentation} --classes 2 --epochs 5 --arg mask_size=64",
            "four photos with two-region masks, 5 epochs, masks at 64 px", expect="boundary_f"),
    "radio eval RUN_DIR knn --data PATH --smoke":
        Run("radio eval runs/quickstart knn --data {digits} --smoke", "scikit-learn digits", expect="tier: smoke"),
    # README: using a trained model
    "radio export runs/quickstart --format transformers":
        Run("radio export runs/quickstart --format transformers", expect="transformers export written"),
    "radio export runs/quickstart --format radio":
        Run("radio export runs/quickstart --format radio", expect="radio export written"),
    "radio export runs/quickstart --format onnx":
        Run("radio export runs/quickstart --format onnx", expect="onnx export written"),
    # README: start from a released C-RADIO (the release: the quickstart run in the official layout)
    "radio train recipes/start_from_c_radio.yaml student.init.source=c-radio_v4-h_half.pth.tar":
        Run("radio train {from_release} student.init.source=runs/quickstart/export_radio/model.pth.tar",
            "the recipe with tiny_random's three tiny teachers as the released ones and a fourth tiny one, "
            "tiny data, 2 steps; the release is the quickstart run written in the official layout above",
            expect="done: step 2"),
    "radio export runs/from_c_radio --format radio":
        Run("radio export runs/from_c_radio --format radio", expect="radio export written"),
    "radio export runs/from_c_radio --format transformers":
        Run("radio export runs/from_c_radio --format transformers", expect="transformers export written"),
    # CONTRIBUTING
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'":
        Skip("installs packages from the network; the suite runs in the installed environment"),
    ".venv/bin/python -m pytest -q tests/test_import_layers.py":
        Run("pytest -q -p no:cacheprovider tests/test_import_layers.py", "in the checkout", expect="passed"),
}


def documented_commands(path: Path) -> list[str]:
    """Commands of the ```bash blocks: comments dropped, backslash continuations joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        current = ""
        for line in block.splitlines():
            text = line.strip()
            if not current and (not text or text.startswith("#")):
                continue
            current = f"{current} {text}".strip()
            if current.endswith("\\"):
                current = current[:-1].rstrip()
                continue
            out.append(re.sub(r"\s+#.*$", "", current).strip())
            current = ""
    return out


def all_commands() -> list[str]:
    return [c for doc in DOCS for c in documented_commands(REPO / doc)]


def test_every_command_is_in_the_table():
    missing = [c for c in all_commands() if c not in TABLE]
    assert not missing, "documented commands the docs test does not know (add them to TABLE):\n" + "\n".join(missing)
    stale = [c for c in TABLE if c not in all_commands()]
    assert not stale, "TABLE entries no longer in the docs:\n" + "\n".join(stale)
    for command, entry in TABLE.items():
        assert entry.why, command


def _photos(folder: Path) -> Path:
    import skimage.data

    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).resize((96, 64)).save(folder / f"{name}.jpg")
    return folder


def _digits(folder: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    count = {c: 0 for c in range(10)}
    for img, label in zip(d.images, d.target):
        if count[label] >= 6:
            continue
        count[label] += 1
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        arr = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(arr).resize((32, 32)).convert("RGB").save(folder / names[label] / f"{count[label]}.png")
    return folder


def _segmentation(folder: Path, photos: Path) -> Path:
    files = sorted(photos.glob("*.jpg"))
    for split, items in (("training", files[:3]), ("validation", files[3:])):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "annotations" / split).mkdir(parents=True)
        for f in items:
            Image.open(f).resize((64, 64)).save(folder / "images" / split / f.name)
            mask = np.zeros((64, 64), np.uint8)
            mask[:, 32:] = 1
            Image.fromarray(mask).save(folder / "annotations" / split / (f.stem + ".png"))
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("docs")
    for name in ("recipes", "examples"):
        (work / name).symlink_to(REPO / name)
    photos = _photos(work / "photos")
    recipe = yaml.safe_load((REPO / "recipes" / "tiny_random.yaml").read_text())
    from radio_core.recipe import apply_overrides, load_raw

    tiny = apply_overrides(recipe, TINY + ["eval.report=false", "output_dir=runs/tiny"])
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    sweep = yaml.safe_load((REPO / "recipes" / "ablations" / "loss_choice.yaml").read_text())
    sweep.update(recipe=str(REPO / "recipes" / "tiny_random.yaml"), output_dir="runs/sweep", cache={"views": 1},
                 eval={"fidelity": {"images": 1}},
                 overrides=[o for o in TINY if not o.startswith("train.steps")] + ["train.steps=2",
                            "eval.report=false", "checkpoint.export=false", "checkpoint.every=2"])
    (work / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    # start_from_c_radio.yaml with tiny_random's teachers (the quickstart release knows them) and a
    # fourth tiny one, on tiny_random's data
    release = load_raw(REPO / "recipes" / "start_from_c_radio.yaml")
    release["teachers"] = {**recipe["teachers"], "dino_b": {"plugin": "dinov2", "args": {"tiny": True},
                                                            "use_summary": False, "target_norm": "phi_s"}}
    release.update(data=recipe["data"])
    release = apply_overrides(release, TINY + ["train.steps=2", "eval.report=false", "train.mixed_precision=no",
                                               "teachers.dino_b.resolution=56", "output_dir=runs/from_c_radio"])
    (work / "from_release.yaml").write_text(yaml.safe_dump(release))
    context = {"photos": photos, "recipe": work / "tiny.yaml", "sweep": work / "sweep.yaml",
               "from_release": work / "from_release.yaml",
               "digits": _digits(work / "digits"), "segmentation": _segmentation(work / "segmentation", photos)}
    return work, context


def run(command: str, work: Path) -> tuple[int, str]:
    argv = shlex.split(command)
    if argv[0] == "pytest":
        done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr
    assert argv[0] == "radio", argv
    from radio_core.cli import main

    out = io.StringIO()
    old = Path.cwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(argv[1:])
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
    return code, out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run(doc, workdir):
    work, context = workdir
    ran = 0
    for command in documented_commands(REPO / doc):
        entry = TABLE[command]
        if isinstance(entry, Skip):
            continue
        actual = entry.command.format(**context)
        code, output = run(actual, work)
        assert code == 0, f"{command}\n  ran as: {actual}\n  exit {code}:\n{output[-3000:]}"
        assert entry.expect in output, f"{actual}: {entry.expect!r} not in the output:\n{output[-2000:]}"
        ran += 1
    assert ran, doc
    if doc == "README.md":  # what the commands leave behind is what the README says
        run_dir = work / "runs" / "quickstart"
        assert (run_dir / "export" / "README.md").is_file()
        assert (run_dir / "export_transformers" / "config.json").is_file()
        assert (run_dir / "export_radio" / "model.pth.tar").is_file()
        assert (run_dir / "export_onnx" / "model.onnx").is_file()
        assert (work / "runs" / "from_c_radio" / "export_radio" / "model.pth.tar").is_file()
        assert (run_dir / "eval" / "knn.json").is_file()


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_loss_and_student_examples_train(tmp_path):
    """The Loss and Student plugin examples, registered by hand, train three steps together."""
    from radio_core.recipe import load_recipe
    from radio_core.registry import Registry
    from radio_core.train.loop import Trainer

    from helpers import tiny_recipe

    blocks = [b for b in readme_python_blocks() if 'registry.add("loss"' in b or 'registry.add("student"' in b]
    assert len(blocks) == 2
    registry = Registry()
    registry.load_entry_points()
    for i, block in enumerate(blocks):
        namespace: dict = {}
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own docs
        registry.register_plugin(types.SimpleNamespace(radio_register=namespace["radio_register"]), f"readme_{i}")
    recipe = load_recipe(tiny_recipe(tmp_path), [
        "student.name=conv_student", "student.args={embed_dim: 48}",
        "teachers.clip.spatial_loss={name: charbonnier, args: {eps: 0.01}}", "train.steps=3"])
    from radio_core.plan.checks import check_recipe

    check_recipe(recipe, registry)  # the schemas of the example factories bind
    last = Trainer(recipe, registry=registry).fit()
    assert last["loss/clip/spatial"] > 0 and np.isfinite(last["loss/total"])

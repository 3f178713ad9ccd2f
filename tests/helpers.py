"""Shared helpers: a tiny version of recipes/tiny_random.yaml and subprocess launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: random-init tiny teachers on scikit-image photos: fast, for tests of the machinery.
QUICKSTART = REPO / "recipes" / "tiny_random.yaml"

#: tiny_random's real tiny teachers and ViT-CPE student, at sizes that take ~0.2 s a step.
TINY = [
    "student.resolution=64", "student.args.depth=2", "student.args.embed_dim=48", "student.args.num_heads=2",
    "teachers.clip.resolution=64", "teachers.dino.resolution=56",
    "data.batch_size=4", "train.steps=20", "train.log_every=1", "schedule.warmup_steps=2",
    "eval.every=0", "eval.report=false", "logging.tensorboard=false", "logging.progress=false",
    "checkpoint.every=1000",
]


def tiny_recipe(tmp_path: Path, *overrides: str, name: str = "recipe.yaml") -> Path:
    """A recipe file: tiny_random.yaml plus TINY plus ``overrides`` (later ones win)."""
    import yaml

    from radio_core.recipe import apply_overrides, load_raw

    data = apply_overrides(load_raw(QUICKSTART), TINY + list(overrides))
    data["output_dir"] = str(tmp_path / "run")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m radio_core.run ARGS`` in a subprocess."""
    out = subprocess.run([sys.executable, "-m", "radio_core.run", *args], env=env(), capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"radio_core.run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """Two CPU ranks: torchrun + Accelerate (MULTI_CPU over gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + os.getpid() % 1000), "-m", "radio_core.run", *args]


def fake_distribution(site: Path, dist: str, module: str, source: str, entry_point: str | None = None) -> Path:
    """A real installed-distribution layout on a sys.path entry: ``<dist>-0.1.dist-info`` with an
    entry point in the radio_core group, and the plugin module ``<module>.py`` holding ``source``."""
    import textwrap

    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[radio_core]\n{entry_point or module} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    return site


def install_recorder(root: Path) -> Path:
    """Install tests/recorder_plugin.py as a plugin distribution under ``root``; returns the
    path to prepend to PYTHONPATH."""
    return fake_distribution(root / "site", "radio-test-recorder", "radio_test_recorder",
                             Path(__file__).with_name("recorder_plugin.py").read_text(), entry_point="recorder")


def env_with(*paths: Path, **extra: str) -> dict:
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [e.get("PYTHONPATH", "")])
    e.update(extra)
    return e


def install_example_plugin(root: Path) -> Path:
    """pip-install examples/third_party_plugin into ``root/site`` (returned), building from a
    copy under ``root``: setuptools writes build/ and *.egg-info next to the sources it builds."""
    import shutil

    source, site = root / "third_party_plugin", root / "site"
    shutil.copytree(REPO / "examples" / "third_party_plugin", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True)
    return site

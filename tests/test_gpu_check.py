"""bench/gpu_check.sh --dry: the GPU script's whole path (paper recipe's stage-2 groups through
the trainer with meta-built, randomly materialised teachers; attention backends; students at
one resolution) on tiny models on the CPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_runs_every_section():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for group in ("clip_dino  teachers dfn_clip+openai_clip+dino, batch 2", "sam        teachers sam, batch 1"):
        assert group in text, text
    assert len(re.findall(r"images/s, [0-9.]+ s \(min", text)) >= 2
    assert re.search(r"MFU \d+\.\d%", text) and "planner estimate" in text
    assert "sdpa" in text and "xformers" in text
    for name in ("E-RADIO-xxxtiny", "E-RADIO-lite-tiny"):
        assert re.search(name + r" +[0-9.]+M params +[0-9.]+ images/s", text), name
    assert "gpu_check done" in text


def test_materialised_teacher_is_finite_and_deterministic():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import materialize_

    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    a = materialize_(net, torch.device("cpu"), seed=3)
    assert all(torch.isfinite(p).all() for p in a.parameters())
    assert torch.equal(a[1].weight, torch.ones(16)) and torch.equal(a[0].bias, torch.zeros(16))
    assert 0.2 < float(a[0].weight.std()) * 8 ** 0.5 < 5
    with torch.device("meta"):
        b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    assert torch.equal(materialize_(b, torch.device("cpu"), seed=3)[0].weight, a[0].weight)

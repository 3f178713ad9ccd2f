"""GPU check: the paper recipe's stage-2 steps at full size on one CUDA device (random init, bf16).

Prints, for the stage-2 (``high_res``) groups of ``recipes/dfn_dino_sam.yaml`` (CLIP + DINOv2 at
432 px, batch 32; SAM at 1024 px, batch 2) run through the framework's own ``train_step``:

* images/s and s/step (median of the timed steps, min/max beside it);
* MFU: the planner's FLOPs per step (student forward + backward, teachers' forward) over the
  step time, against the bf16 GEMM peak measured in the same run;
* peak memory of the group's step (``torch.cuda.max_memory_allocated``, less the weights of the
  other group's teachers, which share this one device) against the planner's per-rank estimate;
* the student's forward + backward with attention ``sdpa`` vs ``xformers``;
* forward images/s of the official E-RADIO, E-RADIO lite B, ViT-H/16-CPE and a CLIP ViT-H/14 image tower at
  512 px.

Teachers are built by their plugins on the meta device (the exact published architectures,
nothing downloaded) and materialised with random weights on the device.

    bash bench/gpu_check.sh            # one H200: < 8 minutes
    bash bench/gpu_check.sh --dry      # tiny models on the CPU (what the test suite runs)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from distill_step import measured_peak_flops  # noqa: E402

GiB = 1024**3

#: --dry: the paper recipe's structure (4 teachers, 2 groups, 2 stages) with tiny models.
DRY_OVERRIDES = [
    "teachers.dfn_clip.args={tiny: {image_size: 64}}", "teachers.dfn_clip.resolution=64",
    "teachers.openai_clip.args={tiny: {image_size: 64, seed: 1}}", "teachers.openai_clip.resolution=64",
    "teachers.dino.args={tiny: {}}", "teachers.dino.resolution=56",
    "teachers.sam.args={tiny: {}}", "teachers.sam.resolution=128",
    "student.args={model: vit_tiny, embed_dim: 64, depth: 2, num_heads: 2, cpe_max_size: 256, register_multiple: 8}",
    "student.resolution=64", "groups.clip_dino.batch_size=2", "groups.sam.batch_size=1",
    "groups.sam.student_resolution=128",
]


def materialize_(module: nn.Module, device: torch.device, seed: int = 0) -> nn.Module:
    """Random weights for a meta-device module on ``device``: fan-in scaled normals for matrices
    (and embeddings), ones for norm scales and layer scales, zeros for biases."""
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.normal_(0.0, fan_in ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm weights, layer scales, scalar gates
                p.fill_(1.0)
    return module


class RandomInitRegistry:
    """A registry whose teachers are the plugins' meta-device builds, materialised with random
    weights on ``device`` (text towers dropped). Everything else is the wrapped registry's."""

    def __init__(self, registry: Any, device: torch.device) -> None:
        self._registry, self._device, self._seed = registry, device, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    def build(self, kind: str, name: str, **kwargs: Any) -> Any:
        if kind != "teacher":
            return self._registry.build(kind, name, **kwargs)
        teacher = self._registry.build(kind, name, **kwargs, meta=True)
        if hasattr(teacher, "drop_text_tower"):
            teacher.drop_text_tower()
        self._seed += 1
        return materialize_(teacher, self._device, self._seed)


def paper_recipe(tmp: str, dry: bool, device: torch.device):
    from radio_core.recipe import load_recipe

    overrides = [f"output_dir={tmp}/run", "data.source={name: synthetic, args: {size: 64, height: 480, width: 640}}",
                 "data.num_workers=0", "logging.progress=false", "logging.tensorboard=false", "logging.jsonl=false",
                 "checkpoint.export=false", "train.mixed_precision=" + ("bf16" if device.type == "cuda" else "'no'")]
    return load_recipe(REPO / "recipes" / "dfn_dino_sam.yaml", overrides + (DRY_OVERRIDES if dry else []))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f})"


def group_steps(recipe, device: torch.device, steps: int, peak: float) -> Any:
    """Stage-2 group steps through ``Trainer.train_step``; returns the trainer (for the student)."""
    from radio_core.plan.planner import plan
    from radio_core.registry import get_registry
    from radio_core.train.loop import Trainer

    registry = get_registry()
    planned = {row.group: row for row in plan(recipe, registry, 2)[0] if row.stage == "high_res"}
    trainer = Trainer(recipe, registry=RandomInitRegistry(registry, device))
    stage = trainer.plans[1]
    runtimes = trainer.enter_stage(stage, stage.start_step)
    weights = {n: sum(p.numel() * p.element_size() for p in t.parameters()) for n, t in trainer.teachers.items()}
    print(f"\nstage 2 ({stage.name}) group steps, {device.type}, {recipe.train.mixed_precision}, "
          f"timed {steps} steps after 1 warm-up (batches loaded beforehand)")
    for rt in runtimes:
        batches = [next(rt.iterator) for _ in range(steps + 1)]
        it = iter(range(10**6))
        step = lambda: trainer.train_step([(rt, batches[next(it) % len(batches)])], stage.start_step)  # noqa: E731
        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(step, steps, device)
        row = planned[rt.slot.group]
        s = statistics.median(times)
        mfu = row.flops_per_rank_step / s / peak
        print(f"  {rt.slot.group:<10} teachers {'+'.join(rt.slot.teachers)}, batch {rt.slot.batch_size}, student "
              f"{rt.slot.student_resolution[0][0]} px: {rt.slot.batch_size / s:8.2f} images/s, {spread(times)}/step, "
              f"{row.flops_per_rank_step / 1e12:.2f} TFLOP/step, MFU {mfu:.1%}")
        if device.type == "cuda":
            others = sum(b for n, b in weights.items() if n not in rt.slot.teachers)
            used = torch.cuda.max_memory_allocated(device) - others
            print(f"  {'':<10} peak memory {used / GiB:.1f} GiB (less {others / GiB:.1f} GiB of the other group's "
                  f"teachers) vs planner {row.total_bytes / GiB:.1f} GiB ({used / row.total_bytes:.2f}x)")
        else:
            print(f"  {'':<10} peak memory: n/a on {device.type}; planner estimate {row.total_bytes / GiB:.2f} GiB")
    return trainer


def attention_backends(student: nn.Module, resolution: int, batch: int, device: torch.device, steps: int) -> None:
    from radio_core.models.attention import xformers_unavailable

    x = torch.rand(batch, 3, resolution, resolution, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\nstudent attention backends: forward + backward, batch {batch} at {resolution} px, {dtype}")
    reason = xformers_unavailable(device)
    for backend in ("sdpa", "xformers"):
        if backend == "xformers" and reason:
            print(f"  xformers   unavailable: {reason}")
            continue
        student.set_attention_backend(backend)

        def fwd_bwd() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                out = student(x)
            (out.patches.float().square().mean() + out.summary.float().square().mean()).backward()

        fwd_bwd()
        times = timed(fwd_bwd, steps, device)
        print(f"  {backend:<10} {batch / statistics.median(times):8.2f} images/s, {spread(times)}/step")
    student.set_attention_backend("sdpa")
    student.zero_grad(set_to_none=True)


def students_at(resolution: int, device: torch.device, dry: bool, steps: int) -> None:
    from radio_core.registry import get_registry

    reg = get_registry()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models: dict[str, nn.Module] = {}
    with torch.device(device):  # random init built in place (buffers included)
        if dry:
            models["E-RADIO-xxxtiny"] = reg.build("student", "eradio", model="eradio_xxxtiny_8x_ws12", num_cls_tokens=3)
            models["E-RADIO-lite-tiny"] = reg.build("student", "eradio_lite", variant="tiny", num_cls_tokens=3)
            models["ViT-tiny-CPE"] = reg.build("student", "vit", model="vit_tiny", depth=2, num_cls_tokens=3)
        else:
            models["E-RADIO"] = reg.build("student", "eradio", model="eradio_large_fullres_ws16", num_cls_tokens=3)
            models["E-RADIO-lite-B"] = reg.build("student", "eradio_lite", variant="b", num_cls_tokens=3)
            models["ViT-H/16-CPE"] = reg.build("student", "vit", model="vit_huge_patch16_224", num_cls_tokens=3)
    models["CLIP ViT-H/14" if not dry else "CLIP tiny"] = clip_tower(resolution, dry, device)
    batch = 2 if dry else 32
    x = torch.rand(batch, 3, resolution, resolution, device=device)
    print(f"\nforward throughput at {resolution} px, batch {batch}, {dtype}, random weights")
    ips = {}
    for name, model in models.items():
        model = model.eval()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            model(x)
            times = timed(lambda: model(x), steps, device)
        ips[name] = batch / statistics.median(times)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"  {name:<14} {params:7.1f}M params  {ips[name]:9.2f} images/s  {spread(times)}/batch", flush=True)
        del model
    ref = list(ips)[-1]
    print("  " + ", ".join(f"{n} {v / ips[ref]:.2f}x" for n, v in ips.items() if n != ref) + f" the {ref}'s images/s")


class _ClipVisual(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def clip_tower(resolution: int, dry: bool, device: torch.device) -> nn.Module:
    """open_clip's ViT-H-14 image tower (dry: two blocks of ViT-B-32), random init on ``device``."""
    import logging

    import open_clip

    name = "ViT-H-14" if not dry else "ViT-B-32"
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": intended here
    try:
        model = open_clip.create_model(name, pretrained=None, force_image_size=resolution, device=device)
    finally:
        logging.getLogger().setLevel(level)
    visual = model.visual
    del model  # the text tower
    if dry:  # keep the dry run fast: two blocks of the B/32 tower
        visual.transformer.resblocks = visual.transformer.resblocks[:2]
    return _ClipVisual(visual)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5; dry 1)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() and not a.dry else "cpu") if a.device == "auto"
                          else a.device)
    if device.type != "cuda" and not a.dry:
        p.error("no CUDA device: run with --dry (tiny models on the CPU), or on a GPU machine")
    steps = a.steps or (1 if a.dry else 5)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measured_peak_flops(dtype, device, n=8192 if device.type == "cuda" else 256)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; measured {dtype} GEMM peak {peak / 1e12:.1f} TFLOP/s"
          + ("  [--dry: tiny models, numbers mean nothing]" if a.dry else ""))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = paper_recipe(tmp, a.dry, device)
        trainer = group_steps(recipe, device, steps, peak)
        student = trainer.unwrapped.student
        res = 128 if a.dry else 432
        del trainer
        attention_backends(student, res, 2 if a.dry else 32, device, steps)
        del student
        if device.type == "cuda":
            torch.cuda.empty_cache()
        students_at(64 if a.dry else 512, device, a.dry, steps)
    print(f"\ngpu_check done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

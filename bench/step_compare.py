"""The framework's training step against the same step written as a plain PyTorch loop.

Used by ``bench/distill_step.py`` (CPU or GPU) and ``bench/gpu_check.py``:

* ``PlainLoop``: deep copies of the framework's student and heads, its frozen teachers, the
  same optimiser settings (fused or not, as the framework chose), the same losses; a competent
  hand-written loop (constants made once, no guard, no bookkeeping).
* ``compare``: interleaved rounds (the arms alternate which goes first, so a drifting machine
  hits both alike) until the 95% confidence interval of the median per-round ratio is narrower
  than the margin it judges, or the round/time budget is spent.
* ``gemm_peak``: the matmul rate this step's own GEMM shapes reach when run alone (each shape
  replayed with its strides and dtype), beside the usual square-GEMM peak, so MFU is read
  against what this step can reach.
* ``profile_sides``: torch.profiler over the same batches on both sides: the ops the framework
  runs that the plain loop does not, and the host reads of device values per step.
"""
from __future__ import annotations

import copy
import math
import os
import random
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> str:
    return "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def loaded(cores: Optional[int] = None) -> bool:
    """Other work on the machine: the 1-minute load above the cores this process uses + 0.5
    (on a 2-core machine: 2.5)."""
    return os.getloadavg()[0] > (cores or torch.get_num_threads()) + 0.5


def measured_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` FLOP/s of an n x n GEMM in ``dtype``: the square-GEMM peak here."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ------------------------------------------------------------------ the plain loop
class PlainLoop:
    """The framework's step for slot ``rt`` written directly against torch."""

    def __init__(self, trainer: Any, rt: Any) -> None:
        d = trainer.unwrapped
        self.student = copy.deepcopy(d.student)
        self.summary_heads = copy.deepcopy(d.summary_heads)
        self.spatial_heads = copy.deepcopy(d.spatial_heads)
        self.slots = dict(d.summary_slots)
        self.teachers = {n: rt.teachers[n] for n in rt.slot.teachers}  # frozen, shared
        self.recipe = trainer.recipe
        self.params = [p for m in (self.student, self.summary_heads, self.spatial_heads) for p in m.parameters()
                       if p.requires_grad]
        o = trainer.recipe.optim
        fused = all(g.get("fused") for g in getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups)
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                     **({"fused": True} if fused else {}))
        self.device = trainer.accelerator.device
        self.resolution = tuple(rt.slot.student_resolution[0])
        mp = trainer.recipe.train.mixed_precision
        self.autocast = dict(device_type=self.device.type, enabled=mp != "no",
                             dtype=torch.bfloat16 if mp == "bf16" else torch.float16)
        self.norm = {n: (torch.tensor(t.mean, device=self.device).view(1, 3, 1, 1),
                         torch.tensor(t.std, device=self.device).view(1, 3, 1, 1)) for n, t in self.teachers.items()}
        self.clip = trainer.recipe.train.grad_clip

    def teacher_input(self, x: torch.Tensor, name: str, t: Any) -> tuple[torch.Tensor, tuple[float, float]]:
        mean, std = self.norm[name]
        if t.resize_mode == "longest_side_pad":
            s = min(t.input_size[0] / x.shape[-2], t.input_size[1] / x.shape[-1])
            size = (round(x.shape[-2] * s), round(x.shape[-1] * s))
            y = (F.interpolate(x, size=size, mode="bilinear", antialias=True) - mean) / std
            y = F.pad(y, (0, t.input_size[1] - size[1], 0, t.input_size[0] - size[0]))
            return y, (size[0] / t.input_size[0], size[1] / t.input_size[1])
        y = F.interpolate(x, size=tuple(t.input_size), mode="bilinear", antialias=True)
        return (y - mean) / std, (1.0, 1.0)

    def step(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.to(self.device, non_blocking=True).float() / 255
        targets = {}
        with torch.no_grad(), torch.autocast(**self.autocast):
            for name, t in self.teachers.items():
                y, valid = self.teacher_input(x, name, t)
                out = t(y.to(next(t.parameters()).dtype))
                sp = out.spatial
                h, w = sp.shape[-2:]
                # drop the grid cells that only saw SAM's padding
                sp = sp[..., : max(1, math.ceil(h * valid[0] - 1e-6)), : max(1, math.ceil(w * valid[1] - 1e-6))]
                targets[name] = (None if out.summary is None else out.summary.float(), sp.float())
        xs = F.interpolate(x, size=self.resolution, mode="bilinear", antialias=True)
        with torch.autocast(**self.autocast):
            out = self.student(xs)
            b = xs.shape[0]
            gh, gw = out.grid
            total = 0.0
            for name, (t_sum, t_sp) in targets.items():
                spec = self.recipe.teachers[name]
                if name in self.summary_heads and t_sum is not None:
                    p = self.summary_heads[name](out.summary[:, self.slots[name]]).float()
                    total = total + spec.weight * (1 - F.cosine_similarity(p, t_sum, dim=-1)).mean()
                p = self.spatial_heads[name](out.patches).transpose(1, 2).reshape(b, -1, gh, gw).float()
                size = (max(gh, t_sp.shape[-2]), max(gw, t_sp.shape[-1]))
                p = F.interpolate(p, size=size, mode="bilinear") if p.shape[-2:] != size else p
                t = F.interpolate(t_sp, size=size, mode="bilinear") if t_sp.shape[-2:] != size else t_sp
                pc, tc = p.permute(0, 2, 3, 1).flatten(0, 2), t.permute(0, 2, 3, 1).flatten(0, 2)
                cos = (1 - F.cosine_similarity(pc, tc, dim=-1)).mean()
                total = total + spec.weight * (0.9 * cos + 0.1 * F.smooth_l1_loss(pc, tc))
        total.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


# ------------------------------------------------------------------ timing both sides
def framework_steps(trainer: Any, rt: Any, batches: list, start: int) -> float:
    sync(trainer.accelerator.device)
    t = time.perf_counter()
    for i, b in enumerate(batches):
        trainer.train_step([(rt, b)], start + i)
    sync(trainer.accelerator.device)
    return time.perf_counter() - t


def plain_steps(loop: PlainLoop, batches: list) -> float:
    sync(loop.device)
    t = time.perf_counter()
    for b in batches:
        loop.step(b["image"])
    sync(loop.device)
    return time.perf_counter() - t


def median_ci(xs: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return meds[int((1 - level) / 2 * resamples)], meds[int((1 + level) / 2 * resamples) - 1]


def interleave(arm_a: Callable[[int], float], arm_b: Callable[[int], float], *, min_rounds: int = 8,
               max_rounds: int = 40, max_seconds: float = 600.0, halfwidth: float = 0.01) -> dict:
    """Rounds of ``arm_a(round)`` and ``arm_b(round)`` (seconds per step each), the order
    alternating, until the 95% CI of the median per-round ratio a/b is at most +-``halfwidth``
    (after ``min_rounds``), ``max_rounds`` or ``max_seconds``."""
    a: list[float] = []
    b: list[float] = []
    ratios: list[float] = []
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    lo, hi = 0.0, math.inf
    while True:
        r = len(ratios)
        arms = [(a, arm_a), (b, arm_b)]
        for out, fn in (arms if r % 2 == 0 else arms[::-1]):
            out.append(fn(r))
        ratios.append(a[-1] / b[-1])
        if len(ratios) >= 3:
            lo, hi = median_ci(ratios)
        done = len(ratios) >= min_rounds and (hi - lo) / 2 <= halfwidth
        if done or len(ratios) >= max_rounds or time.perf_counter() - t0 > max_seconds:
            break
    return {"a": a, "b": b, "ratios": ratios, "ratio": statistics.median(ratios), "ci": (lo, hi),
            "load": (load_start, os.getloadavg()[0]), "seconds": time.perf_counter() - t0}


def compare(trainer: Any, rt: Any, batches: list, start: int = 1, **rounds: Any) -> dict:
    """Framework vs plain loop on the same ``batches`` each round (``interleave``). Ratio =
    plain s / framework s: above 1 the framework is faster."""
    loop = PlainLoop(trainer, rt)
    framework_steps(trainer, rt, batches[:1], 0)  # warm-up both
    plain_steps(loop, batches[:1])
    n = len(batches)
    res = interleave(lambda r: plain_steps(loop, batches) / n,
                     lambda r: framework_steps(trainer, rt, batches, start + r * n) / n, **rounds)
    batch = batches[0]["image"].shape[0]
    fw, pl = statistics.median(res["b"]), statistics.median(res["a"])
    return {**res, "fw": res["b"], "pl": res["a"], "batch": batch, "framework_s": fw, "plain_s": pl,
            "framework_ips": batch / fw, "plain_ips": batch / pl, "loop": loop}


def verdict(res: dict, target: float = 0.97, margin: float = 0.03) -> str:
    lo, hi = res["ci"]
    width = hi - lo
    stable = width < margin
    if lo >= target:
        judged = f"met (the whole interval is >= {target})"
    elif hi < target:
        judged = f"missed (the whole interval is < {target})"
    else:
        judged = f"unresolved (the interval straddles {target})"
    return (f"framework/plain {res['ratio']:.3f}, 95% CI {lo:.3f}-{hi:.3f} (width {width:.1%}, "
            f"{'<' if stable else '>='} the {margin:.0%} it judges; {len(res['ratios'])} rounds, "
            f"per-round {min(res['ratios']):.3f}-{max(res['ratios']):.3f}); target >= {target}: {judged}")


# ------------------------------------------------------------------ FLOPs and the GEMM peak
GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


class GemmShapes(TorchDispatchMode):
    """Every GEMM call: (op, [(size, stride, dtype) of each tensor arg], other args) -> count."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMMS:
            key = (func, tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args),
                   tuple(sorted((kwargs or {}).items())))
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _gemm_flops(func: Any, shapes: tuple) -> float:
    tensors = [s[0] for s in shapes if isinstance(s, tuple) and len(s) == 3 and isinstance(s[2], torch.dtype)]
    a, b = tensors[-2], tensors[-1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def step_flops_and_gemms(fn: Callable[[], Any]) -> tuple[float, dict]:
    """FLOPs of ``fn`` (the planner's counter) and its GEMM calls."""
    from radio_core.plan.planner import count_flops

    with GemmShapes() as shapes:
        flops = count_flops(fn)
    return flops, shapes.calls


def gemm_peak(calls: dict, device: torch.device, trials: int = 3, min_s: float = 0.02) -> dict:
    """Each GEMM shape replayed alone (random values, same sizes, strides and dtype; best of
    ``trials`` timings of at least ``min_s``): the rate this step's GEMMs reach."""
    total_flops = total_s = 0.0
    for (func, shapes, kwargs), count in calls.items():
        args = []
        for s in shapes:
            if isinstance(s, tuple) and len(s) == 3 and isinstance(s[2], torch.dtype):
                size, stride, dtype = s
                args.append(torch.empty_strided(size, stride, dtype=dtype, device=device).normal_())
            else:
                args.append(s)
        kw = dict(kwargs)
        func(*args, **kw)
        best = math.inf
        for _ in range(trials):
            reps, elapsed = 0, 0.0
            sync(device)
            t = time.perf_counter()
            while elapsed < min_s or reps < 2:
                func(*args, **kw)
                reps += 1
                if reps % 4 == 0 or device.type != "cuda":
                    sync(device)
                    elapsed = time.perf_counter() - t
            sync(device)
            best = min(best, (time.perf_counter() - t) / reps)
        flops = _gemm_flops(func, shapes)
        total_flops += count * flops
        total_s += count * best
    return {"flops": total_flops, "seconds": total_s, "rate": total_flops / max(total_s, 1e-12),
            "shapes": len(calls), "calls": sum(calls.values())}


# ------------------------------------------------------------------ where the time goes
class HostReads(TorchDispatchMode):
    """Floating-point values read on the host (each waits for a GPU): ``.item()``, ``float()``..."""

    def __init__(self) -> None:
        super().__init__()
        self.floats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype.is_floating_point:
            self.floats += 1
        return func(*args, **(kwargs or {}))


def profile_sides(trainer: Any, rt: Any, batches: list, loop: PlainLoop, start: int = 50_000) -> dict:
    """Per step, on the same batches: each side's self CPU time, op counts, and float host reads."""
    from torch.profiler import ProfilerActivity, profile

    def run(fn: Callable[[], Any]) -> dict:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.accelerator.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
        return {e.key: (e.count / len(batches), e.self_cpu_time_total / len(batches) / 1e3) for e in prof.key_averages()}

    fw = run(lambda: framework_steps(trainer, rt, batches, start))
    pl = run(lambda: plain_steps(loop, batches))
    reads = {}
    for name, fn in (("framework", lambda: framework_steps(trainer, rt, batches, start + len(batches))),
                     ("plain", lambda: plain_steps(loop, batches))):
        with HostReads() as mode:
            fn()
        reads[name] = mode.floats / len(batches)
    return {"framework": fw, "plain": pl, "host_reads": reads}


def print_profile(p: dict, top: int = 15) -> None:
    fw, pl = p["framework"], p["plain"]
    total = lambda d: sum(ms for _, ms in d.values())  # noqa: E731
    print(f"\nprofile per step (torch.profiler, self CPU ms; the same batches on both sides): framework "
          f"{total(fw):.1f} ms, plain {total(pl):.1f} ms; float host reads per step: framework "
          f"{p['host_reads']['framework']:.1f}, plain {p['host_reads']['plain']:.1f}")
    extra = [(k, fw.get(k, (0, 0))[0] - pl.get(k, (0, 0))[0], fw.get(k, (0, 0))[1] - pl.get(k, (0, 0))[1])
             for k in set(fw) | set(pl)]
    print(f"  {'op':58} {'calls +/-':>9} {'ms +/-':>8}   (framework minus plain, per step)")
    for k, dn, dms in sorted(extra, key=lambda r: -abs(r[2]))[:top]:
        print(f"  {k[:58]:58} {dn:+9.1f} {dms:+8.2f}")
    only = sorted((k for k, dn, _ in extra if dn > 0 and pl.get(k, (0, 0))[0] == 0), key=lambda k: -fw[k][1])
    print("  ops only the framework runs: " + (", ".join(f"{k} x{fw[k][0]:.0f}" for k in only) or "none"))

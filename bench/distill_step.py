"""Distillation step benchmark: this framework's trainer vs a hand-written plain PyTorch loop.

Both sides use identical models (the framework builds them; the plain loop gets deep copies of
the student and heads, and the same frozen teachers), identical batches and identical losses;
their steps are interleaved in one process so machine noise hits both alike. Prints images/s of
both, their ratio, the step's FLOPs (FlopCounterMode) against this machine's matmul peak
measured in the same run (MFU), and the teacher-feature cache speed-up in a realistic
configuration (ViT-S/16 student, CLIP ViT-L/14 + DINOv2-L + SAM-B@1024 teachers, random init):
the FLOP-ratio bound, cached vs student-only vs online steps, bytes per image per view, and a
PCA-compressed cache with its fidelity cost. Every timing is a median over interleaved rounds
with min/max, next to the machine's load average. Exits 1 when the framework is below 0.9x the
plain loop.

    python bench/distill_step.py [--rounds 5] [--steps 4] [--quick] [--levers] [--cache realistic|small|off]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def measured_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an n x n GEMM in ``dtype``: the achievable matmul peak here."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        (a @ b).sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlainLoop:
    """The same step written directly against torch, without the framework."""

    def __init__(self, trainer) -> None:
        d = trainer.unwrapped
        self.student = copy.deepcopy(d.student)
        self.summary_heads = copy.deepcopy(d.summary_heads)
        self.spatial_heads = copy.deepcopy(d.spatial_heads)
        self.slots = dict(d.summary_slots)
        self.teachers = trainer.teachers  # frozen, shared
        self.recipe = trainer.recipe
        params = [*self.student.parameters(), *self.summary_heads.parameters(), *self.spatial_heads.parameters()]
        o = trainer.recipe.optim
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.device = trainer.accelerator.device
        self.resolution = tuple(trainer.recipe.student.resolution[0])

    def teacher_input(self, x, t):
        mean = torch.tensor(t.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(t.std, device=x.device).view(1, 3, 1, 1)
        if t.resize_mode == "longest_side_pad":
            s = min(t.input_size[0] / x.shape[-2], t.input_size[1] / x.shape[-1])
            size = (round(x.shape[-2] * s), round(x.shape[-1] * s))
            y = (F.interpolate(x, size=size, mode="bilinear", antialias=True) - mean) / std
            y = F.pad(y, (0, t.input_size[1] - size[1], 0, t.input_size[0] - size[0]))
            return y, (size[0] / t.input_size[0], size[1] / t.input_size[1])
        y = F.interpolate(x, size=tuple(t.input_size), mode="bilinear", antialias=True)
        return (y - mean) / std, (1.0, 1.0)

    def step(self, images_u8: torch.Tensor) -> float:
        x = images_u8.to(self.device).float() / 255
        targets = {}
        with torch.no_grad():
            for name, t in self.teachers.items():
                y, valid = self.teacher_input(x, t)
                out = t(y)
                sp = out.spatial
                h, w = sp.shape[-2:]
                # drop the grid cells that only saw SAM's padding
                sp = sp[..., : max(1, math.ceil(h * valid[0] - 1e-6)), : max(1, math.ceil(w * valid[1] - 1e-6))]
                targets[name] = (out.summary, sp)
        xs = F.interpolate(x, size=self.resolution, mode="bilinear", antialias=True)
        out = self.student(xs)
        b = xs.shape[0]
        gh, gw = out.grid
        total = 0.0
        for name, (t_sum, t_sp) in targets.items():
            spec = self.recipe.teachers[name]
            if name in self.summary_heads and t_sum is not None:
                p = self.summary_heads[name](out.summary[:, self.slots[name]])
                total = total + spec.weight * (1 - F.cosine_similarity(p, t_sum, dim=-1)).mean()
            p = self.spatial_heads[name](out.patches).transpose(1, 2).reshape(b, -1, gh, gw)
            size = (max(gh, t_sp.shape[-2]), max(gw, t_sp.shape[-1]))
            p = F.interpolate(p, size=size, mode="bilinear") if p.shape[-2:] != size else p
            t = F.interpolate(t_sp, size=size, mode="bilinear") if t_sp.shape[-2:] != size else t_sp
            pc, tc = p.permute(0, 2, 3, 1).flatten(0, 2), t.permute(0, 2, 3, 1).flatten(0, 2)
            cos = (1 - F.cosine_similarity(pc, tc, dim=-1)).mean()
            total = total + spec.weight * (0.9 * cos + 0.1 * F.smooth_l1_loss(pc, tc))
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def build_trainer(recipe_path: str, overrides: list[str], out: str):
    from radio_core.recipe import load_recipe
    from radio_core.train.loop import Trainer

    recipe = load_recipe(recipe_path, overrides + [f"output_dir={out}", "logging.progress=false"])
    return Trainer(recipe)


def framework_steps(trainer, rt, batches, start: int) -> float:
    _sync(trainer.accelerator.device)
    t = time.perf_counter()
    for i, b in enumerate(batches):
        trainer.train_step([(rt, b)], start + i)
    _sync(trainer.accelerator.device)
    return time.perf_counter() - t


def plain_steps(loop: PlainLoop, batches) -> float:
    _sync(loop.device)
    t = time.perf_counter()
    for b in batches:
        loop.step(b["image"])
    _sync(loop.device)
    return time.perf_counter() - t


def step_flops(trainer, rt, batch) -> float:
    from radio_core.plan.planner import count_flops

    return count_flops(lambda: trainer.train_step([(rt, batch)], 10_000))


def make_batches(trainer, n: int) -> tuple:
    """The trainer's own slot runtime for stage 0 and ``n`` batches drawn from it."""
    rt = trainer.enter_stage(trainer.plans[0], 0)[0]
    return rt, [next(rt.iterator) for _ in range(n)]


def compare(recipe: str, overrides: list[str], steps: int, rounds: int, tmp: str, label: str = "") -> dict:
    trainer = build_trainer(recipe, overrides, f"{tmp}/fw")
    rt, batches = make_batches(trainer, steps)
    loop = PlainLoop(trainer)
    batch = batches[0]["image"].shape[0]
    framework_steps(trainer, rt, batches[:1], 0)  # warm-up both
    plain_steps(loop, batches[:1])
    fw, pl = [], []
    for r in range(rounds):
        order = [("fw", lambda: framework_steps(trainer, rt, batches, 1 + r * steps)), ("pl", lambda: plain_steps(loop, batches))]
        if r % 2:
            order.reverse()
        for name, fn in order:
            (fw if name == "fw" else pl).append(fn() / steps)
    fw_t, pl_t = statistics.median(fw), statistics.median(pl)
    ratios = [p / f for f, p in zip(fw, pl)]  # per round: the two arms ran back to back
    return {"label": label, "trainer": trainer, "batch": batch, "framework_s": fw_t, "plain_s": pl_t,
            "framework_ips": batch / fw_t, "plain_ips": batch / pl_t, "ratio": statistics.median(ratios),
            "ratios": ratios, "fw": fw, "pl": pl, "batches": batches, "rt": rt}


def _spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def _load() -> str:
    return "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _resident(batch: dict) -> dict:
    """The batch with its cached targets already fp32 in memory: what a student-only step sees."""
    out = dict(batch)
    out["targets"] = {n: (None if s is None else s.float().clone(), sp.float().clone())
                      for n, (s, sp) in batch["targets"].items()}
    return out


def cache_realistic(recipe: str, overrides: list[str], steps: int, rounds: int, online_steps: int, tmp: str,
                    pca: dict[str, int]) -> dict:
    """Realistic cache configuration (``recipes/bench_cache_realistic.yaml``): a ViT-S/16 student,
    CLIP ViT-L/14 + DINOv2-L + SAM-B@1024 teachers. Measures, interleaved over ``rounds``:
    a cached step (next batch from the loader, targets read from the fp16 cache, then the
    training step), the same with the PCA-compressed cache, and a student-only step (targets
    already fp32 in memory, batch already loaded: the floor). Online steps (teachers run) are
    measured ``online_steps`` times: each costs the teachers' forward."""
    from radio_core.data.cache import FeatureCache, build_cache, compress_cache
    from radio_core.models.teachers import build_teacher
    from radio_core.plan.planner import count_flops, teacher_cost
    from radio_core.recipe import load_recipe
    from radio_core.registry import get_registry

    reg = get_registry()
    r = load_recipe(recipe, overrides)
    teacher_flops = {n: teacher_cost(build_teacher(r, n, reg, meta=True)).flops_per_image for n in r.teachers}
    t = time.perf_counter()
    fp16 = build_cache(r, reg, f"{tmp}/cache", r.augment.views, batch_size=r.data.batch_size, progress=False)
    build_s = time.perf_counter() - t
    fit = max(1, r.data.source.args.get("size", 2) * r.augment.views // 2)
    pca_path = compress_cache(fp16, f"{tmp}/cache_pca", pca, fit_entries=fit)
    arms = {}
    for name, path in (("cached", fp16), ("cached_pca", pca_path)):
        tr = build_trainer(recipe, overrides + [f"cache.path={path}"], f"{tmp}/{name}")
        rt = tr.enter_stage(tr.plans[0], 0)[0]
        arms[name] = (tr, rt)
    tr, rt = arms["cached"]
    resident = _resident(next(rt.iterator))
    batch = resident["image"].shape[0]
    student_flops = count_flops(lambda: tr.train_step([(rt, resident)], 10_000)) / batch

    def loader_steps(name: str) -> float:
        trainer, runtime = arms[name]
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.train_step([(runtime, next(runtime.iterator))], i)
        return (time.perf_counter() - t0) / steps

    def student_only() -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            tr.train_step([(rt, resident)], i)
        return (time.perf_counter() - t0) / steps

    fns = {"cached": lambda: loader_steps("cached"), "cached_pca": lambda: loader_steps("cached_pca"),
           "student_only": student_only}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(rounds):
        order = list(fns) if rnd % 2 == 0 else list(fns)[::-1]
        for k in order:
            times[k].append(fns[k]())
    ratio = [c / s for c, s in zip(times["cached"], times["student_only"])]
    ratio_pca = [c / s for c, s in zip(times["cached_pca"], times["student_only"])]
    load_cached = _load()
    del arms, tr, rt
    online_tr = build_trainer(recipe, overrides, f"{tmp}/online")
    ort = online_tr.enter_stage(online_tr.plans[0], 0)[0]
    online = []
    for i in range(online_steps):
        t0 = time.perf_counter()
        online_tr.train_step([(ort, next(ort.iterator))], i)
        online.append(time.perf_counter() - t0)
    fc, fcp = FeatureCache(fp16), FeatureCache(pca_path)
    t_total = sum(teacher_flops.values())
    return {"teacher_gflop": {n: f / 1e9 for n, f in teacher_flops.items()}, "student_gflop": student_flops / 1e9,
            "bound": (t_total + student_flops) / student_flops, "batch": batch, "build_s": build_s,
            "entries": fc.index["entries"], "bytes": fc.bytes_per_entry(), "bytes_pca": fcp.bytes_per_entry(),
            "fidelity": fcp.index["fidelity"], "times": times, "ratio": ratio, "ratio_pca": ratio_pca,
            "online": online, "load_cached": load_cached, "load_online": _load(),
            "speedup": statistics.median(online) / statistics.median(times["cached"]),
            "speedup_pca": statistics.median(online) / statistics.median(times["cached_pca"])}


def print_cache(c: dict) -> None:
    kib = lambda b: f"{b / 1024:.0f} KiB"  # noqa: E731
    print(f"\nteacher-feature cache, realistic: ViT-S/16 student @224, batch {c['batch']}; teachers "
          + ", ".join(f"{n} {g:.0f}" for n, g in c["teacher_gflop"].items())
          + f" GFLOP/img forward; student step {c['student_gflop']:.1f} GFLOP/img (fwd+bwd+heads+losses)")
    print(f"  FLOP-ratio bound on the speed-up (teachers + student) / student: {c['bound']:.1f}x")
    print(f"  bytes per image per view: fp16 {kib(sum(c['bytes'].values()))} ("
          + ", ".join(f"{n} {kib(b)}" for n, b in c["bytes"].items()) + f"); PCA {kib(sum(c['bytes_pca'].values()))}")
    for n, f in c["fidelity"].items():
        where = "held-out" if f["held_out"] else "in-sample"
        print(f"  PCA {n}: {f['compression']}x smaller spatial, {where} mean cosine {f['mean_cosine']:.4f}, "
              f"relative L2 {f['relative_l2']:.4f} (basis fitted on {f['fit_entries']} entries)")
    t = c["times"]
    print(f"  s/step student-only {_spread(t['student_only'])}")
    print(f"  s/step cached       {_spread(t['cached'])}")
    print(f"  s/step cached (PCA) {_spread(t['cached_pca'])}   [{c['load_cached']}]")
    print(f"  s/step online       {_spread(c['online'])}   [{c['load_online']}]")
    print(f"  cached / student-only step: {_spread(c['ratio'])} (target <= 1.15)")
    print(f"  cached (PCA) / student-only: {_spread(c['ratio_pca'])}")
    print(f"  speed-up online -> cached: {c['speedup']:.1f}x (PCA cache {c['speedup_pca']:.1f}x; bound {c['bound']:.1f}x; "
          f"cache of {c['entries']} crops built in {c['build_s']:.0f} s)")


def cache_speedup(recipe: str, overrides: list[str], steps: int, tmp: str, views: int = 2) -> dict:
    """Small configuration (the bench recipe's teachers, as small as the student): online vs
    cached, same crops (fixed views)."""
    from radio_core.data.cache import build_cache
    from radio_core.recipe import load_recipe
    from radio_core.registry import get_registry

    base = overrides + [f"augment.views={views}"]
    r = load_recipe(recipe, base)
    n_images = len(get_registry().build("dataset", r.data.source.name, **r.data.source.args))
    t = time.perf_counter()
    build_cache(r, get_registry(), f"{tmp}/cache", views, batch_size=r.data.batch_size, progress=False)
    build_s = time.perf_counter() - t
    times = {}
    for name, extra in (("online", []), ("cached", [f"cache.path={tmp}/cache"])):
        tr = build_trainer(recipe, base + extra, f"{tmp}/{name}")
        rt, b = make_batches(tr, steps + 1)
        framework_steps(tr, rt, b[:1], 0)
        times[name] = framework_steps(tr, rt, b[1:], 1) / steps
    return {"online_s": times["online"], "cached_s": times["cached"], "speedup": times["online"] / times["cached"],
            "build_s": build_s, "entries": n_images * views}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "bench_distill_step.yaml"))
    p.add_argument("--steps", type=int, default=4, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median, min, max reported)")
    p.add_argument("--quick", action="store_true", help="batch 4, 2 steps per round: a smoke run")
    p.add_argument("--levers", action="store_true", help="also measure each performance lever's effect")
    p.add_argument("--cache", choices=["realistic", "small", "off"], default="realistic",
                   help="teacher-feature cache measurement: big teachers (default, minutes on a CPU), the "
                        "bench recipe's small teachers, or none")
    p.add_argument("--cache-recipe", default=str(REPO / "recipes" / "bench_cache_realistic.yaml"))
    p.add_argument("--online-steps", type=int, default=2, help="online steps timed in the realistic cache run")
    p.add_argument("--pca", default="clip=128,dino=128,sam=32", help="PCA dims per teacher of the compressed cache")
    p.add_argument("--skip-framework", action="store_true", help="only the cache measurement")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["data.batch_size=4"]
        args.steps = 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        overrides += ["train.mixed_precision=bf16"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pca = {k: int(v) for k, v in (kv.split("=") for kv in args.pca.split(","))}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_framework:
            main_cmp = compare(args.recipe, overrides, args.steps, args.rounds, tmp, "default")
            tr = main_cmp["trainer"]
            flops = step_flops(tr, main_cmp["rt"], main_cmp["batches"][0])
            peak = measured_peak_flops(dtype, device)
            achieved = flops / main_cmp["framework_s"]
            print(f"device {device}, dtype {dtype}, batch {main_cmp['batch']}, steps {args.steps} x {args.rounds} "
                  f"interleaved rounds; {_load()}")
            print(f"{'':28} {'images/s':>10} {'s/step':>8}")
            print(f"{'framework (radio_core)':28} {main_cmp['framework_ips']:>10.2f} {main_cmp['framework_s']:>8.3f}")
            print(f"{'plain PyTorch loop':28} {main_cmp['plain_ips']:>10.2f} {main_cmp['plain_s']:>8.3f}")
            print(f"ratio framework/plain (per round): {_spread(main_cmp['ratios'])}")
            print(f"step FLOPs {flops / 1e9:.1f} GFLOP; achieved {achieved / 1e9:.1f} GFLOP/s; "
                  f"measured {dtype} GEMM peak {peak / 1e9:.1f} GFLOP/s; MFU {achieved / peak:.1%}")
        if args.cache == "small":
            cache = cache_speedup(args.recipe, overrides, args.steps, tmp)
            print(f"teacher-feature cache (small teachers): online {cache['online_s']:.3f} s/step, cached "
                  f"{cache['cached_s']:.3f} s/step, speed-up {cache['speedup']:.2f}x "
                  f"(cache of {cache['entries']} crops built in {cache['build_s']:.1f} s)")
        elif args.cache == "realistic":
            cache_overrides = [o for o in args.overrides if not o.startswith("data.batch_size")]
            if device.type == "cuda":
                cache_overrides += ["train.mixed_precision=bf16"]
            print_cache(cache_realistic(args.cache_recipe, cache_overrides, max(2, args.steps // 2), args.rounds,
                                        args.online_steps, f"{tmp}/realistic", pca))
        if args.levers and not args.skip_framework:
            print("\nlevers (framework images/s, each against the default in the same run):")
            levers = [("fused AdamW", ["optim.fused=true"]),
                      ("no per-step host sync (skip_nonfinite=false)", ["train.skip_nonfinite=false"]),
                      ("torch.compile student", ["train.compile=true"])]
            for name, extra in levers:
                try:
                    res = compare(args.recipe, overrides + extra, args.steps, args.rounds, tmp, name)
                    base = res["plain_ips"]
                    print(f"  {name:48} {res['framework_ips']:8.2f} img/s  ({res['framework_ips'] / base:.3f}x plain loop)")
                except Exception as exc:  # noqa: BLE001 - a lever that can't run here is reported, not fatal
                    print(f"  {name:48} failed: {type(exc).__name__}: {str(exc)[:120]}")
        if not args.skip_framework and main_cmp["ratio"] < 0.9:
            print(f"FAIL: framework at {main_cmp['ratio']:.3f}x the plain loop (< 0.9x)")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

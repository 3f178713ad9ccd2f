"""Student throughput: images/s of ViT-B/16-CPE (global and ViTDet mode), the official E-RADIO (its
published window, and the window the official code picks for the input size), E-RADIO lite B and S
(this project's re-design) and a CLIP ViT-L/14 image tower.

    python bench/student_throughput.py                 # 224, 512 and 1024 px, batch 8, 10 timed rounds
    python bench/student_throughput.py --quick         # batch 1, 3 rounds: a CPU smoke run
    python bench/student_throughput.py --resolution 512 --batch 32 --device cuda
    python bench/student_throughput.py --models E-RADIO "E-RADIO-lite-B" ViT-B/16-CPE   # a subset
    python bench/student_throughput.py --resolution 64 128 --batch 32 --models "proxy ViT" "proxy E-RADIO" "proxy E-RADIO official"

Forward only, fp32, random weights (nothing is downloaded: the CLIP tower is
``open_clip.create_model("ViT-L-14", pretrained=None).visual``), all models at the same input
resolution. Rounds are interleaved (round r times every model once) so that machine-load drift
hits every model alike; the table gives the median time per batch, images/s, and ratios
against the CLIP ViT-L tower (the teacher a student replaces) and against ViT-B-CPE. GFLOP per
image are counted on the meta device (math attention, so attention is included).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ClipTower(nn.Module):
    """open_clip ViT-L-14 image tower taking [0, 1] images (normalisation included, like the students)."""

    def __init__(self, resolution: int, device: str = "cpu") -> None:
        super().__init__()
        import logging

        import open_clip

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": intended here
        try:
            model = open_clip.create_model("ViT-L-14", pretrained=None, force_image_size=resolution, device=device)
        finally:
            logging.getLogger().setLevel(level)
        self.visual = model.visual
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1))

    def forward(self, images):
        return self.visual((images - self.mean) / self.std)


NAMES = ("ViT-B/16-CPE", "ViT-B/16-CPE ViTDet", "E-RADIO", "E-RADIO fit-window", "E-RADIO-lite-B", "E-RADIO-lite-S",
         "CLIP ViT-L/14", "proxy ViT", "proxy E-RADIO", "proxy E-RADIO official")
#: the proxy benchmark's arm of each proxy student (recipes/proxy/ablations.yaml; its arm 'eradio'
#: is E-RADIO lite)
PROXY_ARMS = {"proxy ViT": "baseline", "proxy E-RADIO": "eradio", "proxy E-RADIO official": "eradio_official"}
REPO = Path(__file__).resolve().parents[1]


def proxy_student(arm: str) -> tuple[str, dict]:
    """The proxy benchmark's student (recipes/proxy/base.yaml) as an ablation arm changes it."""
    import yaml

    from radio_core.recipe import deep_merge, load_raw

    student = load_raw(REPO / "recipes/proxy/base.yaml")["student"]
    spec = yaml.safe_load((REPO / "recipes/proxy/ablations.yaml").read_text())
    student = deep_merge(student, (spec["arms"][arm] or {}).get("student", {}))
    return student["name"], student.get("args", {})


def build(name: str, resolution: int, device: str = "cpu") -> nn.Module:
    from radio_core.registry import get_registry

    registry = get_registry()
    if name == "ViT-B/16-CPE":
        return registry.build("student", "vit", model="vit_base_patch16_224", num_cls_tokens=3)
    if name == "ViT-B/16-CPE ViTDet":  # the same network in ViTDet mode: 16x16-token windows, blocks 3/6/9/12 global
        return registry.build("student", "vit", model="vit_base_patch16_224", num_cls_tokens=3, window_size=16)
    if name == "E-RADIO":  # the official architecture and window (16 tokens, 32 on the 2x branch)
        return registry.build("student", "eradio", model="eradio_large_fullres_ws16", num_cls_tokens=3)
    if name == "E-RADIO fit-window":  # the window the official set_optimal_window_size picks for the input
        student = registry.build("student", "eradio", model="eradio_large_fullres_ws16", num_cls_tokens=3)
        student.set_window_size(student.optimal_window_size(resolution))
        return student
    if name.startswith("E-RADIO-lite-"):
        return registry.build("student", "eradio_lite", variant=name[-1].lower(), num_cls_tokens=3)
    if name == "CLIP ViT-L/14":
        return ClipTower(resolution, device)
    if name.startswith("proxy "):
        plugin, args = proxy_student(PROXY_ARMS[name])
        return registry.build("student", plugin, **args)
    raise ValueError(name)


def gflops(name: str, resolution: int) -> float:
    from radio_core.plan.planner import count_flops

    with torch.device("meta"):
        model = build(name, resolution, device="meta").eval()
        x = torch.rand(1, 3, resolution, resolution)
    with torch.no_grad():
        return count_flops(lambda: model(x)) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[224, 512, 1024],
                   help="input edge(s) in px, the same for every model at each (multiples of 32)")
    p.add_argument("--models", nargs="+", default=list(NAMES[:7]), choices=list(NAMES),
                   help="default: all but the proxy benchmark's small students")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for E-RADIO's convs")
    p.add_argument("--quick", action="store_true", help="batch 1, 3 rounds, 1 warm-up (CPU smoke run)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.rounds, a.warmup = 1, 3, 1
    if any(r % 32 for r in a.resolution):
        p.error("--resolution must be multiples of 32 (E-RADIO's input multiple)")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    out = {}
    for res in a.resolution:
        # ViTDet's 16x16-token windows need a grid of whole windows (256-px multiples)
        names = [n for n in NAMES if n in a.models and not (n.endswith("ViTDet") and res % 256)]
        out[res] = run_at(res, a, device, names)
    return out


def run_at(resolution: int, a: argparse.Namespace, device: torch.device, names: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    models, flops = {}, {}
    for name in names:
        t = time.perf_counter()
        model = build(name, resolution).to(device).eval()
        if a.channels_last and name.startswith("E-RADIO"):
            model = model.to(memory_format=torch.channels_last)
        models[name] = model
        flops[name] = gflops(name, resolution)
        params = sum(q.numel() for q in model.parameters()) / 1e6
        print(f"built {name:<19} {params:7.2f}M params  {flops[name]:7.3f} GFLOP/img  ({time.perf_counter() - t:.1f}s)",
              flush=True)
    x = torch.rand(a.batch, 3, resolution, resolution, device=device)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(a.warmup + a.rounds):
            for name in names:
                inp = x.to(memory_format=torch.channels_last) if a.channels_last and name.startswith("E-RADIO") else x
                sync(device)
                t = time.perf_counter()
                models[name](inp)
                sync(device)
                if r >= a.warmup:
                    times[name].append(time.perf_counter() - t)
    ips = {n: a.batch / statistics.median(times[n]) for n in names}
    clip, vitb = ips.get("CLIP ViT-L/14"), ips.get("ViT-B/16-CPE")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{resolution}x{resolution}, batch {a.batch}, fp32 forward, {device.type}, "
          f"{torch.get_num_threads()} threads, median (min-max) of {a.rounds} interleaved rounds; load avg {load}")
    # "bound": the speed-up FLOPs alone would give (reference GFLOP / this model's); a measured
    # ratio near it means the model runs at the reference's efficiency
    print(f"{'model':<19} {'GFLOP/img':>9} {'ms/batch (min-max)':>24} {'images/s':>9} {'vs CLIP-L':>9} {'(bound)':>8} "
          f"{'vs ViT-B':>9} {'(bound)':>8}")
    for n in names:
        ms = [1000 * t for t in times[n]]
        rel_clip = (f"{ips[n] / clip:>8.2f}x {flops['CLIP ViT-L/14'] / flops[n]:>7.2f}x" if clip
                    else f"{'-':>9} {'-':>8}")
        rel_vitb = (f"{ips[n] / vitb:>8.2f}x {flops['ViT-B/16-CPE'] / flops[n]:>7.2f}x" if vitb
                    else f"{'-':>9} {'-':>8}")
        gf = f"{flops[n]:>9.1f}" if flops[n] >= 10 else f"{flops[n]:>9.3f}"
        print(f"{n:<19} {gf} {statistics.median(ms):>9.1f} ({min(ms):.0f}-{max(ms):.0f}){'':>3} "
              f"{ips[n]:>9.2f} {rel_clip} {rel_vitb}")
    if "proxy ViT" in ips and "proxy E-RADIO" in ips:
        print(f"proxy E-RADIO vs proxy ViT: {ips['proxy E-RADIO'] / ips['proxy ViT']:.2f}x images/s "
              f"(FLOP bound {flops['proxy ViT'] / flops['proxy E-RADIO']:.2f}x)")
    return ips


if __name__ == "__main__":
    main()

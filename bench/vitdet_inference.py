"""ViTDet mode at inference: speed and feature agreement of windowed vs global attention.

    python bench/vitdet_inference.py --quick                        # ViT-S, 512 px, CPU smoke run
    python bench/vitdet_inference.py --resolutions 512 1024 2048 --device cuda
    python bench/vitdet_inference.py --model runs/x/export --windows 8 16

C-RADIOv4 brings back RADIO's ViTDet option: at high resolution most blocks attend within
windows of ``ws x ws`` tokens (a global block every ``global_every``, the last one global), so
attention cost grows linearly instead of quadratically with the token count. For each
resolution the same model runs in global mode and in each windowed mode, rounds interleaved;
the table gives median ms/batch, the speed-up over global, GFLOP per image (meta device, math
attention), and the mean cosine similarity between the windowed and the global backbone
features and summaries: how much the windowed mode changes what a trained student outputs
(with the default random weights this is only a smoke number; pass ``--model`` an export of a
student trained with ``window_sizes`` for the real trade-off).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(model: str | None, preset: str, device: torch.device):
    """A RadioModel: an export directory, or a random ViT student of ``preset`` size."""
    from radio_core.model import RadioModel
    from radio_core.registry import get_registry

    if model:
        return RadioModel.load(model, device=device)
    from radio_core.models.distiller import Distiller

    student = get_registry().build("student", "vit", model=preset, num_cls_tokens=2)
    return RadioModel(Distiller(student, [], {}, {}, {})).to(device).eval()


def gflops(radio, resolution: int) -> float:
    from radio_core.plan.planner import count_flops

    x = torch.rand(1, 3, resolution, resolution, device=next(radio.parameters()).device)
    with torch.no_grad():
        return count_flops(lambda: radio(x)) / 1e9


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an export directory or official RADIO checkpoint (default: random ViT)")
    p.add_argument("--preset", default="vit_base_patch16_224", help="random student size when --model is not given")
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--windows", type=int, nargs="+", default=[16], help="window sizes in tokens per side")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="ViT-S, 512 px, window 8, batch 1, 2 rounds")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.resolutions, a.windows, a.batch, a.rounds = "vit_small_patch16_224", [512], [8], 1, 2
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(0)
    radio = load(a.model, a.preset, device)
    modes = [None] + list(a.windows)
    rows = []
    for res in a.resolutions:
        if any(res % (radio.patch_size * w) for w in a.windows):
            print(f"skip {res}: not a multiple of patch x every window ({a.windows})")
            continue
        x = torch.rand(a.batch, 3, res, res, device=device)
        times: dict = {m: [] for m in modes}
        outs, flops = {}, {}
        with torch.inference_mode():
            for r in range(a.warmup + a.rounds):
                for m in modes:
                    radio.set_window_size(m)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t = time.perf_counter()
                    out = radio(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if r >= a.warmup:
                        times[m].append(time.perf_counter() - t)
                    outs[m] = out
        for m in modes:
            radio.set_window_size(m)
            flops[m] = gflops(radio, res)
        radio.set_window_size(None)
        base = statistics.median(times[None])
        for m in modes:
            ms = statistics.median(times[m])
            spatial = F.cosine_similarity(outs[m].spatial, outs[None].spatial, dim=1).mean().item()
            summary = F.cosine_similarity(outs[m].summary, outs[None].summary, dim=-1).mean().item()
            rows.append(dict(resolution=res, window=m, ms=1000 * ms, speedup=base / ms, gflop=flops[m],
                             cos_spatial=spatial, cos_summary=summary))
    print(f"\n{a.model or a.preset}, batch {a.batch}, fp32 forward, {device.type}, {torch.get_num_threads()} threads, "
          f"median of {a.rounds} interleaved rounds")
    print(f"{'res':>5} {'window':>7} {'GFLOP/img':>9} {'ms/batch':>9} {'speed-up':>8} {'cos spatial':>11} "
          f"{'cos summary':>11}")
    for r in rows:
        print(f"{r['resolution']:>5} {str(r['window'] or 'global'):>7} {r['gflop']:>9.1f} {r['ms']:>9.1f} "
              f"{r['speedup']:>7.2f}x {r['cos_spatial']:>11.4f} {r['cos_summary']:>11.4f}")
    return rows


if __name__ == "__main__":
    main()

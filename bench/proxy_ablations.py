"""The proxy benchmark's ablation suite: one command, resumable, seeds, 95% confidence intervals.

    nice -n 10 python bench/proxy_ablations.py recipes/proxy/ablations.yaml [--jobs 2] [--seeds 0 1 2]
        [--arms baseline loss_mse ...] [--smoke] [--dry-run] [--output-dir DIR] [--docs FILE]

For every seed (outer loop, so a suite stopped early still has whole seeds) and every arm: one
training run (``python -m radio_core.run``, its own process and directory, ``--resume`` when a
checkpoint is there) and one downstream evaluation (``radio_proxy.downstream``); ``results.json``
in the run directory marks it done, so a relaunch skips it. Then one table: per arm and metric
the mean over seeds ± the half-width of a 95% t-interval, and per comparison the paired
differences (same seed = same initialisation and data order) with their intervals and a verdict:
*reproduced* (every difference resolved in the paper's direction; for ``not_worse`` claims: every
interval's lower end above -margin), *not reproduced* (some difference resolved against it), or
*inconclusive*. With one seed no interval exists: every verdict is inconclusive.

``--smoke`` checks the pipeline, not the findings: a 64-image world, few-step tiny teachers and
students, 32 evaluation images, seed 0.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from radio_core.recipe import deep_merge, load_raw, validate

SMOKE_WORLD = {"train": 64, "val": 32, "test": 32}
SMOKE = ["train.steps=4", "checkpoint.every=2", "train.log_every=2", "schedule.warmup_steps=1"]


def mean_ci(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and the half-width of its 95% t-interval (None for fewer than two values), by the
    sweep package's statistics."""
    from radio_core.sweep.stats import mean_ci as interval

    iv = interval(list(values))
    return iv.mean, iv.half


# --------------------------------------------------------------------------- spec


def load_spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    for key in ("recipe", "arms"):
        if key not in spec:
            raise SystemExit(f"{path}: missing key {key!r}")
    known = {"recipe", "output_dir", "seeds", "eval", "teacher_scores", "arms", "comparisons", "overrides"}
    unknown = set(spec) - known
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(known))})")
    for c in spec.get("comparisons", []):
        for arm in [c.get("arm"), *c.get("versus", []), *[p[0] for p in c.get("pairs", [])],
                    *[p[1] for p in c.get("pairs", [])]]:
            if arm is not None and arm not in spec["arms"]:
                raise SystemExit(f"{path}: comparison {c['name']!r} names arm {arm!r}, not under arms")
    return spec


def arm_recipe(spec: dict, spec_path: Path, arm: str, seed: int, run_dir: Path, smoke: bool) -> dict:
    """The full recipe mapping of one (arm, seed) run."""
    data = deep_merge(load_raw(spec_path.parent / spec["recipe"]), spec["arms"][arm] or {})
    from radio_core.recipe import apply_overrides

    overrides = list(spec.get("overrides", [])) + [f"train.seed={seed}", f"output_dir={run_dir}"]
    if smoke:  # after the file's overrides: the smoke settings win
        overrides += SMOKE
        data = deep_merge(data, {"data": {"source": {"args": {"world": SMOKE_WORLD}}, "batch_size": 4}})
        for name in data["teachers"]:
            data["teachers"][name].setdefault("args", {}).update(preset="tiny", world=SMOKE_WORLD)
        for group in (data.get("groups") or {}).values():
            group["batch_size"] = 4
    data = apply_overrides(data, overrides, source=f"arm {arm}")
    validate(data, origin=f"{spec_path} arm {arm}")  # fail before launching anything
    return data


# --------------------------------------------------------------------------- running


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def eval_windows(spec: dict) -> list[tuple[int, int]]:
    """The spec's ``eval.windows``: ``[[resolution, window], ...]`` scored in ViTDet mode."""
    return [(int(r), int(w)) for r, w in spec.get("eval", {}).get("windows", [])]


def complete_scores(run_dir: Path, result: dict, resolutions: Sequence[int], windows: Sequence[tuple[int, int]],
                    smoke: bool, probe_images: Optional[int]) -> dict:
    """A finished run's result with the evaluations it lacks added (the spec gained a resolution
    or a window after it ran): only the missing ones run, and results.json is rewritten."""
    from radio_proxy.downstream import evaluate_run

    tried = set(result.get("meta", {}).get("evaluated", result["scores"]))
    missing_res = [r for r in resolutions if f"student@{r}" not in tried]
    missing_win = [(r, w) for r, w in windows if f"student@{r}w{w}" not in tried]
    if not (missing_res or missing_win):
        return result
    scores = evaluate_run(run_dir, missing_res, limit=32 if smoke else None,
                          probe_images=None if smoke else probe_images, windows=missing_win)
    meta = scores.pop("_meta")
    result["scores"].update(scores)
    result["meta"].setdefault("images_per_s", {}).update(meta["images_per_s"])
    result["meta"]["evaluated"] = sorted(tried | {f"student@{r}" for r in missing_res}
                                         | {f"student@{r}w{w}" for r, w in missing_win})
    write_json(run_dir / "results.json", result)
    return result


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_one(spec: dict, spec_path: Path, arm: str, seed: int, out: Path, smoke: bool, score_teachers: bool,
            resolutions: Sequence[int], probe_images: Optional[int] = None) -> Optional[dict]:
    run_dir = out / arm / f"seed{seed}"
    done = run_dir / "results.json"
    windows = eval_windows(spec)
    if done.is_file():
        return complete_scores(run_dir, json.loads(done.read_text()), resolutions, windows, smoke, probe_images)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Several invocations may share an output dir (arms run in parallel): one run, one owner.
    lock = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{arm} seed {seed}: running in another process, skipped here", flush=True)
        return None
    if done.is_file():
        return complete_scores(run_dir, json.loads(done.read_text()), resolutions, windows, smoke, probe_images)
    recipe_path = run_dir / "arm_recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(arm_recipe(spec, spec_path, arm, seed, run_dir, smoke), sort_keys=False))
    from radio_core.formats.checkpoints import list_checkpoints, run_artifacts

    resume = bool(list_checkpoints(run_dir / "checkpoints"))
    # a run killed before its first checkpoint left only logs: start it over
    flag = ["--resume"] if resume else (["--overwrite"] if run_artifacts(run_dir) else [])
    cmd = [sys.executable, "-m", "radio_core.run", str(recipe_path)] + flag
    start, cpu0 = time.perf_counter(), child_cpu_seconds()
    with open(run_dir / "train.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    train_wall, train_cpu = time.perf_counter() - start, child_cpu_seconds() - cpu0
    if resume:  # the earlier part's time is not known here
        train_wall = train_cpu = None
    if rc != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{arm} seed {seed}: training failed (exit {rc}); {run_dir / 'train.log'}:\n" + "\n".join(tail))
    from radio_proxy.downstream import evaluate_run

    start, cpu0 = time.perf_counter(), time.process_time()
    scores = evaluate_run(run_dir, resolutions, teachers=score_teachers, limit=32 if smoke else None,
                          probe_images=None if smoke else probe_images, windows=windows)
    meta = scores.pop("_meta")
    # what was asked, scored or not (a window on an all-global student is skipped, not missing)
    meta["evaluated"] = sorted({f"student@{r}" for r in resolutions} | {f"student@{r}w{w}" for r, w in windows})
    result = {"arm": arm, "seed": seed, "scores": scores, "meta": meta,
              "seconds": {"train_wall": train_wall, "train_cpu": train_cpu, "eval_wall": time.perf_counter() - start,
                          "eval_cpu": time.process_time() - cpu0, "load_avg_1min": os.getloadavg()[0]}}
    write_json(done, result)
    return result


# --------------------------------------------------------------------------- tables


def metric_value(result: dict, metric: str) -> Optional[float]:
    name, _, res = metric.partition("@")
    return result["scores"].get(f"student@{res}", {}).get(name)


def verdict(diffs: list[tuple[float, Optional[float]]], claim: str, margin: float) -> str:
    if any(ci is None for _, ci in diffs):
        return "inconclusive (one seed: no interval)"
    if claim == "better":
        if all(d - ci > 0 for d, ci in diffs):
            return "reproduced"
        if any(d + ci < 0 for d, ci in diffs):
            return "not reproduced"
        return "inconclusive"
    if all(d - ci > -margin for d, ci in diffs):
        return "reproduced"
    if any(d + ci < -margin for d, ci in diffs):
        return "not reproduced"
    return "inconclusive"


def comparison_rows(spec: dict, results: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| comparison | paper finding | metric | arms | difference (95% CI) | resolved | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in spec.get("comparisons", []):
        pairs = [tuple(p) for p in c.get("pairs", [])] or [
            (c["arm"], other, m) for other in c["versus"] for m in c["metrics"]]
        margin = float(c.get("margin", 0.0))
        rows, diffs = [], []
        for a, b, metric, *other in pairs:  # [a, b, metric] or [a, b, a's metric, b's metric]
            metric_b = other[0] if other else metric
            seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
            values = [(metric_value(results[a][s], metric), metric_value(results[b][s], metric_b)) for s in seeds]
            metric = metric if metric_b == metric else f"{metric} vs {metric_b}"
            values = [(x, y) for x, y in values if x is not None and y is not None]
            if not values:
                rows.append((metric, f"{a} - {b}", "not run", "-"))
                diffs.append((0.0, None))
                continue
            d, ci = mean_ci([x - y for x, y in values])
            diffs.append((d, ci))
            threshold = -margin if c["claim"] == "not_worse" else 0.0
            resolved = "-" if ci is None else ("yes" if (d - ci > threshold or d + ci < threshold) else "no")
            interval = f"{d:+.3f}" + ("" if ci is None else f" ± {ci:.3f}") + f" (n={len(values)})"
            rows.append((metric, f"{a} - {b}", interval, resolved))
        v = verdict(diffs, c["claim"], margin)
        for i, (metric, arms, interval, resolved) in enumerate(rows):
            head = (c["name"], c["finding"]) if i == 0 else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {metric} | {arms} | {interval} | {resolved} | "
                         f"{v if i == 0 else ''} |")
    return lines


def arm_table(results: dict[str, dict[int, dict]], resolutions: Sequence[int],
              windows: Sequence[tuple[int, int]] = ()) -> list[str]:
    from radio_proxy.downstream import METRICS

    sizes = [str(r) for r in resolutions] + [f"{r}w{w}" for r, w in windows]
    cols = [f"{m}@{r}" for r in sizes for m in METRICS if not (m == "boundary_f" and int(r.split("w")[0]) < 128)]
    if windows:  # columns no arm has (windows skipped on all-global students) stay out
        cols = [c for c in cols if any(metric_value(r, c) is not None for by in results.values() for r in by.values())]
    lines = ["| arm | seeds | " + " | ".join(cols) + " | train s (cpu) |", "|---|---|" + "---|" * (len(cols) + 1)]
    for arm, by_seed in results.items():
        if not by_seed:
            continue
        cells = []
        for col in cols:
            vals = [v for v in (metric_value(r, col) for r in by_seed.values()) if v is not None]
            if not vals:
                cells.append("-")
                continue
            m, ci = mean_ci(vals)
            cells.append(f"{m:.3f}" + ("" if ci is None else f" ± {ci:.3f}"))
        cpu = [r["seconds"]["train_cpu"] for r in by_seed.values() if r["seconds"]["train_cpu"] is not None]
        lines.append(f"| {arm} | {len(by_seed)} | " + " | ".join(cells) + f" | {sum(cpu) / len(cpu):.0f} |" if cpu
                     else f"| {arm} | {len(by_seed)} | " + " | ".join(cells) + " | - |")
    return lines


def teacher_table(result: dict) -> list[str]:
    from radio_proxy.downstream import table

    teachers = {k: v for k, v in result["scores"].items() if k.startswith("teacher/")}
    student = {k: v for k, v in result["scores"].items() if k.startswith("student@")}
    return table({**teachers, **student}).splitlines()


#: each teacher's speciality and the student resolution it is judged at (the teacher's own).
SPECIALITIES = {"clip": ("zeroshot", 64), "dino": ("miou", 64), "sam": ("boundary_f", 128)}


def speciality_rows(by_seed: dict[int, dict]) -> list[str]:
    """The all-teacher student against each teacher on that teacher's speciality (target: 0.9)."""
    lines = ["| teacher | speciality | teacher | student (mean ± CI over seeds) | ratio |", "|---|---|---|---|---|"]
    first = next((r["scores"] for _, r in sorted(by_seed.items()) if any(k.startswith("teacher/") for k in r["scores"])),
                 {})
    for name, (metric, res) in SPECIALITIES.items():
        teacher = first.get(f"teacher/{name}", {}).get(metric)
        values = [r["scores"].get(f"student@{res}", {}).get(metric) for r in by_seed.values()]
        values = [v for v in values if v is not None]
        if teacher is None or not values:
            continue
        m, ci = mean_ci(values)
        lines.append(f"| {name} | {metric}@{res} | {teacher:.3f} | {m:.3f}" + ("" if ci is None else f" ± {ci:.3f}")
                     + f" | {m / teacher:.2f} |")
    return lines


def median_rates(by_seed: dict[int, dict]) -> dict[str, float]:
    """One arm's single-process inference images/s per scored input (``"128"``, ``"128w8"``),
    median over seeds."""
    import statistics

    rates: dict[str, list[float]] = {}
    for r in by_seed.values():
        for key, v in r.get("meta", {}).get("images_per_s", {}).items():
            rates.setdefault(key.removeprefix("student@"), []).append(v)
    return {k: statistics.median(v) for k, v in rates.items()}


def throughput_rows(results: dict[str, dict[int, dict]]) -> list[str]:
    """The speed side of ViTDet mode: for each arm scored with windows, its single-process
    inference throughput globally and in windows at the same resolution (median over seeds)."""
    lines = []
    for arm, by_seed in results.items():
        rates = median_rates(by_seed)
        for windowed in sorted(k for k in rates if "w" in k):
            plain = windowed.split("w")[0]
            if plain not in rates:
                continue
            fast, slow = rates[windowed], rates[plain]
            lines.append(f"| {arm} | {plain} px | {slow:.0f} | {fast:.0f} ({windowed}) | {fast / slow:.2f}x |")
    if not lines:
        return []
    return ["Inference throughput, global vs ViTDet windows (images/s of one process, median over seeds; other "
            "runs shared the machine):", "", "| arm | input | global | windowed | speed-up |", "|---|---|---|---|---|",
            *lines]


def student_speed_rows(spec: dict, results: dict[str, dict[int, dict]]) -> list[str]:
    """Each arm that changes the student, against the first arm: single-process inference
    images/s at each scored resolution (median over seeds)."""
    def rates(arm: str) -> dict[str, float]:
        return {k: v for k, v in median_rates(results.get(arm, {})).items() if "w" not in k}

    reference = next(iter(spec["arms"]))
    ref = rates(reference)
    lines = []
    for arm, mapping in spec["arms"].items():
        if arm == reference or "student" not in (mapping or {}):
            continue
        for res, v in sorted(rates(arm).items(), key=lambda kv: int(kv[0])):
            if res in ref:
                lines.append(f"| {arm} | {res} px | {v:.0f} | {ref[res]:.0f} | {v / ref[res]:.2f}x |")
    if not lines:
        return []
    return [f"Student inference throughput against `{reference}` (images/s of one process, median over seeds; other "
            "runs shared the machine):", "", f"| arm | input | images/s | {reference} | ratio |", "|---|---|---|---|---|",
            *lines]


def write_results(spec: dict, out: Path, results: dict, resolutions: Sequence[int], command: str,
                  teacher_arm: Optional[str], elapsed: float) -> str:
    lines = [f"Command: `{command}`", ""]
    scored = [r for _, r in sorted(results.get(teacher_arm, {}).items())
              if any(k.startswith("teacher/") for k in r["scores"])] if teacher_arm else []
    if scored:
        first = scored[0]
        lines += [f"### Teachers' own scores (and the `{teacher_arm}` student, seed {first['seed']})", "",
                  *teacher_table(first), "",
                  f"### The `{teacher_arm}` student on each teacher's speciality", "",
                  *speciality_rows(results[teacher_arm]), ""]
    lines += ["### Arms: mean ± 95% CI over seeds", "", *arm_table(results, resolutions, eval_windows(spec)), "",
              *throughput_rows(results), "", *student_speed_rows(spec, results), "",
              "### Comparisons (paired by seed)", "", *comparison_rows(spec, results), "",
              f"Suite wall time of this invocation: {elapsed / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return text


def start_helpers(argv: list[str], jobs: int) -> list[subprocess.Popen]:
    """``jobs - 1`` more copies of this command (without ``--jobs``), and one CPU thread for
    every process from here on: small runs scale better across processes than across threads."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--jobs":
            skip = True
        elif not a.startswith("--jobs="):
            rest.append(a)
    os.environ["OMP_NUM_THREADS"] = "1"  # the training subprocesses read it
    import torch

    torch.set_num_threads(1)  # this process evaluates
    return [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *rest], env=os.environ.copy())
            for _ in range(jobs - 1)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="ablation file (recipes/proxy/ablations.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the file's seeds")
    p.add_argument("--arms", nargs="+", help="run only these arms")
    p.add_argument("--output-dir", help="override the file's output_dir")
    p.add_argument("--smoke", action="store_true", help="tiny world, teachers and runs: checks the pipeline only")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--collect", action="store_true", help="only write the table from the finished runs")
    p.add_argument("--docs", help="also copy the results table to this markdown file")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once: N processes of one CPU thread each, sharing the runs through lock files "
                        "(on a small CPU, N = cores is faster than one process using every core)")
    argv = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")

    spec_path = Path(args.spec)
    spec = load_spec(spec_path)
    seeds = args.seeds or ([0] if args.smoke else spec.get("seeds", [0]))
    arms = args.arms or list(spec["arms"])
    for arm in arms:
        if arm not in spec["arms"]:
            raise SystemExit(f"--arms: unknown arm {arm!r} (known: {', '.join(spec['arms'])})")
    out = Path(args.output_dir or spec.get("output_dir", "runs/proxy/ablations"))
    resolutions = spec.get("eval", {}).get("resolutions", [64, 128])
    teacher_arm = spec.get("teacher_scores")
    if args.dry_run:
        for seed in seeds:
            for arm in arms:
                d = out / arm / f"seed{seed}"
                arm_recipe(spec, spec_path, arm, seed, d, args.smoke)
                state = "done" if (d / "results.json").is_file() else ("partial" if d.is_dir() else "pending")
                print(f"{arm:16s} seed {seed}: {state:8s} {d}")
        return 0
    command = "python bench/proxy_ablations.py " + " ".join(argv)
    if args.collect:
        seeds = args.seeds or spec.get("seeds", [0])
    start = time.perf_counter()
    helpers = start_helpers(argv, args.jobs) if args.jobs > 1 and not args.collect else []
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            t0 = time.perf_counter()
            if args.collect:
                done = out / arm / f"seed{seed}" / "results.json"
                if done.is_file():
                    results[arm][seed] = json.loads(done.read_text())
                continue
            r = run_one(spec, spec_path, arm, seed, out, args.smoke, arm == teacher_arm and seed == seeds[0],
                        resolutions, spec.get("eval", {}).get("probe_images"))
            if r is None:
                continue
            results[arm][seed] = r
            sec = r["seconds"]
            print(f"{arm} seed {seed}: train {sec['train_wall'] or 0:.0f} s wall / {sec['train_cpu'] or 0:.0f} s cpu, "
                  f"eval {sec['eval_wall']:.0f} s ({time.perf_counter() - t0:.0f} s this call)", flush=True)
            write_results(spec, out, results, resolutions, command, teacher_arm, time.perf_counter() - start)
    failed = [h.args for h in helpers if h.wait() != 0]
    for seed in seeds:  # the runs the helpers did
        for arm in arms:
            done = out / arm / f"seed{seed}" / "results.json"
            if seed not in results[arm] and done.is_file():
                results[arm][seed] = json.loads(done.read_text())
    text = write_results(spec, out, results, resolutions, command, teacher_arm, time.perf_counter() - start)
    print(text)
    if failed:
        raise SystemExit(f"{len(failed)} helper process(es) failed; their output is above")
    if args.docs:
        Path(args.docs).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

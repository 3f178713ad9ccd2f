"""The proxy benchmark's numbers in the docs, generated from a finished sweep:

    python -m radio_proxy.report runs/proxy/ablations --into docs/proxy_benchmark.md

Every block between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->`` in
the target file is rewritten from the sweep's own output (``summary.json``, ``references.json``,
``results.md``, ``launches.jsonl``), so a number in the docs is always one the command printed:

* ``NAME-findings`` / ``-references`` / ``-retention`` / ``-noise``: those sections of results.md;
* ``NAME-arms``: each arm's mean ± 95% interval on the metrics the findings read;
* ``NAME-verdicts``: one line per finding with its verdict and intervals;
* ``NAME-budget``: wall time of the sweep (first launch to last result) and of its runs.

``NAME`` is the sweep folder's name (``ablations``, ``methods``, ``steps``). ``--check`` fails
(exit 1) when a block differs from what the sweep gives, without writing.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

SECTIONS = {"findings": "## Findings", "references": "## References", "retention": "## Retention",
            "noise": "## Noise"}


def results_section(results_md: str, heading: str) -> str:
    """The body of the section of results.md whose heading starts with ``heading``."""
    parts = re.split(r"^(## .*)$", results_md, flags=re.M)
    for i in range(1, len(parts), 2):
        if parts[i].startswith(heading):
            return parts[i + 1].strip()
    return ""


def _fmt(iv: Optional[dict]) -> str:
    if not iv or iv.get("mean") is None:
        return "–"
    if iv.get("low") is None:
        return f"{iv['mean']:.3f}"
    return f"{iv['mean']:.3f} ± {(iv['high'] - iv['low']) / 2:.3f}"


def arms_table(summary: dict, metrics: Sequence[str]) -> str:
    cols = [m for m in metrics if m in summary.get("metrics", [])]
    lines = ["| arm | n | " + " | ".join(c.replace("proxy/", "") for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for arm in summary.get("arms", []):
        lines.append(f"| {arm['arm']} | {arm['n']} | " + " | ".join(_fmt(arm.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def verdicts(summary: dict) -> str:
    """One line per finding: its claim and the verdict its rows earned, with the rows' intervals."""
    by: dict[str, list[dict]] = {}
    for f in summary.get("findings", []):
        by.setdefault(f["comparison"], []).append(f)
    lines = []
    for name, rows in by.items():
        parts = "; ".join(f"{r['a']} - {r['b']} {r['metric'].replace('proxy/', '')} "
                          + ("n/a" if r.get("ci_low") is None else
                             f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]") for r in rows)
        lines.append(f"* **{name}: {rows[0]['comparison_verdict']}** ({parts})")
    return "\n".join(lines)


def read_metrics(summary: dict) -> list[str]:
    """The metric columns the findings and retention read, then the other proxy scores at the
    trained resolutions, in a stable order."""
    read = [f["metric"] for f in summary.get("findings", []) if f["metric"].startswith("proxy/")]
    found = []
    for m in read:
        for part in re.findall(r"proxy/\d+/\w+", m):
            found.append(part)
    basics = [f"proxy/{r}/{m}" for r in (64, 128) for m in ("zeroshot", "zeroshot_shape", "knn", "linear", "miou",
                                                            "parts_miou")]
    return list(dict.fromkeys(basics + found))


def budget(sweep_dir: Path) -> str:
    if (sweep_dir / "budget.txt").is_file():  # an archived sweep (--archive)
        return (sweep_dir / "budget.txt").read_text().strip()
    if not (sweep_dir / "launches.jsonl").is_file():
        return ""
    events = [json.loads(line) for line in (sweep_dir / "launches.jsonl").read_text().splitlines() if line.strip()]
    if not events:
        return ""
    runs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("runs/*/SWEEP_DONE.json"))]
    walls = [r.get("wall_s") or 0.0 for r in runs]
    refs = [e for e in events if e.get("event") == "references_failed"]
    # the last result: the last event, the last run's done marker, or the references scored after them
    last = [e["time"] for e in events] + [r.get("time") or 0 for r in runs]
    refs_file = sweep_dir / "references.json"
    if refs_file.is_file():
        last.append(refs_file.stat().st_mtime)
    span = max(last) - min(e["time"] for e in events)
    # --jobs N starts N - 1 worker processes beside the main one, and logs how many
    jobs = 1 + max((e.get("count", 0) for e in events if e.get("event") == "workers"), default=0)
    count = ("one", "two", "three", "four")[jobs - 1] if jobs <= 4 else str(jobs)
    at_once = f"{count} at a time" + (f" with --jobs {jobs}" if jobs > 1 else "")
    return (f"{len(runs)} runs finished; the sweep's wall time from its first launch to its last result "
            f"{span / 60:.0f} min; the runs' own wall time (training + scoring) {sum(walls) / 60:.0f} min in all, "
            f"{sum(walls) / max(len(walls), 1) / 60:.1f} min a run ({at_once})"
            + (f"; reference scoring failed: {refs[-1]['error']}" if refs else "") + ".")


def blocks(sweep_dir: Path) -> dict[str, str]:
    """The generated blocks a sweep folder (or its archive) gives."""
    name = sweep_dir.name
    summary = json.loads((sweep_dir / "summary.json").read_text())
    results = (sweep_dir / "results.md").read_text()
    out = {f"{name}-{k}": results_section(results, h) for k, h in SECTIONS.items()}
    out[f"{name}-arms"] = arms_table(summary, read_metrics(summary))
    out[f"{name}-verdicts"] = verdicts(summary)
    out[f"{name}-budget"] = budget(sweep_dir)
    return {k: v for k, v in out.items() if v}


def teacher_curves(preset: str = "standard", picture: Optional[Path] = None) -> str:
    """Each trained teacher's learning curve (its own speciality on held-out val images, from
    its trained.json in the cache) as a table, and as a picture when ``picture`` is given."""
    from .teachers import KINDS, teacher_config, teacher_dir
    from .world import world_from_args

    world = world_from_args(None)
    curves = {}
    for kind in KINDS:
        info = teacher_dir(kind, preset, teacher_config(kind, preset), world) / "trained.json"
        if info.is_file():
            data = json.loads(info.read_text())
            curves[kind] = data
    if not curves:
        return ""
    lines = ["| teacher | metric (held-out val) | learning curve (step: score) | plateau | train CPU s |",
             "|---|---|---|---|---|"]
    for kind, d in curves.items():
        curve = ", ".join(f"{c['step']}: {c[d['metric']]:.3f}" for c in d["curve"])
        lines.append(f"| {kind} | {d['metric']} | {curve} | {'yes' if d.get('plateau') else 'no'} | "
                     f"{d['train_cpu_seconds']:.0f} |")
    lines += ["", f"Plateau rule: {next(iter(curves.values())).get('plateau_rule', '')}; each curve is scored on "
              f"{next(iter(curves.values()))['config'].get('eval_images', 0) // 2} val images with probes fit on as many "
              "others (never the test split)."]
    if picture is not None:
        from radio_core.eval.pictures import pyplot, save_figure

        plt = pyplot()
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
        for ax, (kind, d) in zip(axes[0], curves.items()):
            ax.plot([c["step"] for c in d["curve"]], [c[d["metric"]] for c in d["curve"]], marker="o")
            ax.set_title(f"proxy {kind} teacher", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel(f"{d['metric']} (held-out val)")
            ax.grid(alpha=0.3)
        save_figure(fig, picture)
    return "\n".join(lines)


def archive(sweep_dir: Path, dest: Path) -> None:
    """The files the blocks are made of, small and text, so the docs can be checked against them."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "results.md", "references.json"):
        if (sweep_dir / name).is_file():
            shutil.copyfile(sweep_dir / name, dest / name)
    (dest / "budget.txt").write_text(budget(sweep_dir) + "\n")


BLOCK = re.compile(r"(<!-- BEGIN generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END generated: (?P=name) -->)", re.S)


def fill(text: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with every block whose name ``values`` has rewritten; the names rewritten."""
    done = []

    def replace(m: re.Match) -> str:
        name = m.group("name")
        if name not in values:
            return m.group(0)
        done.append(name)
        return m.group(1) + values[name] + "\n" + m.group(4)

    return BLOCK.sub(replace, text), done


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="radio_proxy.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", help="finished sweep folders (their output_dir)")
    p.add_argument("--into", action="append", required=True, help="markdown file(s) with generated blocks")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a block is out of date")
    p.add_argument("--curves", metavar="PNG", help="also fill the teacher-curves block from the cached standard "
                                                   "teachers' trained.json and draw their learning curves here")
    p.add_argument("--archive", help="also copy what the blocks are made of (summary.json, results.md, "
                                     "references.json, budget.txt) to ARCHIVE/<sweep name>/, e.g. docs/proxy_results")
    args = p.parse_args(argv)
    values: dict[str, str] = {}
    for d in args.sweeps:
        path = Path(d)
        if not (path / "summary.json").is_file():
            print(f"error: {path}: no summary.json (not a finished sweep folder)", file=sys.stderr)
            return 2
        values.update(blocks(path))
        if args.archive:
            archive(path, Path(args.archive) / path.name)
    if args.curves:
        values["teacher-curves"] = teacher_curves(picture=None if args.check else Path(args.curves))
        if args.archive:
            Path(args.archive).mkdir(parents=True, exist_ok=True)
            (Path(args.archive) / "teacher_curves.md").write_text(values["teacher-curves"] + "\n")
    stale = []
    for target in args.into:
        text = Path(target).read_text()
        new, done = fill(text, values)
        print(f"{target}: {len(done)} block(s) from the sweeps: {', '.join(done) or 'none'}")
        if new != text:
            stale.append(target)
            if not args.check:
                Path(target).write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

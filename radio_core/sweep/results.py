"""Write every results file of a sweep from its runs' folders (callable at any time: runs that
have not finished are listed as pending/running/failed and left out of the statistics).
``sweep`` is the runner's ``Sweep`` (not imported: the runner imports this module)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

from .grid import baseline_arm
from .plots import save_plots
from .stats import LEVEL
from .tables import (arm_table, collect_row, compared_metrics, comparison_markdown, comparison_table, failures,
                     markdown_table, result_columns)


def _interval_json(iv: Any) -> Optional[dict]:
    return None if iv is None else {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _arms_csv(path: Path, arms: list[dict], metrics: list[str]) -> None:
    flat = []
    for a in arms:
        row = {"arm": a["arm"], "n": a["n"]}
        for m in metrics:
            if m in a:
                row.update({m: a[m].mean, f"{m}:ci_low": a[m].low, f"{m}:ci_high": a[m].high})
        flat.append(row)
    _write_csv(path, flat, ["arm", "n"] + [f"{m}{s}" for m in metrics for s in ("", ":ci_low", ":ci_high")])


def _comparisons_csv(path: Path, comparisons: list[dict], baseline: str) -> None:
    rows = [{"arm": c["arm"], "baseline": baseline, "metric": c["metric"], "difference": c["difference"].interval.mean,
             "ci_low": c["difference"].interval.low, "ci_high": c["difference"].interval.high,
             "paired": c["difference"].paired, "verdict": c["difference"].verdict} for c in comparisons]
    _write_csv(path, rows, ["arm", "baseline", "metric", "difference", "ci_low", "ci_high", "paired", "verdict"])


def write_results(sweep: Any, quiet: bool = False) -> list[dict[str, Any]]:
    rows = [collect_row(r) for r in sweep.runs]
    columns = result_columns(rows)
    metrics = compared_metrics(sweep.runs, columns)
    baseline = baseline_arm(sweep.spec, sweep.runs, sweep.sweep_path)
    _write_csv(sweep.out / "results.csv", rows, ["arm"] + columns + ["error"])
    sections = ["## Runs", "", markdown_table(rows, [c for c in columns if not c.endswith("/rel_mse")])]
    arms = arm_table(rows, metrics)
    grouped = any(a["n"] > 1 for a in arms) or sweep.spec.seeds is not None
    if grouped:
        sections += ["", f"## Arms: mean ± {LEVEL:.0%} confidence interval (Student t) over seeds", "",
                     markdown_table(arms, ["arm", "n"] + metrics)]
        _arms_csv(sweep.out / "arms.csv", arms, metrics)
    comparisons = comparison_table(rows, metrics, baseline) if baseline else []
    if baseline:
        sections += ["", f"## Against the baseline arm {baseline}", "",
                     "resolved: the difference's 95% interval excludes 0; inconclusive: it does not.", "",
                     comparison_markdown(comparisons, baseline)]
        _comparisons_csv(sweep.out / "comparisons.csv", comparisons, baseline)
    if any(c.startswith("loss/") for c in columns) and not any(m.startswith("loss/") for m in metrics):
        sections += ["", "Training losses are not compared between arms: the arms optimise different objectives."]
    if failures(rows):
        sections += ["", failures(rows)]
    text = "\n".join(sections)
    (sweep.out / "results.md").write_text(text + "\n")
    summary = {"baseline": baseline, "level": LEVEL, "metrics": metrics,
               "arms": [{"arm": a["arm"], "n": a["n"], **{m: _interval_json(a.get(m)) for m in metrics}} for a in arms],
               "comparisons": [{"arm": c["arm"], "metric": c["metric"], "paired": c["difference"].paired,
                                "verdict": c["difference"].verdict, **_interval_json(c["difference"].interval)}
                               for c in comparisons]}
    (sweep.out / "summary.json").write_text(json.dumps(summary, indent=1))
    save_plots(rows, metrics, sweep.out / "plots")
    if not quiet:
        print(text)
    return rows

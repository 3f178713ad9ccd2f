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


def _findings(sweep: Any, rows: list[dict], metrics: list[str], sections: list[str]) -> list[dict]:
    """The references, the published findings judged, the retention of teacher specialities and
    the noise budget (sections appended to ``sections``); the findings' entries for summary.json."""
    from . import references as refs
    from .analysis import noise_markdown, references_markdown, retention_markdown

    spec = sweep.spec
    reference_rows = refs.load(sweep)
    if reference_rows:
        sections += ["", "## References (scored once: teachers at their own resolution, raw pixels, the student's "
                     "architecture at random initialisation, chance)", "", references_markdown(reference_rows, metrics)]
    a = spec.analysis
    flat = _findings_section(rows, spec, reference_rows, sections) if spec.comparisons else []
    retention = retention_markdown(rows, a, reference_rows)
    if retention:
        sections += ["", "## Retention of each teacher's speciality: (arm - floor) / (ceiling - floor)", "", retention]
    used = list(dict.fromkeys([e["metric"] for e in flat if "(" not in e["metric"] and " vs " not in e["metric"]]
                              + a.retention_metrics))
    noise = noise_markdown(rows, a, [m for m in used if m in metrics])
    if noise:
        sections += ["", f"## Noise: seed-to-seed spread of `{a.noise_arm}` against the test set's sampling noise "
                     "(probes are closed-form: refitting one gives the same numbers)", "", noise]
    return flat


def _findings_section(rows: list[dict], spec: Any, reference_rows: dict, sections: list[str]) -> list[dict]:
    """Appends the findings table to ``sections``; returns its entries for summary.json."""
    from .analysis import comparisons_markdown

    a = spec.analysis
    table, entries = comparisons_markdown(rows, spec.comparisons, a, reference_rows)
    margin = a.margin if not isinstance(a.margin, dict) else f"{a.margin['fraction']:.0%} of each metric's gap"
    sections += ["", "## Findings", "",
                 f"Paired by seed; a comparison's rows share a {a.level:.0%} family-wise level (Bonferroni); no verdict "
                 f"with fewer than {a.min_seeds} seeds. Margin (smallest effect of interest): {margin} (floor to "
                 f"ceiling: {', '.join(f'{k} {v[0]} -> {v[1]}' for k, v in a.gaps.items())}). MDE: the true difference "
                 "a row would detect with 80% power at its level. Verdicts: reproduced; not reproduced (reversed: "
                 "resolved against the claim; equivalent: inside the margin by two one-sided tests); inconclusive.", "",
                 table]
    return entries


def write_results(sweep: Any, quiet: bool = False) -> list[dict[str, Any]]:
    rows = [collect_row(r) for r in sweep.runs]
    columns = result_columns(rows)
    # standard errors stay in results.csv: the tables compare the metrics themselves
    metrics = [m for m in compared_metrics(sweep.runs, columns) if "/se_" not in m and not m.startswith("se_")]
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
    findings = _findings(sweep, rows, metrics, sections)
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
                               for c in comparisons],
               "findings": findings}
    (sweep.out / "summary.json").write_text(json.dumps(summary, indent=1))
    save_plots(rows, metrics, sweep.out / "plots")
    if not quiet:
        print(text)
    return rows

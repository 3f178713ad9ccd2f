"""The sweep's judgement of published findings: paired differences over seeds against a
smallest effect of interest, with the minimum detectable effect of each comparison, the
retention of teacher specialities and the noise budget (seed-to-seed spread against the test
set's sampling noise). Everything here reads the rows that ``tables.collect_row`` builds and
the reference rows an evaluator wrote (``references.json``: floors and ceilings such as raw
pixels, chance, each teacher)."""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from .spec import Analysis, Comparison, ComparisonRow
from .stats import Judgement, judge, mean_ci
from .tables import per_arm


def metric_name(key: str) -> str:
    """``proxy/64/miou`` -> ``miou`` (a sweep column: task, resolution when several, metric)."""
    return key.rsplit("/", 1)[-1]


def task_of(key: str) -> str:
    return key.split("/", 1)[0]


def reference_value(references: dict[str, dict], row: str, key: str) -> Optional[float]:
    """A reference row's value of the column ``key``: at the same resolution, else (a teacher
    runs at its own size) the same task and metric at the only resolution the row has."""
    values = references.get(row) or {}
    if key in values:
        return _scalar(values[key])
    same = [k for k in values if metric_name(k) == metric_name(key) and task_of(k) == task_of(key)]
    return _scalar(values[same[0]]) if len(same) == 1 else None


def _scalar(v: Any) -> Optional[float]:
    """A reference value: a number, or ``{seed: number}`` (mean over seeds)."""
    if isinstance(v, dict):
        vals = [float(x) for x in v.values() if isinstance(x, (int, float))]
        return statistics.fmean(vals) if vals else None
    return float(v) if isinstance(v, (int, float)) else None


def gap(analysis: Analysis, references: dict[str, dict], metric: str) -> Optional[tuple[float, float]]:
    """(floor, ceiling) of a metric from the analysis's ``gaps`` and the references."""
    name = metric_name(metric)
    # a variant of a metric (``knn_jpeg3``: kNN on corrupted images) takes its metric's gap
    pair = analysis.gaps.get(name) or next((analysis.gaps[k] for k in sorted(analysis.gaps, key=len, reverse=True)
                                            if name.startswith(k + "_")), None)
    if not pair:
        return None
    floor, ceiling = (reference_value(references, r, metric) for r in pair)
    if floor is None or ceiling is None:
        return None
    return floor, ceiling


def margin_for(analysis: Analysis, comparison: Comparison, references: dict[str, dict],
               metric: str) -> Optional[float]:
    m = comparison.margin if comparison.margin is not None else analysis.margin
    if not isinstance(m, dict):
        return float(m)
    g = gap(analysis, references, metric)
    if g is None or g[1] <= g[0]:
        return None  # no gap to take a fraction of (or the ceiling is not above the floor)
    return m["fraction"] * (g[1] - g[0])


def row_values(rows: list[dict], arm: str, metric: str, minus: Optional[str]) -> dict[Any, float]:
    """seed -> value of ``metric`` (minus ``minus``) for one arm's finished runs."""
    values = per_arm(rows, metric).get(arm, {})
    if minus is None:
        return values
    other = per_arm(rows, minus).get(arm, {})
    return {s: v - other[s] for s, v in values.items() if s in other}


def row_differences(rows: list[dict], row: ComparisonRow) -> list[float]:
    a = row_values(rows, row.a, row.metric, row.minus)
    b = row_values(rows, row.b, row.b_metric or row.metric, row.minus)
    return [a[s] - b[s] for s in a if s is not None and s in b]


def judge_comparison(rows: list[dict], comparison: Comparison, analysis: Analysis,
                     references: dict[str, dict]) -> list[dict]:
    """One entry per row: the row, its margin, its judgement and verdict. The rows of one
    comparison are one family: each interval is at level ``1 - (1 - level) / k`` (Bonferroni)
    for k rows, so the family's verdict holds at the stated level."""
    k = len(comparison.rows)
    level = 1 - (1 - analysis.level) / k
    out = []
    for row in comparison.rows:
        margin = margin_for(analysis, comparison, references, row.metric)
        j = judge(row_differences(rows, row), margin, level, analysis.min_seeds)
        verdict = j.verdict(comparison.claim) if (margin is not None or comparison.claim == "higher") \
            else "no verdict (no margin: the metric's gap is unknown)"
        out.append({"row": row, "margin": margin, "judgement": j, "verdict": verdict})
    return out


def family_verdict(entries: list[dict]) -> str:
    """A comparison's verdict from its rows': all alike -> that verdict; else the counts."""
    verdicts = [e["verdict"] for e in entries]
    if len(set(verdicts)) == 1:
        return verdicts[0]
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v] = counts.get(v, 0) + 1
    return "mixed: " + ", ".join(f"{n} {v}" for v, n in counts.items())


def _num(v: Optional[float], fmt: str = "+.3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def comparisons_markdown(rows: list[dict], spec_comparisons: list[Comparison], analysis: Analysis,
                         references: dict[str, dict]) -> tuple[str, list[dict]]:
    """The comparisons table and its entries (for summary.json)."""
    lines = ["| comparison | finding | claim | a - b | metric | n | difference [CI] | margin | MDE | verdict |",
             "|" + "---|" * 10]
    flat = []
    for c in spec_comparisons:
        entries = judge_comparison(rows, c, analysis, references)
        overall = family_verdict(entries)
        for i, e in enumerate(entries):
            j: Judgement = e["judgement"]
            iv = j.interval
            ci = "–" if iv.half is None else f"[{iv.low:+.3f}, {iv.high:+.3f}]"
            head = (c.name, c.finding, c.claim) if i == 0 else ("", "", "")
            lines.append(f"| {head[0]} | {head[1]} | {head[2]} | {e['row'].a} - {e['row'].b} | {e['row'].label} | "
                         f"{iv.n} | {_num(iv.mean)} {ci} | {_num(e['margin'], '.3f')} | {_num(j.mde, '.3f')} | "
                         f"{e['verdict']} |")
            flat.append({"comparison": c.name, "claim": c.claim, "a": e["row"].a, "b": e["row"].b,
                         "metric": e["row"].label, "n": iv.n, "difference": iv.mean, "ci_low": iv.low,
                         "ci_high": iv.high, "level": j.level, "margin": e["margin"], "mde": j.mde,
                         "equivalent": j.equivalent, "verdict": e["verdict"], "comparison_verdict": overall})
        lines.append(f"| | | | | | | | | | **{overall}** |")
    return "\n".join(lines), flat


def retention_markdown(rows: list[dict], analysis: Analysis, references: dict[str, dict]) -> str:
    """(arm - floor) / (ceiling - floor) per seed, mean with its interval, per retention metric."""
    if not analysis.retention_arms or not analysis.retention_metrics:
        return ""
    lines = ["| arm | metric | floor | ceiling | arm (mean ± CI) | retention (mean ± CI) |", "|---|---|---|---|---|---|"]
    for arm in analysis.retention_arms:
        for metric in analysis.retention_metrics:
            g = gap(analysis, references, metric)
            values = per_arm(rows, metric).get(arm, {})
            if g is None or not values:
                continue
            floor, ceiling = g
            ratios = [(v - floor) / (ceiling - floor) for v in values.values()] if ceiling != floor else []
            pair = analysis.gaps[metric_name(metric)]
            lines.append(f"| {arm} | {metric} | {pair[0]} {floor:.3f} | {pair[1]} {ceiling:.3f} | "
                         f"{mean_ci(list(values.values())).text()} | "
                         f"{mean_ci(ratios).text() if ratios else '–'} |")
    return "\n".join(lines)


def noise_markdown(rows: list[dict], analysis: Analysis, metrics: list[str]) -> str:
    """Seed-to-seed standard deviation of one arm against the test set's sampling noise (the
    evaluator's bootstrap standard errors, column ``.../se_<metric>`` beside ``.../<metric>``)."""
    arm = analysis.noise_arm
    if arm is None:
        return ""
    lines = ["| metric | seed SD | test-set SE (median over runs) | ratio |", "|---|---|---|---|"]
    for m in metrics:
        seeds = list(per_arm(rows, m).get(arm, {}).values())
        head, _, name = m.rpartition("/")
        se_key = f"{head}/se_{name}" if head else f"se_{name}"
        ses = [r[se_key] for r in rows if isinstance(r.get(se_key), (int, float))]
        if len(seeds) < 2 or not ses:
            continue
        sd, se = statistics.stdev(seeds), statistics.median(ses)
        lines.append(f"| {m} | {sd:.4f} | {se:.4f} | {sd / se:.1f}x |" if se > 0 else f"| {m} | {sd:.4f} | 0 | – |")
    return "\n".join(lines) if len(lines) > 2 else ""


def references_markdown(references: dict[str, dict], metrics: list[str]) -> str:
    """One line per metric column, one column per reference row (teachers hold only their own
    resolution's metrics; random init is a mean ± CI over seeds)."""
    refs = [r for r in references if not r.startswith("_")]
    keys = [m for m in metrics if any(m in references[r] for r in refs)]
    if not refs or not keys:
        return ""
    lines = ["| metric | " + " | ".join(refs) + " |", "|---|" + "---|" * len(refs)]
    for m in keys:
        cells = []
        for r in refs:
            v = references[r].get(m)
            if isinstance(v, dict):
                cells.append(mean_ci([float(x) for x in v.values()]).text())
            else:
                cells.append("–" if v is None else f"{v:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Results built from the runs' own folders whenever they finish: one row per run
(``results.csv``), mean ± 95% CI per arm (``arms.csv``), each arm against the baseline arm
(``comparisons.csv``), all of it in ``results.md`` and ``summary.json``, plus ``plots/``."""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any, Optional, Sequence

from .grid import PlannedRun
from .state import DONE_MARKER, RUN_STATE, read_json, read_metrics
from .stats import difference, mean_ci

NOT_METRICS = {"name", "arm", "seed", "status", "overrides", "error"}


def collect_row(run: PlannedRun) -> dict[str, Any]:
    row: dict[str, Any] = {"name": run.name, "arm": run.arm, "seed": run.seed, "overrides": " ".join(run.overrides)}
    state = read_json(run.run_dir / RUN_STATE) or {}
    marker = read_json(run.run_dir / DONE_MARKER)
    if run.error:
        row.update(status="failed", error=run.error)
    elif marker is not None:
        row.update(status="ok")
    else:
        row.update(status=state.get("status") if state.get("status") not in (None, "running") else "pending",
                   error=state.get("error"))
    lines = read_metrics(run.run_dir / "metrics.jsonl")
    if lines:
        last = lines[-1]
        row.update({k: v for k, v in last.items() if k.startswith("loss/")})
        logged_fidelity = next((l for l in reversed(lines) if any(k.startswith("fidelity/") for k in l)), {})
        row.update({k: v for k, v in logged_fidelity.items() if k.startswith("fidelity/")})
        speeds = [l["images_per_s"] for l in lines[1:] or lines if "images_per_s" in l]
        if speeds:  # median: the first logged steps include start-up
            row["images_per_s"] = statistics.median(speeds)
    if marker is not None:
        row.update(marker.get("eval", {}))
        row["wall_s"] = marker.get("wall_s")
    elif state.get("attempts"):
        row["wall_s"] = sum(a.get("wall_s", 0) for a in state["attempts"])
    return row


def result_columns(rows: list[dict]) -> list[str]:
    """Identity columns, then losses, evaluation metrics (known families first), speed."""
    keys = {k for r in rows for k in r if k not in NOT_METRICS}

    def group(prefix: str) -> list[str]:
        return sorted(k for k in keys if k.startswith(prefix) and k != "loss/total")

    known = (["loss/total"] if "loss/total" in keys else []) + group("loss/") + group("fidelity/") \
        + group("knn/") + group("zeroshot/")
    tail = [k for k in ("images_per_s", "wall_s") if k in keys]
    other = sorted(keys - set(known) - set(tail))  # any other evaluation's numbers
    seed = ["seed"] if any(r.get("seed") is not None for r in rows) else []
    return ["name", "status", *seed, "overrides"] + known + other + tail


def objective(run: PlannedRun) -> Optional[str]:
    """What the training loss measures: arms that differ here have incomparable loss values."""
    if run.recipe is None:
        return None
    keys = ("weight", "summary_weight", "spatial_weight", "summary_loss", "spatial_loss", "use_summary",
            "use_spatial", "target_norm")
    return json.dumps({n: {k: t.model_dump(mode="json")[k] for k in keys}
                       for n, t in sorted(run.recipe.teachers.items())}, sort_keys=True)


def compared_metrics(runs: Sequence[PlannedRun], columns: list[str]) -> list[str]:
    """Metrics worth comparing between arms: training losses only when every arm optimises the
    same objective (a cosine loss and an MSE loss are not on one scale); never wall time."""
    same_objective = len({objective(r) for r in runs if r.recipe is not None}) <= 1
    return [c for c in columns if c not in NOT_METRICS and c != "wall_s" and not c.endswith("/rel_mse")
            and (same_objective or not c.startswith("loss/"))]


def per_arm(rows: list[dict], metric: str) -> dict[str, dict[Any, float]]:
    """arm -> {seed: value} over finished runs."""
    out: dict[str, dict[Any, float]] = defaultdict(dict)
    for r in rows:
        v = r.get(metric)
        if r["status"] == "ok" and isinstance(v, (int, float)) and math.isfinite(v):
            out[r["arm"]][r.get("seed")] = float(v)
    return out


def arm_table(rows: list[dict], metrics: list[str]) -> list[dict[str, Any]]:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    out = []
    for arm in arms:
        entry: dict[str, Any] = {"arm": arm, "n": sum(r["arm"] == arm and r["status"] == "ok" for r in rows)}
        for m in metrics:
            values = list(per_arm(rows, m).get(arm, {}).values())
            if values:
                entry[m] = mean_ci(values)
        out.append(entry)
    return out


def comparison_table(rows: list[dict], metrics: list[str], baseline: str) -> list[dict[str, Any]]:
    out = []
    for m in metrics:
        values = per_arm(rows, m)
        if baseline not in values:
            continue
        for arm, seeds in values.items():
            if arm == baseline:
                continue
            d = difference(seeds, values[baseline])
            out.append({"arm": arm, "metric": m, "baseline": mean_ci(list(values[baseline].values())),
                        "value": mean_ci(list(seeds.values())), "difference": d})
    return out


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if hasattr(v, "text"):
        return v.text()
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    failed = [r for r in rows if r.get("error")]
    return "\n".join(f"* {r['name']} ({r['status']}): {r['error']}" for r in failed)


def comparison_markdown(comparisons: list[dict], baseline: str) -> str:
    lines = [f"| arm | metric | baseline ({baseline}) | this arm | difference [95% CI] | test | verdict |",
             "|" + "---|" * 7]
    for c in comparisons:
        d = c["difference"]
        ci = "–" if d.interval.half is None else f"[{d.interval.low:+.3g}, {d.interval.high:+.3g}]"
        test = "paired t" if d.paired else ("Welch t" if d.interval.half is not None else "n < 2")
        lines.append(f"| {c['arm']} | {c['metric']} | {_cell(c['baseline'])} | {_cell(c['value'])} | "
                     f"{d.interval.mean:+.4g} {ci} | {test} | {d.verdict} |")
    return "\n".join(lines)

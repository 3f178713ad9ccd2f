"""One picture per compared metric: every finished run as a point at its arm, and the arm's mean
with its 95% confidence interval as an error bar. Points, not bars: a bar's height invites
comparing magnitudes that need not share a scale, and hides how far the seeds spread."""
from __future__ import annotations

from pathlib import Path

from .grid import slug
from .tables import per_arm
from .stats import mean_ci


def save_plots(rows: list[dict], metrics: list[str], out_dir: Path) -> list[Path]:
    from ..eval.pictures import pyplot, save_figure

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    paths = []
    for metric in metrics:
        values = per_arm(rows, metric)
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(arms) + 2), 3.6))
        for x, arm in enumerate(arms):
            seeds = list(values.get(arm, {}).values())
            if not seeds:
                continue
            # seeds spread sideways a little so that equal values stay visible
            offsets = [(i - (len(seeds) - 1) / 2) * 0.06 for i in range(len(seeds))]
            ax.scatter([x + o for o in offsets], seeds, s=14, color="tab:blue", alpha=0.6, zorder=2)
            ci = mean_ci(seeds)
            ax.errorbar([x + 0.25], [ci.mean], yerr=[[ci.half or 0.0], [ci.half or 0.0]], fmt="o", color="black",
                        capsize=4, markersize=5, zorder=3)
            ax.annotate(ci.text(), (x + 0.3, ci.mean), fontsize=7, va="center")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(arms) + 0.2)  # room for the last arm's "mean ± half-width" text
        # two lines: a long metric name and the legend never share one line, so neither is cut
        ax.set_title(f"{metric}\npoints: seeds; black: mean ± 95% CI", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        paths.append(save_figure(fig, out_dir / f"{slug(metric.replace('/', '_'))}.png"))
    return paths

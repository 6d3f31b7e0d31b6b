"""Figures of an evaluation (``deepslicing evaluate`` writes them next to ``summary.csv``).

- ``robustness_utility.png`` and ``robustness_violations.png``: heatmaps of policy x scenario, mean
  utility per interval (with its 95 % CI) and the SLA violation rate in %;
- ``timeseries_<scenario>.png``: the first episode, one panel per slice (at most
  :data:`MAX_TIMESERIES_SLICES`): each policy's allocated share against the true needed share.

matplotlib is imported only when figures are drawn, with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from deepslicing.evaluation import UTILITY_HEATMAP, VIOLATION_HEATMAP, PairResult

MAX_TIMESERIES_SLICES = 6
DPI = 110


def plot_all(results: list[PairResult], out: Path) -> list[Path]:
    """Write the two robustness heatmaps and one time-series figure per scenario; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    rows = [r.row for r in results]
    paths = [
        plot_heatmap(
            rows,
            "utility_mean",
            out / UTILITY_HEATMAP,
            title="Mean episode utility (higher is better)",
            colorbar="utility per interval",
            cmap="viridis",
            ci="utility_ci95",
        ),
        plot_heatmap(
            rows,
            "violation_rate",
            out / VIOLATION_HEATMAP,
            title="SLA violation rate, all slices (lower is better)",
            colorbar="share of slice-intervals in violation (%)",
            cmap="Reds",
            percent=True,
        ),
    ]
    for scenario in dict.fromkeys(r.row["scenario"] for r in results):
        paths.append(
            plot_timeseries(
                [r for r in results if r.row["scenario"] == scenario],
                out / f"timeseries_{scenario}.png",
            )
        )
    return paths


def plot_heatmap(
    rows: list[dict[str, Any]],
    key: str,
    path: Path,
    *,
    title: str,
    colorbar: str,
    cmap: str,
    ci: str | None = None,
    percent: bool = False,
) -> Path:
    """A policies x scenarios heatmap of ``row[key]``, each cell annotated with its value."""
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    scale = 100.0 if percent else 1.0
    values = np.full((len(policies), len(scenarios)), np.nan)
    errors = np.zeros_like(values)
    episodes = min(r["episodes"] for r in rows)
    ci = ci if episodes > 1 else None  # one episode has no CI
    for r in rows:
        i, j = policies.index(r["policy"]), scenarios.index(r["scenario"])
        values[i, j] = scale * r[key]
        if ci is not None:
            errors[i, j] = scale * r[ci]
    fig, ax = plt.subplots(
        figsize=(max(6.5, 2.0 + 1.5 * len(scenarios)), 1.8 + 0.65 * len(policies)),
        layout="constrained",
    )
    try:
        low, high = np.nanmin(values), np.nanmax(values)
        if percent:
            low, high = 0.0, max(high, 1.0)
        elif high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(colorbar)
        colormap = image.get_cmap()
        for i in range(len(policies)):
            for j in range(len(scenarios)):
                v = values[i, j]
                if np.isnan(v):
                    continue
                red, green, blue, _ = colormap(image.norm(v))
                color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                text = f"{v:.1f} %" if percent else f"{v:.3f}"
                ax.text(j, i - (0.12 if ci else 0), text, ha="center", va="center", color=color)
                if ci is not None:
                    ax.text(
                        j,
                        i + 0.22,
                        f"±{errors[i, j]:.3f}",
                        ha="center",
                        va="center",
                        color=color,
                        fontsize="x-small",
                    )
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_yticks(range(len(policies)), policies)
        ax.set_xlabel("scenario")
        ax.set_ylabel("policy")
        subtitle = f"{episodes} episode{'s' if episodes > 1 else ''} per cell" + (
            ", ±95 % CI" if ci else ""
        )
        ax.set_title(f"{title}\n{subtitle}")
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def plot_timeseries(results: list[PairResult], path: Path) -> Path:
    """Allocated share per policy and the true needed share, per slice, first episode."""
    import matplotlib.pyplot as plt

    first = results[0]
    scenario = first.row["scenario"]
    num_slices = len(first.slice_names)
    shown = min(num_slices, MAX_TIMESERIES_SLICES)
    ncols = {1: 1, 2: 2, 4: 2}.get(shown, 3)
    nrows = math.ceil(shown / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4.2 * ncols, 3.0 * nrows + 0.8),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    try:
        intervals = np.arange(1, first.shares.shape[0] + 1)
        colors = plt.get_cmap("tab10")
        for k, ax in enumerate(axes.flat):
            if k >= shown:
                ax.set_visible(False)
                continue
            for n, r in enumerate(results):
                ax.plot(
                    intervals, r.shares[:, k], color=colors(n % 10), lw=1.3, label=r.row["policy"]
                )
            ax.plot(intervals, first.needed_share[:, k], "k--", lw=1.4, label="needed share (true)")
            name, kind = first.slice_names[k], first.slice_kinds[k]
            ax.set_title(name if name == kind else f"{name} ({kind})")
            ax.set_ylim(bottom=0.0)
            ax.grid(alpha=0.3)
            if k % ncols == 0:
                ax.set_ylabel("share of the cell")
            if k >= shown - ncols:
                ax.set_xlabel("interval")
        title = f"Scenario {scenario}: allocation vs needed share, first episode"
        if num_slices > shown:
            title += f" (first {shown} of {num_slices} slices shown)"
        fig.suptitle(title)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6))
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path

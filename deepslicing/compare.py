"""``deepslicing compare``: the runs of one MLflow experiment side by side.

Reads every run of ``experiment`` from the tracking store (the same store the MLflow UI shows) and
prints one row per run, best first by ``sort``:

| column                 | source                                                                    |
|------------------------|---------------------------------------------------------------------------|
| `run`                  | the run's name and the first 8 characters of its id                        |
| key params             | the params whose values differ between runs (paths and ids left out)       |
| `utility_mean`         | the run's last `utility_mean`                                              |
| `sla_violation_rate`   | the run's last `sla_violation_rate`                                        |
| `objective`            | the run's last `objective`, else computed from the two above (metrics.objective) |
| `eval/objective`       | the final evaluation's `objective` (training runs), when any run logged it |
| `suite/objective`      | the registry suite's score, when any run's checkpoint was registered       |

Param names are shown with dots: Tune's ``MLflowLoggerCallback`` logs ``maddpg/actor_lr`` and
``deepslicing train`` logs ``maddpg.actor_lr``; both read ``maddpg.actor_lr``, so sweeps, training
runs and registrations (``deepslicing-registry``) compare the same way. Metric names are those of
:mod:`deepslicing.metrics`, with the same meaning as there and in the MLflow UI: the first three
columns are the training rollout's, the ``eval/`` and ``suite/`` columns the measured policy's.

Outputs in ``out``: ``compare.csv`` (every run, all the columns) and ``compare.png``: utility
against SLA violation rate per run (the upper left is better; colour = objective; numbers = table
rows) and the objective per run as bars.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepslicing import metrics
from deepslicing.config import option

CSV_FILE = "compare.csv"
PLOT_FILE = "compare.png"
LOWER_IS_BETTER = (metrics.SLA_VIOLATION_RATE, metrics.CAPACITY_VIOLATIONS)
METRIC_COLUMNS = (
    metrics.UTILITY_MEAN,
    metrics.SLA_VIOLATION_RATE,
    metrics.OBJECTIVE,
    f"{metrics.EVAL}/{metrics.OBJECTIVE}",
    metrics.SUITE_SCORE,
)
HIDDEN_PARAM_WORDS = ("run_dir", "checkpoint", "trial_id", "logdir", "out", "tracking_uri", "path")
MAX_PARAM_COLUMNS = 6
DPI = 110


@dataclass(frozen=True)
class CompareConfig:
    """Compare the runs of an MLflow experiment (sweep trials, training runs or registrations):
    print a table of the params that vary, utility, SLA violation rate, objective and the
    evaluation and suite objectives, best first, and write OUT/compare.csv and OUT/compare.png."""

    experiment: str = option("", "required: the MLflow experiment, e.g. deepslicing-sweeps")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    out: str = option("compare_out", "directory for compare.csv and compare.png")
    sort: str = option(
        metrics.OBJECTIVE,
        "metric to sort by (best first; lower is better for sla_violation_rate), e.g. "
        "objective, utility_mean, sla_violation_rate, suite/objective",
    )
    max_rows: int = option(20, "rows the printed table shows (the CSV and plot have every run)")

    def __post_init__(self) -> None:
        for name in ("experiment", "out", "sort"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: required, a non-empty string; got {value!r}")
        if self.tracking_uri is not None and not isinstance(self.tracking_uri, str):
            raise ValueError(f"tracking_uri: must be a URI string, got {self.tracking_uri!r}")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int):
            raise ValueError(f"max_rows: must be an integer >= 1, got {self.max_rows!r}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows: must be an integer >= 1, got {self.max_rows!r}")


class UnknownExperiment(ValueError):
    """No experiment of that name in the store; the message lists the ones there are."""


def load_runs(experiment: str, uri: str) -> list[dict[str, Any]]:
    """Every run of ``experiment``: ``name``, ``run_id``, ``status``, ``params`` (dotted keys) and
    ``metrics`` (last values)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UnknownExperiment(
            f"experiment: no experiment {experiment!r} at {uri}; the store has {names}"
        )
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [
        {
            "name": run.info.run_name or "",
            "run_id": run.info.run_id,
            "status": run.info.status,
            "params": {k.replace("/", "."): v for k, v in run.data.params.items()},
            "metrics": dict(run.data.metrics),
        }
        for run in runs
    ]


def metric_value(run: dict[str, Any], name: str) -> float | None:
    found = run["metrics"]
    if name in found and math.isfinite(found[name]):
        return float(found[name])
    if name == metrics.OBJECTIVE:
        utility = metric_value(run, metrics.UTILITY_MEAN)
        violations = metric_value(run, metrics.SLA_VIOLATION_RATE)
        if utility is not None and violations is not None:
            return metrics.objective(utility, violations)
    return None


def varying_params(runs: list[dict[str, Any]]) -> list[str]:
    """Param keys whose values differ between runs, without paths, ids and output locations."""
    keys = sorted({k for run in runs for k in run["params"]})
    return [
        k
        for k in keys
        if not any(word in k.rsplit(".", 1)[-1] for word in HIDDEN_PARAM_WORDS)
        and len({run["params"].get(k) for run in runs}) > 1
    ]


def table_rows(runs: list[dict[str, Any]], sort: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run, best first by ``sort`` (runs without it last), and the param columns."""
    params = varying_params(runs)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run["name"], "run_id": run["run_id"], "status": run["status"]}
        row.update({p: run["params"].get(p, "") for p in params})
        row.update({m: metric_value(run, m) for m in METRIC_COLUMNS})
        if sort not in row:
            row[sort] = metric_value(run, sort)
        rows.append(row)
    sign = 1.0 if sort in LOWER_IS_BETTER else -1.0
    rows.sort(key=lambda r: (r[sort] is None, sign * r[sort] if r[sort] is not None else 0.0))
    return rows, params


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], params: list[str], sort: str, max_rows: int) -> str:
    metric_columns = [m for m in METRIC_COLUMNS if any(r[m] is not None for r in rows)]
    if sort not in metric_columns:
        metric_columns.append(sort)
    shown = params[:MAX_PARAM_COLUMNS]
    headers = ["#", "run", *shown, *metric_columns]
    body = [
        [str(i), f"{r['run'][:32]} ({r['run_id'][:8]})", *(_cell(r[p]) for p in shown)]
        + [_cell(r[m]) for m in metric_columns]
        for i, r in enumerate(rows[:max_rows], 1)
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
        *(
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in body
        ),
    ]
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more runs in {CSV_FILE}")
    if len(params) > len(shown):
        lines.append(f"more varying params in {CSV_FILE}: {', '.join(params[len(shown) :])}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def plot(rows: list[dict[str, Any]], path: Path, experiment: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbered = [(i, r) for i, r in enumerate(rows, 1)]
    points = [
        (i, r)
        for i, r in numbered
        if r[metrics.UTILITY_MEAN] is not None and r[metrics.SLA_VIOLATION_RATE] is not None
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    if points:
        x = [100 * r[metrics.SLA_VIOLATION_RATE] for _, r in points]
        y = [r[metrics.UTILITY_MEAN] for _, r in points]
        c = [r[metrics.OBJECTIVE] for _, r in points]
        dots = left.scatter(x, y, c=c, cmap="viridis", s=40, edgecolors="black", linewidths=0.5)
        fig.colorbar(dots, ax=left, label=metrics.OBJECTIVE)
        for (i, _), xi, yi in zip(points, x, y, strict=True):
            left.annotate(str(i), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:
        left.text(0.5, 0.5, "no run logged utility and SLA violations", ha="center")
    left.set_xlabel("SLA violation rate (%)")
    left.set_ylabel("utility (mean per interval)")
    left.set_title("utility vs SLA violations (upper left is better)")
    left.grid(alpha=0.3)
    scored = [(i, r) for i, r in numbered if r[metrics.OBJECTIVE] is not None]
    right.bar([str(i) for i, _ in scored], [r[metrics.OBJECTIVE] for _, r in scored])
    right.set_xlabel("run (# in the table)")
    right.set_ylabel(metrics.OBJECTIVE)
    right.set_title(f"objective = utility - {metrics.SLA_PENALTY} x violation rate")
    right.grid(axis="y", alpha=0.3)
    if len(scored) > 30:
        right.tick_params(axis="x", labelsize=6, rotation=90)
    fig.suptitle(f"MLflow experiment {experiment!r}: {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def compare(config: CompareConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Load, tabulate and write the outputs; returns the rows (best first) and param columns."""
    from deepslicing.tracking import check_server, tracking_uri

    uri = tracking_uri(config.tracking_uri)
    check_server(uri)
    runs = load_runs(config.experiment, uri)
    rows, params = table_rows(runs, config.sort)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / CSV_FILE)
    plot(rows, out / PLOT_FILE, config.experiment)
    return rows, params


def run(config: CompareConfig) -> int:
    from deepslicing.tracking import TrackingError

    try:
        rows, params = compare(config)
    except UnknownExperiment as e:
        print(f"deepslicing compare: error: {e}", file=sys.stderr)
        return 2
    except TrackingError as e:
        print(f"deepslicing compare: error: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"experiment {config.experiment!r} has no runs yet")
    else:
        print(format_table(rows, params, config.sort, config.max_rows))
    out = Path(config.out)
    print(f"\nwrote {out / CSV_FILE}\nwrote {out / PLOT_FILE}")
    return 0

"""`deepslicing compare`: runs written to a real MLflow sqlite store with RunTracker (training-style
dotted params and sweep-style '/' params) come back as a table, best first, with the params that
vary, and a comparison PNG; an unknown experiment exits 2 naming `experiment`."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from deepslicing import metrics
from deepslicing.cli import main
from deepslicing.compare import CSV_FILE, PLOT_FILE
from deepslicing.tracking import RunTracker

RUNS = [  # name, actor_lr, utility, violation rate
    ("slow-lr", 1e-4, 0.60, 0.30),
    ("mid-lr", 1e-3, 0.75, 0.20),
    ("fast-lr", 1e-2, 0.70, 0.50),
]


def _log(uri: str, experiment: str, sep: str, objective: bool) -> None:
    for name, lr, utility, violations in RUNS:
        tracker = RunTracker(
            experiment, command="pytest", description="compare test", uri=uri, run_name=name
        )
        tracker.log_params(
            {
                f"maddpg{sep}actor_lr": lr,
                f"maddpg{sep}gamma": 0.99,  # the same in every run: not a key param
                "run_dir": f"runs/{name}",  # differs, but a path: left out
            }
        )
        for step in range(3):  # the last value counts
            values = {
                metrics.UTILITY_MEAN: utility - 0.1 * (2 - step),
                metrics.SLA_VIOLATION_RATE: violations,
            }
            if objective:
                values[metrics.OBJECTIVE] = metrics.objective(
                    values[metrics.UTILITY_MEAN], violations
                )
                values[metrics.SUITE_SCORE] = values[metrics.OBJECTIVE] - 0.01  # a registered run
            tracker.log_metrics(values, step=step)
        tracker.finish()


@pytest.mark.parametrize(("sep", "objective"), [(".", False), ("/", True)])
def test_table_and_plot(tmp_path, capsys, sep, objective):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log(uri, "runs", sep, objective)
    out = tmp_path / "out"
    code = main(["compare", "--experiment", "runs", "--tracking-uri", uri, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = lines[0].split()
    assert header[:3] == ["#", "run", "maddpg.actor_lr"]
    assert "maddpg.gamma" not in header and "run_dir" not in header
    assert {metrics.UTILITY_MEAN, metrics.SLA_VIOLATION_RATE, metrics.OBJECTIVE} <= set(header)
    assert (metrics.SUITE_SCORE in header) == objective  # only when a run has it
    # best objective first: mid (0.70), slow (0.525), fast (0.575) -> mid, fast, slow
    order = [line.split()[1] for line in lines[2:5]]
    assert order == ["mid-lr", "fast-lr", "slow-lr"]
    assert "0.7500" in lines[2] and "0.7000" in lines[2]  # last utility, objective

    with (out / CSV_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["mid-lr", "fast-lr", "slow-lr"]
    assert float(rows[0][metrics.OBJECTIVE]) == pytest.approx(0.70)
    with Image.open(out / PLOT_FILE) as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_sort_by_violation_rate_puts_the_lowest_first(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log(uri, "runs", ".", False)
    code = main(
        ["compare", "--experiment", "runs", "--tracking-uri", uri, "--out", str(tmp_path / "o")]
        + ["--sort", metrics.SLA_VIOLATION_RATE, "--max-rows", "1"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[1] == "mid-lr"
    assert "2 more runs" in lines[3]


def test_unknown_experiment_exits_2_naming_experiment(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log(uri, "runs", ".", False)
    code = main(["compare", "--experiment", "nope", "--tracking-uri", uri])
    assert code == 2
    err = capsys.readouterr().err
    assert "experiment:" in err and "'runs'" in err

"""``deepslicing evaluate``: the summary, the oracle bound, the output files, seeding and the CLI."""

import csv
import dataclasses
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from deepslicing import cli
from deepslicing.baselines import BASELINES, HEURISTICS
from deepslicing.config import ConfigError, from_mapping, load
from deepslicing.evaluation import (
    COLUMNS,
    EvaluateConfig,
    evaluate,
    evaluate_pairs,
    resolve_policy,
    run,
)
from deepslicing.scenarios import SYNTHETIC_SCENARIOS
from deepslicing.simulator import SlicingConfig, SlicingSimulator

SMALL_ENV = SlicingConfig(episode_length=30)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim >= 2 and min(image.shape[:2]) > 100, (path, image.shape)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Every baseline on every synthetic scenario, written to disk: (config, rows, exit code)."""
    out = tmp_path_factory.mktemp("eval")
    config = EvaluateConfig(episodes=3, seed=7, out=str(out), env=SMALL_ENV)
    code = run(config)
    _, rows = read_csv(out / "summary.csv")
    return config, rows, code


def test_summary_has_one_row_per_policy_and_scenario(full_run):
    config, rows, code = full_run
    assert code == 0
    header, _ = read_csv(Path(config.out) / "summary.csv")
    assert tuple(header) == COLUMNS
    pairs = [(r["policy"], r["scenario"]) for r in rows]
    assert sorted(pairs) == sorted((p, s) for p in BASELINES for s in SYNTHETIC_SCENARIOS)
    for r in rows:
        assert r["episodes"] == "3"
        assert int(r["capacity_violations"]) == 0
        for key in COLUMNS[3:-1]:
            assert np.isfinite(float(r[key])), (key, r)
        for key in ("violation_rate", "violation_rate_embb", "resource_usage"):
            assert 0.0 <= float(r[key]) <= 1.0 + 1e-9


def test_oracle_bounds_every_heuristic(full_run):
    _, rows, _ = full_run
    utility = {(r["policy"], r["scenario"]): float(r["utility_mean"]) for r in rows}
    for scenario in SYNTHETIC_SCENARIOS:
        for heuristic in HEURISTICS:
            assert utility["oracle", scenario] >= utility[heuristic, scenario] - 1e-6, (
                scenario,
                heuristic,
            )


def test_outputs_are_written(full_run):
    config, _, _ = full_run
    out = Path(config.out)
    assert_png(out / "robustness_utility.png")
    assert_png(out / "robustness_violations.png")
    for scenario in SYNTHETIC_SCENARIOS:
        assert_png(out / f"timeseries_{scenario}.png")
    assert load(EvaluateConfig, out / "config.yaml") == config  # the run can be repeated


def test_seed_fixes_the_summary():
    config = EvaluateConfig(
        policy=("equal", "proportional", "oracle"),
        scenario=("burst", "flash_crowd"),
        episodes=2,
        seed=3,
        env=SMALL_ENV,
    )
    first = evaluate(config)
    assert evaluate(config) == first
    other = evaluate(dataclasses.replace(config, seed=4))
    assert [r["utility_mean"] for r in other] != [r["utility_mean"] for r in first]


def test_policies_of_a_scenario_face_the_same_traffic():
    config = EvaluateConfig(
        policy=("equal", "priority", "oracle"), scenario=("burst",), episodes=2, env=SMALL_ENV
    )
    results = evaluate_pairs(config)
    for r in results[1:]:
        np.testing.assert_array_equal(r.needed_share, results[0].needed_share)
    assert results[0].shares.shape == (SMALL_ENV.episode_length, 3)


def test_single_episode_many_slices_and_absent_kinds(tmp_path):
    env = SlicingConfig(episode_length=10, num_slices=8, kinds=("embb", "urllc") * 4)
    config = EvaluateConfig(
        policy=("equal",), scenario=("steady",), episodes=1, out=str(tmp_path), env=env
    )
    assert run(config) == 0
    _, rows = read_csv(tmp_path / "summary.csv")
    assert rows[0]["utility_ci95"] == "0.0"
    assert rows[0]["violation_rate_mmtc"] == ""  # no mMTC slice
    assert rows[0]["violation_rate_embb"] != ""
    assert_png(tmp_path / "timeseries_steady.png")


def test_all_includes_trace_when_a_trace_is_given(tmp_path):
    trace = tmp_path / "trace.csv"
    rng = np.random.default_rng(0)
    lines = ["t,embb,urllc,mmtc"] + [
        f"{t},{40 * a:.3f},{3000 * b:.3f},{5000 * c:.3f}"
        for t, (a, b, c) in enumerate(rng.uniform(0.5, 1.5, size=(50, 3)))
    ]
    trace.write_text("\n".join(lines) + "\n")
    config = EvaluateConfig(
        policy=("equal", "oracle"),
        episodes=1,
        plots=False,
        out=str(tmp_path / "out"),
        env=dataclasses.replace(SMALL_ENV, trace_path=str(trace)),
    )
    assert config.resolved_scenarios() == (*SYNTHETIC_SCENARIOS, "trace")
    assert run(config) == 0
    _, rows = read_csv(tmp_path / "out" / "summary.csv")
    assert {r["scenario"] for r in rows} == {*SYNTHETIC_SCENARIOS, "trace"}
    assert not list((tmp_path / "out").glob("*.png"))  # plots=False


def test_cli_writes_the_summary(tmp_path, capsys):
    code = cli.main(
        [
            "evaluate",
            "--policy",
            "equal,oracle",
            "--scenario",
            "steady,burst",
            "--episodes",
            "2",
            "--set",
            "env.episode_length=20",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    header, rows = read_csv(tmp_path / "summary.csv")
    assert tuple(header) == COLUMNS
    assert [(r["policy"], r["scenario"]) for r in rows] == [
        ("equal", "steady"),
        ("oracle", "steady"),
        ("equal", "burst"),
        ("oracle", "burst"),
    ]
    printed = capsys.readouterr().out
    assert "utility" in printed and str(tmp_path / "summary.csv") in printed


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--scenario", "steady,nowhere", "scenario"),
        ("--policy", "equal,genius", "policy"),
        ("--episodes", "0", "episodes"),
        ("--policy", "equal,equal", "policy"),
        ("--scenario", "", "scenario"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, capsys, flag, value, field):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", flag, value, "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scenario": ("nowhere",)}, "scenario"),
        ({"scenario": ("all", "steady")}, "scenario"),
        ({"scenario": ("trace",)}, "scenario"),  # no env.trace_path
        ({"scenario": ()}, "scenario"),
        ({"policy": ("genius",)}, "policy"),
        ({"policy": ()}, "policy"),
        ({"policy": ("oracle", "oracle")}, "policy"),
        ({"episodes": 0}, "episodes"),
        ({"seed": -1}, "seed"),
        ({"out": ""}, "out"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EvaluateConfig(**kwargs)
    with pytest.raises(ConfigError, match=f"^{field}:"):
        from_mapping(
            EvaluateConfig, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        )


def test_resolve_policy():
    sim = SlicingSimulator(SMALL_ENV, num_envs=2)
    observation = sim.reset(0)
    for name in BASELINES:
        assert resolve_policy(name, sim)(observation).shape == (2, 3)
    with pytest.raises(ValueError, match=r"^policy: unknown policy 'genius'; must be one of \("):
        resolve_policy("genius", sim)

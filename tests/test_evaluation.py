"""``deepslicing evaluate``: the summary, the oracle bound, the output files, seeding and the CLI."""

import csv
import dataclasses
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from deepslicing import cli
from deepslicing.baselines import BASELINES, COMPARATORS, HEURISTICS, NEED_FORECAST
from deepslicing.config import ConfigError, from_mapping, load
from deepslicing.evaluation import (
    COLUMNS,
    SCORECARD_COLUMNS,
    EvaluateConfig,
    evaluate,
    evaluate_pair,
    evaluate_pairs,
    format_scorecard,
    resolve_policy,
    run,
    scorecard,
    write_outputs,
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


def test_utility_is_also_reported_as_percent_of_the_oracle(full_run):
    config, rows, _ = full_run
    oracle = {r["scenario"]: float(r["utility_mean"]) for r in rows if r["policy"] == "oracle"}
    for r in rows:
        expected = 100.0 if r["policy"] == "oracle" else 100 * float(r["utility_mean"])
        expected /= 1.0 if r["policy"] == "oracle" else oracle[r["scenario"]]
        assert float(r["utility_pct_oracle"]) == pytest.approx(expected, rel=1e-12)
    # no trained policy among the baselines: the scorecard has its header and no verdicts
    header, card = read_csv(Path(config.out) / "scorecard.csv")
    assert tuple(header) == SCORECARD_COLUMNS and card == []


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
    assert rows[0]["utility_pct_oracle"] == ""  # no oracle evaluated
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
    assert "mean % of oracle over scenarios: equal " in printed
    assert str(tmp_path / "scorecard.csv") in printed


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


def summary_row(policy, scenario, utility, violation_rate):
    return {
        "policy": policy,
        "scenario": scenario,
        "utility_mean": utility,
        "utility_pct_oracle": None,
        "violation_rate": violation_rate,
    }


def test_scorecard_verdicts_on_a_synthetic_summary():
    trained = "runs/maddpg/checkpoints/iter_000030"
    rows = [
        summary_row("proportional", "steady", 0.85, 0.20),
        summary_row("mpc", "steady", 0.90, 0.40),
        summary_row("oracle", "steady", 0.99, 0.05),  # an upper bound, never the comparator
        summary_row(trained, "steady", 0.92, 0.15),
        summary_row("proportional", "burst", 0.80, 0.20),
        summary_row("forecast", "burst", 0.83, 0.45),
        summary_row(trained, "burst", 0.82, 0.25),
        summary_row("equal", "outage", 0.70, 0.30),
        summary_row(trained, "outage", 0.75, 0.10),
        summary_row("oracle", "diurnal", 0.97, 0.05),
        summary_row(trained, "diurnal", 0.80, 0.20),
    ]
    card = {c["scenario"]: c for c in scorecard(rows)}
    assert list(card) == ["steady", "burst", "outage", "diurnal"]  # trained policy rows only
    assert all(tuple(c) == SCORECARD_COLUMNS for c in card.values())
    steady = card["steady"]
    assert (steady["best_comparator"], steady["best_comparator_utility"]) == ("mpc", 0.90)
    assert steady["margin"] == pytest.approx(0.02) and steady["mpc_utility"] == 0.90
    assert steady["proportional_violation_rate"] == 0.20 and steady["verdict"] == "pass"
    assert card["burst"]["best_comparator"] == "forecast"
    assert card["burst"]["margin"] == pytest.approx(-0.01)
    assert card["burst"]["mpc_utility"] is None
    assert card["burst"]["verdict"] == "fail: utility, violations"
    assert card["outage"]["verdict"] == "incomplete: no proportional"
    assert card["diurnal"]["best_comparator"] is None
    assert card["diurnal"]["verdict"] == "incomplete: no comparator, no proportional"
    text = format_scorecard(rows, list(card.values()))
    assert f"{trained}: passes 1 of 4 scenarios; earns its place: no" in text


def test_evaluate_writes_a_scorecard_for_a_trained_policy(tmp_path):
    """A checkpoint policy's label with a stand-in callable (training one takes minutes): its
    scorecard rows agree with the summary and carry a verdict."""
    config = EvaluateConfig(
        policy=("proportional", "forecast", "mpc", "oracle"),
        scenario=("steady", "burst"),
        episodes=2,
        seed=1,
        out=str(tmp_path),
        plots=False,
        env=SMALL_ENV,
    )
    trained = str(tmp_path / "checkpoints" / "iter_000001")

    def stand_in(obs):  # asks for its forecast and a fixed margin
        return np.minimum(obs[..., NEED_FORECAST] * 1.1, 1.0)

    results = evaluate_pairs(config)
    for scenario in config.scenario:
        env = dataclasses.replace(SMALL_ENV, scenario=scenario)
        results.append(evaluate_pair(env, trained, config.episodes, config.seed, stand_in))
    write_outputs(config, results, tmp_path)
    _, summary = read_csv(tmp_path / "summary.csv")
    assert {r["utility_pct_oracle"] for r in summary if r["policy"] == "oracle"} == {"100.0"}
    assert all(r["utility_pct_oracle"] != "" for r in summary)
    header, card = read_csv(tmp_path / "scorecard.csv")
    assert tuple(header) == SCORECARD_COLUMNS
    assert [(c["policy"], c["scenario"]) for c in card] == [(trained, "steady"), (trained, "burst")]
    by_pair = {(r["policy"], r["scenario"]): r for r in summary}
    for c in card:
        own = by_pair[trained, c["scenario"]]
        comparators = {
            p: float(by_pair[p, c["scenario"]]["utility_mean"])
            for p in COMPARATORS
            if (p, c["scenario"]) in by_pair
        }
        best = max(comparators, key=comparators.get)
        assert c["best_comparator"] == best and c["best_comparator"] != "oracle"
        assert float(c["margin"]) == pytest.approx(
            float(own["utility_mean"]) - comparators[best], abs=1e-12
        )
        assert float(c["mpc_utility"]) == comparators["mpc"]
        proportional = float(by_pair["proportional", c["scenario"]]["violation_rate"])
        beats = float(own["utility_mean"]) > comparators[best]
        fewer = float(own["violation_rate"]) <= proportional
        expected = {
            (True, True): "pass",
            (False, True): "fail: utility",
            (True, False): "fail: violations",
            (False, False): "fail: utility, violations",
        }[beats, fewer]
        assert c["verdict"] == expected

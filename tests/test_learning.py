"""Learning tests (slow): the default training beats every comparator on every synthetic
scenario with fewer SLA violations than ``proportional``; a URLLC budget an operator sets is kept.

The default ``deepslicing train`` settings (3 slices, the ``mix`` scenario) run on a real local Ray;
the trained policy and the comparators then run the same held-out episodes of each of the five
synthetic scenarios (a seed training never drew). Asserted, with margins:

- per scenario, utility >= the best of equal, proportional, priority, static, forecast and mpc
  + ``UTILITY_MARGIN``;
- per scenario, SLA violation rate <= proportional's - ``VIOLATION_MARGIN``;
- mean over scenarios of % of the oracle's utility >= 90;
- no allocation breaks the capacity;
- trained on ``steady`` with ``cost_budget.urllc`` 0.02: URLLC violation rate <= 0.03 on held-out
  ``steady`` episodes, utility >= proportional's + 0.01.

Run them with ``python -m pytest -m slow tests/test_learning.py -s`` (the tables are printed).
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from deepslicing.baselines import COMPARATORS
from deepslicing.config import load
from deepslicing.evaluation import evaluate_pair
from deepslicing.scenarios import SYNTHETIC_SCENARIOS
from deepslicing.train import TrainConfig, algorithm_config
from policies.maddpg.env_runner import slicing_config

EVAL_SEED = 20_261_125  # held out: training draws its episodes from seed 0's generator
EVAL_EPISODES = 8
UTILITY_MARGIN = 0.0005
VIOLATION_MARGIN = 0.001
MIN_PCT_OF_ORACLE = 90.0
BUDGET_S = 15 * 60


def train_default(checkpoint_dir: str, *overrides: str) -> dict:
    config = load(TrainConfig, overrides=overrides)
    algo = algorithm_config(config).build_algo()
    start = time.perf_counter()
    try:
        for _ in range(config.iterations):
            algo.train()
        algo.save_to_path(checkpoint_dir)
        env = slicing_config(algo.config)
        multipliers = [round(float(m), 3) for m in algo.get_multipliers()]
    finally:
        algo.stop()
    return {"env": env, "minutes": (time.perf_counter() - start) / 60, "multipliers": multipliers}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_default_training_beats_the_heuristics_on_every_scenario(ray_local, tmp_path):
    start = time.perf_counter()
    checkpoint = str(tmp_path / "trained")
    run = train_default(checkpoint)
    policies = (*COMPARATORS, "oracle", checkpoint)
    rows = {}
    for scenario in SYNTHETIC_SCENARIOS:
        env = dataclasses.replace(run["env"], scenario=scenario)
        for name in policies:
            rows[scenario, name] = evaluate_pair(env, name, EVAL_EPISODES, EVAL_SEED).row
    elapsed = time.perf_counter() - start

    print()
    print(f"{'scenario':<12}{'policy':<14}{'utility':>9}{'% oracle':>10}{'viol. rate':>12}")
    pct = {}
    for (scenario, name), row in rows.items():
        oracle = rows[scenario, "oracle"]["utility_mean"]
        pct[scenario, name] = 100.0 * row["utility_mean"] / oracle
        label = "trained" if name == checkpoint else name
        print(
            f"{scenario:<12}{label:<14}{row['utility_mean']:>9.4f}{pct[scenario, name]:>10.1f}"
            f"{row['violation_rate']:>12.4f}"
        )
    mean_pct = sum(pct[s, checkpoint] for s in SYNTHETIC_SCENARIOS) / len(SYNTHETIC_SCENARIOS)
    print(
        f"trained: {run['minutes']:.2f} min, multipliers {run['multipliers']}, "
        f"mean {mean_pct:.1f} % of the oracle; total {elapsed / 60:.2f} min"
    )

    assert elapsed < BUDGET_S
    for scenario in SYNTHETIC_SCENARIOS:
        trained = rows[scenario, checkpoint]
        best = max(rows[scenario, c]["utility_mean"] for c in COMPARATORS)
        assert trained["utility_mean"] >= best + UTILITY_MARGIN, scenario
        proportional = rows[scenario, "proportional"]["violation_rate"]
        assert trained["violation_rate"] <= proportional - VIOLATION_MARGIN, scenario
    assert mean_pct >= MIN_PCT_OF_ORACLE
    for key, row in rows.items():
        assert row["capacity_violations"] == 0, key


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_urllc_budget_is_kept_on_held_out_episodes(ray_local, tmp_path):
    checkpoint = str(tmp_path / "budget")
    run = train_default(checkpoint, "env.scenario=steady", "maddpg.cost_budget.urllc=0.02")
    env = dataclasses.replace(run["env"], scenario="steady")
    trained = evaluate_pair(env, checkpoint, EVAL_EPISODES, EVAL_SEED).row
    proportional = evaluate_pair(env, "proportional", EVAL_EPISODES, EVAL_SEED).row
    print()
    for name, row in (("trained", trained), ("proportional", proportional)):
        print(
            f"{name:<14}utility {row['utility_mean']:.4f}  URLLC viol. "
            f"{row['violation_rate_urllc']:.4f}  all {row['violation_rate']:.4f}"
        )
    print(f"multipliers {run['multipliers']}, trained in {run['minutes']:.2f} min")
    assert trained["violation_rate_urllc"] <= 0.03
    assert trained["utility_mean"] >= proportional["utility_mean"] + 0.01

"""Learning test (slow): the default training (MADDPG, ADMM + Lagrangian, the scenario mix) beats
the simple heuristics on every synthetic scenario and keeps fewer SLA violations than
``proportional``.

The default ``deepslicing train`` settings (3 slices, 30 iterations on the ``mix`` scenario) run on
a real local Ray; the trained policy and the comparators then run the same held-out episodes of
each of the five synthetic scenarios (a seed training never drew). Asserted, with margins:

- per scenario, utility >= the best of equal, proportional, priority and static + 0.01;
- per scenario, SLA violation rate <= proportional's;
- mean over scenarios of % of the oracle's utility >= 90;
- no allocation breaks the capacity.

The table printed also shows the ``forecast`` and ``mpc`` comparators: on this cell the trained
policy does not beat them yet (docs/scorecard.md), so that is reported, not asserted.

Run it with ``python -m pytest -m slow tests/test_learning.py -s`` (the numbers are printed).
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from deepslicing.baselines import COMPARATORS
from deepslicing.evaluation import evaluate_pair
from deepslicing.scenarios import SYNTHETIC_SCENARIOS
from deepslicing.train import TrainConfig, algorithm_config
from policies.maddpg.env_runner import slicing_config

EVAL_SEED = 20_261_125  # held out: training draws its episodes from seed 0's generator
EVAL_EPISODES = 8
SIMPLE_HEURISTICS = ("equal", "proportional", "priority", "static")
UTILITY_MARGIN = 0.01
MIN_PCT_OF_ORACLE = 90.0
BUDGET_S = 15 * 60


def train_default(checkpoint_dir: str) -> dict:
    config = TrainConfig()
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
        best = max(rows[scenario, h]["utility_mean"] for h in SIMPLE_HEURISTICS)
        assert trained["utility_mean"] >= best + UTILITY_MARGIN, scenario
        assert trained["violation_rate"] <= rows[scenario, "proportional"]["violation_rate"]
    assert mean_pct >= MIN_PCT_OF_ORACLE
    for key, row in rows.items():
        assert row["capacity_violations"] == 0, key

"""Learning test (slow): MADDPG with ADMM + Lagrangian learns a better allocator than the heuristics.

On the default scenario (steady traffic, 3 slices) and with the default MADDPG settings, the
variants "both" (ADMM coordinator + Lagrange multipliers) and "unconstrained" (projection, no
multipliers) are trained one after the other on a real local Ray, within 15 minutes in all on a
2-core machine. Each trained policy and the equal and proportional baselines then run the same
held-out evaluation episodes (a seed training never drew). "both" must beat both baselines on mean
utility, violate SLAs less often than "unconstrained", and no allocation may break the capacity.

Run it with ``python -m pytest -m slow tests/test_learning.py -s`` (the numbers are printed).
"""

from __future__ import annotations

import time

import pytest

from deepslicing.evaluation import evaluate_pair
from deepslicing.simulator import SlicingConfig
from policies.maddpg import MADDPGConfig
from policies.maddpg.env_runner import slicing_config

SEED = 0
EVAL_SEED = 20_261_125  # held out: training draws its episodes from SEED's generator
EVAL_EPISODES = 16
ITERATIONS = 50  # per variant; one iteration = one 200-interval episode of each of 8 cells
VARIANT_TIME_CAP_S = 6.5 * 60  # stop a variant early on a much slower machine
BUDGET_S = 15 * 60


def train(variant: str, checkpoint_dir: str) -> dict:
    config = MADDPGConfig().training(variant=variant).debugging(seed=SEED)
    algo = config.build_algo()
    start = time.perf_counter()
    iterations, rates = 0, []
    try:
        while iterations < ITERATIONS and time.perf_counter() - start < VARIANT_TIME_CAP_S:
            result = algo.train()
            iterations += 1
            rates.append(result["deepslicing"]["env_steps_per_s"])
        algo.save_to_path(checkpoint_dir)
        env = slicing_config(algo.config)
        multipliers = [round(float(m), 3) for m in algo.get_multipliers()]
    finally:
        algo.stop()
    learning_rates = rates[3:] or rates  # leave out the warm-up iterations (no updates yet)
    return {
        "env": env,
        "iterations": iterations,
        "minutes": (time.perf_counter() - start) / 60,
        "env_steps_per_s": sorted(learning_rates)[len(learning_rates) // 2],
        "multipliers": multipliers,
    }


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_both_beats_baselines_and_violates_less_than_unconstrained(ray_local, tmp_path):
    start = time.perf_counter()
    runs = {v: train(v, str(tmp_path / v)) for v in ("both", "unconstrained")}
    rows = {
        name: evaluate_pair(SlicingConfig(), name, EVAL_EPISODES, EVAL_SEED).row
        for name in ("equal", "proportional")
    }
    for variant, run in runs.items():
        row = evaluate_pair(run["env"], str(tmp_path / variant), EVAL_EPISODES, EVAL_SEED).row
        rows[variant] = row
    elapsed = time.perf_counter() - start

    print()
    print(f"{'policy':<14}{'utility':>9}{'viol. rate':>12}{'cap. viol.':>12}")
    for name, row in rows.items():
        print(
            f"{name:<14}{row['utility_mean']:>9.4f}{row['violation_rate']:>12.4f}"
            f"{row['capacity_violations']:>12d}"
        )
    for variant, run in runs.items():
        print(
            f"{variant}: {run['iterations']} iterations in {run['minutes']:.2f} min, "
            f"median {run['env_steps_per_s']:.0f} env steps/s while learning, "
            f"multipliers {run['multipliers']}"
        )
    print(f"total (training both and evaluating): {elapsed / 60:.2f} min")

    both, unconstrained = rows["both"], rows["unconstrained"]
    assert elapsed < BUDGET_S
    assert both["utility_mean"] > rows["equal"]["utility_mean"]
    assert both["utility_mean"] > rows["proportional"]["utility_mean"]
    assert both["violation_rate"] < unconstrained["violation_rate"]
    for name, row in rows.items():
        assert row["capacity_violations"] == 0, name

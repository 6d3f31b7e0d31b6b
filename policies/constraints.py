"""SLA constraints for MADDPG: Lagrange multipliers adapted by dual ascent, in an RLlib callback.

Each slice i has an SLA cost c_i (1 for an interval in violation, see :mod:`deepslicing.model`)
and a budget b (``cost_budget``, an allowed violation rate). MADDPG maximises
sum_t r_i - lambda_i c_i; after every training iteration the multiplier follows dual ascent on the
constraint mean_t c_i <= b (Boyd and Vandenberghe 2004, section 5; as in constrained RL,
Tessler et al. 2019):

    lambda_i <- clip(lambda_i + multiplier_lr * (C_i - b), 0, multiplier_max)

where C_i is the slice's mean per-interval cost over the episodes that ended this iteration. The
multipliers live in the learner (its state, like SAC's temperature), so they are applied to
replayed raw costs at learning time and are saved and restored with every algorithm checkpoint.
The upper bound (projected dual ascent onto a box) keeps a budget no policy can meet from
growing a multiplier without limit. Iterations that ended no episode leave them unchanged. Variants without multipliers
(``unconstrained``, ``admm``) keep them at 0.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_EPISODES

from deepslicing import metrics


def dual_ascent(
    multipliers: np.ndarray,
    episode_cost: np.ndarray,
    budget: float,
    step_size: float,
    upper: float = np.inf,
) -> np.ndarray:
    """One projected dual ascent step: clip(lambda + step_size * (cost - budget), 0, upper)."""
    step = np.asarray(multipliers) + step_size * (np.asarray(episode_cost) - budget)
    return np.clip(step, 0.0, upper)


class ConstraintCallback(RLlibCallback):
    """After each iteration, update MADDPG's multipliers from the measured episode costs and
    report them in ``result[metrics.SECTION]["multiplier/<slice>"]``."""

    def on_train_result(self, *, algorithm, metrics_logger=None, result, **kwargs) -> None:
        config = algorithm.config
        multipliers = algorithm.get_multipliers()
        runners = result.get(ENV_RUNNER_RESULTS, {})
        costs = runners.get(metrics.EPISODE_COST, {})
        ended = runners.get(NUM_EPISODES, 0)
        names = algorithm.slice_names
        if config.uses_multipliers and ended and all(n in costs for n in names):
            cost = np.array([float(costs[n]) for n in names])
            multipliers = dual_ascent(
                multipliers, cost, config.cost_budget, config.multiplier_lr, config.multiplier_max
            )
            algorithm.set_multipliers(multipliers)
        section = result.setdefault(metrics.SECTION, {})
        for name, value in zip(names, multipliers, strict=True):
            section[metrics.per_slice(metrics.MULTIPLIER, name)] = float(value)

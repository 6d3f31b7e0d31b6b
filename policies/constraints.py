"""SLA constraints for MADDPG: Lagrange multipliers adapted by dual ascent, in an RLlib callback.

Each slice i has an SLA cost c_i (1 for an interval in violation, see :mod:`deepslicing.model`)
and a multiplier lambda_i, the price of a violation: MADDPG maximises sum_t r_i - lambda_i c_i.
Every multiplier starts at ``initial_multiplier``. A slice may have a budget b_i (``cost_budget``:
one allowed violation rate for every slice, or one per slice kind, e.g. ``{"urllc": 0.02}``);
after every training iteration its multiplier follows dual ascent on the constraint
mean_t c_i <= b_i (Boyd and Vandenberghe 2004, section 5; as in constrained RL, Tessler et al.
2019):

    lambda_i <- clip(lambda_i + multiplier_lr * (C_i - b_i), 0, multiplier_max)

where C_i is the slice's mean per-interval cost over the episodes that ended this iteration. A
slice without a budget keeps its starting price throughout: by default no kind has a budget and
every violation costs the same (:data:`DEFAULT_VIOLATION_PRICE`), which is what maximises utility
at a given overall violation rate (equal marginal utility per violation in every slice). The
multipliers live in the learner (its state, like SAC's temperature), so they are applied to
replayed raw costs at learning time and are saved and restored with every algorithm checkpoint.
The upper bound (projected dual ascent onto a box) keeps a budget no policy can meet from
growing a multiplier without limit; a multiplier at its cap while its slice is still over budget is
reported, not hidden: ``budget_unreachable/<slice>`` is 1 in the result (and the training progress
says so), since then no policy the multiplier can buy keeps that budget - typically one below the
violation rate even the per-interval oracle has. Iterations that ended no episode leave the
multipliers unchanged. Variants without multipliers (``unconstrained``, ``admm``) keep them at 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_EPISODES

from deepslicing import metrics
from deepslicing.slices import KINDS

# One price of a violation for every slice, in units of the cell's utility per interval. Measured
# on the default training (docs/scorecard.md): a lower price buys utility with violations, a higher
# one the reverse; this one keeps the violation rate below `proportional`'s on every synthetic
# scenario while beating `mpc` in utility.
DEFAULT_VIOLATION_PRICE = 0.055
CostBudget = float | Mapping[str, float | None] | None


def slice_budgets(budget: CostBudget, kinds: Sequence[str]) -> np.ndarray:
    """Per slice, its allowed violation rate: ``budget`` itself, or its kind's entry; NaN for a
    slice without a budget (None, or a kind not named), whose multiplier stays at its start."""
    if isinstance(budget, Mapping):
        rates = [budget.get(k) for k in kinds]
        return np.array([np.nan if r is None else float(r) for r in rates])
    return np.full(len(kinds), np.nan if budget is None else float(budget))


def check_budget(budget: object) -> None:
    """Raises ValueError naming the bad entry: a number in [0, 1], or a map kind -> number."""
    entries = budget.items() if isinstance(budget, Mapping) else [(None, budget)]
    for kind, value in entries:
        key = "cost_budget" if kind is None else f"cost_budget.{kind}"
        if kind is not None and kind not in KINDS:
            raise ValueError(f"{key}: must be one of the slice kinds {KINDS}")
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (0.0 <= value <= 1.0)
        ):
            raise ValueError(f"{key}: must be a violation rate in [0, 1], got {value!r}")


def dual_ascent(
    multipliers: np.ndarray,
    episode_cost: np.ndarray,
    budget: float | np.ndarray,
    step_size: float,
    upper: float = np.inf,
) -> np.ndarray:
    """One projected dual ascent step: clip(lambda + step_size * (cost - budget), 0, upper);
    a multiplier whose budget is NaN (no budget) is left as it is."""
    multipliers = np.asarray(multipliers, dtype=np.float64)
    step = np.clip(multipliers + step_size * (np.asarray(episode_cost) - budget), 0.0, upper)
    return np.where(np.isnan(budget), multipliers, step)


def unreachable(
    multipliers: np.ndarray, episode_cost: np.ndarray, budget: np.ndarray, upper: float
) -> np.ndarray:
    """Per slice: is its multiplier at the cap while its cost is still above budget?"""
    return (np.asarray(multipliers) >= upper) & (np.asarray(episode_cost) > budget)


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
        budget = slice_budgets(config.cost_budget, algorithm.slice_kinds)
        stuck = np.zeros(len(names), dtype=bool)
        if config.uses_multipliers and ended and all(n in costs for n in names):
            cost = np.array([float(costs[n]) for n in names])
            multipliers = dual_ascent(
                multipliers, cost, budget, config.multiplier_lr, config.multiplier_max
            )
            algorithm.set_multipliers(multipliers)
            stuck = unreachable(multipliers, cost, budget, config.multiplier_max)
        section = result.setdefault(metrics.SECTION, {})
        for name, value, b, s in zip(names, multipliers, budget, stuck, strict=True):
            section[metrics.per_slice(metrics.MULTIPLIER, name)] = float(value)
            if not np.isnan(b):
                section[metrics.per_slice(metrics.COST_BUDGET, name)] = float(b)
                section[metrics.per_slice(metrics.BUDGET_UNREACHABLE, name)] = float(s)

"""Reference allocation policies: four heuristics and the per-interval oracle.

A policy maps the observation ``(num_envs, num_slices, 6)`` to requested shares
``(num_envs, num_slices)``; the simulator's coordinator makes them feasible. Heuristics see what the
agents see (the interval just finished); the oracle sees the true needed shares of the interval it
allocates, so it is an upper bound, not a deployable policy.

| name           | requests                                                                           |
|----------------|------------------------------------------------------------------------------------|
| `equal`        | 1 / num_slices each                                                                |
| `proportional` | the whole cell, split in proportion to last interval's needed shares               |
| `priority`     | URLLC first, then eMBB, then mMTC: each its last needed share + 10 %, while room lasts |
| `static`       | a fixed split in proportion to each slice's needed share at its mean demand and mean spectral efficiency |
| `oracle`       | exact maximiser of this interval's utility given its true needed shares (cvxpy LP) |
"""

from __future__ import annotations

from collections.abc import Callable

import cvxpy as cp
import numpy as np

from deepslicing import model
from deepslicing.simulator import SlicingSimulator

Policy = Callable[[np.ndarray], np.ndarray]

HEURISTICS = ("equal", "proportional", "priority", "static")
BASELINES = (*HEURISTICS, "oracle")
PRIORITY_ORDER = ("urllc", "embb", "mmtc")
PRIORITY_MARGIN = 0.10
NEEDED = model.FEATURES.index("needed_share")


def make_policy(name: str, sim: SlicingSimulator) -> Policy:
    """The named baseline for the cells of ``sim``."""
    if name not in BASELINES:
        raise ValueError(f"policy: must be one of {BASELINES}, got {name!r}")
    if name == "oracle":
        return Oracle(sim)
    if name == "equal":
        return lambda obs: np.full(obs.shape[:-1], 1.0 / obs.shape[-2])
    if name == "proportional":
        return _proportional
    if name == "priority":
        rank = np.array([PRIORITY_ORDER.index(k) for k in sim.slices.kind])
        order = np.argsort(rank, kind="stable")
        return lambda obs: _priority(obs, order)
    nominal = model.needed_share(
        sim.slices, sim.cell, sim.slices.mean_demand, sim.slices.mean_spectral_efficiency
    )
    split = nominal / nominal.sum()
    return lambda obs: np.broadcast_to(split, obs.shape[:-1])


def _proportional(obs: np.ndarray) -> np.ndarray:
    need = obs[..., NEEDED].astype(np.float64)
    total = need.sum(axis=-1, keepdims=True)
    return np.where(total > 0, need / np.where(total > 0, total, 1.0), 1.0 / need.shape[-1])


def _priority(obs: np.ndarray, order: np.ndarray) -> np.ndarray:
    want = obs[..., NEEDED].astype(np.float64) * (1.0 + PRIORITY_MARGIN)
    requests = np.zeros_like(want)
    room = np.ones(want.shape[:-1])
    for i in order:
        requests[..., i] = np.minimum(want[..., i], room)
        room = room - requests[..., i]
    return requests


class Oracle:
    """Solves each interval's allocation exactly with cvxpy, knowing its true needed shares.

    The utility sum_i w_i min(1, x_i / need_i) - waste * sum_i max(0, x_i - need_i) is concave and
    piecewise linear, so maximising it over {x >= 0, sum x <= 1} is a linear program; all cells of a
    batch are one problem, compiled once (parameters for the needs) and re-solved per interval.
    """

    def __init__(self, sim: SlicingSimulator):
        self.sim = sim
        shape = (sim.num_envs, sim.num_slices)
        self.need = cp.Parameter(shape, nonneg=True)
        self.inv_need = cp.Parameter(shape, nonneg=True)
        # 1 where need == 0: such a slice is satisfied whatever it gets
        self.nothing_needed = cp.Parameter(shape, nonneg=True)
        x = cp.Variable(shape, nonneg=True)
        weight = np.broadcast_to(sim.slices.utility_weight, shape)
        sat = cp.minimum(1.0, cp.multiply(x, self.inv_need) + self.nothing_needed)
        objective = cp.sum(cp.multiply(weight, sat)) - sim.cell.waste_weight * cp.sum(
            cp.pos(x - self.need)
        )
        self.x = x
        self.problem = cp.Problem(cp.Maximize(objective), [cp.sum(x, axis=1) <= 1.0])

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        need = self.sim.next_need()
        self.need.value = need
        self.inv_need.value = np.where(need > 0, 1.0 / np.where(need > 0, need, 1.0), 0.0)
        self.nothing_needed.value = (need <= 0).astype(np.float64)
        self.problem.solve(solver=cp.CLARABEL)
        if self.problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise RuntimeError(f"oracle: cvxpy returned status {self.problem.status}")
        return np.clip(self.x.value, 0.0, 1.0)

"""Reference allocation policies: what an operator would run instead of a learned policy, and the
per-interval oracle.

A policy maps the observation ``(num_envs, num_slices, 14)`` (:data:`deepslicing.model.FEATURES`)
to requested shares ``(num_envs, num_slices)``; the simulator's coordinator makes them feasible.
The comparators see what the agents see (the interval just finished, and the slice's own forecast
of the next one); the oracle sees the true needed shares of the interval it allocates, so it is an
upper bound, not a deployable policy.

| name           | requests                                                                           |
|----------------|------------------------------------------------------------------------------------|
| `equal`        | 1 / num_slices each                                                                |
| `proportional` | the whole cell, split in proportion to last interval's needed shares               |
| `priority`     | URLLC first, then eMBB, then mMTC: each its last needed share + 10 %, while room lasts |
| `static`       | a fixed split in proportion to each slice's needed share at its mean demand and mean spectral efficiency |
| `forecast`     | each slice alone: its forecast of the next needed share + `HEADROOM_SIGMAS` x its forecast error (`need_forecast`, `forecast_error` of the observation) |
| `mpc`          | the oracle's LP solved on the forecast needs (`need_forecast` + `MPC_HEADROOM_SIGMAS` x `forecast_error`) instead of the true ones, every interval |
| `oracle`       | exact maximiser of this interval's utility given its true needed shares (cvxpy LP) |

`forecast` and `mpc` are stateless: the forecaster (:mod:`deepslicing.forecast`) runs in the
simulator and its output is part of every observation. `forecast` is what each slice would ask for
on its own; `mpc` is a central planner that knows the utility weights and the cell's capacity and
plans one interval ahead (receding horizon of one interval: the utility has no coupling across
intervals, because traffic does not depend on allocations).

Headroom (in units of the slice's smoothed forecast error), measured on traffic the evaluation's
default seed does not use: 3 default slices, the five synthetic scenarios, 16 episodes of 200
intervals each, seed 1, projection coordinator. Mean utility over the scenarios (and the paired
difference to the best setting, 95 % CI over episodes) and the SLA violation rate:

| headroom | `forecast` utility         | violations | `mpc` utility              | violations |
|----------|----------------------------|------------|----------------------------|------------|
| 0        | 0.8701 (-0.0013 ± 0.0008)  | 56.3 %     | 0.8941 (-0.0054 ± 0.0006)  | 52.4 %     |
| 0.25     | **0.8713**                 | 50.5 %     | 0.8990 (-0.0005 ± 0.0003)  | 45.0 %     |
| 0.5      | 0.8684 (-0.0030 ± 0.0007)  | 45.5 %     | **0.8996**                 | 38.2 %     |
| 0.75     | 0.8625 (-0.0089 ± 0.0013)  | 42.2 %     | 0.8971 (-0.0025 ± 0.0003)  | 33.3 %     |
| 1.0      | 0.8546 (-0.0168 ± 0.0019)  | 40.0 %     | 0.8924 (-0.0072 ± 0.0005)  | 29.5 %     |
| 1.5      | 0.8357 (-0.0356 ± 0.0027)  | 37.8 %     | 0.8788 (-0.0207 ± 0.0009)  | 24.6 %     |

So ``HEADROOM_SIGMAS = 0.25`` (the best on each of the five scenarios) and
``MPC_HEADROOM_SIGMAS = 0.5`` (the best on steady, diurnal and flash_crowd; 0.25 is ahead by 0.002
on burst and 0.0002 on outage). With `forecast`'s 0.25, `mpc` would lose 0.0005 of mean utility;
with no headroom, 0.0054. More headroom trades utility for fewer SLA violations:
the utility charges over-provisioning (``waste_weight``) and only scales satisfaction by the share
of the need served, so the utility-best setting still misses many SLAs by a little.
"""

from __future__ import annotations

from collections.abc import Callable

import cvxpy as cp
import numpy as np

from deepslicing import model
from deepslicing.simulator import SlicingSimulator

Policy = Callable[[np.ndarray], np.ndarray]
NeedSource = Callable[[np.ndarray], np.ndarray]

HEURISTICS = ("equal", "proportional", "priority", "static", "forecast", "mpc")
COMPARATORS = HEURISTICS  # what a trained policy must beat (see deepslicing.evaluation)
BASELINES = (*HEURISTICS, "oracle")
PRIORITY_ORDER = ("urllc", "embb", "mmtc")
PRIORITY_MARGIN = 0.10
HEADROOM_SIGMAS = 0.25  # forecast: request = need_forecast + this x forecast_error (measured above)
MPC_HEADROOM_SIGMAS = 0.5  # mpc: the LP's needs = need_forecast + this x forecast_error
NEEDED = model.FEATURES.index("needed_share")
NEED_FORECAST = model.FEATURES.index("need_forecast")
FORECAST_ERROR = model.FEATURES.index("forecast_error")


def make_policy(name: str, sim: SlicingSimulator) -> Policy:
    """The named baseline for the cells of ``sim``."""
    if name not in BASELINES:
        raise ValueError(f"policy: must be one of {BASELINES}, got {name!r}")
    if name == "oracle":
        return Oracle(sim)
    if name == "mpc":
        return Oracle(sim, needs=lambda obs: forecast_need(obs, MPC_HEADROOM_SIGMAS))
    if name == "forecast":
        return lambda obs: np.minimum(forecast_need(obs, HEADROOM_SIGMAS), 1.0)
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


def forecast_need(obs: np.ndarray, headroom_sigmas: float) -> np.ndarray:
    """need_forecast + ``headroom_sigmas`` x forecast_error of each slice, ``(..., num_slices)``."""
    obs = np.asarray(obs, dtype=np.float64)
    return obs[..., NEED_FORECAST] + headroom_sigmas * obs[..., FORECAST_ERROR]


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
    """Solves each interval's allocation exactly with cvxpy, given needed shares from ``needs``.

    The utility sum_i w_i min(1, x_i / need_i) - waste * sum_i max(0, x_i - need_i) is concave and
    piecewise linear, so maximising it over {x >= 0, sum x <= 1} is a linear program; all cells of a
    batch are one problem, compiled once (parameters for the needs) and re-solved per interval.
    Its optimum is the greedy fill: slices in decreasing value density w_i / need_i each get their
    need while capacity lasts (the last one what is left), nothing beyond the need.

    ``needs(obs)`` says where the needs come from: by default the true needs of the interval the
    next step scores (``sim.next_need()``: the oracle, an upper bound); the `mpc` baseline passes
    the observation's forecast instead, the same LP on what a deployable controller knows.
    """

    def __init__(self, sim: SlicingSimulator, needs: NeedSource | None = None):
        self.sim = sim
        self.needs = (lambda obs: sim.next_need()) if needs is None else needs
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
        return self.solve(self.needs(obs))

    def solve(self, need: np.ndarray) -> np.ndarray:
        """The utility-maximising shares ``(num_envs, num_slices)`` for these needed shares."""
        need = np.maximum(np.asarray(need, dtype=np.float64), 0.0)
        self.need.value = need
        self.inv_need.value = np.where(need > 0, 1.0 / np.where(need > 0, need, 1.0), 0.0)
        self.nothing_needed.value = (need <= 0).astype(np.float64)
        self.problem.solve(solver=cp.CLARABEL)
        if self.problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise RuntimeError(f"oracle: cvxpy returned status {self.problem.status}")
        return np.clip(self.x.value, 0.0, 1.0)

"""slicing_v0: one 5G cell whose PRBs are split among network slices, one agent per slice.

| property           | value                                                                  |
|--------------------|------------------------------------------------------------------------|
| API                | PettingZoo ``ParallelEnv``; ``parallel_env(**kwargs)``                 |
| agents             | one per slice, named after it: ``["embb", "urllc", "mmtc"]`` by default |
| action space       | ``Box(0, 1, (1,), float32)``: the share of the cell the slice requests |
| observation space  | ``Box(0, high, (14,), float32)``: the slice's own features (below)     |
| episode            | ``episode_length`` intervals (default 200), then truncation            |

**Dynamics.** Every interval the coordinator turns the requests into a feasible allocation (shares
>= 0 summing to at most 1: the capacity constraint is hard), then the interval's traffic, which the
agents have not seen, is served. Requests outside [0, 1] are clipped and counted in
``infos[agent]["clipped_actions"]``; NaN requests raise :class:`deepslicing.simulator.ActionError`.

**Observation** (all from the interval just finished): 0 ``demand_ratio`` (demand / mean demand,
[0, 10]); 1 ``spectral_efficiency`` (/ 7.4 bit/s/Hz, [0, 1]); 2 ``needed_share`` (share that would
just have met the SLA, [0, 5]); 3 ``allocated_share`` ([0, 1]); 4 ``satisfaction``
(min(1, allocated / needed)); 5 ``episode_progress`` (time of day, [0, 1]); derived from the
slice's own history: 6 ``need_forecast``, 7 ``forecast_error``, 8 ``previous_need`` (share units);
from the clock: 9 ``time_sin``, 10 ``time_cos``; and the coordinator's broadcast: 11
``capacity_price`` (see :mod:`deepslicing.model`).

**Reward** of slice i: weight_i / sum(weights) x satisfaction_i - waste_weight x
max(0, share_i - needed_i); the rewards of all slices add up to the cell's utility (at most 1).
**Cost**, apart from the reward: ``infos[agent]["cost"]`` is 1.0 when the slice's SLA was violated.
``infos`` also hold ``share``, ``needed_share`` and ``clipped_actions``.

**Arguments** (see :class:`deepslicing.simulator.SlicingConfig`): ``scenario`` (one of
:data:`SCENARIOS`, default ``"steady"``), ``num_slices`` (1..20, default 3), ``kinds``, ``slices``
(full specs), ``episode_length`` (200), ``num_prbs`` (100), ``prb_bandwidth_khz`` (180),
``interval_s`` (1.0), ``waste_weight`` (0.5), ``coordinator`` (``"projection"`` or ``"admm"``),
``admm_rho`` (0.5), ``admm_iterations`` (20), ``trace_path`` (CSV for ``scenario="trace"``),
``backend`` (``"fast"``, the model's formulas, or ``"ns3"``, the same env on ns-3 packets: see
:mod:`ns3_gym.simulator`; ``close()`` hands its simulator back).
Seeding: ``reset(seed=s)`` fixes the traffic of that episode and of the unseeded resets after it.

**Version history.** v0: first release; observations grew from 6 to 14 features (the derived
6..11) with the kind-shared MADDPG policy.

For many cells at once use :func:`vector_env`, which returns the batched
:class:`deepslicing.simulator.SlicingSimulator` over the same model.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from deepslicing.config import from_mapping
from deepslicing.model import FEATURE_HIGH, NUM_FEATURES
from deepslicing.scenarios import SCENARIOS
from deepslicing.simulator import ActionError, SlicingConfig, SlicingSimulator

__all__ = ["SCENARIOS", "SlicingParallelEnv", "parallel_env", "vector_env"]


def parallel_env(**kwargs: Any) -> SlicingParallelEnv:
    """The PettingZoo parallel env; keyword arguments are :class:`SlicingConfig` fields."""
    return SlicingParallelEnv(from_mapping(SlicingConfig, kwargs))


def vector_env(num_envs: int, **kwargs: Any) -> SlicingSimulator:
    """``num_envs`` cells stepped together as ``(num_envs, num_slices)`` arrays."""
    return SlicingSimulator(from_mapping(SlicingConfig, kwargs), num_envs=num_envs)


class SlicingParallelEnv(ParallelEnv):
    metadata = {"name": "slicing_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: SlicingConfig):
        self.config = config
        self.sim = SlicingSimulator(config, num_envs=1)
        self.possible_agents = [s.name for s in self.sim.specs]
        self.agents: list[str] = []
        self.render_mode = None
        self._seeds = np.random.default_rng()

    @functools.cache  # noqa: B019 - one space per agent for the env's life, as PettingZoo advises
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(0.0, FEATURE_HIGH, shape=(NUM_FEATURES,), dtype=np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Box:
        return spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._seeds = np.random.default_rng(seed)
        obs = self.sim.reset(int(self._seeds.integers(2**63)))[0]
        self.agents = list(self.possible_agents)
        observations = {a: obs[i] for i, a in enumerate(self.agents)}
        return observations, {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("step: the episode is over; call reset() first")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ActionError(f"actions: no action for agent(s) {missing}")
        try:
            requests = np.array([actions[a] for a in self.agents], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ActionError(
                f"actions: each must be one number (a share), got {actions!r}: {e}"
            ) from None
        if requests.size != len(self.agents):
            raise ActionError(
                f"actions: each must be one share, got shapes {[np.shape(actions[a]) for a in self.agents]}"
            )
        out = self.sim.step(requests.reshape(1, -1))
        agents = self.agents
        observations = dict(zip(agents, out.observation[0], strict=True))
        rewards = dict(zip(agents, out.reward[0].tolist(), strict=True))
        infos = {
            a: {"cost": c, "share": x, "needed_share": n, "clipped_actions": int(k)}
            for a, c, x, n, k in zip(
                agents,
                out.cost[0].tolist(),
                out.shares[0].tolist(),
                out.needed_share[0].tolist(),
                out.clipped[0].tolist(),
                strict=True,
            )
        }
        terminations = dict.fromkeys(agents, False)
        truncations = dict.fromkeys(agents, out.done)
        if out.done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def render(self) -> None:
        return None

    def close(self) -> None:
        close = getattr(self.sim, "close", None)  # the ns-3 backend holds a simulator to give back
        if close is not None:
            close()

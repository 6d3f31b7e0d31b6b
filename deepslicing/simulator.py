"""Batched slicing episodes: the one state machine behind the PettingZoo env, the RLlib adapter,
the vector env and evaluation, so their behaviour never forks.

Arrays are ``(num_envs, num_slices)``. An episode has ``episode_length`` decision intervals; at reset
the traffic of intervals 0..episode_length is drawn (interval 0 is the warm-up the first observation
describes, under an equal split). Each ``step`` takes requested shares in [0, 1], coordinates them
into a feasible allocation, and scores it against the next interval's traffic, which the agents have
not seen (they observe the interval just finished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from deepslicing import forecast, model
from deepslicing.config import check_int, option
from deepslicing.coordinator import (
    UTILITY_ITERATIONS,
    UTILITY_RHO,
    Coordination,
    check_admm,
    check_objective,
    coordinate,
)
from deepslicing.scenarios import check_scenario, generate, load_trace
from deepslicing.slices import SliceSpec, default_slices, resolve_slices


@dataclass(frozen=True)
class SlicingConfig:
    """One cell and its slices, the traffic scenario, and how requests are coordinated."""

    scenario: str = option(
        "steady",
        "traffic scenario: steady, diurnal, burst, outage, flash_crowd, trace, or mix (a random one "
        "of the five synthetic ones per cell, with random load and outages)",
    )
    num_slices: int = option(
        3, "number of slices (1..20) when `slices` is not given; kinds cycle embb, urllc, mmtc"
    )
    kinds: tuple[str, ...] | None = option(
        None, "kinds of the default slices, one per slice (overrides the cycle)"
    )
    slices: tuple[SliceSpec, ...] | None = option(
        None, "full slice specs (name, kind, targets, ...); overrides num_slices and kinds"
    )
    episode_length: int = option(200, "decision intervals per episode")
    num_prbs: int = option(100, "PRBs in the cell")
    prb_bandwidth_khz: float = option(180.0, "bandwidth of one PRB (kHz)")
    interval_s: float = option(
        1.0, "length of a decision interval (s); mMTC demand is devices per interval"
    )
    waste_weight: float = option(
        0.5, "utility lost per unit of share given beyond what the SLA needs"
    )
    coordinator: Literal["projection", "admm"] = option(
        "projection", "projection (exact, one step) or admm (iterative, converges to it)"
    )
    objective: Literal["utility", "euclidean"] = option(
        "utility",
        "what coordination keeps under overload: utility (serve slices in order of utility per "
        "share) or euclidean (cut every request by the same amount)",
    )
    admm_rho: float = option(UTILITY_RHO, "ADMM penalty rho (> 0)")
    admm_iterations: int = option(UTILITY_ITERATIONS, "ADMM iterations (1..10000)")
    trace_path: str | None = option(
        None, "CSV of demands for the trace scenario: a header naming one column per slice"
    )
    backend: Literal["fast", "ns3"] = option(
        "fast", "fast (the model's formulas) or ns3 (packets on ns-3: ns3_gym/, the [ns3] extra)"
    )

    def __post_init__(self) -> None:
        check_scenario(self.scenario)
        self.resolved_slices()
        for name in ("episode_length", "num_prbs"):
            check_int(name, getattr(self, name), 1, 1_000_000)
        positive = {"prb_bandwidth_khz": self.prb_bandwidth_khz, "interval_s": self.interval_s}
        for name, value in positive.items():
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if not (isinstance(self.waste_weight, int | float) and 0 <= self.waste_weight < 1e6):
            raise ValueError(f"waste_weight: must be a number >= 0, got {self.waste_weight!r}")
        if self.coordinator not in ("projection", "admm"):
            raise ValueError(
                f"coordinator: must be 'projection' or 'admm', got {self.coordinator!r}"
            )
        check_objective(self.objective)
        check_admm(self.admm_rho, self.admm_iterations)
        if self.scenario == "trace" and not self.trace_path:
            raise ValueError("trace_path: the 'trace' scenario needs a trace CSV file")

    def resolved_slices(self) -> tuple[SliceSpec, ...]:
        if self.slices is not None:
            return resolve_slices(self.slices)
        return default_slices(self.num_slices, self.kinds)

    def cell(self) -> model.Cell:
        return model.Cell(self.num_prbs, self.prb_bandwidth_khz, self.interval_s, self.waste_weight)


@dataclass(frozen=True)
class Step:
    """What one interval produced, all ``(num_envs, num_slices)`` unless noted."""

    observation: np.ndarray  # (num_envs, num_slices, 14) float32
    reward: np.ndarray
    cost: np.ndarray  # 1.0 where the slice's SLA was violated
    shares: np.ndarray  # the feasible allocation applied
    needed_share: np.ndarray
    clipped: np.ndarray  # bool, the request was outside [0, 1] and was clipped
    primal_residual: np.ndarray  # (num_envs,) ADMM residuals (0 with the projection)
    dual_residual: np.ndarray
    done: bool


class ActionError(ValueError):
    """Actions of the wrong shape or with NaN; the message names the rule."""


class SlicingSimulator:
    def __new__(cls, config: SlicingConfig | None = None, num_envs: int = 1):
        # backend="ns3" builds the packet-level subclass; ns3_gym loads ns-3 only then
        if cls is SlicingSimulator and config is not None and config.backend != "fast":
            from ns3_gym.simulator import backend_class

            cls = backend_class(config.backend)
        return super().__new__(cls)

    def __init__(self, config: SlicingConfig, num_envs: int = 1):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs: must be an integer >= 1, got {num_envs!r}")
        self.config = config
        self.num_envs = num_envs
        self.specs = config.resolved_slices()
        self.slices = model.SliceArrays.from_specs(self.specs)
        self.cell = config.cell()
        self.num_slices = self.slices.num_slices
        self.trace = (
            load_trace(config.trace_path, tuple(s.name for s in self.specs))
            if config.scenario == "trace"
            else None
        )
        self.t = 0

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Draw new episodes from ``seed``; returns the first observation ``(num_envs, num_slices, 14)``."""
        rng = np.random.default_rng(seed)
        horizon = self.config.episode_length + 1
        traffic = generate(
            self.config.scenario,
            rng,
            num_envs=self.num_envs,
            horizon=horizon,
            mean_demand=self.slices.mean_demand,
            mean_spectral_efficiency=self.slices.mean_spectral_efficiency,
            kinds=self.slices.kind,
            trace=self.trace,
        )
        self.demand = traffic.demand
        self.spectral_efficiency = traffic.spectral_efficiency
        self.need = model.needed_share(
            self.slices, self.cell, self.demand, self.spectral_efficiency
        )
        self.traffic_features = model.traffic_features(
            self.slices, self.demand, self.spectral_efficiency, self.need
        )
        self.t = 0
        self.shares = np.full((self.num_envs, self.num_slices), 1.0 / self.num_slices)
        self.history = forecast.start(self.need[:, 0])
        self.levels = self.traffic_features[:, 0, :, :2].astype(np.float64)
        self.price = np.zeros(self.num_envs)
        return self._observe(model.satisfaction(self.shares, self.need[:, 0]))

    def next_need(self) -> np.ndarray:
        """The true needed shares of the interval the next step scores (for the oracle only)."""
        return self.need[:, self.t + 1]

    def coordinate(self, requests: np.ndarray) -> Coordination:
        """The feasible allocation of ``requests``, its capacity price and ADMM residuals."""
        c = self.config
        return coordinate(
            requests,
            self.slices.utility_weight,
            method=c.coordinator,
            objective=c.objective,
            rho=c.admm_rho,
            iterations=c.admm_iterations,
        )

    def step(self, requests: np.ndarray) -> Step:
        if self.t >= self.config.episode_length:
            raise RuntimeError("step: the episode is over; call reset() first")
        requests = np.asarray(requests, dtype=np.float64)
        if requests.shape != (self.num_envs, self.num_slices):
            raise ActionError(
                f"actions: must have shape (num_envs, num_slices) = "
                f"{(self.num_envs, self.num_slices)}, got {requests.shape}"
            )
        if np.isnan(requests).any():
            raise ActionError("actions: must not be NaN (requested shares are in [0, 1])")
        in_range = np.minimum(np.maximum(requests, 0.0), 1.0)
        shares, self.price, primal, dual = self.coordinate(in_range)
        self.t += 1
        self.shares = shares
        need = self.need[:, self.t]
        self.history = forecast.update(self.history, need)
        self.levels = forecast.smooth_levels(self.levels, self.traffic_features[:, self.t, :, :2])
        sat = model.satisfaction(shares, need)
        return Step(
            observation=self._observe(sat),
            reward=model.rewards(self.slices, self.cell, shares, need, sat),
            cost=model.sla_cost(shares, need),
            shares=shares,
            needed_share=need,
            clipped=in_range != requests,
            primal_residual=primal,
            dual_residual=dual,
            done=self.t >= self.config.episode_length,
        )

    def kpis(self) -> dict[str, np.ndarray]:
        """Physical QoS of the current interval's allocation (see :func:`model.qos`)."""
        t = self.t
        return model.qos(
            self.slices, self.cell, self.shares, self.demand[:, t], self.spectral_efficiency[:, t]
        )

    def _observe(self, sat: np.ndarray) -> np.ndarray:
        t = self.t
        return model.observe(
            self.traffic_features[:, t],
            self.shares,
            sat,
            t / self.config.episode_length,
            self.history,
            self.need[:, max(t - 1, 0)],
            self.price[:, None] / self.slices.utility_weight,
            self.levels,
        )

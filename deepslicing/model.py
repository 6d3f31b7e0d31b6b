"""The slicing model as pure array functions over ``(..., num_slices)``.

Units: shares are fractions of the cell's PRB budget; rates in Mbps; delays in ms; spectral
efficiency in bit/s/Hz. A cell has ``num_prbs`` PRBs (default 100) of ``prb_bandwidth_khz``
(default 180 kHz), so a share ``x`` of the cell carries ``x * num_prbs * prb_bandwidth_mhz * se`` Mbps.

Per slice and interval:

- offered load (Mbps): eMBB demand as is; URLLC packets/s x packet bits; mMTC devices x message
  bits / interval.
- required capacity (Mbps): the largest of what each present SLA target asks for
  (bandwidth: min(offered, target); p95 latency with an M/M/1 queue of rate mu packets/s:
  mu >= lambda + ln(20) / (target - base delay); jitter (M/M/1 sojourn std 1/(mu - lambda)):
  mu >= lambda + 1 / target; availability: offered x target %; loss: offered x (1 - target %)).
- needed share = required / (Mbps one full cell gives at this spectral efficiency).
- QoS of an allocation: throughput = min(offered, capacity); p95 delay = base + ln(20)/(mu - lambda)
  (infinite when mu <= lambda); served fraction = throughput / offered (devices served for mMTC).
  The SLA holds exactly when share >= needed share.
- satisfaction = min(1, share / needed share) (1 when nothing is needed);
  over-provisioning = max(0, share - needed share);
  reward_i = weight_i / sum(weights) x satisfaction_i - waste_weight x over-provisioning_i, so the
  slices' rewards add up to the cell's utility, at most 1 per interval.
- cost_i = 1 when slice i's SLA is violated, else 0. Costs are reported apart from rewards.

Observation, 14 features per slice, of the interval just finished:

| index | name                  | meaning                                             | range   |
|-------|-----------------------|-----------------------------------------------------|---------|
| 0     | `demand_ratio`        | offered demand / the slice's mean demand            | [0, 10] |
| 1     | `spectral_efficiency` | spectral efficiency / 7.4 bit/s/Hz                  | [0, 1]  |
| 2     | `needed_share`        | share that would just have met the SLA              | [0, 5]  |
| 3     | `allocated_share`     | share the slice was given                           | [0, 1]  |
| 4     | `satisfaction`        | min(1, allocated / needed)                          | [0, 1]  |
| 5     | `episode_progress`    | intervals elapsed / episode length (time of day)    | [0, 1]  |
| 6     | `need_forecast`       | forecast of the next needed share (own history)     | [0, 5]  |
| 7     | `forecast_error`      | smoothed absolute error of those forecasts (share)  | [0, 5]  |
| 8     | `previous_need`       | needed share of the interval before the last        | [0, 5]  |
| 9     | `time_sin`            | (1 + sin(2 pi episode_progress)) / 2                | [0, 1]  |
| 10    | `time_cos`            | (1 + cos(2 pi episode_progress)) / 2                | [0, 1]  |
| 11    | `capacity_price`      | coordinator's capacity price / the slice's weight   | [0, 10] |
| 12    | `demand_level`        | slow level of `demand_ratio` (EWMA, alpha 0.2)      | [0, 10] |
| 13    | `channel_level`       | slow level of `spectral_efficiency` (EWMA, 0.1)     | [0, 1]  |

Features 0..5 are the *measured* features (:data:`MEASURED_FEATURES`: what a slice reports and
what ``POST /predict`` takes); 6..13 are derived, from the slice's own history (6..8 and the slow
levels 12, 13, :mod:`deepslicing.forecast`), the clock (9, 10: a day is one episode, as sin/cos so midnight is next
to 23:59) and one broadcast every slice can see at execution time (11): the coordinator's price of
capacity in the interval just finished (utility per unit share of the last slice it could not serve
in full; 0 when every request fit), divided by the slice's utility weight, so it reads as one over
the largest request the coordinator still served in full. Where only the measured features are
known (a single reading), :func:`complete_features` fills the derived ones: forecast = previous
need = the last need, error = ``forecast.INITIAL_RELATIVE_ERROR`` x it, price 0, levels = the
readings themselves.

Why the slow levels: demand noise is independent per interval while its level drifts (diurnal
shape, bursts, flash crowds) and the channel is AR(1), so one reading or the fast need forecast
(alpha 0.7) mixes noise into the level. With them, an actor trained offline on the known reward
moved about 0.4 point of the oracle's utility further along the utility/violation frontier
(docs/scorecard.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepslicing import forecast
from deepslicing.scenarios import SPECTRAL_EFFICIENCY_RANGE
from deepslicing.slices import BASE_DELAY_MS, KINDS, SliceSpec

FEATURES = (
    "demand_ratio",
    "spectral_efficiency",
    "needed_share",
    "allocated_share",
    "satisfaction",
    "episode_progress",
    "need_forecast",
    "forecast_error",
    "previous_need",
    "time_sin",
    "time_cos",
    "capacity_price",
    "demand_level",
    "channel_level",
)
NUM_FEATURES = len(FEATURES)
NUM_MEASURED_FEATURES = 6
MEASURED_FEATURES = FEATURES[:NUM_MEASURED_FEATURES]
FEATURE_HIGH = np.array(
    [10.0, 1.0, 5.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 10.0, 10.0, 1.0], dtype=np.float32
)
LN20 = math.log(20.0)  # p95 of an exponential sojourn time is ln(20) / (mu - lambda)
SLA_TOLERANCE = 1e-9
_TINY = 1e-12


@dataclass(frozen=True)
class SliceArrays:
    """Resolved slice specs as arrays of shape ``(num_slices,)``, or ``(cells, num_slices)`` when
    serving many cells at once; NaN marks an absent target."""

    kind: tuple[str, ...] | np.ndarray
    weight: np.ndarray
    mean_demand: np.ndarray
    packet_bits: np.ndarray
    mean_spectral_efficiency: np.ndarray
    bandwidth_mbps: np.ndarray
    latency_ms_p95: np.ndarray
    availability: np.ndarray
    jitter_ms: np.ndarray
    loss_pct: np.ndarray
    utility_weight: np.ndarray  # weight / sum(weight)

    @classmethod
    def from_specs(cls, specs: tuple[SliceSpec, ...]) -> SliceArrays:
        def column(get):
            return np.array([np.nan if get(s) is None else float(get(s)) for s in specs])

        return cls(
            kind=tuple(s.kind for s in specs),
            weight=column(lambda s: s.weight),
            mean_demand=column(lambda s: s.mean_demand),
            packet_bits=column(lambda s: s.packet_bits),
            mean_spectral_efficiency=column(lambda s: s.mean_spectral_efficiency),
            bandwidth_mbps=column(lambda s: s.targets.bandwidth_mbps),
            latency_ms_p95=column(lambda s: s.targets.latency_ms_p95),
            availability=column(lambda s: s.targets.availability),
            jitter_ms=column(lambda s: s.targets.jitter_ms),
            loss_pct=column(lambda s: s.targets.loss_pct),
            utility_weight=column(lambda s: s.weight) / sum(s.weight for s in specs),
        )

    @property
    def num_slices(self) -> int:
        return len(self.kind)

    def is_kind(self, kind: str) -> np.ndarray:
        assert kind in KINDS
        return np.asarray(self.kind) == kind


@dataclass(frozen=True)
class Cell:
    num_prbs: int = 100
    prb_bandwidth_khz: float = 180.0
    interval_s: float = 1.0
    waste_weight: float = 0.5

    def mbps_per_share(self, spectral_efficiency: np.ndarray) -> np.ndarray:
        return self.num_prbs * (self.prb_bandwidth_khz / 1000.0) * spectral_efficiency


def offered_mbps(slices: SliceArrays, cell: Cell, demand: np.ndarray) -> np.ndarray:
    per_unit = np.where(
        slices.is_kind("embb"),
        1.0,
        np.where(
            slices.is_kind("urllc"),
            slices.packet_bits / 1e6,
            slices.packet_bits / (1e6 * cell.interval_s),
        ),
    )
    return demand * per_unit


def required_mbps(slices: SliceArrays, offered: np.ndarray) -> np.ndarray:
    """Capacity (Mbps) each slice needs to meet all of its SLA targets."""
    mbit_per_packet = slices.packet_bits / 1e6
    packet_rate = offered / mbit_per_packet
    latency_s = (slices.latency_ms_p95 - BASE_DELAY_MS) / 1000.0
    candidates = (
        np.minimum(offered, slices.bandwidth_mbps),
        (packet_rate + LN20 / latency_s) * mbit_per_packet,
        (packet_rate + 1000.0 / slices.jitter_ms) * mbit_per_packet,
        offered * slices.availability / 100.0,
        offered * (1.0 - slices.loss_pct / 100.0),
    )
    required = np.zeros_like(offered)
    for c in candidates:
        required = np.fmax(required, c)  # fmax skips the NaN of an absent target
    return required


def needed_share(
    slices: SliceArrays, cell: Cell, demand: np.ndarray, spectral_efficiency: np.ndarray
) -> np.ndarray:
    offered = offered_mbps(slices, cell, demand)
    return required_mbps(slices, offered) / cell.mbps_per_share(spectral_efficiency)


def satisfaction(shares: np.ndarray, need: np.ndarray) -> np.ndarray:
    """min(1, share / need); 1 where nothing is needed (the tiny offset keeps 0/0 at 1)."""
    return np.minimum(1.0, (shares + _TINY) / (need + _TINY))


def sla_met(shares: np.ndarray, need: np.ndarray) -> np.ndarray:
    return shares >= need * (1.0 - SLA_TOLERANCE)


def sla_cost(shares: np.ndarray, need: np.ndarray) -> np.ndarray:
    """1.0 where the SLA is violated, else 0.0."""
    return (shares < need * (1.0 - SLA_TOLERANCE)).astype(np.float64)


def rewards(
    slices: SliceArrays,
    cell: Cell,
    shares: np.ndarray,
    need: np.ndarray,
    sat: np.ndarray | None = None,
) -> np.ndarray:
    """Per-slice rewards; their sum over slices is the cell's utility for the interval."""
    sat = satisfaction(shares, need) if sat is None else sat
    return slices.utility_weight * sat - cell.waste_weight * np.maximum(0.0, shares - need)


def utility(slices: SliceArrays, cell: Cell, shares: np.ndarray, need: np.ndarray) -> np.ndarray:
    return rewards(slices, cell, shares, need).sum(axis=-1)


def qos(
    slices: SliceArrays,
    cell: Cell,
    shares: np.ndarray,
    demand: np.ndarray,
    spectral_efficiency: np.ndarray,
) -> dict[str, np.ndarray]:
    """Physical KPIs of an allocation: throughput and capacity (Mbps), p95 delay (ms), served share."""
    offered = offered_mbps(slices, cell, demand)
    capacity = shares * cell.mbps_per_share(spectral_efficiency)
    throughput = np.minimum(offered, capacity)
    mbit_per_packet = slices.packet_bits / 1e6
    headroom = (capacity - offered) / mbit_per_packet  # mu - lambda, packets/s
    with np.errstate(divide="ignore"):
        delay = np.where(headroom > 0, BASE_DELAY_MS + 1000.0 * LN20 / headroom, np.inf)
        served = np.where(offered > 0, throughput / np.where(offered > 0, offered, 1.0), 1.0)
    return {
        "offered_mbps": offered,
        "capacity_mbps": capacity,
        "throughput_mbps": throughput,
        "delay_p95_ms": delay,
        "served_fraction": served,
    }


def traffic_features(
    slices: SliceArrays, demand: np.ndarray, spectral_efficiency: np.ndarray, need: np.ndarray
) -> np.ndarray:
    """Features 0..2 (what the traffic did), ``(..., num_slices, 3)``, clipped to range."""
    features = np.stack(
        (demand / slices.mean_demand, spectral_efficiency / SPECTRAL_EFFICIENCY_RANGE[1], need),
        axis=-1,
    )
    return np.clip(features, 0.0, FEATURE_HIGH[:3])


def observe(
    traffic: np.ndarray,
    shares: np.ndarray,
    sat: np.ndarray,
    progress: float | np.ndarray,
    history: forecast.Forecast,
    previous_need: np.ndarray,
    price_per_weight: np.ndarray,
    levels: np.ndarray,
) -> np.ndarray:
    """The observation ``(..., num_slices, 14)`` float32 in :data:`FEATURES` order.

    ``traffic`` comes from :func:`traffic_features`, ``sat`` from :func:`satisfaction`, ``history``
    is the slice's forecaster after the interval just finished; ``progress`` is a number or an
    array broadcastable to ``shares``; ``price_per_weight`` the capacity price / utility weight;
    ``levels`` ``(..., num_slices, 2)`` the slow levels of features 0 and 1
    (:func:`deepslicing.forecast.smooth_levels`).
    """
    obs = np.empty((*shares.shape, NUM_FEATURES), dtype=np.float32)
    obs[..., :3] = traffic
    obs[..., 3] = shares
    obs[..., 4] = sat
    obs[..., 5] = progress
    obs[..., 6] = history.next_need
    obs[..., 7] = history.error
    obs[..., 8] = previous_need
    angle = 2.0 * np.pi * np.asarray(progress, dtype=np.float64)
    obs[..., 9] = 0.5 * (1.0 + np.sin(angle))
    obs[..., 10] = 0.5 * (1.0 + np.cos(angle))
    obs[..., 11] = price_per_weight
    obs[..., 12:14] = levels
    return np.clip(obs, 0.0, FEATURE_HIGH, out=obs)


def complete_features(measured: np.ndarray) -> np.ndarray:
    """Measured features ``(..., 6)`` -> the full observation ``(..., 14)`` with the derived
    features at their single-reading defaults (see the module docstring)."""
    measured = np.asarray(measured, dtype=np.float32)
    need = measured[..., FEATURES.index("needed_share")].astype(np.float64)
    return observe(
        measured[..., :3],
        measured[..., 3],
        measured[..., 4],
        measured[..., 5],
        forecast.start(need),
        need,
        np.zeros_like(need),
        measured[..., :2],
    )

"""Seeded traffic scenarios: per-slice demand and channel traces for whole episodes.

A scenario turns a random generator into a :class:`Traffic` of shape ``(num_envs, horizon, num_slices)``:

- ``demand``: offered load in each slice's own unit (eMBB Mbps, URLLC packets/s, mMTC devices per
  interval), = the slice's mean demand x a scenario multiplier x log-normal noise (sigma 0.1).
- ``spectral_efficiency``: bit/s/Hz, the slice's mean x AR(1) log-normal fading (sigma 0.25,
  correlation 0.9 per interval, mean-preserving), clipped to [0.15, 7.4] (3GPP TS 38.214 CQI range).

Scenarios (the multiplier ``m[t]`` per slice; ``T`` is the horizon):

| name          | demand and channel                                                                 |
|---------------|------------------------------------------------------------------------------------|
| `steady`      | m = 1                                                                              |
| `diurnal`     | m = 1 + 0.45 sin(2 pi (t / T + phase)), one day per episode, phase per kind       |
| `burst`       | two-state MMPP per slice: on (m = 1.7) / off (m = 0.65), switch prob 0.1 / 0.15    |
| `outage`      | m = 1; in one window of T/8 intervals spectral efficiency of every slice x 0.35    |
| `flash_crowd` | one random slice: m jumps to 3 at a random time, decays back with time constant T/10 |
| `trace`       | demand replayed from a CSV file (see :func:`load_trace`), random start per env     |
| `mix`         | per env (cell), independently: one of the five synthetic scenarios above with      |
|               | probabilities `MIX_PROBABILITIES` (1/5 each); demand x a cell load factor          |
|               | U`MIX_LOAD_RANGE` = U[0.6, 1.4] (one per cell) x a slice load factor               |
|               | U`MIX_SLICE_LOAD_RANGE` = U[0.8, 1.2] (one per slice, so relative loads vary);     |
|               | the `outage` channel window with probability `MIX_OUTAGE_PROBABILITY` = 0.3        |
|               | whatever the demand scenario, always when it is `outage` (so 0.2 + 0.8 x 0.3 =     |
|               | 44 % of cells)                                                                     |

`mix` is for training a policy that generalises; evaluation's ``all`` means the five synthetic
scenarios (:data:`SYNTHETIC_SCENARIOS`) and never includes it. Both load factors have mean 1, so the
mean demand of a `mix` cell matches the scenario it drew, on average. :func:`mix_draws` gives the
per-env draws (the first thing `generate("mix", rng, ...)` takes from ``rng``).

Traces are generated whole at reset: the traffic is exogenous (allocations do not change it), so an
episode is fixed by its seed and the oracle can see each interval's true demand.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTHETIC_SCENARIOS = ("steady", "diurnal", "burst", "outage", "flash_crowd")
SCENARIOS = (*SYNTHETIC_SCENARIOS, "trace", "mix")

DEMAND_NOISE_SIGMA = 0.1
FADING_SIGMA = 0.25
FADING_CORRELATION = 0.9
SPECTRAL_EFFICIENCY_RANGE = (0.15, 7.4)
DIURNAL_AMPLITUDE = 0.45
DIURNAL_PHASE = {"embb": 0.0, "urllc": 0.08, "mmtc": 0.5}  # fraction of a day; mMTC peaks at night
BURST_ON, BURST_OFF, BURST_P_ON, BURST_P_OFF = 1.7, 0.65, 0.1, 0.15
OUTAGE_FACTOR = 0.35
FLASH_PEAK = 3.0
MIX_SCENARIOS = SYNTHETIC_SCENARIOS  # what a `mix` cell draws from
MIX_PROBABILITIES = (0.2, 0.2, 0.2, 0.2, 0.2)  # one per MIX_SCENARIOS entry
MIX_LOAD_RANGE = (0.6, 1.4)  # uniform cell load factor, one per env
MIX_SLICE_LOAD_RANGE = (0.8, 1.2)  # uniform slice load factor, one per env and slice
MIX_OUTAGE_PROBABILITY = 0.3  # channel loss window in cells whose scenario is not `outage`


class ScenarioError(ValueError):
    """An unknown scenario or a malformed trace; the message names the field and the rule."""


@dataclass(frozen=True)
class MixDraw:
    """What the `mix` scenario drew for each env: ``scenario`` ``(num_envs,)`` int indices into
    :data:`MIX_SCENARIOS`, ``load`` ``(num_envs,)`` cell factors, ``slice_load``
    ``(num_envs, num_slices)`` factors, ``outage`` ``(num_envs,)`` bool (a channel loss window)."""

    scenario: np.ndarray
    load: np.ndarray
    slice_load: np.ndarray
    outage: np.ndarray

    def names(self) -> tuple[str, ...]:
        return tuple(MIX_SCENARIOS[i] for i in self.scenario)


@dataclass(frozen=True)
class Traffic:
    """Exogenous episode traces, each ``(num_envs, horizon, num_slices)`` float64."""

    demand: np.ndarray
    spectral_efficiency: np.ndarray


def check_scenario(name: object, where: str = "scenario") -> str:
    if name not in SCENARIOS:
        raise ScenarioError(f"{where}: must be one of {SCENARIOS}, got {name!r}")
    return name  # type: ignore[return-value]


def generate(
    scenario: str,
    rng: np.random.Generator,
    *,
    num_envs: int,
    horizon: int,
    mean_demand: np.ndarray,
    mean_spectral_efficiency: np.ndarray,
    kinds: tuple[str, ...],
    trace: np.ndarray | None = None,
) -> Traffic:
    """Sample ``num_envs`` episodes of ``horizon`` intervals for slices with the given means."""
    check_scenario(scenario)
    shape = (num_envs, horizon, len(kinds))
    outage = np.ones(num_envs, dtype=bool) if scenario == "outage" else None
    if scenario == "trace":
        if trace is None:
            raise ScenarioError("trace_path: the 'trace' scenario needs a trace CSV file")
        demand = _replay(trace, rng, num_envs, horizon)
    else:
        if scenario == "mix":
            draw = mix_draws(rng, num_envs, len(kinds))
            multiplier = _mix_multiplier(rng, shape, kinds, draw)
            outage = draw.outage
        else:
            multiplier = _MULTIPLIERS[scenario](rng, shape, kinds)
        noise = rng.lognormal(-0.5 * DEMAND_NOISE_SIGMA**2, DEMAND_NOISE_SIGMA, size=shape)
        demand = mean_demand * multiplier * noise
    fading = _ar1_lognormal(rng, shape, FADING_SIGMA, FADING_CORRELATION)
    se = mean_spectral_efficiency * fading
    if outage is not None:
        window = _outage_window(rng, num_envs, horizon) & outage[:, None]
        se = np.where(window[:, :, None], se * OUTAGE_FACTOR, se)
    se = np.clip(se, *SPECTRAL_EFFICIENCY_RANGE)
    return Traffic(demand=demand, spectral_efficiency=se)


def mix_draws(rng: np.random.Generator, num_envs: int, num_slices: int) -> MixDraw:
    """The per-env draws of the `mix` scenario (see the module docstring), in the order
    :func:`generate` takes them from ``rng``."""
    scenario = rng.choice(len(MIX_SCENARIOS), size=num_envs, p=MIX_PROBABILITIES)
    load = rng.uniform(*MIX_LOAD_RANGE, size=num_envs)
    slice_load = rng.uniform(*MIX_SLICE_LOAD_RANGE, size=(num_envs, num_slices))
    outage = (scenario == MIX_SCENARIOS.index("outage")) | (
        rng.random(num_envs) < MIX_OUTAGE_PROBABILITY
    )
    return MixDraw(scenario=scenario, load=load, slice_load=slice_load, outage=outage)


def _mix_multiplier(rng, shape, kinds, draw: MixDraw) -> np.ndarray:
    """Each env's drawn scenario's multiplier (one call per scenario, on its envs), times the
    env's cell and slice load factors."""
    multiplier = np.empty(shape)
    for i, name in enumerate(MIX_SCENARIOS):
        envs = np.flatnonzero(draw.scenario == i)
        if envs.size:
            multiplier[envs] = _MULTIPLIERS[name](rng, (envs.size, *shape[1:]), kinds)
    return multiplier * (draw.load[:, None] * draw.slice_load)[:, None, :]


def _outage_window(rng, num_envs, horizon):
    """``(num_envs, horizon)`` bool: one window of T/8 intervals at a uniform start per env."""
    length = max(1, horizon // 8)
    start = rng.integers(0, max(1, horizon - horizon // 8), size=num_envs)
    t = np.arange(horizon)
    return (t >= start[:, None]) & (t < start[:, None] + length)


def _steady(rng, shape, kinds):
    return np.ones(shape)


def _diurnal(rng, shape, kinds):
    _, horizon, _ = shape
    phase = np.array([DIURNAL_PHASE[k] for k in kinds])
    day = np.arange(horizon)[:, None] / horizon + phase
    return np.broadcast_to(1.0 + DIURNAL_AMPLITUDE * np.sin(2 * np.pi * day), shape).copy()


def _burst(rng, shape, kinds):
    num_envs, horizon, num_slices = shape
    on = rng.random((num_envs, num_slices)) < BURST_P_ON / (BURST_P_ON + BURST_P_OFF)
    flips = rng.random(shape)
    states = np.empty(shape, dtype=bool)
    for t in range(horizon):
        states[:, t] = on
        on = np.where(on, flips[:, t] >= BURST_P_OFF, flips[:, t] < BURST_P_ON)
    return np.where(states, BURST_ON, BURST_OFF)


def _flash_crowd(rng, shape, kinds):
    num_envs, horizon, num_slices = shape
    start = rng.integers(horizon // 5, max(horizon // 5 + 1, 3 * horizon // 4), size=num_envs)
    target = rng.integers(0, num_slices, size=num_envs)
    since = np.arange(horizon)[None, :] - start[:, None]
    decay = np.where(since >= 0, np.exp(-np.maximum(since, 0) / max(1.0, horizon / 10)), 0.0)
    multiplier = np.ones(shape)
    rows = np.arange(num_envs)
    multiplier[rows, :, target] += (FLASH_PEAK - 1.0) * decay
    return multiplier


_MULTIPLIERS = {
    "steady": _steady,
    "diurnal": _diurnal,
    "burst": _burst,
    "outage": _steady,
    "flash_crowd": _flash_crowd,
}


def _ar1_lognormal(rng, shape, sigma, rho):
    """Mean-one log-normal AR(1) gains along axis 1, stationary from the first interval."""
    num_envs, horizon, num_slices = shape
    eps = rng.standard_normal(shape)
    log_gain = np.empty(shape)
    log_gain[:, 0] = sigma * eps[:, 0]
    innovation = sigma * math.sqrt(1.0 - rho**2)
    for t in range(1, horizon):
        log_gain[:, t] = rho * log_gain[:, t - 1] + innovation * eps[:, t]
    return np.exp(log_gain - 0.5 * sigma**2)


def _replay(trace, rng, num_envs, horizon):
    length = trace.shape[0]
    start = rng.integers(0, length, size=num_envs)
    idx = (start[:, None] + np.arange(horizon)[None, :]) % length
    return trace[idx]


def load_trace(path: str | Path, slice_names: tuple[str, ...]) -> np.ndarray:
    """Read a demand trace: a header row naming one column per slice (extra columns such as ``t``
    are ignored), then one row per interval of demands in each slice's unit, finite and >= 0.

    Returns ``(rows, num_slices)`` in ``slice_names`` order.
    """
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"trace_path: no such file {str(path)!r}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ScenarioError(f"trace_path: {path} is empty; it needs a header row")
        header = [h.strip() for h in header]
        missing = [n for n in slice_names if n not in header]
        if missing:
            raise ScenarioError(
                f"trace_path: {path} has no column for slice(s) {missing}; header is {header}"
            )
        columns = [header.index(n) for n in slice_names]
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ScenarioError(
                    f"trace_path: {path} line {line_no} has {len(row)} fields, header has {len(header)}"
                )
            values = []
            for c in columns:
                try:
                    v = float(row[c])
                except ValueError:
                    raise ScenarioError(
                        f"trace_path: {path} line {line_no} column {header[c]!r}: "
                        f"not a number: {row[c]!r}"
                    ) from None
                if not math.isfinite(v) or v < 0:
                    raise ScenarioError(
                        f"trace_path: {path} line {line_no} column {header[c]!r}: "
                        f"demand must be finite and >= 0, got {row[c]!r}"
                    )
                values.append(v)
            rows.append(values)
    if not rows:
        raise ScenarioError(f"trace_path: {path} has a header but no data rows")
    return np.asarray(rows, dtype=np.float64)

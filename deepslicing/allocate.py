"""Answering allocation requests: slice SLA targets and readings in, feasible shares and PRBs out.

The pure core of the Serve app (:mod:`serve_apps.allocator` is its HTTP shell) and of
``deepslicing bench serve``. It works on C cells of N slices at once, arrays ``(C, N)``; cells with
different slice counts are grouped by count. Units as in :mod:`deepslicing.model`: shares are
fractions of the cell's PRBs, rates Mbps, delays ms.

A slice in a request has a name, SLA targets and optional readings of the interval just finished:

| reading               | unit                          | when absent                                   |
|-----------------------|-------------------------------|-----------------------------------------------|
| `demand`              | the kind's demand unit        | `mean_demand`                                 |
| `mean_demand`         | the kind's demand unit        | the kind's default x 3 / N (as in the default scenarios) |
| `spectral_efficiency` | bit/s/Hz                      | the kind's mean (4.5 eMBB, 2.5 URLLC, 1.2 mMTC) |
| `current_share`       | fraction of the cell          | min(1, needed share): as if the SLA held      |
| `previous_demand`     | the kind's demand unit        | `demand` (no change: a flat history)           |
| `demand_level`        | the kind's demand unit        | 0.8 `previous_demand` + 0.2 `demand`, else `demand` |
| `spectral_efficiency_level` | bit/s/Hz                | `spectral_efficiency`                          |

and the cell a ``time_of_day`` in [0, 1] (default 0.5), the policy's ``episode_progress`` feature
(and its sin/cos). ``previous_demand`` (the interval before the last) gives the policy its short
history: the previous need and the forecaster of :mod:`deepslicing.forecast` after those two
intervals; without it the derived features take their single-reading defaults
(:func:`deepslicing.model.complete_features`). The two levels are the slow averages of
:func:`deepslicing.forecast.smooth_levels` (features 12 and 13); the defaults are what that
smoothing gives after the readings the request carries. The capacity price feature is 0 (the service does
not know the cell's last price).
Demand units: eMBB offered Mbps, URLLC packets/s, mMTC devices per interval
(:mod:`deepslicing.slices`). A slice with no targets takes its kind's default SLA.

Kind of a slice: ``kind`` when given; else a kind's name inside the slice name (``URLLC_Control``,
``CCTV_eMBB``); else from its targets, first match of: ``latency_ms_p95`` -> urllc,
``bandwidth_mbps`` -> embb, ``jitter_ms`` or ``loss_pct`` -> urllc (voice-like), ``availability`` ->
mmtc; else embb.

Steps per cell:

1. needed share of every slice from its targets and readings (:func:`deepslicing.model.needed_share`);
2. the policy's requested share: each slice is fed, as its 14 features, to the model's first actor
   of the same kind (actors are decentralised, so any number of slices can share one actor); a
   slice whose kind the model has no actor for requests its needed share (``source`` = "need");
3. guardrail: each slice is first reserved ``qos_floor`` x its needed share (when the reserves fit
   the cell), and the rest of the requests are coordinated into what remains, so shares are >= 0
   and sum to at most 1, always. Requests that fit are granted as asked (the policy decides). Under
   overload the guardrail uses the utility objective of :mod:`deepslicing.coordinator` with the
   slices' utility weights w, solved exactly (``method`` "projection", the default: the LP
   optimum, on the coordinator's numpy engine, so a replica answering never imports numba, about
   125 MiB; residuals 0), or by the compiled ADMM loop (``method`` "admm", ``rho``, ``iterations``,
   defaults 2 and 100, which reaches 0.9998 of the exact utility on average), and, since it
   knows each slice's need d, values the part of a request a within the need, min(a, d), at the
   slice's true density w / d; the part beyond the need gets what is left afterwards, pro rata.
   That is the oracle (the LP on true needs) restricted to x <= a: a slice never gets more than
   it asked for, but neither under-asking (density w / a would rank it too high) nor over-asking
   (w / a too low, and its waste served first) distorts the order. Measured on seeded 5-10 slice
   cells at 1.5-2x overload (tests/test_allocate.py), utility relative to the oracle when the
   policy asks its need x lognormal(0, 0.3): 0.94 with this rule, 0.84 with the density from the
   request or from max(request, need), 0.50 with the Euclidean projection; asking exactly the
   need: 1 with the exact method, 0.9999 with ADMM (Euclidean projection 0.53).
   ``objective="euclidean"`` keeps the old equal cut;
4. PRBs = floor(share x num_prbs), so PRBs never exceed the cell either;
5. predicted QoS of the allocation (throughput, p95 delay), whether each SLA holds
   (share >= need) and its risk (1 - min(1, share / need)).

With ``reject_infeasible``, a cell whose slices need more than the whole cell (sum of needed
shares > 1) raises :class:`InfeasibleError`, which names the slices and their needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepslicing import forecast, model
from deepslicing.coordinator import (
    CAPACITY_TOLERANCE,
    UTILITY_ITERATIONS,
    UTILITY_RHO,
    Method,
    Objective,
    check_admm,
    check_objective,
)
from deepslicing.coordinator import coordinate as coordinate_shares
from deepslicing.scenarios import SPECTRAL_EFFICIENCY_RANGE
from deepslicing.slices import KIND_DEFAULTS, KINDS, TARGET_BOUNDS

TARGETS = tuple(TARGET_BOUNDS)
DEFAULT_TIME_OF_DAY = 0.5
MAX_NEED = 1e6  # needed shares are capped here (a million cells): keeps every answer finite
Actor = Callable[[np.ndarray], np.ndarray]  # (E, S, 6) float32 -> (E, S) requested shares


class InfeasibleError(ValueError):
    """The slices of a cell need more than the whole cell; the message says which and how much."""


@dataclass(frozen=True)
class Guardrail:
    """How requests become a feasible allocation (see the module docstring, step 3): ADMM
    ``rho`` and ``iterations`` (the utility objective's defaults; used when ``method`` is
    "admm"), the ``qos_floor`` reserve, ``reject_infeasible``, the coordinator's ``objective``
    ("utility"; "euclidean" is the old equal cut) and ``method`` ("projection", the default:
    the exact answer, without numba; "admm": the compiled ADMM loop)."""

    rho: float = UTILITY_RHO
    iterations: int = UTILITY_ITERATIONS
    qos_floor: float = 0.0
    reject_infeasible: bool = False
    objective: Objective = "utility"
    method: Method = "projection"

    def __post_init__(self) -> None:
        check_admm(self.rho, self.iterations)
        check_objective(self.objective)
        if self.method not in ("projection", "admm"):
            raise ValueError(f"method: must be 'projection' or 'admm', got {self.method!r}")
        if not (isinstance(self.qos_floor, int | float) and 0.0 <= self.qos_floor <= 1.0):
            raise ValueError(f"qos_floor: must be a number in [0, 1], got {self.qos_floor!r}")


def infer_kind(name: str, targets: dict[str, float | None], kind: str | None = None) -> str:
    """The slice's kind by the rule in the module docstring."""
    if kind is not None:
        return kind
    lowered = name.lower()
    for k in KINDS:
        if k in lowered:
            return k
    present = {t for t, v in targets.items() if v is not None}
    if "latency_ms_p95" in present:
        return "urllc"
    if "bandwidth_mbps" in present:
        return "embb"
    if present & {"jitter_ms", "loss_pct"}:
        return "urllc"
    if "availability" in present:
        return "mmtc"
    return "embb"


@dataclass(frozen=True)
class SliceInput:
    """One slice of a request, already validated; ``None`` readings take their defaults."""

    name: str
    targets: dict[str, float | None]
    slice_id: int = 0
    kind: str | None = None
    sst: int | None = None
    sd: str | None = None
    demand: float | None = None
    mean_demand: float | None = None
    spectral_efficiency: float | None = None
    current_share: float | None = None
    previous_demand: float | None = None
    demand_level: float | None = None
    spectral_efficiency_level: float | None = None


@dataclass(frozen=True)
class Allocation:
    """The answer for C cells of N slices: arrays ``(C, N)`` unless noted."""

    kind: np.ndarray  # str
    from_policy: np.ndarray  # bool: the model's actor made the request (else the need did)
    needed_share: np.ndarray
    requested_share: np.ndarray
    share: np.ndarray
    prbs: np.ndarray  # int
    offered_mbps: np.ndarray
    throughput_mbps: np.ndarray
    delay_p95_ms: np.ndarray  # inf when the queue is unstable
    sla_ok: np.ndarray  # bool
    sla_risk: np.ndarray
    primal_residual: np.ndarray  # (C,)
    dual_residual: np.ndarray  # (C,)
    total_need: np.ndarray  # (C,) sum of needed shares; > 1 means not every SLA can hold


def slice_arrays(
    kind: np.ndarray, targets: np.ndarray, mean_demand: np.ndarray
) -> model.SliceArrays:
    """:class:`model.SliceArrays` over ``(C, N)``; targets ``(C, N, 5)`` in :data:`TARGETS` order."""

    def per_kind(get) -> np.ndarray:
        table = {k: get(d) for k, d in KIND_DEFAULTS.items()}
        return per_slice(table, kind, float)

    ones = np.ones(kind.shape)
    return model.SliceArrays(
        kind=kind,
        weight=ones,
        mean_demand=mean_demand,
        packet_bits=per_kind(lambda d: d.packet_bits),
        mean_spectral_efficiency=per_kind(lambda d: d.mean_spectral_efficiency),
        **{name: targets[..., i] for i, name in enumerate(TARGETS)},
        utility_weight=ones / kind.shape[-1],
    )


def per_slice(table: dict[str, Any], kind: np.ndarray, dtype) -> np.ndarray:
    """``table[kind]`` for every slice, shaped like ``kind``."""
    return np.array([table[k] for k in kind.reshape(-1).tolist()], dtype=dtype).reshape(kind.shape)


def _fill(values: np.ndarray, default: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), default, values)


def allocate_group(
    cells: Sequence[Sequence[SliceInput]],
    time_of_day: Sequence[float],
    actor: Actor,
    actor_kinds: Sequence[str],
    cell: model.Cell,
    guardrail: Guardrail,
) -> Allocation:
    """Allocate C cells that all have the same number of slices N."""
    num_cells, num_slices = len(cells), len(cells[0])
    flat = [s for c in cells for s in c]

    def column(get) -> np.ndarray:
        return np.array(
            [np.nan if (v := get(s)) is None else v for s in flat], dtype=np.float64
        ).reshape(num_cells, num_slices)

    kind = np.array([infer_kind(s.name, s.targets, s.kind) for s in flat]).reshape(
        num_cells, num_slices
    )
    targets = np.array(
        [[np.nan if s.targets.get(t) is None else s.targets[t] for t in TARGETS] for s in flat],
        dtype=np.float64,
    ).reshape(num_cells, num_slices, len(TARGETS))
    no_targets = np.isnan(targets).all(axis=-1)
    if no_targets.any():
        defaults = {
            k: [np.nan if (v := getattr(d.targets, t)) is None else v for t in TARGETS]
            for k, d in KIND_DEFAULTS.items()
        }
        targets[no_targets] = [defaults[k] for k in kind[no_targets]]

    default_mean = per_slice({k: d.mean_demand for k, d in KIND_DEFAULTS.items()}, kind, float)
    mean_demand = _fill(column(lambda s: s.mean_demand), default_mean * 3.0 / num_slices)
    slices = slice_arrays(kind, targets, mean_demand)
    demand = _fill(column(lambda s: s.demand), mean_demand)
    efficiency = _fill(column(lambda s: s.spectral_efficiency), slices.mean_spectral_efficiency)

    def capped_need(offered: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            need = model.needed_share(slices, cell, offered, efficiency)
        # extreme but valid targets (a jitter of 1e-300 ms) overflow; cap them at an absurd need
        return np.where(need < MAX_NEED, need, MAX_NEED)  # NaN compares False: capped too

    need = capped_need(demand)
    current = _fill(column(lambda s: s.current_share), np.minimum(need, 1.0))
    previous = column(lambda s: s.previous_demand)
    previous_need = capped_need(_fill(previous, demand))
    single, two = forecast.start(need), forecast.update(forecast.start(previous_need), need)
    known = ~np.isnan(previous)
    history = forecast.Forecast(*(np.where(known, b, a) for a, b in zip(single, two, strict=True)))
    traffic = model.traffic_features(slices, demand, efficiency, need)
    previous_ratio = _fill(previous, demand) / slices.mean_demand
    # without level readings: the smoothing after the readings given (the channel's is its reading)
    smoothed = forecast.smooth_levels(
        np.stack((previous_ratio, traffic[..., 1]), axis=-1), traffic[..., :2]
    )
    given = np.stack(
        (
            column(lambda s: s.demand_level) / slices.mean_demand,
            column(lambda s: s.spectral_efficiency_level) / SPECTRAL_EFFICIENCY_RANGE[1],
        ),
        axis=-1,
    )
    levels = _fill(given, smoothed)
    progress = np.broadcast_to(np.asarray(time_of_day, dtype=np.float64)[:, None], need.shape)
    features = model.observe(
        traffic,
        current,
        model.satisfaction(current, need),
        progress,
        history,
        np.where(known, previous_need, need),
        np.zeros_like(need),
        levels,
    )
    requested, from_policy = request_shares(actor, actor_kinds, kind, features, need)
    share, primal, dual = guard(
        requested,
        need,
        guardrail,
        lambda c: [s.name for s in cells[c]],
        len(cells),
        slices.utility_weight,
    )

    kpis = model.qos(slices, cell, share, demand, efficiency)
    return Allocation(
        kind=kind,
        from_policy=from_policy,
        needed_share=need,
        requested_share=requested,
        share=share,
        prbs=np.floor(share * cell.num_prbs + 1e-9).astype(np.int64),
        offered_mbps=kpis["offered_mbps"],
        throughput_mbps=kpis["throughput_mbps"],
        delay_p95_ms=kpis["delay_p95_ms"],
        sla_ok=model.sla_met(share, need),
        sla_risk=1.0 - model.satisfaction(share, need),
        primal_residual=primal,
        dual_residual=dual,
        total_need=need.sum(axis=-1),
    )


def request_shares(
    actor: Actor,
    actor_kinds: Sequence[str],
    kind: np.ndarray,
    features: np.ndarray,
    need: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's requested share from the model's first actor of its kind (else its need)."""
    first_actor = {}
    for i, k in enumerate(actor_kinds):
        first_actor.setdefault(k, i)
    index = per_slice({k: first_actor.get(k, -1) for k in KINDS}, kind, np.int64).reshape(-1)
    from_policy = index >= 0
    requested = np.minimum(need, 1.0).reshape(-1).copy()
    if from_policy.any():
        rows = np.flatnonzero(from_policy)
        obs = np.zeros((rows.size, len(actor_kinds), model.NUM_FEATURES), dtype=np.float32)
        picked = np.arange(rows.size)
        obs[picked, index[rows]] = features.reshape(-1, model.NUM_FEATURES)[rows]
        requested[rows] = np.asarray(actor(obs), dtype=np.float64)[picked, index[rows]]
    return requested.reshape(kind.shape), from_policy.reshape(kind.shape)


def coordinate(
    requested: np.ndarray,
    need: np.ndarray,
    guardrail: Guardrail,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reserve ``qos_floor`` x need where the reserves fit, coordinate the rest into what remains
    by the guardrail's method on its objective; returns shares, primal and dual residuals
    ``(C, N)``, ``(C,)``, ``(C,)`` (residuals 0 for the exact method). ``weights``: the slices'
    utility weights (None: equal)."""
    # the exact method runs on numpy, so a replica answering with it never imports numba
    solve = {
        "method": guardrail.method,
        "rho": guardrail.rho,
        "iterations": guardrail.iterations,
        "engine": "numpy" if guardrail.method == "projection" else "numba",
    }
    reserve = None
    if guardrail.qos_floor == 0.0:
        rest, rest_need, room = np.maximum(requested, 0.0), need, None
    else:
        reserve = guardrail.qos_floor * np.minimum(need, 1.0)
        fits = reserve.sum(axis=-1, keepdims=True) <= 1.0
        reserve = np.where(fits, reserve, 0.0)
        room = 1.0 - reserve.sum(axis=-1, keepdims=True)
        safe_room = np.maximum(room, 1e-12)
        rest = np.maximum(requested - reserve, 0.0) / safe_room
        rest_need = np.maximum(need - reserve, 0.0) / safe_room
    if guardrail.objective == "utility":
        # the part of each request within its need first, valued at the true density w / need;
        # then what is left, pro rata, to the parts beyond the needs (module docstring, step 3)
        if weights is None:
            weights = np.full(rest.shape[-1], 1.0 / rest.shape[-1])
        within = np.minimum(rest, rest_need)
        valued = weights * np.divide(
            within, rest_need, out=np.zeros_like(within), where=rest_need > 0
        )
        result = coordinate_shares(within, valued, **solve)
        beyond = rest - within
        left = np.maximum(1.0 - result.shares.sum(axis=-1, keepdims=True), 0.0)
        wanted = beyond.sum(axis=-1, keepdims=True)
        scale = np.minimum(1.0, np.divide(left, wanted, out=np.ones_like(left), where=wanted > 0))
        result = result._replace(shares=result.shares + beyond * scale)
    else:
        result = coordinate_shares(rest, objective="euclidean", **solve)
    if reserve is None:
        return result.shares, result.primal_residual, result.dual_residual
    share = np.where(room > 1e-12, reserve + result.shares * safe_room, reserve)
    return share, result.primal_residual, result.dual_residual


def guard(
    requested: np.ndarray,
    need: np.ndarray,
    guardrail: Guardrail,
    slice_names: Callable[[int], Sequence[str]],
    num_cells: int,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The guardrail, arrays ``(C, N)``: with ``reject_infeasible``, raise
    :class:`InfeasibleError` naming the first cell whose slices need more than the cell (their
    names from ``slice_names(cell)``); then :func:`coordinate` with the slices' utility
    ``weights`` (None: equal)."""
    if guardrail.reject_infeasible:
        over = need.sum(axis=-1) > 1.0 + CAPACITY_TOLERANCE
        if over.any():
            c = int(np.flatnonzero(over)[0])
            parts = ", ".join(
                f"{name} {n:.3f}" for name, n in zip(slice_names(c), need[c], strict=True)
            )
            where = f"cells[{c}]: " if num_cells > 1 else ""
            raise InfeasibleError(
                f"{where}the SLAs cannot all be met: the slices need {need[c].sum():.3f} of the "
                f"cell ({parts}), more than 1"
            )
    return coordinate(requested, need, guardrail, weights)


def allocate(
    cells: Sequence[Sequence[SliceInput]],
    time_of_day: Sequence[float],
    actor: Actor,
    actor_kinds: Sequence[str],
    cell: model.Cell,
    guardrail: Guardrail,
) -> list[tuple[Allocation, int]]:
    """Allocate cells of any slice counts; returns, per cell in order, its group's
    :class:`Allocation` and the cell's row in it."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault(len(c), []).append(i)
    answer: list[tuple[Allocation, int] | None] = [None] * len(cells)
    for members in groups.values():
        result = allocate_group(
            [cells[i] for i in members],
            [time_of_day[i] for i in members],
            actor,
            actor_kinds,
            cell,
            guardrail,
        )
        for row, i in enumerate(members):
            answer[i] = (result, row)
    return answer  # type: ignore[return-value]


def slice_answers(result: Allocation, row: int, slices: Sequence[SliceInput]) -> list[dict]:
    """Plain per-slice answers of one cell (JSON-ready; an unstable queue's delay is None)."""
    out = []
    for j, s in enumerate(slices):
        delay = float(result.delay_p95_ms[row, j])
        out.append(
            {
                "slice_id": s.slice_id,
                "name": s.name,
                "kind": str(result.kind[row, j]),
                "sst": s.sst,
                "sd": s.sd,
                "share": float(result.share[row, j]),
                "prbs": int(result.prbs[row, j]),
                "requested_share": float(result.requested_share[row, j]),
                "needed_share": float(result.needed_share[row, j]),
                "expected_throughput_mbps": float(result.throughput_mbps[row, j]),
                "expected_delay_p95_ms": delay if np.isfinite(delay) else None,
                "sla_ok": bool(result.sla_ok[row, j]),
                "sla_risk": float(result.sla_risk[row, j]),
                "source": "policy" if result.from_policy[row, j] else "need",
            }
        )
    return out

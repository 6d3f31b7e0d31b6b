"""The slicing simulator on packets: :class:`Ns3SlicingSimulator`, ``SlicingConfig(backend="ns3")``.

It is :class:`deepslicing.simulator.SlicingSimulator` with one thing replaced: what happened in
the interval. Reset, traffic, coordination, observations (the simulator's own ``_observe``, so
every feature of :mod:`deepslicing.model` is there), reward and error behaviour are the fast
backend's, inherited. After each ``step`` the interval is played on ns-3 (see
:mod:`ns3_gym.engine`): each slice's packets from that interval's demand, through a bottleneck at
``share x cell capacity``; the per-slice measurements below come from the packets, and the step's
``cost`` is judged from them instead of from ``share < needed share``.

Measurements (``kpis()`` after a step; ``(num_envs, num_slices)`` arrays):

| key               | unit | meaning                                                               |
|-------------------|------|-----------------------------------------------------------------------|
| `offered_mbps`    | Mbps | bits the slice's sources sent in the interval / interval              |
| `capacity_mbps`   | Mbps | the link rate enforced (share x capacity, floored at a packet/interval) |
| `throughput_mbps` | Mbps | bits delivered in the interval / interval                             |
| `delay_p95_ms`    | ms   | p95 one-way delay of packets delivered in the interval (inf: sent, none delivered; NaN: none sent) |
| `jitter_ms`       | ms   | standard deviation of those delays                                    |
| `loss_pct`        | %    | packets dropped by the full queue / packets sent                      |
| `served_fraction` | 1    | min(1, delivered bits / offered bits); 1 when nothing was offered     |
| `devices_served`  | 1    | packets delivered in the interval (mMTC: one report per device)       |

SLA verdict from measurements (cost 1 when any present target fails): bandwidth: throughput <
(1 - :data:`BOUNDARY_TOLERANCE`) x min(offered, target); p95 latency: measured p95 > target;
availability: served fraction < target % / 100 - :data:`BOUNDARY_TOLERANCE`; jitter: measured >
target; loss: measured > target. The tolerance (0.5 %) covers the packets that straddle an interval
boundary (those on the wire when it ends, about 1 ms of traffic plus one packet).

The reward keeps the fast model's definition (allocation against the needed share of the
interval's traffic): costs are what packets decide, so the Lagrangian sees the packet-level SLA.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepslicing.simulator import SlicingConfig, SlicingSimulator, Step
from deepslicing.slices import BASE_DELAY_MS
from ns3_gym import engine

BACKENDS = ("fast", "ns3")
BOUNDARY_TOLERANCE = 0.005
_SEED_TAG = 0x6E7333  # keeps the packet streams apart from the traffic draw of the same seed


def backend_class(backend: str) -> type[SlicingSimulator]:
    """The simulator class of ``backend``; raises naming the field and the rule."""
    if backend == "fast":
        return SlicingSimulator
    if backend == "ns3":
        engine.require_ns3()
        return Ns3SlicingSimulator
    raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")


def measure(
    raw: np.ndarray, packet_bits: np.ndarray, capacity_bps: np.ndarray, interval_s: float
) -> dict[str, np.ndarray]:
    """The measurement table (module docstring) from :data:`engine.COLUMNS` rows ``(..., 9)``."""
    col = {name: raw[..., i] for i, name in enumerate(engine.COLUMNS)}
    sent, received = col["sent"], col["received"]
    offered_bits = sent * packet_bits
    delivered = col["delivered_bits"]
    p95 = np.where(received > 0, col["delay_p95_ms"], np.where(sent > 0, np.inf, np.nan))
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.where(sent > 0, 100.0 * col["dropped"] / sent, 0.0)
        served = np.where(offered_bits > 0, np.minimum(1.0, delivered / offered_bits), 1.0)
    return {
        "offered_mbps": offered_bits / interval_s / 1e6,
        "capacity_mbps": capacity_bps / 1e6,
        "throughput_mbps": delivered / interval_s / 1e6,
        "delay_p95_ms": p95,
        "delay_mean_ms": col["delay_mean_ms"],
        "jitter_ms": np.where(received > 0, col["jitter_ms"], np.nan),
        "loss_pct": loss,
        "served_fraction": served,
        "devices_served": received,
        "packets_sent": sent,
        "packets_dropped": col["dropped"],
        "delivered_bits": delivered,
    }


def sla_violated(slices, m: dict[str, np.ndarray]) -> np.ndarray:
    """1.0 where a measured KPI misses a present SLA target of the slice, else 0.0."""
    tol = BOUNDARY_TOLERANCE
    with np.errstate(invalid="ignore"):
        checks = (
            m["throughput_mbps"] < (1 - tol) * np.minimum(m["offered_mbps"], slices.bandwidth_mbps),
            m["delay_p95_ms"] > slices.latency_ms_p95,
            m["served_fraction"] < slices.availability / 100.0 - tol,
            m["jitter_ms"] > slices.jitter_ms,
            m["loss_pct"] > slices.loss_pct,
        )
    violated = np.zeros(np.shape(m["loss_pct"]), dtype=bool)
    for c in checks:
        violated |= c  # comparisons with NaN (absent target, nothing measured) are False
    return violated.astype(np.float64)


class Ns3SlicingSimulator(SlicingSimulator):
    """:class:`SlicingSimulator` whose intervals are played on ns-3 (module docstring)."""

    def __init__(self, config: SlicingConfig, num_envs: int = 1):
        super().__init__(config, num_envs)
        s = self.slices
        links = num_envs * self.num_slices
        self._packet_bits = 8.0 * np.maximum(np.round(s.packet_bits / 8.0), 3.0)
        self._kind_code = np.array([engine.ARRIVALS[k] for k in s.kind], dtype=np.int32)
        self._links = links
        self.measured: dict[str, np.ndarray] | None = None
        self.last_rates: tuple[np.ndarray, np.ndarray] | None = None
        self.links: engine.Links | None = None
        self.engine = engine.acquire(self)

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is None:  # draw one, so traffic and packets come from the same seed
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
        observation = super().reset(seed)
        seeds = np.random.SeedSequence([int(seed), _SEED_TAG]).generate_state(
            self._links, np.uint64
        )
        self.links = engine.Links(
            packet_bits=np.tile(self._packet_bits, self.num_envs),
            arrivals=np.tile(self._kind_code, self.num_envs),
            seeds=seeds,
            delay_ms=BASE_DELAY_MS,
        )
        self.engine.build(self.links)
        self.measured = None
        return observation

    def step(self, requests: np.ndarray) -> Step:
        out = super().step(requests)  # validates, coordinates, observes; cost replaced below
        t, c = self.t, self.config
        capacity = out.shares * self.cell.mbps_per_share(self.spectral_efficiency[:, t]) * 1e6
        bps = np.maximum(capacity, self._packet_bits / c.interval_s)
        demand = self.demand[:, t]
        embb = np.asarray(self.slices.kind) == "embb"
        amount = np.where(embb, demand * 1e6 / self._packet_bits, demand)  # packets/s or devices
        self.last_rates = (
            bps.ravel(),
            amount.ravel(),
        )  # what ns-3 was given (bench ns3 replays it)
        raw = self.engine.run(*self.last_rates, c.interval_s)
        raw = raw.reshape(self.num_envs, self.num_slices, -1)
        self.measured = measure(raw, self._packet_bits, bps, c.interval_s)
        return dataclasses.replace(out, cost=sla_violated(self.slices, self.measured))

    def kpis(self) -> dict[str, np.ndarray]:
        """The packet measurements of the interval just stepped (module docstring)."""
        if self.measured is None:
            raise RuntimeError("kpis: no interval has been played since reset(); call step()")
        return self.measured

    def close(self) -> None:
        """Give the in-process ns-3 back (or stop this simulator's Ray actor)."""
        engine.release(self)
        if isinstance(self.engine, engine.RemoteEngine):
            self.engine.close()

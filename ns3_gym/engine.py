"""The ns-3 side of the backend: one packet-level cell per process, stepped an interval at a time.

:class:`LocalEngine` compiles ``ns3_gym/cell.h`` with ``cppyy.cppdef`` (once per process) and
holds a ``dsns3::Cell`` of ``num_envs x num_slices`` slice links. ``run`` sets each link's rate,
starts the interval's packet sources, then ``Simulator::Stop(interval) + Simulator::Run()`` and
reads the per-link summary back: Python does O(links) work per interval, never per packet.

Traffic per slice (from the scenario's demand, the same array the fast model scores):

| kind    | demand unit      | packets                                   | arrival process          |
|---------|------------------|-------------------------------------------|--------------------------|
| `embb`  | Mbps             | ``packet_bits`` (12,000 bits by default)  | constant rate, random phase |
| `urllc` | packets/s        | ``packet_bits`` (2,048)                   | Poisson                  |
| `mmtc`  | devices/interval | one report of ``packet_bits`` (800) each  | uniform times in the interval |

Packet sizes are rounded to whole bytes (at least 3); 2 of them are the PPP header the device
adds, so the bits on the wire equal ``packet_bits``.

Enforcement: each slice has its own point-to-point bottleneck whose transmit rate is
``share x Cell.mbps_per_share(spectral efficiency)`` (bit/s) for the interval, as a PRB scheduler
would give it; a share below one packet per interval is raised to that floor (``packet_bits /
interval_s`` bit/s, so a packet caught on the link at a rate change finishes within an interval).
The link's propagation delay is :data:`deepslicing.slices.BASE_DELAY_MS` (1 ms), so an idle slice's
p95 delay is the base delay plus one packet's transmission time. Queue limit: a drop-tail queue of
:data:`QUEUE_PACKETS` (1000) packets per slice; overload shows as queueing delay, then as loss.

Seeding: every link has its own ``std::mt19937_64`` seeded from the episode seed (no ns-3 global
RNG is used); ``build`` destroys the previous simulation (``Simulator::Destroy``), so the same
seed and the same shares give the same packets.

One ns-3 simulator lives in a process. :func:`acquire` hands the in-process engine to the first
simulator that asks and, while that one is alive, a :class:`RemoteEngine` (the same engine in its
own Ray actor) to any other.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install -e '.[ns3]'"
QUEUE_PACKETS = 1000
ARRIVALS = {"embb": 0, "urllc": 1, "mmtc": 2}  # dsns3::Arrivals: CBR, POISSON, UNIFORM
COLUMNS = (
    "sent",
    "dropped",
    "received",
    "delivered_bits",
    "delay_p95_ms",
    "delay_mean_ms",
    "jitter_ms",
    "delay_max_ms",
    "queued",
)
_HEADER = Path(__file__).with_name("cell.h")


class Ns3NotInstalledError(ImportError):
    """backend="ns3" without the ns-3 Python package."""


def require_ns3() -> None:
    """Raise :class:`Ns3NotInstalledError` naming the install command unless ns-3 is importable."""
    if importlib.util.find_spec("ns") is None or importlib.util.find_spec("cppyy") is None:
        raise Ns3NotInstalledError(
            f"backend: 'ns3' needs the ns-3 Python package (ns3==3.44.post0); install it with "
            f"`{INSTALL_HINT}`"
        )


_compiled = None


def _dsns3():
    """Import ns-3 and compile the cell (once per process); returns the ``dsns3`` namespace."""
    global _compiled
    if _compiled is None:
        require_ns3()
        # cppyy may print "Failed to materialize symbols" while ns-3 loads: known and harmless
        import cppyy
        from ns import ns  # noqa: F401 - loads the ns-3 libraries and headers into cling

        cppyy.cppdef(_HEADER.read_text())
        _compiled = cppyy.gbl.dsns3
    return _compiled


@dataclass(frozen=True)
class Links:
    """What ``build`` needs, one entry per link (env-major: link = env x num_slices + slice)."""

    packet_bits: np.ndarray  # float64 (links,)
    arrivals: np.ndarray  # int32 (links,), ARRIVALS codes
    seeds: np.ndarray  # uint64 (links,)
    delay_ms: float
    queue_packets: int = QUEUE_PACKETS


class LocalEngine:
    """The ns-3 cell of this process (see the module docstring)."""

    def __init__(self) -> None:
        self._dsns3 = _dsns3()
        self._cell = None
        self._out = np.zeros(0)

    def build(self, links: Links) -> None:
        import cppyy

        self._cell = None  # the old cell's links go before its nodes
        cppyy.gbl.ns3.Simulator.Destroy()
        n = len(links.packet_bits)
        self._arrays = (
            np.ascontiguousarray(links.packet_bits, dtype=np.float64),
            np.ascontiguousarray(links.arrivals, dtype=np.int32),
            np.ascontiguousarray(links.seeds, dtype=np.uint64),
        )
        self._cell = self._dsns3.Cell(n, *self._arrays, float(links.delay_ms), links.queue_packets)
        self._out = np.zeros(n * len(COLUMNS))

    def run(self, bps: np.ndarray, amount: np.ndarray, interval_s: float) -> np.ndarray:
        """One interval: link rates ``bps`` and arrivals ``amount`` per link -> ``(links, 9)``
        measurements in :data:`COLUMNS` order."""
        if self._cell is None:
            raise RuntimeError("run: build() the cell first")
        bps = np.ascontiguousarray(bps, dtype=np.float64)
        amount = np.ascontiguousarray(amount, dtype=np.float64)
        self._cell.RunInterval(bps, amount, float(interval_s), self._out)
        return self._out.reshape(-1, len(COLUMNS)).copy()

    def run_bare(self, bps: np.ndarray, amount: np.ndarray, interval_s: float) -> float:
        """``(intervals, links)`` rates and arrivals back to back in C++; packets received."""
        bps = np.ascontiguousarray(bps, dtype=np.float64)
        amount = np.ascontiguousarray(amount, dtype=np.float64)
        return float(self._dsns3.RunBare(self._cell, bps.shape[0], bps, amount, float(interval_s)))

    def now_s(self) -> float:
        import cppyy

        return float(cppyy.gbl.ns3.Simulator.Now().GetSeconds())


class RemoteEngine:
    """A :class:`LocalEngine` in its own Ray actor (its own process, so its own ns-3).

    A closed engine's actor waits in this process's pool for the next :class:`RemoteEngine` of
    the same Ray session (starting one imports ns-3 and compiles the cell, about 10 s)."""

    _idle: list = []  # (Ray session's GCS address, actor handle)

    def __init__(self) -> None:
        import ray

        if not ray.is_initialized():
            from deepslicing.ray_runtime import init_ray

            init_ray()
        self._job = ray.get_runtime_context().gcs_address
        pool = RemoteEngine._idle
        RemoteEngine._idle = [(job, a) for job, a in pool if job == self._job]
        if RemoteEngine._idle:
            self._actor = RemoteEngine._idle.pop()[1]
        else:
            actor = ray.remote(num_cpus=0)(_EngineActor)
            env = {"env_vars": {"PYTHONPATH": _pythonpath()}}
            self._actor = actor.options(runtime_env=env).remote()

    def build(self, links: Links) -> None:
        import ray

        ray.get(self._actor.build.remote(links))

    def run(self, bps: np.ndarray, amount: np.ndarray, interval_s: float) -> np.ndarray:
        import ray

        return ray.get(self._actor.run.remote(bps, amount, interval_s))

    def close(self) -> None:
        if self._actor is not None:
            RemoteEngine._idle.append((self._job, self._actor))
            self._actor = None


class _EngineActor:
    def __init__(self) -> None:
        self.engine = LocalEngine()

    def build(self, links: Links) -> None:
        self.engine.build(links)

    def run(self, bps: np.ndarray, amount: np.ndarray, interval_s: float) -> np.ndarray:
        return self.engine.run(bps, amount, interval_s)


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return root if not rest else f"{root}{os.pathsep}{rest}"


_local: LocalEngine | None = None
_owner: weakref.ref | None = None


def acquire(owner: object) -> LocalEngine | RemoteEngine:
    """The in-process engine if no live object holds it, else a new :class:`RemoteEngine`."""
    global _local, _owner
    require_ns3()
    if _owner is not None and _owner() is not None:
        gc.collect()  # an owner kept alive only by a reference cycle lets go here
    if _owner is None or _owner() is None:
        if _local is None:
            _local = LocalEngine()
        _owner = weakref.ref(owner)
        return _local
    return RemoteEngine()


def release(owner: object) -> None:
    """Give the in-process engine back (``owner`` closes before it is garbage)."""
    global _owner
    if _owner is not None and _owner() is owner:
        _owner = None

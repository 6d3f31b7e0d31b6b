"""Slice specifications: what a slice is, what it promises, and what traffic it carries.

A slice has a ``kind`` that fixes the unit of its demand and its default traffic shape:

| kind    | demand unit              | default mean | packet size | mean spectral eff. | default SLA           |
|---------|--------------------------|--------------|-------------|--------------------|-----------------------|
| `embb`  | offered Mbps             | 40 Mbps      | 12000 bit   | 4.5 bit/s/Hz       | bandwidth_mbps = 50   |
| `urllc` | packets per second       | 3000 pkt/s   | 2048 bit    | 2.5 bit/s/Hz       | latency_ms_p95 = 10   |
| `mmtc`  | devices per interval     | 5000 devices | 800 bit     | 1.2 bit/s/Hz       | availability = 99 (%) |

The defaults put the three default slices at about 82 of the cell's 100 PRBs on average, so that
scenario peaks overload the cell and allocation matters. Spectral efficiencies sit inside the
0.15..7.4 bit/s/Hz span of the 3GPP TS 38.214 CQI table 1; URLLC uses robust MCS, mMTC devices sit
at the cell edge. SLA values follow the predecessor system's use-case KPIs (AGV control < 10 ms p95,
eMBB camera and CCTV streams of 10..200 Mbps, availability 99.9 %..99.99 %).

SLA targets, all optional, each turned into a required capacity by :mod:`deepslicing.model`:

- ``bandwidth_mbps``: served throughput >= min(offered, target) (Mbps, > 0)
- ``latency_ms_p95``: M/M/1 sojourn p95 + base delay <= target (ms, > 1 ms base delay)
- ``availability``: share of offered traffic (devices for mMTC) served, percent in (0, 100]
- ``jitter_ms``: standard deviation of the M/M/1 sojourn time <= target (ms, > 0)
- ``loss_pct``: share of offered traffic not served <= target, percent in [0, 100)

Optional 5G identifiers ``sst`` (0..255), ``sd`` (24-bit hex string such as "0x000001") and
``five_qi`` (1..255) are carried through to serving and reports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

KINDS = ("embb", "urllc", "mmtc")
MAX_SLICES = 20
BASE_DELAY_MS = 1.0  # air interface + processing floor added to the queueing delay (ms)


class SliceConfigError(ValueError):
    """A slice or cell configuration breaks a rule; the message names the field and the rule."""


@dataclass(frozen=True)
class Bounds:
    """An interval of allowed values: ``low < v`` (or ``<=`` when ``low_inclusive``), ``v <= high``
    (or ``<`` when not ``high_inclusive``)."""

    low: float
    high: float
    unit: str
    low_inclusive: bool = False
    high_inclusive: bool = True

    def contains(self, v: float) -> bool:
        above = v >= self.low if self.low_inclusive else v > self.low
        below = v <= self.high if self.high_inclusive else v < self.high
        return above and below

    def rule(self) -> str:
        left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"must be in {left}{self.low:g}, {self.high:g}{right} {self.unit}"


# The allowed range of each SLA target, shared by slice specs and the HTTP schema. Latency must
# exceed the base delay, which no allocation can remove.
TARGET_BOUNDS: dict[str, Bounds] = {
    "bandwidth_mbps": Bounds(0.0, 1e5, "Mbps"),
    "latency_ms_p95": Bounds(BASE_DELAY_MS, 1e4, "ms"),
    "availability": Bounds(0.0, 100.0, "%"),
    "jitter_ms": Bounds(0.0, 1e4, "ms"),
    "loss_pct": Bounds(0.0, 100.0, "%", low_inclusive=True, high_inclusive=False),
}


@dataclass(frozen=True)
class SlaTargets:
    """Soft SLA targets of one slice; ``None`` means the slice makes no promise on that KPI."""

    bandwidth_mbps: float | None = None
    latency_ms_p95: float | None = None
    availability: float | None = None
    jitter_ms: float | None = None
    loss_pct: float | None = None

    def validate(self, where: str) -> None:
        for name, bounds in TARGET_BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SliceConfigError(f"{where}.targets.{name}: must be a number, got {value!r}")
            if not math.isfinite(value) or not bounds.contains(float(value)):
                raise SliceConfigError(f"{where}.targets.{name}: {bounds.rule()}, got {value!r}")

    def is_empty(self) -> bool:
        return all(getattr(self, n) is None for n in self.__dataclass_fields__)


@dataclass(frozen=True)
class KindDefaults:
    mean_demand: float
    packet_bits: float
    mean_spectral_efficiency: float
    targets: SlaTargets


KIND_DEFAULTS: dict[str, KindDefaults] = {
    "embb": KindDefaults(40.0, 12000.0, 4.5, SlaTargets(bandwidth_mbps=50.0)),
    "urllc": KindDefaults(3000.0, 2048.0, 2.5, SlaTargets(latency_ms_p95=10.0)),
    "mmtc": KindDefaults(5000.0, 800.0, 1.2, SlaTargets(availability=99.0)),
}


@dataclass(frozen=True)
class SliceSpec:
    """One slice: identity, kind, SLA targets and traffic shape (``None`` takes the kind default)."""

    name: str
    kind: str
    targets: SlaTargets = field(default_factory=SlaTargets)
    weight: float = 1.0  # relative importance in the utility
    mean_demand: float | None = None  # in the kind's demand unit (see module docstring)
    packet_bits: float | None = None
    mean_spectral_efficiency: float | None = None  # bit/s/Hz
    sst: int | None = None
    sd: str | None = None
    five_qi: int | None = None

    def resolved(self) -> SliceSpec:
        """The spec with every ``None`` traffic field and empty targets filled from its kind."""
        self.validate("slice")
        d = KIND_DEFAULTS[self.kind]
        return replace(
            self,
            targets=d.targets if self.targets.is_empty() else self.targets,
            mean_demand=d.mean_demand if self.mean_demand is None else self.mean_demand,
            packet_bits=d.packet_bits if self.packet_bits is None else self.packet_bits,
            mean_spectral_efficiency=(
                d.mean_spectral_efficiency
                if self.mean_spectral_efficiency is None
                else self.mean_spectral_efficiency
            ),
        )

    def validate(self, where: str) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name):
            raise SliceConfigError(
                f"{where}.name: must be 1..64 characters of letters, digits, '_', '.', '-', "
                f"got {self.name!r}"
            )
        if self.kind not in KINDS:
            raise SliceConfigError(f"{where}.kind: must be one of {KINDS}, got {self.kind!r}")
        positive = {
            "weight": self.weight,
            "mean_demand": self.mean_demand,
            "packet_bits": self.packet_bits,
            "mean_spectral_efficiency": self.mean_spectral_efficiency,
        }
        for name, value in positive.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SliceConfigError(f"{where}.{name}: must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise SliceConfigError(
                    f"{where}.{name}: must be a finite number > 0, got {value!r}"
                )
        if self.sst is not None and not (isinstance(self.sst, int) and 0 <= self.sst <= 255):
            raise SliceConfigError(f"{where}.sst: must be an integer in 0..255, got {self.sst!r}")
        if self.sd is not None and not (
            isinstance(self.sd, str) and re.fullmatch(r"(0x)?[0-9A-Fa-f]{6}", self.sd)
        ):
            raise SliceConfigError(
                f"{where}.sd: must be 6 hex digits such as '0x000001', got {self.sd!r}"
            )
        if self.five_qi is not None and not (
            isinstance(self.five_qi, int) and 1 <= self.five_qi <= 255
        ):
            raise SliceConfigError(
                f"{where}.five_qi: must be an integer in 1..255, got {self.five_qi!r}"
            )
        self.targets.validate(where)


def default_slices(
    num_slices: int = 3, kinds: tuple[str, ...] | None = None
) -> tuple[SliceSpec, ...]:
    """``num_slices`` slices cycling eMBB, URLLC, mMTC (or ``kinds``), each demand scaled by 3/n.

    Scaling keeps the nominal cell load near that of the 3 default slices whatever the number of
    slices, so scenarios stay comparable from 3 to 20 slices. Names are the kind when kinds are
    unique, else ``kind_i``.
    """
    check_num_slices(num_slices, "num_slices")
    if kinds is None:
        kinds = tuple(KINDS[i % len(KINDS)] for i in range(num_slices))
    if len(kinds) != num_slices:
        raise SliceConfigError(
            f"kinds: must list one kind per slice ({num_slices}), got {len(kinds)}"
        )
    for i, kind in enumerate(kinds):
        if kind not in KINDS:
            raise SliceConfigError(f"kinds[{i}]: must be one of {KINDS}, got {kind!r}")
    unique_names = len(set(kinds)) == len(kinds)
    scale = 3.0 / num_slices
    specs = [
        SliceSpec(
            name=kind if unique_names else f"{kind}_{i}",
            kind=kind,
            mean_demand=KIND_DEFAULTS[kind].mean_demand * scale,
        )
        for i, kind in enumerate(kinds)
    ]
    return tuple(s.resolved() for s in specs)


def check_num_slices(num_slices: object, where: str) -> None:
    if isinstance(num_slices, bool) or not isinstance(num_slices, int):
        raise SliceConfigError(f"{where}: must be an integer, got {num_slices!r}")
    if not 1 <= num_slices <= MAX_SLICES:
        raise SliceConfigError(f"{where}: must be between 1 and {MAX_SLICES}, got {num_slices}")


def resolve_slices(specs: tuple[SliceSpec, ...] | list[SliceSpec]) -> tuple[SliceSpec, ...]:
    """Validate a user-given slice list (count, unique names) and fill kind defaults."""
    check_num_slices(len(specs), "slices (count)")
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):
        spec.validate(f"slices[{i}]")
        if names.index(spec.name) != i:
            raise SliceConfigError(f"slices[{i}].name: must be unique, {spec.name!r} repeats")
    return tuple(s.resolved() for s in specs)

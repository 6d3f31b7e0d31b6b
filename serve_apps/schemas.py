"""Request and response bodies of the allocation service, as strict pydantic models.

Strict means: no type coercion (``"5"`` is not a number, ``true`` is not an integer), no unknown
fields, no NaN or Infinity. Ranges come from the same tables the slicing model uses
(:data:`deepslicing.slices.TARGET_BOUNDS`), so the OpenAPI document states every rule a request
must follow. Units and defaults of the readings are in :mod:`deepslicing.allocate`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepslicing.allocate import DEFAULT_TIME_OF_DAY
from deepslicing.model import NUM_FEATURES
from deepslicing.scenarios import SPECTRAL_EFFICIENCY_RANGE
from deepslicing.slices import KINDS, MAX_SLICES, TARGET_BOUNDS

MAX_CELLS = 5000  # cells in one /allocate/batch request
MAX_DEMAND = 1e9  # in the kind's demand unit; anything larger is a unit mistake

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _target(name: str, description: str):
    b = TARGET_BOUNDS[name]
    low = {"ge": b.low} if b.low_inclusive else {"gt": b.low}
    high = {"le": b.high} if b.high_inclusive else {"lt": b.high}
    return Field(None, description=f"{description} ({b.unit})", **low, **high)


class Targets(BaseModel):
    """SLA targets of a slice; all optional, none at all takes the kind's default SLA."""

    model_config = STRICT
    bandwidth_mbps: float | None = _target(
        "bandwidth_mbps", "served throughput >= min(offered, this)"
    )
    latency_ms_p95: float | None = _target("latency_ms_p95", "95th percentile delay <= this")
    availability: float | None = _target("availability", "share of offered traffic served >= this")
    jitter_ms: float | None = _target("jitter_ms", "delay standard deviation <= this")
    loss_pct: float | None = _target("loss_pct", "share of offered traffic not served <= this")


class Readings(BaseModel):
    """What the slice measured over the interval just finished; all optional."""

    model_config = STRICT
    demand: float | None = Field(
        None,
        ge=0,
        le=MAX_DEMAND,
        description="offered demand: eMBB Mbps, URLLC packets/s, mMTC devices",
    )
    mean_demand: float | None = Field(
        None, gt=0, le=MAX_DEMAND, description="the slice's usual demand, same unit as demand"
    )
    spectral_efficiency: float | None = Field(
        None,
        ge=SPECTRAL_EFFICIENCY_RANGE[0],
        le=SPECTRAL_EFFICIENCY_RANGE[1],
        description="bit/s/Hz, the CQI table's range",
    )
    current_share: float | None = Field(
        None, ge=0, le=1, description="share of the cell's PRBs the slice holds now"
    )
    previous_demand: float | None = Field(
        None,
        ge=0,
        le=MAX_DEMAND,
        description="offered demand of the interval before the last, same unit as demand: "
        "the policy's short history (default: demand)",
    )
    demand_level: float | None = Field(
        None,
        ge=0,
        le=MAX_DEMAND,
        description="the slice's recent average demand, same unit as demand, e.g. an EWMA with "
        "weight 0.2 on the newest interval (default: from demand and previous_demand)",
    )
    spectral_efficiency_level: float | None = Field(
        None,
        ge=SPECTRAL_EFFICIENCY_RANGE[0],
        le=SPECTRAL_EFFICIENCY_RANGE[1],
        description="bit/s/Hz, the slice's recent average, e.g. an EWMA with weight 0.1 on the "
        "newest interval (default: spectral_efficiency)",
    )


class SliceRequest(BaseModel):
    model_config = STRICT
    slice_id: int = Field(
        ge=0, le=2**31 - 1, description="the caller's slice identifier, unique per cell"
    )
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="letters, digits, _ . -")
    kind: Literal[KINDS] | None = Field(
        None, description="embb, urllc or mmtc; inferred when absent"
    )
    sst: int | None = Field(None, ge=0, le=255, description="5G slice/service type")
    sd: str | None = Field(
        None, pattern=r"^(0x)?[0-9A-Fa-f]{6}$", description="slice differentiator, 6 hex digits"
    )
    targets: Targets = Field(default_factory=Targets)
    readings: Readings | None = None


class AllocateRequest(BaseModel):
    """One cell: its slices and, optionally, the time of day (the policy's episode progress)."""

    model_config = STRICT
    slices: list[SliceRequest] = Field(min_length=1, max_length=MAX_SLICES)
    time_of_day: float = Field(
        DEFAULT_TIME_OF_DAY, ge=0, le=1, description="fraction of the day elapsed"
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> AllocateRequest:
        seen: set[int] = set()
        for i, s in enumerate(self.slices):
            if s.slice_id in seen:
                raise ValueError(
                    f"slices[{i}].slice_id: must be unique in a cell, {s.slice_id} repeats"
                )
            seen.add(s.slice_id)
        return self


class BatchRequest(BaseModel):
    model_config = STRICT
    cells: list[AllocateRequest] = Field(min_length=1, max_length=MAX_CELLS)


class PredictRequest(BaseModel):
    """The flat state, slice by slice: the model's slices x the 6 measured features (18 floats for
    3 slices; the derived ones take their single-reading defaults) or x all 14 features."""

    model_config = STRICT
    state: list[float] = Field(min_length=1, max_length=MAX_SLICES * NUM_FEATURES)


class SliceAllocation(BaseModel):
    slice_id: int
    name: str
    kind: str
    sst: int | None
    sd: str | None
    share: float = Field(description="fraction of the cell's PRBs allocated")
    prbs: int = Field(description="floor(share x the cell's PRBs)")
    requested_share: float = Field(description="what the policy asked for, before the guardrail")
    needed_share: float = Field(description="the share that just meets the slice's SLA")
    expected_throughput_mbps: float
    expected_delay_p95_ms: float | None = Field(description="null when the queue is unstable")
    sla_ok: bool = Field(description="the SLA is predicted to hold (share >= needed share)")
    sla_risk: float = Field(description="1 - min(1, share / needed share)")
    source: Literal["policy", "need"] = Field(description="who made the request")


class CellAllocation(BaseModel):
    slices: list[SliceAllocation]
    total_share: float = Field(description="sum of shares, at most 1")
    total_need: float = Field(description="sum of needed shares; above 1 not every SLA can hold")
    admm_primal_residual: float
    model_version: str


class BatchAllocation(BaseModel):
    cells: list[CellAllocation]
    model_version: str


class PredictResponse(BaseModel):
    requested_shares: list[float] = Field(description="the actors' outputs, one per slice")
    shares: list[float] = Field(description="after the guardrail: >= 0, sum <= 1")
    model_version: str


class ErrorDetail(BaseModel):
    field: str
    rule: str


class ErrorResponse(BaseModel):
    error: str = Field(description="a short machine-readable code")
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok"]
    model_version: str


class ModelInfo(BaseModel):
    model_version: str
    model_uri: str
    format: str
    num_slices: int
    actor_kinds: list[str]
    features: list[str]
    cell: dict[str, float]
    guardrail: dict[str, float | int | bool | str]
    metadata: dict

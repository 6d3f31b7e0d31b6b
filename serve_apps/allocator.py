"""The allocation service: a Ray Serve deployment with a FastAPI ingress.

Endpoints (JSON; bodies and rules in :mod:`serve_apps.schemas`, the OpenAPI document at
``/openapi.json``, an explorer at ``/docs``):

| method, path           | key | does                                                            |
|------------------------|-----|-----------------------------------------------------------------|
| ``POST /allocate``     | yes | one cell: slices with SLA targets -> shares, PRBs, predicted QoS |
| ``POST /allocate/batch`` | yes | many cells in one request                                    |
| ``POST /predict``      | yes | the flat state (model slices x 6 or 14 features) -> shares      |
| ``GET /model_info``    | yes | model version and source, slice layout, features, cell, guardrail |
| ``GET /health``        | no  | 200 once the replica has its model                              |
| ``GET /metrics``       | no  | the service's metrics in the Prometheus text format             |

Every error is JSON ``{"error", "message", "details": [{"field", "rule"}]}``: 400 unparsable JSON,
401 missing or wrong ``X-API-Key``, 404/405 unknown path or method, 409 SLAs that cannot all be met
(with ``reject_infeasible``), 413 body over ``max_body_bytes``, 415 a body whose ``Content-Type`` is
not JSON, 422 a field breaking a rule,
429 rate limited (with ``Retry-After``).

Model: loaded once per replica in ``reconfigure`` from ``model``, a registered model URI
(``models:/deepslicing-allocator@champion``, ONNX through onnxruntime) or an export directory
(``format`` onnx, int8 or torchscript). A registered model is downloaded by a short-lived Ray task
on the replica's node (:func:`fetch_registered_outside`), so MLflow and its data stack never load
into a replica (RSS 512 -> 376 MiB, ``docs/benchmarks.md``). All settings travel as the
deployment's ``user_config``, so a new champion is picked up by redeploying with changed settings (``serve deploy`` of the
config file, or ``serve.run(build_app(...))``): a new ``model``, or, when the alias moved under
the same URI, a new ``revision``. Serve then rolls the deployment: new replicas load the new model
and take traffic once healthy, old ones finish their requests and stop, so none is dropped. (A
``user_config`` override in the config file's ``deployments`` section reloads inside the running
replicas through ``reconfigure`` instead.)

Metrics: recorded with ``ray.serve.metrics`` (names in :mod:`deepslicing.metrics`), which Ray
aggregates per node and exports at each node's metrics port for Prometheus; ``GET /metrics``
returns this node's copy of the service's families. A replica tallies requests in plain Python and
hands them to Ray every ``FLUSH_PERIOD_S`` (a Ray record per request would cost more than the
guardrail); Ray reports them every few seconds. Prometheus scrape config, recording and alert
rules: ``cluster/prometheus/``; the Grafana dashboard: ``cluster/grafana/`` (panels and queries in
``docs/observability.md``).

Under load, the ``/allocate`` cells waiting in a replica at the same moment are answered with one
allocation (:class:`CellBatcher`); a request that finds the replica idle never waits for others.

Autoscaling: ``min_replicas``..``max_replicas`` replicas of ``replica_cpus`` CPUs each, scaled on
``target_ongoing_requests`` per replica (Serve's autoscaler); on a 2-core laptop 0.25-CPU replicas
let several fit. On a cluster raise ``max_replicas`` and ``replica_cpus`` and put more nodes behind
Serve's ingress (see ``cluster/README.md``).
"""

# No ``from __future__ import annotations`` here: Serve's ingress rebuilds the endpoint signatures
# and FastAPI must see ``Request`` as a class, not a string.
import asyncio
import dataclasses
import datetime
import functools
import gc
import logging
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepslicing import metrics
from deepslicing.allocate import (
    DEFAULT_TIME_OF_DAY,
    Guardrail,
    InfeasibleError,
    SliceInput,
    allocate,
    guard,
    slice_answers,
)
from deepslicing.config import check_int, from_mapping, option, to_dict
from deepslicing.coordinator import UTILITY_ITERATIONS, UTILITY_RHO
from deepslicing.model import (
    FEATURE_HIGH,
    FEATURES,
    NUM_FEATURES,
    NUM_MEASURED_FEATURES,
    Cell,
    complete_features,
)
from deepslicing.ray_runtime import Ingress
from serve_apps import schemas
from serve_apps.security import KeyRing, TokenBuckets, read_keys

logger = logging.getLogger("ray.serve")

API_KEY_HEADER = "X-API-Key"
PROTECTED = {"/allocate", "/allocate/batch", "/predict", "/model_info"}
ROUTES = PROTECTED | {"/health", "/metrics", "/openapi.json", "/docs"}
APP_NAME = "deepslicing"
FLUSH_PERIOD_S = 0.5  # a replica hands its metric tallies to Ray this often
DEPLOYMENT_NAME = "allocator"


@dataclass(frozen=True)
class ServeConfig:
    """Serve the champion allocation policy over HTTP on Ray Serve (local Ray, or RAY_ADDRESS)."""

    model: str = option(
        "models:/deepslicing-allocator@champion",
        "registered model URI (models:/NAME@ALIAS or models:/NAME/VERSION) or an export directory",
    )
    tracking_uri: str | None = option(
        None,
        "MLflow store for models:/ URIs (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    revision: str = option(
        "", "any new value makes running replicas reload the model (after the alias moved)"
    )
    format: Literal["onnx", "int8", "torchscript"] = option(
        "onnx", "model file of an export directory (registered models are ONNX)"
    )
    guardrail_method: Literal["projection", "admm"] = option(
        "projection",
        "how the guardrail solves an overloaded cell: projection (the exact answer, numpy) or "
        "admm (the compiled ADMM loop with admm_rho and admm_iterations; loads numba, ~125 MB)",
    )
    admm_rho: float = option(UTILITY_RHO, "guardrail ADMM penalty rho (> 0)")
    admm_iterations: int = option(UTILITY_ITERATIONS, "guardrail ADMM iterations (1..10000)")
    qos_floor: float = option(
        0.0,
        "reserve this fraction of each slice's needed share before the policy's requests (0..1)",
    )
    reject_infeasible: bool = option(
        False, "answer 409 when a cell's slices need more than the whole cell"
    )
    auth: bool = option(True, "require X-API-Key on every endpoint but /health and /metrics")
    api_keys_file: str | None = option(
        None, "secret file with one API key per line (default: $DEEPSLICING_API_KEYS, comma list)"
    )
    rate_limit_per_s: float = option(200.0, "requests per second per key and replica")
    rate_limit_burst: int = option(400, "requests a key may send at once before the rate applies")
    max_body_bytes: int = option(4_000_000, "largest request body accepted (bytes)")
    host: str = option("127.0.0.1", "interface the HTTP proxy listens on")
    port: int = option(8000, "HTTP port")
    min_replicas: int = option(1, "autoscaling: fewest replicas")
    max_replicas: int = option(2, "autoscaling: most replicas")
    target_ongoing_requests: float = option(
        4.0, "autoscaling: requests in flight per replica it aims for"
    )
    upscale_delay_s: float = option(3.0, "autoscaling: load must last this long to add replicas")
    downscale_delay_s: float = option(20.0, "autoscaling: quiet must last this long to remove them")
    replica_cpus: float = option(0.25, "CPUs reserved per replica (fractions let several fit)")
    max_ongoing_requests: int = option(32, "requests one replica takes at once")
    num_cpus: int = option(2, "CPUs of the local Ray instance (ignored with RAY_ADDRESS)")
    ingress: Ingress = option(
        "auto",
        "how HTTP reaches the replicas when this command starts Ray: haproxy (HAProxy straight "
        "to each replica's own port; 3-5x lower latency here), proxy (Serve's Python proxy), "
        "auto (haproxy where ray[serve] installed its binary, i.e. Linux; else proxy); with "
        "RAY_ADDRESS the cluster's environment decides (cluster/README.md)",
    )

    def __post_init__(self) -> None:
        self.guardrail()  # checks rho, iterations, qos_floor
        for name in ("rate_limit_per_s", "target_ongoing_requests", "replica_cpus"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 86400):
                raise ValueError(
                    f"{name}: must be a number of seconds in [0, 86400], got {value!r}"
                )
        check_int("rate_limit_burst", self.rate_limit_burst, 1)
        check_int("max_body_bytes", self.max_body_bytes, 1024, 1_000_000_000)
        check_int("port", self.port, 1, 65535)
        check_int("min_replicas", self.min_replicas, 1, 1000)
        check_int("max_replicas", self.max_replicas, self.min_replicas, 1000)
        check_int("max_ongoing_requests", self.max_ongoing_requests, 1, 100_000)
        check_int("num_cpus", self.num_cpus, 1)
        if not self.model:
            raise ValueError("model: must name a registered model URI or an export directory")

    def guardrail(self) -> Guardrail:
        return Guardrail(
            self.admm_rho,
            self.admm_iterations,
            self.qos_floor,
            self.reject_infeasible,
            method=self.guardrail_method,
        )


# --- one replica's loaded state -----------------------------------------------------------------


class ServiceError(ValueError):
    """The service cannot start with these settings; the message names the setting."""


@dataclass(frozen=True)
class Service:
    """What a replica serves with: the model, the cell, the guardrail, keys and limits."""

    config: ServeConfig
    policy: Any  # deepslicing.export.ExportedPolicy
    model_uri: str
    model_version: str
    actor_kinds: tuple[str, ...]
    cell: Cell
    guardrail: Guardrail
    keys: KeyRing | None
    buckets: TokenBuckets

    @classmethod
    def load(cls, config: ServeConfig) -> "Service":
        from deepslicing.export import load_exported
        from deepslicing.simulator import SlicingConfig
        from deepslicing.tracking import tracking_uri

        if config.model.startswith("models:/"):
            files, model_version = fetch_registered_outside(
                config.model, tracking_uri(config.tracking_uri)
            )
            scratch = Path(tempfile.mkdtemp(prefix="deepslicing-model-"))
            try:
                for name, data in files.items():
                    (scratch / name).write_bytes(data)
                policy = load_exported(scratch, "onnx")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            if not Path(config.model).is_dir():
                raise ServiceError(
                    f"model: {config.model!r} is neither a models:/ URI nor an export directory"
                )
            policy = load_exported(config.model, config.format)
            model_version = str(policy.metadata["model_version"])
        keys = KeyRing(read_keys(config.api_keys_file)) if config.auth else None
        meta = policy.metadata
        env = from_mapping(SlicingConfig, meta["env"])
        return cls(
            config=config,
            policy=policy,
            model_uri=config.model,
            model_version=model_version,
            actor_kinds=tuple(s["kind"] for s in meta["slices"]),
            cell=env.cell(),
            guardrail=config.guardrail(),
            keys=keys,
            buckets=TokenBuckets(config.rate_limit_per_s, float(config.rate_limit_burst)),
        )

    def warm_up(self) -> None:
        """One allocation with a slice of every kind the model has, so the first request does not
        pay for loading the compiled guardrail and the ONNX session's first run."""
        cell = [SliceInput(name=kind, targets={}, kind=kind) for kind in self.actor_kinds]
        allocate(
            [cell], [DEFAULT_TIME_OF_DAY], self.policy, self.actor_kinds, self.cell, self.guardrail
        )

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "model_uri": self.model_uri,
            "format": self.policy.format,
            "num_slices": self.policy.num_slices,
            "actor_kinds": list(self.actor_kinds),
            "features": list(FEATURES),
            "cell": {
                "num_prbs": self.cell.num_prbs,
                "prb_bandwidth_khz": self.cell.prb_bandwidth_khz,
                "interval_s": self.cell.interval_s,
            },
            "guardrail": dataclasses.asdict(self.guardrail),
            "metadata": {k: v for k, v in self.policy.metadata.items() if k != "env"},
        }


def fetch_registered(model_uri: str, uri: str) -> tuple[dict[str, bytes], str]:
    """A registered model's export files (name -> bytes: the ONNX actors and their metadata) and
    the version ``model_uri`` resolved to, downloaded from the MLflow store ``uri``."""
    from deepslicing.registry import download_export

    scratch = Path(tempfile.mkdtemp(prefix="deepslicing-fetch-"))
    try:
        export_dir, version = download_export(model_uri, scratch, uri)
        return {p.name: p.read_bytes() for p in export_dir.iterdir() if p.is_file()}, version
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fetch_registered_outside(model_uri: str, uri: str) -> tuple[dict[str, bytes], str]:
    """:func:`fetch_registered` in a short-lived Ray task on this node when Ray runs (the worker
    exits after it: ``max_calls=1``), else in this process. MLflow and what it maps (SQLAlchemy,
    pandas, pyarrow, scipy; about 130 MB) then never load into a replica, which keeps only the
    files; on this node, so a sqlite store or a local artifact path resolves as it would here."""
    import ray

    if not ray.is_initialized():
        return fetch_registered(model_uri, uri)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_calls=1, max_retries=0, scheduling_strategy=here)
    try:
        return ray.get(task(fetch_registered).remote(model_uri, uri))
    except ray.exceptions.RayTaskError as e:  # the download's own error (a clear ValueError)
        raise e.cause from None


# --- metrics ------------------------------------------------------------------------------------


class ServiceMetrics:
    """The service's Ray metrics, one set per replica process.

    Each record into a Ray metric is a call into Ray's C++ core, and a request would make about
    seven; requests only add to plain-Python tallies here, and :meth:`flush` hands them to Ray at
    most every ``FLUSH_PERIOD_S`` (Ray exports every couple of seconds anyway). Gauges keep the
    latest value per slice. Everything runs on the replica's event loop, so no lock is needed; a
    replica that stops loses at most its last ``FLUSH_PERIOD_S`` of tallies."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            metrics.SERVE_REQUESTS, "HTTP requests by endpoint and status", ("endpoint", "status")
        )
        self.latency = Histogram(
            metrics.SERVE_LATENCY_MS,
            "request latency inside the replica (ms) by endpoint and status",
            list(metrics.SERVE_LATENCY_BOUNDARIES_MS),
            ("endpoint", "status"),
        )
        self.rejections = Counter(
            metrics.SERVE_REJECTIONS, "requests refused, by reason", ("reason",)
        )
        self.share = Gauge(metrics.SERVE_SHARE, "last share allocated to a slice", ("slice",))
        self.sla_risk = Gauge(
            metrics.SERVE_SLA_RISK,
            "last predicted SLA risk of a slice, 1 - min(1, share/need)",
            ("slice",),
        )
        self.residual = Histogram(
            metrics.SERVE_ADMM_RESIDUAL,
            "guardrail ADMM primal residual, largest of a request's cells",
            list(metrics.SERVE_RESIDUAL_BOUNDARIES),
        )
        self.allocations = Counter(metrics.SERVE_ALLOCATIONS, "slice allocations answered")
        self.need = Gauge(metrics.SERVE_NEED, "last needed share of a slice", ("slice",))
        self.throughput = Gauge(
            metrics.SERVE_THROUGHPUT_MBPS,
            "last predicted throughput (Mbps) of a slice with a bandwidth target and readings",
            ("slice",),
        )
        self.target = Gauge(
            metrics.SERVE_TARGET_MBPS,
            "throughput (Mbps) the SLA asks for at the slice's last demand, min(demand, target)",
            ("slice",),
        )
        self.model_created = Gauge(
            metrics.SERVE_MODEL_CREATED,
            "when the served model was exported (Unix seconds)",
            ("model_version",),
        )
        self.max_replicas = Gauge(metrics.SERVE_MAX_REPLICAS, "autoscaling max_replicas")
        self._latencies: dict[tuple[str, str], list[float]] = {}
        self._rejected: dict[str, int] = {}
        self._residuals: list[float] = []
        self._allocated = 0
        self._slices: dict[str, tuple[float, float, float]] = {}
        self._throughputs: dict[str, tuple[float, float]] = {}
        self._flusher: asyncio.Task | None = None

    def request(self, endpoint: str, status: int, ms: float) -> None:
        self._latencies.setdefault((endpoint, str(status)), []).append(ms)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    def rejection(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def answered(
        self, residual: float, allocations: int, slices: list[dict], inputs: list[SliceInput]
    ) -> None:
        """A request's worst ADMM residual, its slice allocations, and per-slice share, need and
        risk (answers ``slices`` of ``inputs``); throughput against target where a slice has a
        bandwidth target and its readings a demand."""
        self._residuals.append(residual)
        self._allocated += allocations
        for a, s in zip(slices, inputs, strict=True):
            self._slices[a["name"]] = (a["share"], a["needed_share"], a["sla_risk"])
            target = s.targets.get("bandwidth_mbps")
            if target is not None and s.demand is not None:
                wanted = min(s.demand, target)
                self._throughputs[a["name"]] = (a["expected_throughput_mbps"], wanted)

    def loaded(self, service: "Service") -> None:
        """The model a replica serves now and its autoscaling ceiling."""
        created = datetime.datetime.fromisoformat(service.policy.metadata["created"])
        tags = {"model_version": service.model_version}
        self.model_created.set(created.timestamp(), tags=tags)
        self.max_replicas.set(service.config.max_replicas)

    def flush(self) -> None:
        latencies, self._latencies = self._latencies, {}
        rejected, self._rejected = self._rejected, {}
        residuals, self._residuals = self._residuals, []
        allocated, self._allocated = self._allocated, 0
        slices, self._slices = self._slices, {}
        throughputs, self._throughputs = self._throughputs, {}
        for (endpoint, status), values in latencies.items():
            tags = {"endpoint": endpoint, "status": status}
            self.requests.inc(len(values), tags=tags)
            for ms in values:
                self.latency.observe(ms, tags=tags)
        for reason, count in rejected.items():
            self.rejections.inc(count, tags={"reason": reason})
        for residual in residuals:
            self.residual.observe(residual)
        if allocated:
            self.allocations.inc(allocated)
        for name, (share, need, risk) in slices.items():
            self.share.set(share, tags={"slice": name})
            self.need.set(need, tags={"slice": name})
            self.sla_risk.set(risk, tags={"slice": name})
        for name, (throughput, target) in throughputs.items():
            self.throughput.set(throughput, tags={"slice": name})
            self.target.set(target, tags={"slice": name})

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_PERIOD_S)
            try:
                self.flush()
            except Exception:  # a metrics failure must not stop the service or later flushes
                logger.exception("could not record the service's metrics")


_metrics: ServiceMetrics | None = None


class CellBatcher:
    """Answers the single cells of ``POST /allocate`` together: cells that arrive while the replica
    is busy wait for one :func:`deepslicing.allocate.allocate` call on all of them (in-process,
    233 us for a cell alone, 45 us per cell in a batch of 8). Nothing waits on purpose: a cell
    that finds the replica idle is answered at once, alone. If the shared call raises (an
    infeasible cell under ``reject_infeasible``), each cell is answered alone, so an error stays
    with its cell. A cell's answer equals its answer alone up to float32 rounding in the ONNX
    actor (its row may round differently beside others; 5e-8 seen). Runs on the replica's event
    loop; ``answer`` maps a list of cells to their answers in order."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.waiting: list[tuple[Any, asyncio.Future]] = []

    async def submit(self, cell) -> dict:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self.waiting:
            loop.call_soon(self.run)  # after the requests already on the loop had their turn
        self.waiting.append((cell, done))
        return await done

    def run(self) -> None:
        batch, self.waiting = self.waiting, []
        cells = [cell for cell, _ in batch]
        try:
            answers: list = self.answer(cells)
        except Exception as e:
            answers = [self.alone(cell) for cell in cells] if len(cells) > 1 else [e]
        for (_, done), answer in zip(batch, answers, strict=True):
            if done.done():  # its request was cancelled
                continue
            if isinstance(answer, Exception):
                done.set_exception(answer)
            else:
                done.set_result(answer)

    def alone(self, cell) -> Any:
        try:
            return self.answer([cell])[0]
        except Exception as e:
            return e


class Current:
    """This replica's service, for the middleware. A module-level class, so the replica resolves
    it by import: Serve ships the ingress class by value, with copies of the module's other
    globals as they were when it was decorated."""

    service: Service | None = None
    cells: CellBatcher | None = None  # the replica's batcher of single cells (POST /allocate)


def service_metrics() -> ServiceMetrics:
    global _metrics
    if _metrics is None:
        _metrics = ServiceMetrics()
    return _metrics


# --- HTTP ---------------------------------------------------------------------------------------


def error_response(
    status: int, error: str, message: str, details: list[dict] | None = None, headers=None
) -> JSONResponse:
    body = {"error": error, "message": message, "details": details or []}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of FastAPI: API key, rate limit and body size are checked before
    any parsing, every request is counted and timed, and ``POST /allocate`` is answered here
    (:func:`answer_cell`)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"  # the route inside the app, whatever its prefix
        endpoint = path if path in ROUTES else "other"
        status = 500

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal, receive = await self.check(scope, receive, endpoint)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            elif endpoint == "/allocate" and scope["method"] == "POST":
                # the hot endpoint, answered here: FastAPI's middleware, routing and endpoint
                # machinery cost the replica about 0.09 ms of CPU per request, more than the
                # allocation itself in a batch (docs/benchmarks.md)
                answer = await answer_cell(Request(scope, receive))
                await answer(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            service_metrics().request(endpoint, status, (time.perf_counter() - start) * 1000.0)

    async def check(self, scope, receive, endpoint: str):
        service = Current.service
        if endpoint not in PROTECTED or service is None:
            return None, receive
        if service.keys is not None:
            presented = None
            for name, value in scope["headers"]:
                if name == b"x-api-key":
                    presented = value.decode("latin-1")
            ident = service.keys.identify(presented)
            if ident is None:
                service_metrics().rejection("unauthorized")
                return error_response(
                    401,
                    "unauthorized",
                    f"missing or invalid API key; send it in the {API_KEY_HEADER} header",
                    [{"field": API_KEY_HEADER, "rule": "must be a configured API key"}],
                    {"WWW-Authenticate": API_KEY_HEADER},
                ), receive
            wait = service.buckets.take(ident)
            if wait > 0:
                service_metrics().rejection("rate_limited")
                retry = TokenBuckets.retry_after(wait)
                return error_response(
                    429,
                    "rate_limited",
                    f"rate limit of {service.config.rate_limit_per_s:g} requests/s per key "
                    f"exceeded; retry after {retry} s",
                    headers={"Retry-After": retry},
                ), receive
        return await self.limit_body(scope, receive, service.config.max_body_bytes)

    async def limit_body(self, scope, receive, limit: int):
        def too_large():
            service_metrics().rejection("too_large")
            return error_response(
                413,
                "too_large",
                f"request body over {limit} bytes",
                [{"field": "body", "rule": f"must be at most {limit} bytes"}],
            )

        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return too_large(), receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return too_large(), receive
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


ERRORS = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in (
        (400, "the body is not valid JSON"),
        (401, "missing or invalid API key"),
        (409, "the slices' SLAs cannot all be met (reject_infeasible)"),
        (413, "body too large"),
        (415, "the body is not declared as JSON (Content-Type)"),
        (422, "a field breaks a rule; details name it"),
        (429, "rate limited; see Retry-After"),
    )
}

app = FastAPI(
    title="deepslicing allocation service",
    version="0.1.0",
    description="Feasible PRB allocations for 5G network slices from a trained MADDPG policy.",
)
app.add_middleware(Guard)
# The POST endpoints parse their bodies themselves (pydantic straight from the bytes Guard holds):
# FastAPI's typed-body and key dependencies cost about 0.13 ms of the replica's CPU per request,
# more than the guardrail. The document is completed by hand, so clients and schemathesis see the
# same bodies and key rule.
BODY_MODELS: dict[str, type[BaseModel]] = {}  # bodies endpoints parse themselves, by name
KEY_SCHEME = "APIKeyHeader"


def openapi_document(api: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies and the key the endpoints check themselves."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        components = document.setdefault("components", {})
        known = components.setdefault("schemas", {})
        for model in BODY_MODELS.values():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            known.update(schema.pop("$defs", {}))
            known[model.__name__] = schema
        components["securitySchemes"] = {
            KEY_SCHEME: {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
        }
        for path in PROTECTED:
            for operation in document["paths"].get(path, {}).values():
                operation["security"] = [{KEY_SCHEME: []}]
        api.openapi_schema = document
    return api.openapi_schema


app.openapi = functools.partial(openapi_document, app)


def post_json(path: str, body: type[BaseModel], response: type[BaseModel]):
    """``app.post`` for an endpoint that parses its JSON ``body`` itself (with :func:`parse`)."""
    BODY_MODELS[body.__name__] = body
    schema = {"$ref": f"#/components/schemas/{body.__name__}"}
    return app.post(
        path,
        response_model=response,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        },
    )


class UnsupportedMediaType(Exception):
    """A POST body declared as something other than JSON."""

    def __init__(self, content_type: str):
        self.content_type = content_type


def is_json(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type, parameters (``; charset=utf-8``) aside."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as ``model``; a body not declared as JSON raises :class:`UnsupportedMediaType`,
    a broken rule what FastAPI raises for its typed bodies."""
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        raise UnsupportedMediaType(content_type)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


async def answer_cell(request: Request) -> JSONResponse:
    """The answer to ``POST /allocate`` (called by :class:`Guard`, after the key, rate and size
    checks): the cell goes to the replica's :class:`CellBatcher`; a refused body or an infeasible
    cell gets what FastAPI's exception handlers (below) answer the other endpoints."""
    try:
        cell = await parse(request, schemas.AllocateRequest)
        return JSONResponse(await Current.cells.submit(cell))
    except (RequestValidationError, UnsupportedMediaType, InfeasibleError) as e:
        return await app.exception_handlers[type(e)](request, e)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    service_metrics().rejection("invalid")
    details = []
    unparsable = False
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ())]
        unparsable |= e.get("type") == "json_invalid"
        message = e.get("msg", "invalid").removeprefix("Value error, ")
        details.append({"field": ".".join(loc) or "body", "rule": message})
    if unparsable:
        return error_response(400, "invalid_json", "the body is not valid JSON", details)
    first = details[0] if details else {"field": "body", "rule": "invalid"}
    return error_response(422, "invalid", f"{first['field']}: {first['rule']}", details)


@app.exception_handler(UnsupportedMediaType)
async def unsupported_media_type(request: Request, exc: UnsupportedMediaType) -> JSONResponse:
    service_metrics().rejection("unsupported_media_type")
    given = exc.content_type or "none"
    return error_response(
        415,
        "unsupported_media_type",
        f"Content-Type: must be application/json, got {given}",
        [{"field": "Content-Type", "rule": "must be application/json"}],
    )


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=exc.headers)


@app.exception_handler(InfeasibleError)
async def infeasible(request: Request, exc: InfeasibleError) -> JSONResponse:
    service_metrics().rejection("infeasible")
    return error_response(409, "infeasible", str(exc))


def slice_inputs(cell: schemas.AllocateRequest) -> list[SliceInput]:
    out = []
    for s in cell.slices:
        r = s.readings
        out.append(
            SliceInput(
                name=s.name,
                targets=s.targets.__dict__,
                slice_id=s.slice_id,
                kind=s.kind,
                sst=s.sst,
                sd=s.sd,
                **({} if r is None else r.__dict__),  # readings are SliceInput fields by name
            )
        )
    return out


def node_metrics_url() -> str:
    """This node's Ray metrics export endpoint."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise RuntimeError("this replica's node is not in ray.nodes()")


def read_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def service_families(text: str) -> str:
    """The ``ray_deepslicing_*`` families of a Prometheus text exposition, comments included."""
    keep = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("#") and line.count(" ") >= 2 else line
        if name.startswith("ray_deepslicing_"):
            keep.append(line)
    return "\n".join(keep) + "\n"


def invalid_state(rule: str, field: str = "state") -> JSONResponse:
    service_metrics().rejection("invalid")
    return error_response(422, "invalid", f"{field}: {rule}", [{"field": field, "rule": rule}])


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=5)
@serve.ingress(app)
class Allocator:
    """One replica: loads the model in ``reconfigure`` (every ``user_config`` change)."""

    def __init__(self) -> None:
        self.service: Service | None = None
        self._metrics_url: str | None = None
        Current.cells = CellBatcher(lambda cells: self._answer(cells, self.service, gauges=True))
        service_metrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        service = Service.load(from_mapping(ServeConfig, user_config))
        service.warm_up()
        # what is loaded now lives as long as the replica: keep it out of the collector's scans,
        # which otherwise pause requests for milliseconds
        gc.collect()
        gc.freeze()
        self.service = service  # one reference swap: requests in flight keep the old model
        Current.service = service
        service_metrics().loaded(service)
        logger.info("serving model %s from %s", service.model_version, service.model_uri)

    def check_health(self) -> None:
        if self.service is None:
            raise RuntimeError("no model loaded")

    @app.get("/health", response_model=schemas.Health)
    async def health(self):
        return {"status": "ok", "model_version": self.service.model_version}

    @app.get(
        "/model_info",
        response_model=schemas.ModelInfo,
        responses=ERRORS,
    )
    async def model_info(self):
        return self.service.info()

    @post_json("/allocate", schemas.AllocateRequest, schemas.CellAllocation)
    async def allocate_cell(self, request: Request):
        """Declared for the OpenAPI document; :class:`Guard` answers ``POST /allocate`` with
        :func:`answer_cell` before FastAPI sees it, so this only runs if Guard is bypassed."""
        return await answer_cell(request)

    @post_json("/allocate/batch", schemas.BatchRequest, schemas.BatchAllocation)
    async def allocate_batch(self, request: Request):
        body = await parse(request, schemas.BatchRequest)
        service = self.service
        return JSONResponse(
            {"cells": self._answer(body.cells, service), "model_version": service.model_version}
        )

    def _answer(self, cells: list[schemas.AllocateRequest], service: Service, gauges: bool = False):
        """Answers of ``cells`` in order; ``gauges``: the last cell's slices set the per-slice
        share and risk gauges (single-cell requests do, batches do not)."""
        inputs = [slice_inputs(c) for c in cells]
        results = allocate(
            inputs,
            [c.time_of_day for c in cells],
            service.policy,
            service.actor_kinds,
            service.cell,
            service.guardrail,
        )
        m = service_metrics()
        answers, worst = [], 0.0
        for (result, row), slices in zip(results, inputs, strict=True):
            answers.append(
                {
                    "slices": slice_answers(result, row, slices),
                    "total_share": float(result.share[row].sum()),
                    "total_need": float(result.total_need[row]),
                    "admm_primal_residual": float(result.primal_residual[row]),
                    "model_version": service.model_version,
                }
            )
            worst = max(worst, float(result.primal_residual[row]))
        last = (answers[-1]["slices"], inputs[-1]) if gauges else ([], [])
        m.answered(worst, sum(len(s) for s in inputs), *last)
        return answers

    @post_json("/predict", schemas.PredictRequest, schemas.PredictResponse)
    async def predict(self, request: Request):
        body = await parse(request, schemas.PredictRequest)
        service = self.service
        num_slices = service.policy.num_slices
        # the measured 6 features per slice (18 floats for 3 slices), or all 12
        widths = (NUM_MEASURED_FEATURES, NUM_FEATURES)
        width = next((w for w in widths if len(body.state) == num_slices * w), None)
        if width is None:
            return invalid_state(
                f"must hold {num_slices * NUM_MEASURED_FEATURES} numbers ({num_slices} slices x "
                f"{NUM_MEASURED_FEATURES} measured features) or {num_slices * NUM_FEATURES} "
                f"({num_slices} x all {NUM_FEATURES} features), got {len(body.state)}"
            )
        obs = np.asarray(body.state, dtype=np.float32).reshape(1, num_slices, width)
        over = (obs < 0) | (obs > FEATURE_HIGH[:width])
        if over.any():
            i = int(np.flatnonzero(over.reshape(-1))[0])
            return invalid_state(
                f"[{i}] (slice {i // width} {FEATURES[i % width]}) must be in "
                f"[0, {FEATURE_HIGH[i % width]:g}], got {body.state[i]!r}",
                field=f"state.{i}",
            )
        if width == NUM_MEASURED_FEATURES:
            obs = complete_features(obs)
        requested = np.asarray(service.policy(obs), dtype=np.float64)
        need = obs[..., FEATURES.index("needed_share")].astype(np.float64)
        names = [s["name"] for s in service.policy.metadata["slices"]]
        shares, _, _ = guard(requested, need, service.guardrail, lambda _: names, 1)
        return {
            "requested_shares": requested[0].tolist(),
            "shares": shares[0].tolist(),
            "model_version": service.model_version,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(self):
        service_metrics().flush()  # this replica's latest tallies; others' lag by FLUSH_PERIOD_S
        if self._metrics_url is None:  # ray.nodes() and the read block: off the event loop
            self._metrics_url = await asyncio.to_thread(node_metrics_url)
        text = await asyncio.to_thread(read_url, self._metrics_url)
        return PlainTextResponse(service_families(text), media_type="text/plain; version=0.0.4")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The typed application builder ``serve run`` / ``serve deploy`` call (``import_path:
    serve_apps.allocator:build_app``); ``args`` are :class:`ServeConfig` fields."""
    config = args if isinstance(args, ServeConfig) else from_mapping(ServeConfig, dict(args or {}))
    return Allocator.options(
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        },
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus},
        user_config=to_dict(config),
    ).bind()

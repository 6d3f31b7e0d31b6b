"""``deepslicing bench serve``: the HTTP allocation service against a no-op Serve deployment, its
batch throughput, and its guardrail against a cvxpy solve, in one run.

One process starts a local Ray (2 CPUs) and Serve's HTTP ingress on ``127.0.0.1:8311`` (not 8000,
so it does not collide with a service or tests on the default port), with two applications behind
it. ``--ingress`` (default ``auto``: ``haproxy`` where Ray finds the HAProxy binary, else ``proxy``)
chooses it for both, as for ``deepslicing serve``: HAProxy straight to each replica's own port, or
Serve's Python proxy actor (:mod:`deepslicing.ray_runtime`). The contenders:

| contender | what answers                                                                           |
|-----------|----------------------------------------------------------------------------------------|
| `ours`    | the allocation service, ``serve_apps.allocator.build_app`` at ``/``: ``POST /allocate`` with the operator payload (:data:`deepslicing.serving.OPERATOR_REQUEST`, 3 slices) and an ``X-API-Key``; 1 replica (``min_replicas`` = ``max_replicas`` = 1), rate limits set so high that no request is refused |
| `noop`    | a FastAPI ingress at ``/noop`` whose ``POST /allocate`` reads the request's body (``await request.body()``) and returns a small constant JSON; the same replica settings (1 replica, ``replica_cpus``, ``max_ongoing_requests``) |
| `batch`   | ours, ``POST /allocate/batch`` with 500 cells of the operator payload's 3 slices (each cell its own seeded ``time_of_day``) |
| `guardrail` | in-process, no HTTP: :func:`deepslicing.allocate.coordinate` with a :class:`~deepslicing.allocate.Guardrail` on the Euclidean objective (its default method: the exact projection in numpy, as the service runs it; the service's objective is the utility one) on one 3-slice cell ``(1, 3)`` per call |
| `cvxpy`   | in-process: the same problem (the guardrail's Euclidean objective), the Euclidean projection of the requests onto {z >= 0, sum z <= 1}, as a cvxpy problem compiled once with the requests as a ``Parameter`` and re-solved per call (cvxpy's default solver); the fastest way to use cvxpy per request |

The noop reads the body because, behind the proxy, Serve's replica pulls a request's body from the
proxy with one more actor call only when the app reads it. Every real endpoint must; a noop that
skips it answered about 1.5x as many requests per second (concurrency 1 and 16) on the 2-CPU
machine of ``docs/benchmarks.md``, which would measure an endpoint nobody could write rather than
Serve's overhead.

The model is a fresh seeded actor for the default 3 slices exported to ONNX in a temporary directory
(:func:`deepslicing.export.export_untrained`; latency does not depend on training), registered as
``deepslicing-allocator`` with the alias ``champion`` in a temporary MLflow sqlite store, and served
from ``models:/deepslicing-allocator@champion`` as ``deepslicing serve`` does by default; the API
key is a random one in a temporary key file.

Memory: after the last round, each replica of ``ours`` and ``noop`` reports its own resident set
(``psutil``, run inside the live replica through the actor's ``__ray_call__``): RSS, the figure the
goal uses, and USS (pages no other process shares: what one more replica costs a node whose other
replicas already map the same libraries), and which of the heavy packages it has imported
(:data:`deepslicing.bench.replicas.HEAVY_MODULES`).

Unit costs (for sizing a cluster, ``cluster/README.md``): after the rounds, ``noop`` at c=16, ours
at c=1 and c=16 and ``batch`` run once more for ``seconds`` each while the CPU time (user + system)
of the replica process and of the ingress is read before and after (``psutil``; the ingress is
HAProxy, or Serve's proxy actor, found among this run's Ray processes; not read when joining a
cluster through ``RAY_ADDRESS``). The client's CPU is not counted. CPU per decision = CPU time /
cells answered (1 per ``/allocate`` request, ``batch_cells`` per batch request). These extra runs
do not enter the rounds' figures.

Load generator (the same for ``noop`` and ``ours``, and for ``batch``): one aiohttp
``ClientSession`` per concurrency level with keep-alive connections (``TCPConnector(limit=C)``),
``C`` workers in a closed loop (send, read the whole answer, send the next) for ``seconds``, with
the body serialised once beforehand and the same headers (the key included) for both contenders.
Every request is timed on its own (``time.perf_counter``, send to last byte read); every answer
must be 200, and any other status or a connection error fails the run with the count and the first
error. ``noop`` and ``ours`` are measured at concurrency 1 and 16, ``batch`` at concurrency 2 (one
batch in the replica while the next is parsed); the guardrail contenders cycle through 256 request
vectors drawn before timing (uniform in [0, 1]^3; about 5/6 of them over-full), on which both
answers are first checked to agree (largest absolute difference at most 1e-4, else the run fails).

All contenders are warmed up for ``min(0.5, seconds)`` s, then interleaved over ``rounds`` rounds of
``seconds`` each (the order rotating), and each figure is the median over rounds of that round's
figure. Latencies are client-side milliseconds, including the client's own time on the same 2 CPUs.

JSON keys (``X`` in ``ours``, ``noop``; ``C`` in 1, 16):

- ``X_cC_p50_ms``, ``X_cC_p95_ms``, ``X_cC_p99_ms``: latency percentiles (ms, per round, median
  over rounds); ``X_cC_rps``: answered requests per second; ``X_cC_requests``: requests timed over
  all rounds; ``X_cC_rounds``: each round's ``{"rps", "p50_ms", "p95_ms", "p99_ms", "requests"}``;
- ``p95_ms_c1`` = ``ours_c1_p95_ms`` (goal <= 10);
- ``rps_ratio_vs_noop_c1``, ``rps_ratio_vs_noop_c16``: ``ours_cC_rps / noop_cC_rps`` (goal at 16:
  >= 0.65);
- ``replica_rss_ratio_vs_noop`` = ``ours_replica_rss_mb / noop_replica_rss_mb`` (goal <= 1.3);
  ``X_replica_rss_mb``, ``X_replica_uss_mb`` (MiB, the mean over the app's replicas, 1 here),
  ``X_replica_modules`` (the :data:`~deepslicing.bench.replicas.HEAVY_MODULES` imported in its replicas), ``replica_uss_ratio_vs_noop``;
- ``cpu_ms_per_decision_U`` (``U`` in ``noop_c16``, ``ours_c1``, ``ours_c16``, ``batch``): replica
  CPU milliseconds per cell decision (per request for the noop); ``ingress_cpu_ms_per_decision_U``
  the ingress's (absent with ``RAY_ADDRESS``); ``decisions_U``, the cells answered while measured;
- ``batch_requests_per_s``, ``batch_p50_ms``; ``batch_allocations_per_s`` =
  ``batch_requests_per_s`` x ``batch_cells`` x 3 slice-allocations per second (goal >= 20,000);
  ``batch_rounds``;
- ``guardrail_us``, ``cvxpy_us``: microseconds per call (median over rounds of each round's mean);
  ``guardrail_speedup_vs_cvxpy`` = ``cvxpy_us / guardrail_us`` (goal >= 50);
  ``guardrail_max_abs_diff_vs_cvxpy``; ``cvxpy_solver``; ``guardrail_us_rounds``,
  ``cvxpy_us_rounds``;
- ``errors`` (always 0: a run with errors fails), ``concurrency``, ``batch_cells``,
  ``batch_concurrency``, ``port``, ``ingress`` (the one used), ``replica_cpus``,
  ``max_ongoing_requests``, ``seconds``, ``rounds``, ``seed`` and the machine (``cpus``,
  ``python``, ``ray``, ``aiohttp``, ``cvxpy``).
"""

# No ``from __future__ import annotations``: Serve's ingress rebuilds the noop endpoint's signature,
# and FastAPI must see ``Request`` as a class, not a string.
import asyncio
import dataclasses
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from deepslicing.bench.replicas import cpu_per_decision, replica_memory

PORT = 8311
CONCURRENCY = (1, 16)
BATCH_CELLS = 500
BATCH_CONCURRENCY = 2
NUM_SLICES = 3  # the operator payload's slices
GUARDRAIL_POOL = 256  # request vectors the in-process contenders cycle through
AGREEMENT_TOLERANCE = 1e-4  # largest |guardrail - cvxpy| share difference accepted
RATE_LIMIT = 1e9  # requests/s per key, so the bench is never answered 429
NOOP_APP = "bench-noop"
NOOP_PREFIX = "/noop"
REQUEST_TIMEOUT_S = 60.0
NOOP_ANSWER = {"status": "ok"}
MODEL_NAME = "deepslicing-allocator"
ALIAS = "champion"

noop_api = FastAPI()


@serve.deployment(name="noop")
@serve.ingress(noop_api)
class Noop:
    """The comparator: Serve's proxy, router and FastAPI ingress, receiving the request's body and
    doing nothing with it."""

    @noop_api.post("/allocate")
    async def allocate(self, request: Request) -> JSONResponse:
        # Serve pulls a request's body from the proxy (one more actor call) only when the app reads
        # it; a service must, so the comparator does too.
        await request.body()
        return JSONResponse(NOOP_ANSWER)


def bench_serve(config) -> dict[str, Any]:
    import aiohttp
    import cvxpy
    import ray

    from deepslicing import serving
    from deepslicing.bench import _log, interleave
    from deepslicing.export import export_untrained
    from deepslicing.ray_runtime import init_ray, resolve_ingress
    from serve_apps.allocator import API_KEY_HEADER, APP_NAME, DEPLOYMENT_NAME, ServeConfig

    ingress = resolve_ingress(config.ingress)
    rng = np.random.default_rng(config.seed)
    guardrail, cvxpy_call, requests, agreement = guardrail_contenders(rng)
    solver = cvxpy_call.solver
    _log(
        f"bench serve: guardrail and cvxpy ({solver}) agree on {GUARDRAIL_POOL} requests "
        f"(max abs diff {agreement:.2g})"
    )
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as scratch:
        key = secrets.token_urlsafe(24)
        keys_file = Path(scratch) / "api_keys"
        keys_file.write_text(key + "\n")
        model = Path(scratch) / "model"
        export_untrained(model, config.seed, "bench-serve-untrained", NUM_SLICES)
        store = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        model_uri = register_untrained(model, store, config.seed)
        serve_config = ServeConfig(
            model=model_uri,
            tracking_uri=store,
            api_keys_file=str(keys_file),
            rate_limit_per_s=RATE_LIMIT,
            rate_limit_burst=int(RATE_LIMIT),
            port=PORT,
            min_replicas=1,
            max_replicas=1,
            ingress=ingress,
        )
        loop = asyncio.new_event_loop()
        sessions: dict[int, Any] = {}
        started_ray = init_ray(serve_config.num_cpus, ingress, serve_config.host)
        if os.environ.get("RAY_ADDRESS"):
            ingress = "the cluster's"  # its nodes' environment decides, not this run
        try:
            _log(f"bench serve: starting Ray and Serve on {serve_config.host}:{PORT} ({ingress})")
            url = serving.start(serve_config)
            serve.run(
                Noop.options(
                    num_replicas=1,
                    max_ongoing_requests=serve_config.max_ongoing_requests,
                    ray_actor_options={"num_cpus": serve_config.replica_cpus},
                ).bind(),
                name=NOOP_APP,
                route_prefix=NOOP_PREFIX,
            )
            headers = {"Content-Type": "application/json", API_KEY_HEADER: key}
            cell = json.dumps(serving.OPERATOR_REQUEST).encode()
            batch = json.dumps({"cells": batch_cells(rng, BATCH_CELLS)}).encode()
            check_answers(url, key, batch)

            async def open_session(limit: int):
                return aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=limit),
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                )

            for c in sorted({*CONCURRENCY, BATCH_CONCURRENCY}):
                sessions[c] = loop.run_until_complete(open_session(c))
            http: dict[str, HttpLoad] = {}
            for c in CONCURRENCY:
                for name, path in (("noop", f"{NOOP_PREFIX}/allocate"), ("ours", "/allocate")):
                    http[f"{name}_c{c}"] = HttpLoad(loop, sessions[c], url + path, cell, headers, c)
            http["batch"] = HttpLoad(
                loop,
                sessions[BATCH_CONCURRENCY],
                url + "/allocate/batch",
                batch,
                headers,
                BATCH_CONCURRENCY,
            )
            in_process = {
                "guardrail": CallLoad(guardrail, requests),
                "cvxpy": CallLoad(cvxpy_call, requests),
            }
            contenders: dict[str, Callable[[float], float]] = {**http, **in_process}
            labels = {
                **{
                    f"{name}_c{c}": f"{name} /allocate, c={c} (requests)"
                    for c in CONCURRENCY
                    for name in ("noop", "ours")
                },
                "batch": f"ours /allocate/batch x{BATCH_CELLS} (requests)",
                "guardrail": "guardrail in-process (calls)",
                "cvxpy": f"cvxpy {solver} in-process (calls)",
            }
            _log(
                f"bench serve: {config.rounds} round(s) x {config.seconds:g} s per contender, "
                f"concurrency {list(CONCURRENCY)}, batch {BATCH_CELLS} cells, seed={config.seed}, "
                f"{os.cpu_count()} CPU(s)"
            )
            for contender in [*http.values(), *in_process.values()]:
                contender(config.warmup_seconds)
                contender.rounds.clear()
            _log(f"  warmed up {len(contenders)} contenders ({config.warmup_seconds:g} s each)")
            interleave(contenders, config.rounds, config.seconds, labels)
            memory = {
                "ours": replica_memory(APP_NAME, DEPLOYMENT_NAME),
                "noop": replica_memory(NOOP_APP, Noop.name),
            }
            unit_costs = {
                unit: cpu_per_decision(http[name], app, config.seconds, cells)
                for unit, name, app, cells in (
                    ("noop_c16", "noop_c16", (NOOP_APP, Noop.name), 1),
                    ("ours_c1", "ours_c1", (APP_NAME, DEPLOYMENT_NAME), 1),
                    ("ours_c16", "ours_c16", (APP_NAME, DEPLOYMENT_NAME), 1),
                    ("batch", "batch", (APP_NAME, DEPLOYMENT_NAME), BATCH_CELLS),
                )
            }
        finally:
            for session in sessions.values():
                loop.run_until_complete(session.close())
            loop.close()
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                if started_ray:
                    ray.shutdown()

    result: dict[str, Any] = {"target": "serve"}
    for name in (f"{n}_c{c}" for c in CONCURRENCY for n in ("noop", "ours")):
        rounds = http[name].rounds
        for figure in ("p50_ms", "p95_ms", "p99_ms", "rps"):
            result[f"{name}_{figure}"] = statistics.median(r[figure] for r in rounds)
        result[f"{name}_requests"] = sum(r["requests"] for r in rounds)
        result[f"{name}_rounds"] = rounds
    result["p95_ms_c1"] = result["ours_c1_p95_ms"]
    for c in CONCURRENCY:
        result[f"rps_ratio_vs_noop_c{c}"] = result[f"ours_c{c}_rps"] / result[f"noop_c{c}_rps"]
    for name, replicas in memory.items():
        for figure in ("rss_mb", "uss_mb"):
            result[f"{name}_replica_{figure}"] = statistics.mean(r[figure] for r in replicas)
        result[f"{name}_replica_modules"] = sorted({m for r in replicas for m in r["modules"]})
    for figure in ("rss", "uss"):
        result[f"replica_{figure}_ratio_vs_noop"] = (
            result[f"ours_replica_{figure}_mb"] / result[f"noop_replica_{figure}_mb"]
        )
    for unit, (replica_ms, ingress_ms, decisions) in unit_costs.items():
        result[f"cpu_ms_per_decision_{unit}"] = replica_ms
        if ingress_ms is not None:
            result[f"ingress_cpu_ms_per_decision_{unit}"] = ingress_ms
        result[f"decisions_{unit}"] = decisions
    batch_rounds = http["batch"].rounds
    result["batch_requests_per_s"] = statistics.median(r["rps"] for r in batch_rounds)
    result["batch_p50_ms"] = statistics.median(r["p50_ms"] for r in batch_rounds)
    result["batch_allocations_per_s"] = result["batch_requests_per_s"] * BATCH_CELLS * NUM_SLICES
    result["batch_rounds"] = batch_rounds
    for name, contender in in_process.items():
        us = [r["us"] for r in contender.rounds]
        result[f"{name}_us"] = statistics.median(us)
        result[f"{name}_us_rounds"] = us
    result["guardrail_speedup_vs_cvxpy"] = result["cvxpy_us"] / result["guardrail_us"]
    result["guardrail_max_abs_diff_vs_cvxpy"] = agreement
    result.update(
        {
            "cvxpy_solver": solver,
            "errors": 0,
            "concurrency": list(CONCURRENCY),
            "batch_cells": BATCH_CELLS,
            "batch_concurrency": BATCH_CONCURRENCY,
            "port": PORT,
            "ingress": ingress,
            "replica_cpus": serve_config.replica_cpus,
            "max_ongoing_requests": serve_config.max_ongoing_requests,
            "seconds": config.seconds,
            "rounds": config.rounds,
            "seed": config.seed,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "aiohttp": aiohttp.__version__,
            "cvxpy": cvxpy.__version__,
        }
    )
    for c in CONCURRENCY:
        _log(
            f"bench serve, c={c}: "
            + ", ".join(
                f"{n} {result[f'{n}_c{c}_rps']:,.0f} req/s, p50/p95/p99 "
                f"{result[f'{n}_c{c}_p50_ms']:.2f}/{result[f'{n}_c{c}_p95_ms']:.2f}/"
                f"{result[f'{n}_c{c}_p99_ms']:.2f} ms"
                for n in ("noop", "ours")
            )
            + f" (rps_ratio_vs_noop {result[f'rps_ratio_vs_noop_c{c}']:.2f})"
        )
    _log(
        "bench serve, replica memory: "
        + ", ".join(
            f"{n} RSS {result[f'{n}_replica_rss_mb']:.0f} MiB (USS "
            f"{result[f'{n}_replica_uss_mb']:.0f}; {', '.join(result[f'{n}_replica_modules'])})"
            for n in ("noop", "ours")
        )
        + f" (replica_rss_ratio_vs_noop {result['replica_rss_ratio_vs_noop']:.2f})"
    )
    _log(
        "bench serve, CPU ms per cell decision (replica + ingress): "
        + ", ".join(
            f"{unit} {ms:.3f} + " + ("?" if ingress is None else f"{ingress:.3f}")
            for unit, (ms, ingress, _) in unit_costs.items()
        )
    )
    _log(
        f"bench serve: batch {result['batch_allocations_per_s']:,.0f} slice-allocations/s; "
        f"guardrail {result['guardrail_us']:.1f} us, cvxpy {result['cvxpy_us']:.1f} us per call "
        f"(speedup {result['guardrail_speedup_vs_cvxpy']:.1f})"
    )
    return result


# --- the model ----------------------------------------------------------------------------------


def register_untrained(export_dir: Path, uri: str, seed: int) -> str:
    """The export at ``export_dir`` registered in the MLflow store ``uri`` as a version of
    :data:`MODEL_NAME` (its run in a ``bench-serve`` experiment) with the alias :data:`ALIAS`; the
    ``models:/NAME@ALIAS`` URI the service loads."""
    from mlflow import MlflowClient

    from deepslicing import lineage

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("bench-serve")).info.run_id
    model_id = lineage.log_model(client, run_id, export_dir, [], 0, {}, {}, seed)
    version = lineage.register_version(client, model_id, MODEL_NAME, {})
    client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    client.set_terminated(run_id)
    return f"models:/{MODEL_NAME}@{ALIAS}"


# --- the service under load ----------------------------------------------------------------------


def batch_cells(rng: np.random.Generator, cells: int) -> list[dict[str, Any]]:
    """``cells`` copies of the operator payload, each with its own ``time_of_day``."""
    from deepslicing.serving import OPERATOR_REQUEST

    times = rng.random(cells)
    return [{**OPERATOR_REQUEST, "time_of_day": round(float(t), 4)} for t in times]


def check_answers(url: str, key: str, batch: bytes) -> None:
    """One request to each endpoint before timing: 200 and answers of the expected shape."""
    from deepslicing.serving import OPERATOR_REQUEST, request

    checks = (
        (f"{NOOP_PREFIX}/allocate", OPERATOR_REQUEST, lambda a: a == NOOP_ANSWER),
        ("/allocate", OPERATOR_REQUEST, lambda a: len(a["slices"]) == NUM_SLICES),
        (
            "/allocate/batch",
            json.loads(batch),
            lambda a: (
                len(a["cells"]) == BATCH_CELLS
                and all(c["total_share"] <= 1 + 1e-9 for c in a["cells"])
            ),
        ),
    )
    for path, body, valid in checks:
        status, answer = request(url, "POST", path, body, key)
        if status != 200 or not valid(answer):
            raise RuntimeError(f"bench serve: POST {path} answered {status}: {str(answer)[:300]}")


class HttpLoad:
    """A contender for :func:`deepslicing.bench.interleave`: ``concurrency`` closed-loop workers
    POST ``body`` to ``url`` for ``seconds``; each call appends the round's figures to
    ``rounds`` and returns requests/s. Any answer but 200 fails the run."""

    def __init__(self, loop, session, url: str, body: bytes, headers: dict, concurrency: int):
        self.loop, self.session, self.url = loop, session, url
        self.body, self.headers, self.concurrency = body, headers, concurrency
        self.rounds: list[dict[str, float]] = []

    def __call__(self, seconds: float) -> float:
        latencies, elapsed, errors, attempts = self.loop.run_until_complete(self.load(seconds))
        if errors:
            raise RuntimeError(
                f"bench serve: {len(errors)} of {attempts} requests to {self.url} failed "
                f"(concurrency {self.concurrency}); first: {errors[0]}"
            )
        ms = np.asarray(latencies) * 1e3
        rps = len(latencies) / elapsed
        p50, p95, p99 = np.percentile(ms, (50, 95, 99))
        self.rounds.append(
            {
                "rps": rps,
                "p50_ms": float(p50),
                "p95_ms": float(p95),
                "p99_ms": float(p99),
                "requests": len(latencies),
            }
        )
        return rps

    async def load(self, seconds: float) -> tuple[list[float], float, list[str], int]:
        import aiohttp

        latencies: list[float] = []
        errors: list[str] = []
        attempts = 0
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal attempts
            while clock() < deadline:
                attempts += 1
                before = clock()
                try:
                    async with self.session.post(
                        self.url, data=self.body, headers=self.headers
                    ) as response:
                        answer = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                if status == 200:
                    latencies.append(clock() - before)
                else:
                    errors.append(f"status {status}: {answer[:300].decode(errors='replace')}")

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return latencies, clock() - start, errors, attempts


# --- the guardrail in-process --------------------------------------------------------------------


class CvxpyProjection:
    """min ||z - a||^2 over {z >= 0, sum z <= 1} for one cell, compiled once, solved per call."""

    def __init__(self, num_slices: int) -> None:
        import cvxpy as cp

        self.requests = cp.Parameter(num_slices)
        self.z = cp.Variable(num_slices)
        self.problem = cp.Problem(
            cp.Minimize(cp.sum_squares(self.z - self.requests)),
            [self.z >= 0, cp.sum(self.z) <= 1],
        )
        self.solver = ""

    def __call__(self, requested: np.ndarray) -> np.ndarray:
        import cvxpy as cp

        self.requests.value = requested[0]
        self.problem.solve()
        if self.problem.status != cp.OPTIMAL:
            raise RuntimeError(f"bench serve: cvxpy returned status {self.problem.status}")
        self.solver = self.problem.solver_stats.solver_name
        return self.z.value[None, :]


def guardrail_contenders(rng: np.random.Generator):
    """The guardrail and cvxpy as ``requested (1, 3) -> shares (1, 3)`` calls, the pool of
    requests they cycle through, and their largest disagreement on it (checked here)."""
    from deepslicing.allocate import Guardrail, coordinate
    from deepslicing.coordinator import DEFAULT_ITERATIONS, DEFAULT_RHO

    requests = list(rng.random((GUARDRAIL_POOL, 1, NUM_SLICES)))
    need = rng.random((1, NUM_SLICES)) / NUM_SLICES
    # the guardrail's Euclidean objective, the problem the cvxpy contender solves; the default
    # utility objective is checked against cvxpy's LP in tests/test_coordinator.py instead
    settings = Guardrail(DEFAULT_RHO, DEFAULT_ITERATIONS, objective="euclidean")

    def guardrail(requested: np.ndarray) -> np.ndarray:
        return coordinate(requested, need, settings)[0]

    cvxpy_call = CvxpyProjection(NUM_SLICES)
    agreement = max(float(np.abs(guardrail(r) - cvxpy_call(r)).max()) for r in requests)
    if not agreement <= AGREEMENT_TOLERANCE:
        raise RuntimeError(
            f"bench serve: guardrail and cvxpy disagree by {agreement:.3g} (> "
            f"{AGREEMENT_TOLERANCE:g}) on the same requests"
        )
    return guardrail, cvxpy_call, requests, agreement


@dataclasses.dataclass
class CallLoad:
    """A contender for :func:`deepslicing.bench.interleave`: ``call`` on the requests of ``pool``
    in turn for ``seconds``; appends the round's microseconds per call to ``rounds``, returns
    calls/s."""

    call: Callable[[np.ndarray], np.ndarray]
    pool: list[np.ndarray]
    rounds: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def __call__(self, seconds: float) -> float:
        clock = time.perf_counter
        n = len(self.pool)
        calls = 0
        start = clock()
        deadline = start + seconds
        now = start
        while now < deadline:
            self.call(self.pool[calls % n])
            calls += 1
            now = clock()
        self.rounds.append({"us": (now - start) / calls * 1e6, "calls": calls})
        return calls / (now - start)

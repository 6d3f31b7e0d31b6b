"""The allocation service over real HTTP: a real local Ray, Serve on 127.0.0.1, real ONNX exports.

Covers the predecessor's four use-case payloads, auth (401) and rate limits (429 + Retry-After),
malformed input (4xx JSON naming the field, the service keeps serving), the guardrail options
(409, QoS floor), Prometheus metrics parsed by prometheus_client, a schemathesis run against the
service's own OpenAPI document, a new model picked up by reconfiguring under load, a killed
replica, and (slow) autoscaling up and back down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from deepslicing.allocate import InfeasibleError
from deepslicing.export import export_untrained
from deepslicing.model import complete_features
from deepslicing.ray_runtime import METRICS_REPORT_INTERVAL_MS, init_ray
from deepslicing.serving import OPERATOR_REQUEST, request
from serve_apps.allocator import DEPLOYMENT_NAME, CellBatcher, ServeConfig, build_app

PORT = 8100
URL = f"http://127.0.0.1:{PORT}"
KEY = "test-key-0123456789abcdef"
UNLIMITED = {"rate_limit_per_s": 10_000.0, "rate_limit_burst": 10_000}  # never 429 in these tests
SERVE_CONFIG_FILE = Path(__file__).parents[1] / "serve_apps" / "serve_config.yaml"

# the four use cases of the predecessor system's README (payloads as given there)
USE_CASES = {
    "manufacturing": [
        {
            "slice_id": 1,
            "name": "URLLC_Control",
            "targets": {"latency_ms_p95": 5, "bandwidth_mbps": 5},
        },
        {"slice_id": 0, "name": "eMBB_Cameras", "targets": {"bandwidth_mbps": 100, "jitter_ms": 5}},
    ],
    "logistics": [
        {
            "slice_id": 1,
            "name": "AGV_URLLC",
            "targets": {"latency_ms_p95": 10, "bandwidth_mbps": 5},
        },
        {"slice_id": 2, "name": "Scanners_BE", "targets": {"availability": 99.99}},
        {"slice_id": 0, "name": "CCTV_eMBB", "targets": {"bandwidth_mbps": 30}},
    ],
    "campus": [
        {"slice_id": 10, "name": "Voice", "targets": {"jitter_ms": 20, "loss_pct": 1}},
        {"slice_id": 11, "name": "Video", "targets": {"bandwidth_mbps": 200}},
        {"slice_id": 12, "name": "AR", "targets": {"latency_ms_p95": 20}},
        {"slice_id": 13, "name": "IT_BE", "targets": {"bandwidth_mbps": 50}},
    ],
    "operator": OPERATOR_REQUEST["slices"],
}
EXPECTED_KINDS = {
    "manufacturing": ["urllc", "embb"],
    "logistics": ["urllc", "mmtc", "embb"],
    "campus": ["urllc", "embb", "urllc", "embb"],
    "operator": ["embb", "urllc", "mmtc"],
}


def make_export(directory: Path, seed: int, version: str) -> Path:
    """An ONNX export of a freshly initialised (seeded) 3-slice actor: real files, no training."""
    export_untrained(directory, seed, version)
    return directory


def deploy(name: str, prefix: str, **settings) -> None:
    serve.run(build_app(ServeConfig(**settings)), name=name, route_prefix=prefix)


def post(path: str, body, key: str | None = KEY, url: str = URL) -> tuple[int, dict]:
    return request(url, "POST", path, body, key)


def raw_post(path: str, data: bytes, headers: dict[str, str]):
    req = urllib.request.Request(URL + path, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "a": make_export(root / "a", seed=1, version="model-a"),
        "b": make_export(root / "b", seed=2, version="model-b"),
    }


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "keys"
    path.write_text(f"# test keys\n{KEY}\nsecond-key-0123456789abcdef\n")
    return path


@pytest.fixture(scope="module", params=["haproxy", "proxy"])
def ingress(request):
    """A fresh local Ray whose Serve takes HTTP through each ingress in turn (haproxy is what
    ``auto`` picks on Linux)."""
    assert not ray.is_initialized()
    init_ray(num_cpus=2, ingress=request.param)
    yield request.param
    ray.shutdown()


@pytest.fixture(scope="module")
def service(ingress, exports, keys_file):
    """The main app at / plus a strict, tightly rate-limited one at /strict."""
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    common = {"api_keys_file": str(keys_file), "port": PORT, "max_body_bytes": 200_000}
    deploy(
        "main",
        "/",
        model=str(exports["a"]),
        **UNLIMITED,
        **common,
    )
    deploy(
        "strict",
        "/strict",
        model=str(exports["a"]),
        reject_infeasible=True,
        qos_floor=1.0,
        rate_limit_per_s=0.5,
        rate_limit_burst=3,
        **common,
    )
    yield common
    serve.shutdown()


def listeners() -> dict[int, tuple[str, list[tuple[str, int]]]]:
    """Per process: its name and the TCP addresses it listens on, (hex address, port) as in
    /proc/net/tcp (127.0.0.1 is "0100007F")."""
    owner = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = int(pid)
        except OSError:  # gone, or not ours to read
            continue
    found: dict[int, tuple[str, list[tuple[str, int]]]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                pid = owner[fields[9]]
                address, port = fields[1].split(":")
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                found.setdefault(pid, (name, []))[1].append((address, int(port, 16)))
    return found


def test_http_takes_the_chosen_ingress_and_haproxy_listens_on_127_0_0_1_only(service, ingress):
    assert post("/allocate", {"slices": USE_CASES["operator"]})[0] == 200
    serving_port = [
        (name, sockets) for name, sockets in listeners().values() if ("0100007F", PORT) in sockets
    ]
    assert len(serving_port) == 1, serving_port
    name, sockets = serving_port[0]
    if ingress == "haproxy":
        assert name == "haproxy"
        # the HTTP frontend, the stats page and the Prometheus exporter, none on a public address
        assert len(sockets) >= 3 and all(address == "0100007F" for address, _ in sockets)
    else:
        assert name != "haproxy" and name.startswith("ray::")  # Serve's ProxyActor


def test_use_case_payloads_get_feasible_allocations(service):
    for case, slices in USE_CASES.items():
        status, body = post("/allocate", {"slices": slices})
        assert status == 200, (case, body)
        answers = body["slices"]
        assert [a["slice_id"] for a in answers] == [s["slice_id"] for s in slices]
        assert [a["name"] for a in answers] == [s["name"] for s in slices]
        assert [a["kind"] for a in answers] == EXPECTED_KINDS[case]
        shares = [a["share"] for a in answers]
        assert all(x >= 0 for x in shares) and sum(shares) <= 1 + 1e-9, (case, shares)
        assert sum(a["prbs"] for a in answers) <= 100
        assert body["total_share"] == pytest.approx(sum(shares))
        assert body["model_version"] == "model-a"
        for a in answers:
            assert a["prbs"] == int(a["share"] * 100 + 1e-9)
            assert a["sla_ok"] == (a["share"] >= a["needed_share"] * (1 - 1e-9))
            assert 0 <= a["sla_risk"] <= 1 and a["expected_throughput_mbps"] >= 0
            assert a["source"] == "policy"
    _, operator = post("/allocate", {"slices": USE_CASES["operator"]})
    assert [(a["sst"], a["sd"]) for a in operator["slices"]] == [
        (1, "0x000001"),
        (1, "0x000002"),
        (1, "0x000003"),
    ]


def test_batch_answers_each_cell_like_a_single_request(service):
    cells = [{"slices": s, "time_of_day": 0.25} for s in USE_CASES.values()]
    status, body = post("/allocate/batch", {"cells": cells})
    assert status == 200 and len(body["cells"]) == 4
    for cell, (case, slices) in zip(body["cells"], USE_CASES.items(), strict=True):
        _, single = post("/allocate", {"slices": slices, "time_of_day": 0.25})
        assert [a["share"] for a in cell["slices"]] == pytest.approx(
            [a["share"] for a in single["slices"]], abs=1e-12
        ), case


def test_concurrent_single_cells_are_answered_as_if_each_came_alone(service):
    """16 /allocate requests at once (the replica answers the ones that meet in one allocation)."""
    cells = [
        {"slices": slices, "time_of_day": round(0.1 + 0.05 * i, 2)}
        for i, slices in enumerate(list(USE_CASES.values()) * 4)
    ]
    alone = [post("/allocate", c)[1] for c in cells]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda c: post("/allocate", c), cells))
    for cell, single, (status, answer) in zip(cells, alone, together, strict=True):
        assert status == 200, answer
        assert [a["name"] for a in answer["slices"]] == [s["name"] for s in cell["slices"]]
        # float32 ONNX rows may differ in the last bits with the rows beside them
        assert [a["share"] for a in answer["slices"]] == pytest.approx(
            [a["share"] for a in single["slices"]], abs=1e-6
        )


def test_cells_waiting_together_share_one_call_and_an_error_stays_with_its_cell():
    calls: list[list[str]] = []

    def answer(cells: list[str]) -> list[str]:
        calls.append(list(cells))
        if "heavy" in cells:
            raise InfeasibleError("heavy needs more than the cell")
        return [c.upper() for c in cells]

    async def submit_together(cells: list[str]):
        batcher = CellBatcher(answer)
        return await asyncio.gather(*(batcher.submit(c) for c in cells), return_exceptions=True)

    assert asyncio.run(submit_together(["a", "b", "c"])) == ["A", "B", "C"]
    assert calls == [["a", "b", "c"]]
    calls.clear()
    results = asyncio.run(submit_together(["a", "heavy", "c"]))
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], InfeasibleError)
    assert calls == [["a", "heavy", "c"], ["a"], ["heavy"], ["c"]]


def test_predict_takes_the_flat_state_and_answers_feasible_shares(service):
    state = [1.0, 0.6, 0.5, 0.4, 0.8, 0.5] * 3
    status, body = post("/predict", {"state": state})
    assert status == 200, body
    assert len(body["shares"]) == 3 and len(body["requested_shares"]) == 3
    assert all(0 <= r <= 1 for r in body["requested_shares"])
    assert sum(body["shares"]) <= 1 + 1e-9 and min(body["shares"]) >= 0
    # all 12 features per slice: the 6 measured ones completed as the service completes them
    full = complete_features(np.float32(state).reshape(3, 6)).reshape(-1).tolist()
    status, twelve = post("/predict", {"state": full})
    assert status == 200, twelve
    np.testing.assert_allclose(twelve["requested_shares"], body["requested_shares"], rtol=1e-6)


def test_health_is_open_and_the_rest_needs_a_key(service):
    assert request(URL, "GET", "/health") == (200, {"status": "ok", "model_version": "model-a"})
    for method, path, body in (
        ("POST", "/allocate", {"slices": USE_CASES["operator"]}),
        ("POST", "/allocate/batch", {"cells": [{"slices": USE_CASES["operator"]}]}),
        ("POST", "/predict", {"state": [0.5] * 18}),
        ("GET", "/model_info", None),
    ):
        for key in (None, "", "wrong-key-0123456789abcdef", KEY[:-1]):
            status, answer = request(URL, method, path, body, key)
            assert status == 401, (path, key)
            assert (
                answer["error"] == "unauthorized" and answer["details"][0]["field"] == "X-API-Key"
            )
    status, info = request(URL, "GET", "/model_info", None, "second-key-0123456789abcdef")
    assert status == 200
    assert info["model_version"] == "model-a" and info["actor_kinds"] == ["embb", "urllc", "mmtc"]
    assert info["num_slices"] == 3 and info["cell"]["num_prbs"] == 100
    # a prefixed app guards its routes too
    assert post("/strict/allocate", {"slices": USE_CASES["operator"]}, key=None)[0] == 401


def test_rate_limit_gives_429_with_retry_after_per_key(service):
    light = {
        "slice_id": 0,
        "name": "eMBB",
        "targets": {"bandwidth_mbps": 10},
        "readings": {"demand": 10},
    }
    body = json.dumps({"slices": [light]}).encode()
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    statuses = [raw_post("/strict/allocate", body, headers) for _ in range(5)]
    codes = [s for s, _, _ in statuses]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
    status, answer, response_headers = next(s for s in statuses if s[0] == 429)
    assert answer["error"] == "rate_limited"
    assert int(response_headers["Retry-After"]) >= 1
    # another key has its own bucket
    other = {**headers, "X-API-Key": "second-key-0123456789abcdef"}
    assert raw_post("/strict/allocate", body, other)[0] == 200


def test_unmeetable_slas_are_rejected_with_409_when_asked(service):
    time.sleep(2.5)  # refill the strict app's bucket (0.5 tokens/s)
    heavy = {
        "slices": [
            {
                "slice_id": 0,
                "name": "eMBB",
                "targets": {"bandwidth_mbps": 100},
                "readings": {"demand": 300},
            }
        ]
    }
    status, answer = post("/strict/allocate", heavy)
    assert status == 409 and answer["error"] == "infeasible"
    assert "eMBB" in answer["message"] and "more than 1" in answer["message"]
    # /predict refuses a state whose needed shares (feature 2) add up to more than the cell
    time.sleep(2.0)
    state = [1.0, 0.6, 0.5, 0.4, 0.8, 0.5] * 3  # 3 x 0.5 needed
    status, answer = post("/strict/predict", {"state": state})
    assert status == 409 and answer["error"] == "infeasible"
    assert "embb 0.500" in answer["message"] and "1.500 of the cell" in answer["message"]
    # the same request on the main app is answered, feasibly, with the SLA marked at risk
    status, answer = post("/allocate", heavy)
    assert status == 200 and answer["slices"][0]["sla_ok"] is False
    assert answer["total_share"] <= 1 + 1e-9


def _bad_requests(too_big: bytes):
    op = USE_CASES["operator"]
    good_slice = op[0]
    return [
        # (what, path, raw body, expected status, field named in details)
        ("invalid JSON", "/allocate", b'{"slices": [', 400, "body"),
        ("not an object", "/allocate", b"[1, 2]", 422, "body"),
        (
            "wrong type",
            "/allocate",
            {"slices": [{**good_slice, "slice_id": "0"}]},
            422,
            "slices.0.slice_id",
        ),
        (
            "bool as int",
            "/allocate",
            {"slices": [{**good_slice, "slice_id": True}]},
            422,
            "slices.0.slice_id",
        ),
        (
            "NaN",
            "/allocate",
            b'{"slices": [{"slice_id": 0, "name": "a", "targets": {"bandwidth_mbps": NaN}}]}',
            422,
            "slices.0.targets.bandwidth_mbps",
        ),
        (
            "Infinity",
            "/allocate",
            b'{"slices": [{"slice_id": 0, "name": "a", "targets": {"latency_ms_p95": Infinity}}]}',
            422,
            "slices.0.targets.latency_ms_p95",
        ),
        (
            "huge number",
            "/allocate",
            b'{"slices": [{"slice_id": 0, "name": "a", "targets": {"jitter_ms": 1e400}}]}',
            422,
            "slices.0.targets.jitter_ms",
        ),
        (
            "missing field",
            "/allocate",
            {"slices": [{"slice_id": 0, "targets": {}}]},
            422,
            "slices.0.name",
        ),
        ("unknown field", "/allocate", {"slices": op, "priority": 1}, 422, "priority"),
        (
            "unknown target",
            "/allocate",
            {"slices": [{**good_slice, "targets": {"speed": 1}}]},
            422,
            "slices.0.targets.speed",
        ),
        (
            "negative target",
            "/allocate",
            {"slices": [{**good_slice, "targets": {"bandwidth_mbps": -5}}]},
            422,
            "slices.0.targets.bandwidth_mbps",
        ),
        (
            "absurd target",
            "/allocate",
            {"slices": [{**good_slice, "targets": {"bandwidth_mbps": 1e9}}]},
            422,
            "slices.0.targets.bandwidth_mbps",
        ),
        (
            "latency under the base delay",
            "/allocate",
            {"slices": [{**good_slice, "targets": {"latency_ms_p95": 0.5}}]},
            422,
            "slices.0.targets.latency_ms_p95",
        ),
        (
            "availability over 100",
            "/allocate",
            {"slices": [{**good_slice, "targets": {"availability": 101}}]},
            422,
            "slices.0.targets.availability",
        ),
        (
            "negative demand",
            "/allocate",
            {"slices": [{**good_slice, "readings": {"demand": -1}}]},
            422,
            "slices.0.readings.demand",
        ),
        ("bad sd", "/allocate", {"slices": [{**good_slice, "sd": "0xZZ"}]}, 422, "slices.0.sd"),
        (
            "bad name",
            "/allocate",
            {"slices": [{**good_slice, "name": "a b"}]},
            422,
            "slices.0.name",
        ),
        ("zero slices", "/allocate", {"slices": []}, 422, "slices"),
        (
            "21 slices",
            "/allocate",
            {"slices": [{"slice_id": i, "name": f"s{i}"} for i in range(21)]},
            422,
            "slices",
        ),
        (
            "duplicate slice_id",
            "/allocate",
            {"slices": [op[0], {**op[1], "slice_id": 0}]},
            422,
            "body",
        ),
        ("empty batch", "/allocate/batch", {"cells": []}, 422, "cells"),
        (
            "bad cell in batch",
            "/allocate/batch",
            {"cells": [{"slices": op}, {"slices": []}]},
            422,
            "cells.1.slices",
        ),
        ("state too short", "/predict", {"state": [0.5] * 17}, 422, "state"),
        ("state too long", "/predict", {"state": [0.5] * 24}, 422, "state"),
        (
            "state out of range",
            "/predict",
            {"state": [0.5] * 6 + [-1.0] + [0.5] * 11},
            422,
            "state.6",
        ),
        ("state with a string", "/predict", {"state": ["0.5"] * 18}, 422, "state.0"),
        ("body over the limit", "/allocate", too_big, 413, "body"),
    ]


def test_malformed_requests_get_4xx_json_naming_the_field_and_the_service_keeps_serving(service):
    too_big = b'{"slices": [' + b" " * 250_000 + b"]}"
    for what, path, body, expected, field in _bad_requests(too_big):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "X-API-Key": KEY}
        status, answer, _ = raw_post(path, data, headers)
        assert status == expected, (what, status, answer)
        assert set(answer) == {"error", "message", "details"}, what
        assert answer["details"] and answer["details"][0]["field"] == field, (what, answer)
        assert answer["details"][0]["rule"], what
    # duplicate ids are named in the rule
    _, answer, _ = raw_post(
        "/allocate",
        json.dumps(
            {"slices": [USE_CASES["operator"][0], {**USE_CASES["operator"][1], "slice_id": 0}]}
        ).encode(),
        {"Content-Type": "application/json", "X-API-Key": KEY},
    )
    assert "slices[1].slice_id" in answer["details"][0]["rule"] and "unique" in answer["message"]
    # unknown paths and methods are JSON too
    assert request(URL, "GET", "/nowhere") == (
        404,
        {"error": "http_error", "message": "Not Found", "details": []},
    )
    assert request(URL, "GET", "/allocate", None, KEY)[0] == 405
    # and the service still answers
    assert post("/allocate", {"slices": USE_CASES["operator"]})[0] == 200


def test_a_body_not_declared_as_json_gets_415_and_json_with_parameters_is_fine(service):
    body = json.dumps({"slices": USE_CASES["operator"]}).encode()
    # (urllib sends application/x-www-form-urlencoded where no type is given, as curl -d does)
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        headers = {"X-API-Key": KEY, "Content-Type": content_type}
        for path in ("/allocate", "/predict"):
            status, answer, _ = raw_post(path, body, headers)
            assert status == 415, (content_type, path, status, answer)
            assert answer["error"] == "unsupported_media_type"
            assert answer["details"] == [
                {"field": "Content-Type", "rule": "must be application/json"}
            ]
            assert content_type in answer["message"]
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        headers = {"Content-Type": content_type, "X-API-Key": KEY}
        assert raw_post("/allocate", body, headers)[0] == 200, content_type


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_count_requests_rejections_and_allocations(service):
    post("/allocate", {"slices": USE_CASES["operator"]})
    post("/allocate", {"slices": USE_CASES["operator"]}, key=None)
    wanted = {
        "ray_deepslicing_requests",
        "ray_deepslicing_request_latency_ms",
        "ray_deepslicing_rejections",
        "ray_deepslicing_allocation_share",
        "ray_deepslicing_sla_risk",
        "ray_deepslicing_admm_primal_residual",
        "ray_deepslicing_slice_allocations",
    }
    deadline = time.monotonic() + 10 * METRICS_REPORT_INTERVAL_MS / 1000
    while True:
        status, text = request(URL, "GET", "/metrics")
        assert status == 200
        families = _families(text)
        if wanted <= set(families) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wanted <= set(families), sorted(families)
    ok = [
        s
        for s in families["ray_deepslicing_requests"].samples
        if s.labels["endpoint"] == "/allocate" and s.labels["status"] == "200"
    ]
    assert ok and sum(s.value for s in ok) >= 1
    reasons = {s.labels["reason"] for s in families["ray_deepslicing_rejections"].samples}
    assert "unauthorized" in reasons
    shares = {
        s.labels["slice"]: s.value for s in families["ray_deepslicing_allocation_share"].samples
    }
    assert {"eMBB", "URLLC", "mMTC"} <= set(shares) and all(0 <= v <= 1 for v in shares.values())
    buckets = [
        s
        for s in families["ray_deepslicing_request_latency_ms"].samples
        if s.name.endswith("_bucket")
    ]
    assert {s.labels["le"] for s in buckets} >= {"10.0", "+Inf"}
    # only the service's own families are shown
    assert all(name.startswith("ray_deepslicing_") for name in families)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(service, tmp_path):
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            sys.executable,  # the schemathesis of this environment, whatever PATH says
            "-m",
            "schemathesis.cli",
            "run",
            f"{URL}/openapi.json",
            "--header",
            f"X-API-Key: {KEY}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--max-examples",
            "40",
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "2",
            "--seed",
            "1",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        cwd=tmp_path,  # schemathesis keeps a cache directory where it runs
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    text = report.read_text()
    assert "/allocate" in text and "/predict" in text  # the operations were exercised
    assert post("/allocate", {"slices": USE_CASES["operator"]})[0] == 200


def _load(path: str, body: dict, stop: threading.Event, workers: int, url: str = URL) -> list:
    """Closed-loop load from ``workers`` threads until ``stop``; returns (status, model_version)
    per request, with the answer (or the connection error) in place of the version for a failure."""
    results: list = []
    lock = threading.Lock()

    def worker():
        while not stop.is_set():
            try:
                status, answer = request(url, "POST", path, body, KEY, timeout=30)
                ok = status == 200 and isinstance(answer, dict)
                version = answer.get("model_version") if ok else str(answer)[:200]
            except OSError as e:
                status, version = "connection error", str(e)
            with lock:
                results.append((status, version))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=60)
    return results


def test_a_new_model_is_picked_up_by_reconfiguring_without_dropping_requests(service, exports):
    """Redeploying with another model rolls the replicas under load; no request fails."""
    replicas = _replicas("main")
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(_load, "/allocate", {"slices": USE_CASES["operator"]}, stop, 4)
        time.sleep(1.0)
        deploy(
            "main",
            "/",
            model=str(exports["b"]),
            **UNLIMITED,
            **service,
        )
        deadline = time.monotonic() + 60
        while request(URL, "GET", "/health")[1].get("model_version") != "model-b":
            assert time.monotonic() < deadline, "the new model never came up"
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        results = load.result()
    statuses = [s for s, _ in results]
    assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200][:5]
    versions = [v for _, v in results]
    assert versions[0] == "model-a" and versions[-1] == "model-b"
    assert request(URL, "GET", "/model_info", None, KEY)[1]["model_version"] == "model-b"
    assert _replicas("main") != replicas  # Serve rolled the deployment onto new replicas


def _replicas(app: str) -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{DEPLOYMENT_NAME}#")
    )


def _running(app: str) -> int:
    deployment = serve.status().applications[app].deployments[DEPLOYMENT_NAME]
    return deployment.replica_states.get("RUNNING", 0)


def test_killing_a_replica_loses_at_most_its_requests_in_flight_and_is_replaced(service, exports):
    workers = 4
    deploy(
        "pair",
        "/pair",
        model=str(exports["a"]),
        min_replicas=2,
        max_replicas=2,
        replica_cpus=0.1,
        **UNLIMITED,
        **service,
    )
    before = _replicas("pair")
    assert len(before) == 2
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(
            _load, "/pair/allocate", {"slices": USE_CASES["operator"]}, stop, workers
        )
        time.sleep(2.0)
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        time.sleep(4.0)
        stop.set()
        results = load.result()
    failed = [(s, answer) for s, answer in results if s != 200]
    assert len(results) > 50 and len(failed) <= workers, (len(results), failed)
    deadline = time.monotonic() + 90
    while not (_running("pair") == 2 and before[0] not in _replicas("pair")):
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    assert post("/pair/allocate", {"slices": USE_CASES["operator"]})[0] == 200
    serve.delete("pair")


@pytest.mark.slow
def test_autoscaling_adds_replicas_under_load_and_removes_them_after(service, exports):
    deploy(
        "scaled",
        "/scaled",
        model=str(exports["a"]),
        min_replicas=1,
        max_replicas=3,
        target_ongoing_requests=1.0,
        upscale_delay_s=1.0,
        downscale_delay_s=5.0,
        replica_cpus=0.1,
        **UNLIMITED,
        **service,
    )
    assert _running("scaled") == 1
    big = {"cells": [{"slices": USE_CASES["campus"]}] * 200}
    stop = threading.Event()
    peak = 1
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(_load, "/scaled/allocate/batch", big, stop, 8)
        deadline = time.monotonic() + 90
        while peak < 2 and time.monotonic() < deadline:
            time.sleep(1.0)
            peak = max(peak, _running("scaled"))
        stop.set()
        results = load.result()
    assert peak >= 2, "no replica was added under sustained load"
    assert all(s == 200 for s, _ in results)
    deadline = time.monotonic() + 120
    while _running("scaled") > 1:
        assert time.monotonic() < deadline, "replicas did not come back down after the load"
        time.sleep(1.0)
    serve.delete("scaled")


def test_openapi_document_names_the_bodies_and_key_the_endpoints_check_themselves():
    from serve_apps.allocator import PROTECTED, app

    document = app.openapi()
    known = document["components"]["schemas"]
    for path, model in (
        ("/allocate", "AllocateRequest"),
        ("/allocate/batch", "BatchRequest"),
        ("/predict", "PredictRequest"),
    ):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert known[model]["additionalProperties"] is False
    referenced = {ref.rsplit("/", 1)[1] for ref in _refs(document)}
    assert referenced <= set(known), referenced - set(known)
    scheme = document["components"]["securitySchemes"]["APIKeyHeader"]
    assert scheme == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == (path in PROTECTED), path


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_serve_config_file_is_a_valid_serve_deploy_config(exports):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(SERVE_CONFIG_FILE.read_text())
    schema = ServeDeploySchema.model_validate(data)
    (application,) = schema.applications
    assert application.import_path == "serve_apps.allocator:build_app"
    assert application.args["host"] == schema.http_options.host == "127.0.0.1"
    args = {**application.args, "model": str(exports["a"])}
    built = build_app(args)  # the builder accepts the file's args
    assert built is not None
    with pytest.raises(ValueError, match="max_replicas"):
        build_app({**args, "min_replicas": 3, "max_replicas": 2})


def test_a_chunked_body_over_the_limit_is_refused_without_a_length(service):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    chunks = (b" " * 50_000 for _ in range(6))  # 300 kB, no Content-Length
    connection.request(
        "POST",
        "/allocate",
        body=chunks,
        headers={"Content-Type": "application/json", "X-API-Key": KEY},
        encode_chunked=True,
    )
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 413 and answer["error"] == "too_large"
    assert post("/allocate", {"slices": USE_CASES["operator"]})[0] == 200

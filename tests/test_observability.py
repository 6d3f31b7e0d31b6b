"""Observability, checked with the real tools: ``promtool`` checks the scrape config and rules and
runs the rule unit tests (and rejects broken copies of them); the committed Grafana dashboard is
what ``deepslicing dashboard`` writes; and live, a real Prometheus (the Debian package, on
127.0.0.1) scrapes a real Serve app and a real training run through Ray's service discovery
file, every recording rule and every dashboard query returns series with the labels their names
and legends promise, and a copy of the latency alert with a tiny threshold fires in Prometheus's
own alerts API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from test_train import TINY

from deepslicing import dashboard, serving
from deepslicing.cli import main as cli
from deepslicing.export import export_untrained
from deepslicing.ray_runtime import free_ports
from serve_apps.allocator import APP_NAME, ServeConfig

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "cluster" / "prometheus"
RECORDING = PROMETHEUS_DIR / "rules" / "deepslicing-recording.yml"
ALERTS = PROMETHEUS_DIR / "rules" / "deepslicing-alerts.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD_JSON = REPO / "cluster" / "grafana" / "deepslicing.json"
KEY = "observability-key-0123456789abcdef"
TRAIN_RUN = "obs-train"  # the run directory's name, the training series' run label
LIVE_DEADLINE_S = 90  # for every rule and query to have series after the load
# what each recording rule's series carry (its name's level, label by label)
RECORDED_LABELS = {
    "application_endpoint_status:deepslicing_requests:rate5m": {
        "application",
        "endpoint",
        "status",
    },
    "application_endpoint_status:deepslicing_requests:ratio_rate5m": {
        "application",
        "endpoint",
        "status",
    },
    "application_endpoint:deepslicing_request_errors:ratio_rate5m": {"application", "endpoint"},
    "application_reason:deepslicing_rejections:rate5m": {"application", "reason"},
    "application_endpoint:deepslicing_request_latency_ms:quantile_rate5m": {
        "application",
        "endpoint",
        "quantile",
    },
    "application:deepslicing_slice_allocations:rate5m": {"application"},
    "application_slice:deepslicing_allocation_share:avg": {"application", "slice"},
    "application_slice:deepslicing_slice_need:avg": {"application", "slice"},
    "application_slice:deepslicing_sla_risk:max": {"application", "slice"},
    "application_slice:deepslicing_throughput_deviation:ratio": {"application", "slice"},
    "application_deployment:deepslicing_replicas:healthy": {"application", "deployment"},
    "application_deployment:deepslicing_replicas:max": {"application", "deployment"},
    "application_model_version:deepslicing_model_age:days": {"application", "model_version"},
    "run:deepslicing_train_iterations:rate5m": {"run"},
}
# Ray's and Prometheus's own labels, left out of the samples printed
NOISE = {
    "__name__",
    "Component",
    "NodeAddress",
    "SessionName",
    "Version",
    "WorkerId",
    "instance",
    "job",
    "otel_scope_name",
    "otel_scope_schema_url",
    "otel_scope_version",
}
# the dashboard's variables as the live test sets them
VARIABLES = {"$application": APP_NAME, "$__rate_interval": "1m"}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool not found: apt-get install prometheus (the README's test command installs it)"
        )
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


# --- promtool -----------------------------------------------------------------------------------


def test_scrape_config_and_rules_pass_promtool_check():
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 2 rule files found" in out.stdout


def test_rule_unit_tests_pass():
    out = promtool("test", "rules", *(str(p.relative_to(PROMETHEUS_DIR)) for p in RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(RULE_TESTS) == 2


BREAKS = {
    # a syntax error: the checks and the unit tests both refuse the file
    "unbalanced parenthesis": (
        RECORDING,
        "expr: sum by (application, endpoint, status) (rate(ray_deepslicing_requests_total[5m]))\n",
        "expr: sum by (application, endpoint, status) (rate(ray_deepslicing_requests_total[5m])\n",
        ("check", "test"),
    ),
    # valid rules that mean something else: only the unit tests notice
    "latency threshold 100 ms": (ALERTS, "> 10\n", "> 100\n", ("test",)),
    "no traffic floor on the error ratio": (
        ALERTS,
        "> 0.05\n            and on (application, endpoint)\n"
        "          sum by (application, endpoint) "
        "(application_endpoint_status:deepslicing_requests:rate5m) > 0.05\n",
        "> 0.05\n",
        ("test",),
    ),
    "errors ratio missing while no 5xx": (
        RECORDING,
        "            or\n              0 * sum by (application, endpoint) "
        "(rate(ray_deepslicing_requests_total[5m]))\n",
        "",
        ("test",),
    ),
}


@pytest.mark.parametrize("name", BREAKS)
def test_a_broken_rule_fails_promtool(tmp_path, name):
    path, old, new, failing = BREAKS[name]
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    target = copy / path.relative_to(PROMETHEUS_DIR)
    text = target.read_text()
    assert text.count(old) == 1, f"{name}: the text to break is not in {path.name} once"
    target.write_text(text.replace(old, new))
    check = promtool("check", "rules", str(target), cwd=copy)
    test = promtool(
        "test", "rules", *(str(p.relative_to(PROMETHEUS_DIR)) for p in RULE_TESTS), cwd=copy
    )
    assert (check.returncode != 0) == ("check" in failing), check.stdout + check.stderr
    assert test.returncode != 0, f"{name}: the rule unit tests still pass"


def test_every_alert_is_documented_and_unit_tested_firing_and_not_firing():
    alerts = rules(ALERTS)
    for alert in alerts:
        notes = alert["annotations"]
        assert set(notes) == {"summary", "description", "runbook"}, alert["alert"]
        assert "{{ $labels." in notes["description"], alert["alert"]
        assert "docs/observability.md#" in notes["runbook"], alert["alert"]
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
    fired, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in alerts}
    assert fired == names and quiet == names


def test_every_recording_rule_has_a_unit_test_and_known_labels():
    records = {rule["record"] for rule in rules(RECORDING)}
    assert records == set(RECORDED_LABELS)
    tested = {
        check["expr"]
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for check in case.get("promql_expr_test", [])
    }
    assert records <= tested


def test_kubernetes_monitors_scrape_ray_pods_as_job_ray():
    docs = list(yaml.safe_load_all((PROMETHEUS_DIR / "kuberay-monitors.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"ServiceMonitor", "PodMonitor"}
    for d in docs:
        endpoints = d["spec"].get("endpoints") or d["spec"]["podMetricsEndpoints"]
        for endpoint in endpoints:
            assert endpoint["port"] == "metrics"
            assert {"targetLabel": "job", "replacement": "ray"} in endpoint["relabelings"]


# --- the dashboard ------------------------------------------------------------------------------


def test_committed_dashboard_is_what_the_command_writes(tmp_path):
    out = tmp_path / "dashboard.json"
    assert cli(["dashboard", "--out", str(out)]) == 0
    assert out.read_text() == DASHBOARD_JSON.read_text(), (
        "cluster/grafana/deepslicing.json is stale: run `deepslicing dashboard`"
    )
    board = json.loads(out.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs == [q.expr for _, _, q in dashboard.queries()]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Errors", "Latency", "Saturation", "Slices", "Model", "Training"]


# --- live: Serve + training scraped by a real Prometheus ----------------------------------------


def allocate_body(with_readings: bool) -> dict:
    """The operator's three slices; with readings, the eMBB slice reports its demand, so its
    throughput is compared with its 100 Mbps target."""
    slices = [dict(s) for s in serving.OPERATOR_REQUEST["slices"]]
    if with_readings:
        slices[0]["readings"] = {"demand": 80.0, "spectral_efficiency": 4.0}
    return {"slices": slices}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The allocation service on a fresh local Ray (2 CPUs), started as `deepslicing serve` does."""
    root = tmp_path_factory.mktemp("observability")
    export_untrained(root / "model", seed=3, model_version="obs-model")
    keys = root / "keys"
    keys.write_text(KEY + "\n")
    (port,) = free_ports("127.0.0.1", 1)
    assert not ray.is_initialized()
    config = ServeConfig(
        model=str(root / "model"), api_keys_file=str(keys), port=port, ingress="proxy"
    )
    url = serving.start(config)
    yield url
    serving.stop()


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Prometheus on 127.0.0.1 with the committed scrape config and rules, Ray's discovery file,
    1 s intervals, plus a copy of the latency alert that fires on any latency."""
    from ray._private.metrics_agent import PrometheusServiceDiscoveryWriter

    root = tmp_path_factory.mktemp("prometheus")
    # The head's dashboard writes this file on a cluster; this Ray runs without the dashboard,
    # so the test has Ray's writer produce it once (the node set does not change here).
    writer = PrometheusServiceDiscoveryWriter(
        ray.get_runtime_context().gcs_address, str(root), str(root)
    )
    writer.write()
    # Ray lists each node at its own address; its metrics agents listen on every interface, and
    # this test's traffic stays on the loopback
    groups = json.loads(Path(writer.get_target_file_name()).read_text())
    for group in groups:
        group["targets"] = ["127.0.0.1:" + t.rsplit(":", 1)[1] for t in group["targets"]]
    targets = root / "targets.json"
    targets.write_text(json.dumps(groups))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0]["files"] = [str(targets)]
    forced = root / "forced.yml"
    forced.write_text(yaml.safe_dump({"groups": [{"name": "forced", "rules": [forced_alert()]}]}))
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]] + [str(forced)]
    config_file = root / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    (port,) = free_ports("127.0.0.1", 1)
    log = (root / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            shutil.which("prometheus") or pytest.fail("prometheus not found (apt-get install)"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{url}/-/ready"), 30, "Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def forced_alert() -> dict:
    """The committed high-latency alert with a threshold of 0 ms and no waiting."""
    (alert,) = [r for r in rules(ALERTS) if r["alert"] == "DeepslicingAllocationLatencyHigh"]
    assert alert["expr"].rstrip().endswith("> 10")
    return {**alert, "expr": alert["expr"].rstrip().removesuffix("> 10") + "> 0", "for": "0s"}


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        time.sleep(1.0)
    return result


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def load(service, prometheus, tmp_path_factory):
    """Bounded traffic with bad requests among it, sent twice: the first round creates every
    series and the second, once Prometheus has stored them, makes their rates positive (a
    counter's first sample is not an increase). Then a 2-iteration training run in the same Ray."""
    requests = [("POST", "/allocate", allocate_body(i % 2 == 0), KEY, 200) for i in range(20)]
    requests += [
        ("POST", "/predict", {"state": [0.5] * 18}, KEY, 200),
        ("GET", "/model_info", None, KEY, 200),
        ("GET", "/health", None, None, 200),
        ("POST", "/allocate", allocate_body(False), None, 401),
        ("POST", "/allocate", {"slices": []}, KEY, 422),
        ("POST", "/predict", {"state": [0.5] * 5}, KEY, 422),
        ("GET", "/no-such-path", None, KEY, 404),
    ]
    kinds = {
        (path if path != "/no-such-path" else "other", str(code)) for _, path, *_, code in requests
    }

    def stored() -> bool:
        series = query(prometheus, "ray_deepslicing_requests_total")
        return {(s["metric"]["endpoint"], s["metric"]["status"]) for s in series} >= kinds

    for round_ in range(2):
        for method, path, body, key, expected in requests:
            assert serving.request(service, method, path, body, key)[0] == expected
        if round_ == 0:
            wait_for(stored, LIVE_DEADLINE_S, "Prometheus to store every request series")
    run_dir = tmp_path_factory.mktemp("training") / TRAIN_RUN
    train = ["train", "--run-dir", str(run_dir), "--iterations", "2", "--no-tracking", *TINY]
    assert cli(train) == 0


def test_every_recording_rule_returns_series_with_its_labels(prometheus, load, capsys):
    def all_recorded():
        found = {record: query(prometheus, record) for record in RECORDED_LABELS}
        return found if all(found.values()) else None

    found = wait_for(all_recorded, LIVE_DEADLINE_S, "every recording rule to have series")
    with capsys.disabled():
        print("\nrecording rules (series, a sample):")
        for record, series in found.items():
            print(f"  {len(series):3d}  {sample(series):<44}  {record}")
    for record, series in found.items():
        for s in series:
            assert RECORDED_LABELS[record] <= set(s["metric"]), (record, s["metric"])

    def value(record: str, **labels: str) -> float:
        (match,) = [s for s in found[record] if labels.items() <= s["metric"].items()]
        return float(match["value"][1])

    rate = "application_endpoint_status:deepslicing_requests:rate5m"
    assert value(rate, endpoint="/allocate", status="200") > 0
    p95 = "application_endpoint:deepslicing_request_latency_ms:quantile_rate5m"
    assert 0 < value(p95, endpoint="/allocate", quantile="0.95") < 5000
    deviation = "application_slice:deepslicing_throughput_deviation:ratio"
    assert [s["metric"]["slice"] for s in found[deviation]] == ["eMBB"]  # the one with readings
    age = "application_model_version:deepslicing_model_age:days"
    assert 0 <= value(age, model_version="obs-model") < 1
    assert {s["metric"]["run"] for s in found["run:deepslicing_train_iterations:rate5m"]} == {
        TRAIN_RUN
    }
    statuses = {
        (s["metric"]["endpoint"], s["metric"]["status"])
        for s in found["application_endpoint_status:deepslicing_requests:rate5m"]
    }
    assert {("/allocate", "200"), ("/allocate", "401"), ("/allocate", "422"), ("other", "404")} <= (
        statuses
    )


def test_every_dashboard_query_returns_series_with_its_legend_labels(prometheus, load, capsys):
    def resolved(expr: str) -> str:
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        return expr

    def answered():
        found = [
            (row, title, q, query(prometheus, resolved(q.expr)))
            for row, title, q in dashboard.queries()
        ]
        return found if all(series for *_, series in found) else None

    found = wait_for(answered, LIVE_DEADLINE_S, "every dashboard query to have series")
    with capsys.disabled():
        print("\ndashboard queries (series, a sample):")
        for row, title, q, series in found:
            print(f"  {len(series):3d}  {sample(series):<44}  {row} / {title}: {resolved(q.expr)}")
    for _, title, q, series in found:
        for s in series:
            assert q.labels() <= set(s["metric"]), (title, q.expr, s["metric"])


def test_an_alert_with_a_tiny_threshold_fires_in_prometheus(prometheus, load):
    def firing():
        with urllib.request.urlopen(f"{prometheus}/api/v1/alerts", timeout=10) as response:
            alerts = json.load(response)["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing"]

    alerts = wait_for(firing, LIVE_DEADLINE_S, "the forced latency alert to fire")
    (alert,) = alerts
    assert alert["labels"]["alertname"] == "DeepslicingAllocationLatencyHigh"
    assert alert["labels"]["application"] == APP_NAME
    assert alert["labels"]["endpoint"] == "/allocate"
    assert alert["annotations"]["description"].startswith(f"Application {APP_NAME}: p95 latency")
    assert "docs/observability.md#latency" in alert["annotations"]["runbook"]


def sample(series: list[dict]) -> str:
    """The first series' labels that matter and its value, e.g. ``slice=eMBB 0.31``."""
    first = min(series, key=lambda s: sorted(s["metric"].items()))
    labels = {k: v for k, v in first["metric"].items() if k not in NOISE}
    shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{shown} {float(first['value'][1]):.4g}"

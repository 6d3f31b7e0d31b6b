"""The shared tracking server of cluster/: a real PostgreSQL (Debian's `postgresql` binaries, run as
the `postgres` user when the tests run as root) behind a real `mlflow server` that proxies artifacts
(`--serve-artifacts`, files in its `--artifacts-destination`), every process on 127.0.0.1 only.
Through it, with nothing but MLFLOW_TRACKING_URI set: `deepslicing register` twice with the gate
deciding, `deepslicing compare` listing the registration runs, and the Serve app loading
`models:/deepslicing-allocator@champion` from the server and answering POST /allocate over HTTP.
The runs, versions and alias are read back from PostgreSQL itself, the model files from the
artifact folder; and the Kubernetes manifests (cluster/kuberay/mlflow*.yaml) run the same server."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import psycopg2
import pytest
import yaml
from mlflow import MlflowClient
from test_registry import train

from deepslicing.ray_runtime import free_ports
from deepslicing.registry import CHAMPION, KEPT, MODEL_NAME, PROMOTED
from deepslicing.serving import OPERATOR_REQUEST, request, start, stop
from serve_apps.allocator import ServeConfig

HOST = "127.0.0.1"
USER = "deepslicing"
PASSWORD = "test-password-0123456789"
DATABASE = "mlflow"
KEY = "test-key-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
SUITE = ["--scenario", "steady,burst", "--episodes", "1", "--seed", "0"]


def pg_binary(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else where Debian's `postgresql` package puts it."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"{name} not found: install Debian's postgresql package (see README.md)")
    return found


def wait_until(ready, what: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, reset, database starting up
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} was not ready within {timeout} s")


def end(process: subprocess.Popen, sig: int) -> None:
    """Stop a process started in its own session, with everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster in a temporary directory, on 127.0.0.1 only, with a password
    user and an empty database for MLflow; its connection settings."""
    # postgres refuses to run as root: as root, the `postgres` OS user (Debian's package makes it)
    # runs it, so the directory is made outside pytest's 0700 root-only tmp folder
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="deepslicing-pg-"))
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data, password_file = root / "data", root / "password"
    port = free_ports(HOST, 1)[0]
    try:
        subprocess.run(
            as_user + ["sh", "-c", f"umask 077 && printf %s '{PASSWORD}' > {password_file}"],
            check=True,
        )
        subprocess.run(
            as_user
            + [pg_binary("initdb"), "-D", str(data), "-U", USER, "--pwfile", str(password_file)]
            + ["--auth", "scram-sha-256", "--encoding", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server = subprocess.Popen(
            as_user + [pg_binary("postgres"), "-D", str(data), "-h", HOST, "-p", str(port)]
            + ["-k", str(root), "-c", "fsync=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        settings = {"host": HOST, "port": port, "user": USER, "password": PASSWORD}
        try:
            wait_until(
                lambda: psycopg2.connect(dbname="postgres", **settings).close() is None,
                "postgres",
                server,
            )
            admin = psycopg2.connect(dbname="postgres", **settings)
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {DATABASE}")
            admin.close()
            yield {**settings, "dbname": DATABASE}
        finally:
            end(server, signal.SIGINT)  # postgres' "fast" shutdown
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on the PostgreSQL store, proxying artifacts to a local folder."""
    artifacts = tmp_path_factory.mktemp("mlflow_artifacts")
    port = free_ports(HOST, 1)[0]
    # the driver named: SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql://
    store = f"postgresql+psycopg2://{USER}:{PASSWORD}@{HOST}:{postgres['port']}/{DATABASE}"
    log = tmp_path_factory.mktemp("mlflow_log") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", store, "--serve-artifacts"]
            + ["--artifacts-destination", str(artifacts), "--host", HOST, "--port", str(port)]
            + ["--workers", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://{HOST}:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200

    try:
        wait_until(healthy, f"mlflow server (log: {log})", server)
        yield {"uri": uri, "artifacts": artifacts}
    finally:
        end(server, signal.SIGTERM)


def deepslicing(uri: str, cwd: Path, *args: str) -> str:
    """The `deepslicing` command with only MLFLOW_TRACKING_URI naming the server; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "deepslicing.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory) -> dict:
    """A tiny trained run (3 iterations); its checkpoints after 1 and after 3 iterations
    registered in turn through the server, the gate deciding the second; what each printed."""
    root = tmp_path_factory.mktemp("mlflow_postgres")
    run = train(root, "run")
    printed = [
        deepslicing(
            mlflow_server["uri"],
            root,
            "register",
            "--checkpoint",
            str(run / "checkpoints" / checkpoint),
            "--out",
            str(root / checkpoint),
            *SUITE,
        )
        for checkpoint in ("iter_000001", "iter_000003")
    ]
    return {"root": root, "printed": printed}


def test_register_twice_through_the_server_the_gate_decides(mlflow_server, registered, postgres):
    first, second = registered["printed"]
    assert re.search(r"registered deepslicing-allocator version 1 \(run \w+, http://", first)
    assert "gate: no champion yet; version 1 takes the alias" in first
    assert "registered deepslicing-allocator version 2 " in second
    verdict = re.search(r"\(recorded\); (promoted|kept)", second)
    assert verdict, second
    champion = "2" if verdict.group(1) == "promoted" else "1"

    client = MlflowClient(tracking_uri=mlflow_server["uri"], registry_uri=mlflow_server["uri"])
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == champion
    decision = client.get_model_version(MODEL_NAME, "2").tags["gate_decision"]
    assert decision == (PROMOTED if champion == "2" else KEPT)

    # the server keeps all of it in PostgreSQL ...
    with psycopg2.connect(**postgres) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT version, run_id FROM model_versions WHERE name = %s", [MODEL_NAME])
        versions = dict(cursor.fetchall())
        cursor.execute(
            "SELECT alias, version FROM registered_model_aliases WHERE name = %s", [MODEL_NAME]
        )
        aliases = dict(cursor.fetchall())
        cursor.execute(
            "SELECT r.run_uuid, r.status, r.artifact_uri FROM runs r JOIN experiments e"
            " ON r.experiment_id = e.experiment_id WHERE e.name = 'deepslicing-registry'"
        )
        runs = {run_id: (status, uri) for run_id, status, uri in cursor.fetchall()}
    assert sorted(versions) == [1, 2]
    assert aliases == {CHAMPION: int(champion)}
    assert len(runs) == 2 and set(versions.values()) == set(runs)  # a registration run each
    # ... and the artifacts behind mlflow-artifacts:/ URIs, files in its artifacts destination
    for status, uri in runs.values():
        assert status == "FINISHED" and uri.startswith("mlflow-artifacts:/"), uri
    onnx = sorted(mlflow_server["artifacts"].rglob("model.onnx"))
    assert len(onnx) == 2 and all(path.stat().st_size > 1000 for path in onnx)
    # nothing went to an embedded store of the working directory
    assert not (registered["root"] / "mlflow.db").exists()
    assert not (registered["root"] / "mlruns").exists()


def test_compare_lists_the_registration_runs(mlflow_server, registered):
    out = registered["root"] / "compare"
    printed = deepslicing(
        mlflow_server["uri"],
        registered["root"],
        "compare",
        "--experiment",
        "deepslicing-registry",
        "--out",
        str(out),
    )
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    experiment = client.get_experiment_by_name("deepslicing-registry")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    rows = printed.splitlines()[2:4]
    assert len(names) == 2 and {row.split()[1] for row in rows} == names, printed
    assert (out / "compare.csv").exists() and (out / "compare.png").exists()


def test_serve_loads_the_champion_from_the_server(mlflow_server, registered, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    client = MlflowClient(tracking_uri=mlflow_server["uri"], registry_uri=mlflow_server["uri"])
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    config = ServeConfig(
        model=f"models:/{MODEL_NAME}@{CHAMPION}",
        tracking_uri=mlflow_server["uri"],
        api_keys_file=str(keys),
        host=HOST,
        port=free_ports(HOST, 1)[0],
        max_replicas=1,
    )
    try:
        url = start(config)
        status, answer = request(url, "POST", "/allocate", OPERATOR_REQUEST, KEY)
        assert status == 200, answer
        assert len(answer["slices"]) == 3 and answer["total_share"] <= 1 + 1e-6
        status, info = request(url, "GET", "/model_info", key=KEY)
        assert status == 200, info
        assert info["model_uri"] == config.model
        assert info["model_version"] == f"{MODEL_NAME}/{champion.version}"
        assert answer["model_version"] == info["model_version"]
    finally:
        stop()


def test_the_kubernetes_manifests_run_the_same_server():
    """cluster/kuberay/: MLflow proxies artifacts and keeps its store in the PostgreSQL of
    mlflow-postgres.yaml, both with the credentials of its Secret; the image has the driver
    this module tested, at the dev extra's pin."""
    manifests = {
        name: {o["kind"]: o for o in yaml.safe_load_all((KUBERAY / name).read_text()) if o}
        for name in ("mlflow.yaml", "mlflow-postgres.yaml")
    }
    secret = manifests["mlflow-postgres.yaml"]["Secret"]
    assert set(secret["stringData"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    database = manifests["mlflow-postgres.yaml"]["Service"]
    (mlflow,) = manifests["mlflow.yaml"]["Deployment"]["spec"]["template"]["spec"]["containers"]
    (postgres,) = manifests["mlflow-postgres.yaml"]["Deployment"]["spec"]["template"]["spec"][
        "containers"
    ]
    for container in (mlflow, postgres):
        assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    env = {e["name"]: e["value"] for e in mlflow["env"]}
    port = database["spec"]["ports"][0]["port"]
    assert env["MLFLOW_BACKEND_STORE_URI"] == (
        "postgresql+psycopg2://$(POSTGRES_USER):$(POSTGRES_PASSWORD)"
        f"@{database['metadata']['name']}:{port}/$(POSTGRES_DB)"
    )
    assert "--serve-artifacts" in mlflow["command"]
    assert not any("backend-store" in arg or "sqlite" in arg for arg in mlflow["command"])
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [d for d in dev["dev"] if d.startswith("psycopg2-binary==")]
    assert pin == f"psycopg2-binary=={psycopg2.__version__.split()[0]}"
    assert re.search(rf"^RUN pip install .* {re.escape(pin)}$", DOCKERFILE.read_text(), re.M)

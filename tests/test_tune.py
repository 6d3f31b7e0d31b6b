"""`deepslicing tune`: a real ASHA sweep on local Ray, every trial an MLflow run; bad sweeps fail
before any trial starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tune_configs" / "maddpg_asha_small.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "tune_configs").glob("maddpg_*.yaml")))
def test_every_shipped_sweep_loads(path):
    """Loading checks the base and every candidate value as a training config (an earlier change
    of maddpg.cost_budget left the default sweep unloadable)."""
    from deepslicing.config import load
    from deepslicing.sweep import SweepConfig

    assert load(SweepConfig, path).search_space


def tune_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "deepslicing.cli", "tune", *args,
        "--storage-path", str(tmp_path / "tune"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip


def run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def sweep_runs(client):
    """The sweep's parent run and its trials' runs, nested under it; nothing else is there."""
    experiment = client.get_experiment_by_name("deepslicing-sweeps")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r is not parents[0]]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    return parents[0], children


def test_small_asha_sweep_runs_trials_stops_some_and_logs_each_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    # one trial at a time: training is seeded, so ASHA's decisions are the same on every run
    out = run(
        tune_command(tmp_path, str(SMALL), "--max-concurrent-trials", "1"), tmp_path, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "4 trials, 0 failed" in out.stdout
    assert "best trial: objective" in out.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, runs = sweep_runs(client)
    assert parent.info.run_name == "maddpg_asha_small" and parent.info.status == "FINISHED"
    assert parent.data.params["search_space.maddpg.actor_lr"] == "loguniform [0.0001, 0.003]"
    assert parent.data.tags["mlflow.source.name"] == "deepslicing tune"
    assert len(runs) == 4
    iterations = []
    for r in runs:
        params = r.data.params
        assert float(params["maddpg/actor_lr"]) > 0
        assert params["maddpg/batch_size"] == "128"  # the base settings are logged too
        assert params["env/scenario"] == "steady"
        assert r.data.tags["sweep"] == "maddpg_asha_small"
        assert r.data.tags["variant"] == "both"
        history = client.get_metric_history(r.info.run_id, "objective")
        assert history, "every trial reports the objective"
        hp = client.get_metric_history(r.info.run_id, "hp/maddpg.actor_lr")
        assert hp[-1].value == pytest.approx(float(params["maddpg/actor_lr"]))
        iterations.append(history[-1].step)
        # only the vocabulary of deepslicing.metrics, not Tune's bookkeeping or the config
        assert "training_iteration" not in r.data.metrics
        assert "time_this_iter_s" not in r.data.metrics
        assert not any(k.startswith("config/") for k in r.data.metrics)
    assert max(iterations) == 4
    assert min(iterations) < 4, f"ASHA stopped no trial early: {iterations}"

    # the best trial went through the registry: a version of the model with the champion alias
    # ... logged from the best trial's run, which the parent names
    assert "best trial, registered" in out.stdout
    version = client.get_model_version_by_alias("deepslicing-allocator", "champion")
    assert version.tags["gate_decision"] == "promoted"
    assert float(version.tags["suite/objective"]) > -1
    best = [r for r in runs if r.data.tags.get("best_trial") == "true"]
    assert len(best) == 1 and version.run_id == best[0].info.run_id
    assert parent.data.tags["best_trial_run_id"] == best[0].info.run_id
    assert parent.data.tags["registered_version"] == str(version.version)
    assert client.get_run(version.run_id).data.tags["registered_version"] == str(version.version)
    # Tune's best (scope "all": the best iteration of any trial) is the best in MLflow too
    best_of = {
        r.info.run_id: max(m.value for m in client.get_metric_history(r.info.run_id, "objective"))
        for r in runs
    }
    assert best_of[version.run_id] == max(best_of.values())


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("colour: red\n", "colour: unknown key"),
        ("search_space: []\n", "search_space: is empty"),
        (
            "metric: happiness\nsearch_space:\n  - {key: maddpg.tau, kind: choice, values: [0.01]}\n",
            "metric: 'happiness' is never reported",
        ),
        (
            "search_space:\n  - {key: maddpg.colour, kind: choice, values: [1]}\n",
            "maddpg has no setting 'colour'",
        ),
        (
            "search_space:\n  - {key: maddpg.actor_lr, kind: loguniform, values: [0, 1]}\n",
            "loguniform needs low > 0",
        ),
        (
            "search_space:\n  - {key: maddpg.tau, kind: choice, values: [0.01]}\n"
            "maddpg: {actor_lr: -1}\n",
            "maddpg.actor_lr",
        ),
        (
            "search_space:\n  - {key: maddpg.tau, kind: choice, values: [0.01, 7]}\n",
            "maddpg.tau",
        ),
    ],
)
def test_bad_sweep_fails_before_trials_start(tmp_path, yaml_text, message):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml_text)
    out = run(tune_command(tmp_path, str(sweep)), tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert not (tmp_path / "tune").exists()
    assert "Started a local Ray instance" not in out.stderr


def test_unreachable_mlflow_server_is_named_before_trials_start(tmp_path):
    out = run(
        [*tune_command(tmp_path, str(SMALL)), "--tracking-uri", "http://127.0.0.1:9"],
        tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    assert "MLflow tracking server 'http://127.0.0.1:9' is not reachable" in out.stderr
    assert not (tmp_path / "tune").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 120 s")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def rest(uri: str, path: str, **query: str) -> dict:
    """A GET of MLflow's REST API, as the UI makes it."""
    url = f"{uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_sweep_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    """Through the server's REST API: the model-training experiment, the sweep's parent run with
    its trials nested, every `trial` name of the metric table, and the registered champion: a
    logged model of the best trial's run, with its suite metrics and a signature."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from deepslicing import metrics

    cmd = tune_command(tmp_path, str(SMALL))
    cmd += ["--tracking-uri", mlflow_server, "--set", "num_samples=2", "--set", "max_iterations=2"]
    out = run(cmd, tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    experiment = rest(
        mlflow_server, "experiments/get-by-name", experiment_name="deepslicing-sweeps"
    )
    tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"].startswith("Ray Tune sweeps")

    client = MlflowClient(tracking_uri=mlflow_server)
    parent, runs = sweep_runs(client)
    assert len(runs) == 2
    for r in runs:
        assert "objective" in r.data.metrics
        assert "maddpg/actor_lr" in r.data.params
        assert r.data.tags["mlflow.source.name"] == "deepslicing tune"
        keys = set(r.data.metrics)
        found = {metrics.documented_name(k) for k in keys}
        assert [n for n, where in metrics.vocabulary() if "trial" in where and n not in found] == []
        assert [k for k in keys if metrics.documented_name(k) is None] == []

    version = rest(
        mlflow_server, "registered-models/alias", name="deepslicing-allocator", alias="champion"
    )["model_version"]
    assert version["run_id"] == parent.data.tags["best_trial_run_id"]
    model_id = version["source"].removeprefix("models:/")
    model = rest(mlflow_server, f"logged-models/{model_id}")["model"]
    assert model["info"]["source_run_id"] == version["run_id"]
    linked = {m["key"] for m in model["data"]["metrics"]}
    assert metrics.SUITE_SCORE in linked and f"{metrics.SUITE}/burst/{metrics.OBJECTIVE}" in linked
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        signature = mlflow.models.get_model_info(version["source"]).signature
    finally:
        mlflow.set_tracking_uri(previous)
    from deepslicing.model import NUM_FEATURES

    assert signature.inputs.inputs[0].shape == (-1, 3, NUM_FEATURES)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store


def test_pbt_sweep_logs_mutated_hyperparameters_as_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    cmd = tune_command(tmp_path, str(SMALL), "--scheduler", "pbt", "--no-register")
    cmd += [
        "--set",
        "num_samples=2",
        "--set",
        "max_iterations=4",
        "--set",
        "perturbation_interval=2",
    ]
    out = run(cmd, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 trials, 0 failed" in out.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, runs = sweep_runs(client)
    assert len(runs) == 2
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "hp/maddpg.actor_lr")
        # every iteration logged; a trial that PBT rewinds to another's checkpoint after it
        # already reported a later iteration logs that iteration again (seen: [1, 2, 3, 3, 4])
        steps = [m.step for m in history]
        assert sorted(set(steps)) == [1, 2, 3, 4] and steps[:2] == [1, 2], steps
        # the param keeps the trial's first value; the metric follows PBT's changes
        assert history[0].value == pytest.approx(float(r.data.params["maddpg/actor_lr"]))

"""`deepslicing tune`: a real ASHA sweep on local Ray, every trial an MLflow run; bad sweeps fail
before any trial starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tune_configs" / "maddpg_asha_small.yaml"


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
    experiment = client.get_experiment_by_name("deepslicing-sweeps")
    runs = client.search_runs([experiment.experiment_id])
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
        iterations.append(int(r.data.metrics["training_iteration"]))
    assert max(iterations) == 4
    assert min(iterations) < 4, f"ASHA stopped no trial early: {iterations}"

    # the best trial went through the registry: a version of the model with the champion alias
    assert "best trial, registered" in out.stdout
    version = client.get_model_version_by_alias("deepslicing-allocator", "champion")
    assert version.tags["gate_decision"] == "promoted"
    assert float(version.tags["suite_score"]) > -1


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


def test_sweep_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    cmd = tune_command(tmp_path, str(SMALL))
    cmd += ["--tracking-uri", mlflow_server, "--set", "num_samples=2", "--set", "max_iterations=2"]
    out = run(cmd, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("deepslicing-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for r in runs:
        assert "objective" in r.data.metrics
        assert "maddpg/actor_lr" in r.data.params
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
    experiment = client.get_experiment_by_name("deepslicing-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "hp/maddpg.actor_lr")
        # every iteration logged; a trial that PBT rewinds to another's checkpoint after it
        # already reported a later iteration logs that iteration again (seen: [1, 2, 3, 3, 4])
        steps = [m.step for m in history]
        assert sorted(set(steps)) == [1, 2, 3, 4] and steps[:2] == [1, 2], steps
        # the param keeps the trial's first value; the metric follows PBT's changes
        assert history[0].value == pytest.approx(float(r.data.params["maddpg/actor_lr"]))

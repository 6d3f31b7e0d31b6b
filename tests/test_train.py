"""`deepslicing train`: bad input stops before Ray, checkpoints resume with their multipliers, and a
real local cluster runs training through `ray job submit` with the run landing in MLflow."""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deepslicing.config import load
from deepslicing.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--eval-episodes",
    "0",
    "--set",
    "maddpg.learning_starts=400",
    "--set",
    "maddpg.batch_size=64",
    "--set",
    "env.episode_length=50",
]


def train_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepslicing.train",
        "--run-dir",
        str(tmp_path / "run"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *TINY,
        *args,
    ]


def quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def test_shipped_yaml_is_the_commented_defaults():
    path = REPO / "tune_configs" / "maddpg.yaml"
    assert load(TrainConfig, path) == TrainConfig()
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for previous, line in zip(lines, lines[1:], strict=False):
        if not line.lstrip().startswith("#") and ":" in line:
            assert previous.lstrip().startswith("#"), f"key without a comment: {line!r}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "maddpg.colour=1"], "maddpg.colour: unknown key"),
        (["--set", "maddpg.actor_lr=fast"], "maddpg.actor_lr: must be a number"),
        (["--set", "maddpg.tau=0"], "maddpg.tau"),
        (["--set", "maddpg.variant=greedy"], "maddpg.variant: must be one of"),
        (["--iterations", "0"], "iterations: must be an integer >= 1"),
        (["--set", "env.coordinator=admm"], "env.coordinator"),
        (["--resume"], "resume: no checkpoint"),
    ],
)
def test_bad_input_fails_before_ray_and_changes_nothing(tmp_path, args, message):
    out = subprocess.run(
        train_command(tmp_path, *args),
        capture_output=True,
        text=True,
        env=quiet_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Started a local Ray instance" not in out.stderr
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "mlflow.db").exists()


def read_progress(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "progress.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_killed_run_resumes_from_its_checkpoint_with_multipliers(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(tmp_path, "--iterations", "30", "--checkpoint-every", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=quiet_env(),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state_file = run_dir / "state.json"
            if state_file.is_file() and json.loads(state_file.read_text())["iteration"] >= 4:
                break
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at iteration 4 within 240 s")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    state = json.loads((run_dir / "state.json").read_text())
    saved_iteration = state["iteration"]
    at_checkpoint = next(
        r for r in read_progress(run_dir) if int(r["iteration"]) == saved_iteration
    )
    saved = {
        k.split("/")[1]: float(v) for k, v in at_checkpoint.items() if k.startswith("multiplier/")
    }
    assert any(v > 0 for v in saved.values())  # the 'both' variant has moved its multipliers

    resumed = subprocess.run(
        train_command(tmp_path, "--iterations", str(saved_iteration + 2), "--resume"),
        capture_output=True,
        text=True,
        env=quiet_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("resumed from"))
    assert f"at iteration {saved_iteration};" in line
    restored = dict(
        (name, float(value))
        for name, value in (p.split() for p in line.split("multipliers restored: ")[1].split(", "))
    )
    assert restored == pytest.approx(saved, rel=1e-6, abs=1e-9)
    iterations = [int(r["iteration"]) for r in read_progress(run_dir)]
    assert iterations == list(range(1, saved_iteration + 3))
    assert f"iter {saved_iteration + 1:>4}/" in resumed.stdout
    assert f"iter {saved_iteration:>4}/" not in resumed.stdout

    again = subprocess.run(
        train_command(tmp_path, "--iterations", "3"),
        capture_output=True,
        text=True,
        env=quiet_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert again.returncode == 2 and "already holds a run" in again.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    """Token authentication on, with a token of this test's own, for the head and its clients."""
    env = quiet_env()
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return env


@pytest.fixture
def local_cluster():
    """`ray start --head` (dashboard and job server on 127.0.0.1), blocking in its own session so
    teardown stops only this cluster. Yields the job server address and the client environment."""
    gcs_port, dashboard_port = free_port(), free_port()
    env = cluster_env()
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--object-store-memory=200000000",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ray", "job", "submit", "--address", address, "--", "true"],
                capture_output=True,
                env=env,
            )
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start exited"
            time.sleep(1)
        else:
            pytest.fail("the Ray head did not take a job within 120 s")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_ray_job_submit_trains_and_logs_to_mlflow(tmp_path, local_cluster):
    from mlflow.tracking import MlflowClient

    address, env = local_cluster
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "deepslicing.train",
            "--iterations",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
            "--tracking-uri",
            tracking_uri,
            "--experiment",
            "job-test",
            *TINY,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    assert "iter    2/2" in out.stdout
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("job-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["maddpg.variant"] == "both"
    assert run.data.tags["scenario"] == "steady"
    history = client.get_metric_history(run.info.run_id, "utility_mean")
    assert [m.step for m in history] == [1, 2]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["iterations"] == 2


def test_mlflow_server_down_is_named_and_results_still_land(tmp_path):
    cmd = train_command(tmp_path, "--iterations", "2", "--checkpoint-every", "1")
    cmd += ["--tracking-uri", "http://127.0.0.1:9"]  # nothing listens on the discard port
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=quiet_env(), cwd=tmp_path, timeout=300
    )
    assert out.returncode == 3, out.stderr[-3000:]
    assert "MLflow tracking server 'http://127.0.0.1:9' is not reachable" in out.stderr
    run_dir = tmp_path / "run"
    assert [int(r["iteration"]) for r in read_progress(run_dir)] == [1, 2]
    assert json.loads((run_dir / "state.json").read_text())["iteration"] == 2


def test_progress_line_names_few_multipliers_and_sums_up_many():
    """Up to MAX_SLICES_LISTED slices each multiplier is named; beyond, the line gives their range
    and still names a slice whose budget cannot be reached."""
    from deepslicing import metrics
    from deepslicing.train import MAX_SLICES_LISTED, progress_line

    names = [f"s{i}" for i in range(20)]
    summary = {
        metrics.per_slice(metrics.MULTIPLIER, n): 0.05 + 0.01 * i for i, n in enumerate(names)
    }
    summary[metrics.per_slice(metrics.BUDGET_UNREACHABLE, "s3")] = 1.0
    few = progress_line(1, 45, summary, names[:MAX_SLICES_LISTED], 1.0)
    assert "lambda [s0 0.05 s1 0.06 s2 0.07 s3 0.08 (budget not reachable) s4 0.09 s5 0.10]" in few
    many = progress_line(1, 45, summary, names, 1.0)
    assert "lambda [0.05..0.24 over 20 slices; budget not reachable: s3]" in many
    assert "s10" not in many

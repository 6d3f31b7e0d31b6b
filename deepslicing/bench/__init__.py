"""``deepslicing bench TARGET``: measure a part of deepslicing against its comparator in one run.

Every target measures ours and the comparator in the same process, interleaved in ``rounds``
rounds (each contender runs ``seconds`` of wall-clock time per round, the contenders' order rotating
from round to round), and reports for each contender the median over the rounds, because one noisy
round on a small shared machine should not decide the result. Progress and results go to stderr as
they come; stdout holds only the result, one JSON object on one line with ``--json`` (so it can be
piped to ``jq``: what Ray's workers print while a target runs goes to stderr too), a small table
without it.

``bench env`` measures environment step rates, in steps per second of wall-clock time (resets are
inside the timed loop, amortised over the episode, and not counted as steps):

| contender | what is stepped                                                                           |
|-----------|-------------------------------------------------------------------------------------------|
| `api`     | ``envs.slicing_v0.parallel_env()`` (3 slices, default scenario) through the PettingZoo parallel API: ``env.step({agent: action})`` with ``Box(1,)`` float32 actions in [0, 1], ``env.reset()`` when ``env.agents`` is empty |
| `mpe2`    | ``mpe2.simple_spread_v3.parallel_env(N=3, max_cycles=25)`` (discrete actions 0..4), stepped by the same loop |
| `batched` | ``envs.slicing_v0.vector_env(num_envs)``, a :class:`~deepslicing.simulator.SlicingSimulator`: ``step(requests)`` with a ``(num_envs, 3)`` float array, ``reset(seed)`` when ``done`` |

Actions are drawn before timing from a numpy generator seeded with ``seed`` (a pool the loops
cycle through), so the cost of sampling them is not measured. Each contender is warmed up for
``min(0.5, seconds)`` s before the first round.

JSON keys (rates are medians over rounds; a slice-step is one slice of one cell for one interval):

- ``api_steps_per_s``, ``mpe2_steps_per_s``: env steps/s of the two parallel-API envs;
- ``batched_env_steps_per_s``: cells stepped per second by the batched core (``num_envs`` per call);
- ``batched_slice_steps_per_s``: ``batched_env_steps_per_s`` x 3;
- ``ratio_vs_mpe2``: ``api_steps_per_s / mpe2_steps_per_s``;
- ``batched_vs_api``: ``batched_slice_steps_per_s / (api_steps_per_s x 3)``, per slice-step;
- ``*_rounds``: each contender's per-round rates; ``num_envs``, ``seconds``, ``rounds``, ``seed``
  and the machine (``cpus``, ``python``, ``numpy``).

``bench train``, ``bench export``, ``bench serve`` and ``bench ns3`` are described in
:mod:`deepslicing.bench.train`, :mod:`deepslicing.bench.export`, :mod:`deepslicing.bench.serve`
and :mod:`deepslicing.bench.ns3`.
``bench export`` only reports (per-call latency of the torch, TorchScript, ONNX and int8 actors for
3 and 20 slices); it has no goal.

Goals (:data:`GOALS`) are floors, except the keys in :data:`CEILINGS`, which must not be exceeded
(``p95_ms_c1``, a latency; ``replica_rss_ratio_vs_noop``, memory). The JSON adds ``goals`` (key -> goal), ``goal_ceilings`` (the goal keys
that are ceilings) and ``goals_met``; ``run`` exits 1 when a goal is missed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from deepslicing.config import check_int, option
from deepslicing.ray_runtime import Ingress

TARGETS = ("env", "train", "export", "serve", "ns3")
WARMUP_SECONDS = 0.5  # per contender, before the first round (less when `seconds` is smaller)
CHECK_CLOCK_EVERY = 16  # parallel-API steps between clock reads
ACTION_POOL = 4096  # pre-generated joint actions the parallel-API loops cycle through
REQUEST_POOL = 16  # pre-generated (num_envs, 3) request arrays the batched loop cycles through
NUM_SLICES = 3  # slicing_v0's default, and simple_spread's N
MPE2_MAX_CYCLES = 25
MPE2_NUM_ACTIONS = 5  # simple_spread's discrete actions: no-op, left, right, down, up
# The acceptance goals per target: floors, except the keys in CEILINGS; `run` exits 1 when a
# value falls below its floor or rises above its ceiling.
GOALS: dict[str, dict[str, float]] = {
    "env": {"ratio_vs_mpe2": 5.0, "batched_vs_api": 50.0},
    "ns3": {"ratio_vs_bare_ns3": 0.7},
    "train": {"ratio_vs_rllib_sac": 10.0, "ratio_vs_bare_loop": 0.5},
    "serve": {
        "p95_ms_c1": 10.0,
        "rps_ratio_vs_noop_c16": 0.65,
        "batch_allocations_per_s": 20_000.0,
        "guardrail_speedup_vs_cvxpy": 50.0,
        "replica_rss_ratio_vs_noop": 1.3,
    },
}
# goals a value must not exceed (a latency, a replica's memory against the no-op's)
CEILINGS = frozenset({"p95_ms_c1", "replica_rss_ratio_vs_noop"})


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark a part of deepslicing against its comparator in one run; the last stdout line is
    JSON with --json. `env`: step rates of the slicing_v0 PettingZoo parallel API, of mpe2's
    simple_spread_v3 (N=3) through the same loop, and of the batched core (vector_env), in env
    steps/s (medians over interleaved rounds), with ratio_vs_mpe2 = api / mpe2 and batched_vs_api =
    batched slice-steps/s / API slice-steps/s."""

    target: Literal["env", "train", "export", "serve", "ns3"] = option(
        "env",
        "what to benchmark: env (environment step rates), train (MADDPG training throughput "
        "vs RLlib SAC and vs the bare learner loop; needs a few minutes), export (per-call "
        "latency of the torch, TorchScript, ONNX and int8 actors for 3 and 20 slices) or serve "
        "(the HTTP allocation service on Ray Serve vs a no-op deployment at concurrency 1 and "
        "16, /allocate/batch throughput, the guardrail vs cvxpy; about a minute) or ns3 (the ns-3 "
        "env vs a bare ns-3 run of the same traffic and rates, and the fast model's speed-up)",
    )
    json: bool = option(False, "print the result as one JSON line, last on stdout")
    seconds: float = option(2.0, "measuring time per contender per round (s), > 0 and <= 3600")
    rounds: int = option(
        3, "rounds interleaving the contenders (1..1000); the median over rounds is reported"
    )
    train_seconds: float = option(
        20.0, "train: measuring time per contender per round (s), > 0 and <= 3600"
    )
    num_envs: int = option(1024, "cells stepped together by the batched core (1..1000000)")
    seed: int = option(0, "seed of the pre-generated actions and of the env resets, >= 0")
    ingress: Ingress = option(
        "auto", "serve: how HTTP reaches both deployments (as `deepslicing serve --ingress`)"
    )

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target: must be one of {TARGETS}, got {self.target!r}")
        if not isinstance(self.json, bool):
            raise ValueError(f"json: must be true or false, got {self.json!r}")
        for name in ("seconds", "train_seconds"):
            seconds = getattr(self, name)
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not (math.isfinite(seconds) and 0 < seconds <= 3600)
            ):
                raise ValueError(f"{name}: must be a finite number in (0, 3600], got {seconds!r}")
        for name, low, high in (
            ("rounds", 1, 1000),
            ("num_envs", 1, 1_000_000),
            ("seed", 0, 2**63 - 1),
        ):
            check_int(name, getattr(self, name), low, high)

    @property
    def warmup_seconds(self) -> float:
        return min(WARMUP_SECONDS, self.seconds)


def run(config: BenchConfig) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the result alone
        result = TARGET_FUNCTIONS[config.target](config)
    goals = GOALS.get(config.target, {})
    missed = {key: goal for key, goal in goals.items() if not meets_goal(key, result[key], goal)}
    result["goals"] = goals
    result["goal_ceilings"] = sorted(CEILINGS & goals.keys())
    result["goals_met"] = not missed
    for key, goal in missed.items():
        side = "above its ceiling" if key in CEILINGS else "below its goal"
        _log(f"bench {config.target}: {key} = {result[key]:.3g} is {side} of {goal:g}")
    if config.json:
        print(json.dumps(result), flush=True)
    else:
        print(format_table(result), flush=True)
    return 1 if missed else 0


def meets_goal(key: str, value: float, goal: float) -> bool:
    """``value <= goal`` for a ceiling (a key in :data:`CEILINGS`), else ``value >= goal``; NaN
    meets neither."""
    return value <= goal if key in CEILINGS else value >= goal


# --- bench env -------------------------------------------------------------------------------


def bench_env(config: BenchConfig) -> dict[str, Any]:
    """Step rates of the slicing_v0 parallel API, mpe2 simple_spread_v3 and the batched core."""
    from mpe2 import simple_spread_v3

    from envs import slicing_v0

    rng = np.random.default_rng(config.seed)
    api_env = slicing_v0.parallel_env()
    api_env.reset(seed=config.seed)
    api_actions = rng.random((ACTION_POOL, len(api_env.possible_agents), 1), dtype=np.float32)
    api_pool = [
        {a: api_actions[i, j] for j, a in enumerate(api_env.possible_agents)}
        for i in range(ACTION_POOL)
    ]

    mpe_env = simple_spread_v3.parallel_env(N=NUM_SLICES, max_cycles=MPE2_MAX_CYCLES)
    mpe_env.reset(seed=config.seed)
    mpe_actions = rng.integers(0, MPE2_NUM_ACTIONS, size=(ACTION_POOL, NUM_SLICES))
    mpe_pool = [
        {a: mpe_actions[i, j] for j, a in enumerate(mpe_env.possible_agents)}
        for i in range(ACTION_POOL)
    ]

    batched = slicing_v0.vector_env(config.num_envs)
    batched_requests = rng.random((REQUEST_POOL, config.num_envs, batched.num_slices))
    batched_resets = [0]

    def reset_batched() -> None:  # episode k of the batch draws its traffic from seed + k
        batched.reset(config.seed + batched_resets[0])
        batched_resets[0] += 1

    reset_batched()

    contenders: dict[str, Callable[[float], float]] = {
        "api": lambda s: time_parallel_env(api_env, api_pool, s),
        "mpe2": lambda s: time_parallel_env(mpe_env, mpe_pool, s),
        "batched": lambda s: (
            time_batched(batched, batched_requests, reset_batched, s) * config.num_envs
        ),
    }
    labels = {
        "api": "slicing_v0 parallel API",
        "mpe2": "mpe2 simple_spread_v3",
        "batched": f"slicing_v0 vector_env({config.num_envs})",
    }
    _log(
        f"bench env: {config.rounds} round(s) x {config.seconds:g} s per contender, "
        f"num_envs={config.num_envs}, seed={config.seed}, {os.cpu_count()} CPU(s)"
    )
    for name, measure in contenders.items():
        measure(config.warmup_seconds)
        _log(f"  warmed up {labels[name]} ({config.warmup_seconds:g} s)")
    rates = interleave(contenders, config.rounds, config.seconds, labels)
    api_env.close()
    mpe_env.close()

    api = statistics.median(rates["api"])
    mpe = statistics.median(rates["mpe2"])
    batched_env = statistics.median(rates["batched"])
    batched_slice = batched_env * NUM_SLICES
    result = {
        "target": "env",
        "api_steps_per_s": api,
        "mpe2_steps_per_s": mpe,
        "batched_env_steps_per_s": batched_env,
        "batched_slice_steps_per_s": batched_slice,
        "ratio_vs_mpe2": api / mpe,
        "batched_vs_api": batched_slice / (api * NUM_SLICES),
        "api_steps_per_s_rounds": rates["api"],
        "mpe2_steps_per_s_rounds": rates["mpe2"],
        "batched_env_steps_per_s_rounds": rates["batched"],
        "num_envs": config.num_envs,
        "seconds": config.seconds,
        "rounds": config.rounds,
        "seed": config.seed,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    _log(
        f"bench env: api {api:,.0f} env steps/s, mpe2 {mpe:,.0f} env steps/s "
        f"(ratio_vs_mpe2 {result['ratio_vs_mpe2']:.2f}); batched {batched_slice:,.0f} "
        f"slice-steps/s (batched_vs_api {result['batched_vs_api']:.1f})"
    )
    return result


def time_parallel_env(env: Any, pool: list[dict[str, Any]], seconds: float) -> float:
    """Env steps/s of a PettingZoo parallel env stepped with the joint actions of ``pool`` in turn,
    reset (unseeded, continuing its seeded stream) whenever ``env.agents`` is empty."""
    n = len(pool)
    steps = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(CHECK_CLOCK_EVERY):
            if not env.agents:
                env.reset()
            env.step(pool[steps % n])
            steps += 1
        now = time.perf_counter()
        if now >= deadline:
            return steps / (now - start)


def time_batched(
    sim: Any, requests: np.ndarray, reset: Callable[[], None], seconds: float
) -> float:
    """``step`` calls/s of a batched simulator fed the arrays of ``requests`` in turn, calling
    ``reset()`` whenever a step reports ``done`` (multiply by ``num_envs`` for env steps/s)."""
    n = len(requests)
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        if sim.step(requests[calls % n]).done:
            reset()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


# --- shared ----------------------------------------------------------------------------------


def interleave(
    contenders: dict[str, Callable[[float], float]],
    rounds: int,
    seconds: float,
    labels: dict[str, str],
) -> dict[str, list[float]]:
    """Each round runs every contender for ``seconds``, starting one later each round, so a slow
    spell of the machine is spread over the contenders rather than landing on one."""
    names = list(contenders)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            rate = contenders[name](seconds)
            rates[name].append(rate)
            _log(f"  round {r + 1}/{rounds}: {labels[name]:<32} {rate:>14,.0f} /s")
    return rates


def format_table(result: dict[str, Any]) -> str:
    """The headline numbers of a result as a small aligned table."""
    rows = [
        (key, value)
        for key, value in result.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"deepslicing bench {result['target']}"]
    for key, value in rows:
        text = f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"
        lines.append(f"  {key:<{width}}  {text:>16}")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_train(config: BenchConfig) -> dict[str, Any]:
    from deepslicing.bench.train import bench_train as run_train_bench

    return run_train_bench(config)


def bench_export(config: BenchConfig) -> dict[str, Any]:
    from deepslicing.bench.export import bench_export as run_export_bench

    return run_export_bench(config)


def bench_serve(config: BenchConfig) -> dict[str, Any]:
    from deepslicing.bench.serve import bench_serve as run_serve_bench

    return run_serve_bench(config)


def bench_ns3(config: BenchConfig) -> dict[str, Any]:
    from deepslicing.bench.ns3 import bench_ns3 as run_ns3_bench

    return run_ns3_bench(config)


TARGET_FUNCTIONS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "env": bench_env,
    "train": bench_train,
    "export": bench_export,
    "serve": bench_serve,
    "ns3": bench_ns3,
}

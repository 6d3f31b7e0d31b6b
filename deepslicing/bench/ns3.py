"""``deepslicing bench ns3``: the ns-3 env against a bare ns-3 run of the same traffic and rates.

One contender run is one whole episode of the default cell (3 slices, ``steady``, 200 intervals of
1 s) with requests drawn before timing from a numpy generator seeded with ``seed``; a contender
runs whole episodes until ``seconds`` have passed in a round (at least one), and the rounds are
interleaved as in :func:`deepslicing.bench.interleave`; medians over rounds are reported.

| contender | what runs                                                                               |
|-----------|-----------------------------------------------------------------------------------------|
| `env`     | ``envs.slicing_v0.parallel_env(backend="ns3")`` through the PettingZoo parallel API: ``reset(seed)`` then ``step({agent: action})`` to the end (coordination, observations, packet measurements, SLA verdicts) |
| `bare`    | the same ns-3 cell (same links, seeds, queue limits) given the same per-interval link rates and arrivals the env gave it, all intervals in one C++ loop (``dsns3::RunBare``): no env, no Ray, no Python per interval; the limit of ns-3 itself here |
| `fast`    | the same episode on ``parallel_env(backend="fast")``, the fast model                    |

JSON keys: ``env_intervals_per_s``, ``bare_intervals_per_s``, ``fast_intervals_per_s``
(intervals of one cell per second of wall time), ``env_packets_per_s``, ``bare_packets_per_s``
(packets sent by the sources per second of wall time; both runs send the same packets),
``ratio_vs_bare_ns3`` = env / bare intervals per second (goal >= 0.7), ``fast_speedup_vs_ns3``
= fast / env intervals per second, ``episode_seconds`` (wall time of one 200-interval ns-3
episode through the env, the median), ``packets_per_episode``, ``*_rounds`` and the settings.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import numpy as np

EPISODE_LENGTH = 200


def bench_ns3(config) -> dict[str, Any]:
    from deepslicing.bench import _log, interleave
    from envs import slicing_v0
    from ns3_gym.engine import require_ns3

    require_ns3()
    rng = np.random.default_rng(config.seed)
    env = slicing_v0.parallel_env(backend="ns3", episode_length=EPISODE_LENGTH)
    fast = slicing_v0.parallel_env(backend="fast", episode_length=EPISODE_LENGTH)
    agents = env.possible_agents
    requests = rng.random((EPISODE_LENGTH, len(agents), 1), dtype=np.float32)
    actions = [{a: requests[t, j] for j, a in enumerate(agents)} for t in range(EPISODE_LENGTH)]

    def episode(e) -> None:
        e.reset(seed=config.seed)
        for t in range(EPISODE_LENGTH):
            e.step(actions[t])

    # one recorded episode: the rates and arrivals the env hands ns-3, for the bare replay
    sim = env.sim
    env.reset(seed=config.seed)
    bps, amount, packets = [], [], 0.0
    for t in range(EPISODE_LENGTH):
        env.step(actions[t])
        bps.append(sim.last_rates[0])
        amount.append(sim.last_rates[1])
        packets += float(sim.kpis()["packets_sent"].sum())
    links = sim.links
    bps_all, amount_all = np.array(bps), np.array(amount)
    interval_s = sim.config.interval_s
    engine = sim.engine

    def bare_episode() -> None:
        engine.build(links)
        engine.run_bare(bps_all, amount_all, interval_s)

    def timed(run_one):
        def measure(seconds: float) -> float:
            began = time.perf_counter()
            episodes = 0
            while True:
                run_one()
                episodes += 1
                elapsed = time.perf_counter() - began
                if elapsed >= seconds:
                    return episodes * EPISODE_LENGTH / elapsed

        return measure

    contenders = {
        "env": timed(lambda: episode(env)),
        "bare": timed(bare_episode),
        "fast": timed(lambda: episode(fast)),
    }
    labels = {
        "env": "ns-3 env (parallel API)",
        "bare": "bare ns-3 (C++ loop)",
        "fast": "fast model env",
    }
    _log(f"bench ns3: {EPISODE_LENGTH}-interval episodes, {packets:,.0f} packets each")
    rates = interleave(contenders, config.rounds, config.seconds, labels)
    env.close()
    median = {name: statistics.median(values) for name, values in rates.items()}
    per_interval = packets / EPISODE_LENGTH
    return {
        "target": "ns3",
        "env_intervals_per_s": median["env"],
        "bare_intervals_per_s": median["bare"],
        "fast_intervals_per_s": median["fast"],
        "env_packets_per_s": median["env"] * per_interval,
        "bare_packets_per_s": median["bare"] * per_interval,
        "ratio_vs_bare_ns3": median["env"] / median["bare"],
        "fast_speedup_vs_ns3": median["fast"] / median["env"],
        "episode_seconds": EPISODE_LENGTH / median["env"],
        "packets_per_episode": packets,
        **{f"{name}_intervals_per_s_rounds": values for name, values in rates.items()},
        "episode_length": EPISODE_LENGTH,
        "seconds": config.seconds,
        "rounds": config.rounds,
        "seed": config.seed,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }

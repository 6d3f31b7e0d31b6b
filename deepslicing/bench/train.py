"""``deepslicing bench train``: training throughput of our MADDPG against RLlib's stock SAC and
against the bare maths of our learner, in one run.

All three use the default env (3 slices, steady traffic), actors and critics of the same hidden
sizes, the same train batch and the same update-to-data ratio (MADDPG's defaults: 256 rows,
0.25 gradient updates per env step). The unit is env steps per second of wall-clock time, sampling
and learning together, measured only after learning has started (warm-up excluded).

| contender    | what runs                                                                              |
|--------------|----------------------------------------------------------------------------------------|
| `maddpg`     | ``MADDPG.train()`` under RLlib on a local Ray (our env runner, replay and learner)     |
| `rllib_sac`  | RLlib's ``SAC`` on the same env as a multi-agent ``MultiAgentEnv`` (one policy per slice), ``training_intensity`` = batch x updates per step so it makes the same updates per env step |
| `bare_loop`  | our learner's ``update_from_replay`` (losses and optimizer steps) in a plain Python loop over a replay pre-filled with random transitions: no Ray, no env. Its updates/s divided by the update-to-data ratio is the env-step rate the maths alone would allow |

JSON keys: ``maddpg_env_steps_per_s``, ``rllib_sac_env_steps_per_s``,
``bare_loop_env_steps_per_s`` (medians over rounds), ``ratio_vs_rllib_sac`` = maddpg / SAC,
``ratio_vs_bare_loop`` = maddpg / bare loop, per-round lists, and the shared settings.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import numpy as np

SAC_LEARNING_STARTS = 256  # env steps; SAC's warm-up, kept short because SAC is slow here
MADDPG_LEARNING_STARTS = 1_600


def bench_train(config) -> dict[str, Any]:
    import ray
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    from deepslicing.bench import _log, interleave
    from deepslicing.ray_runtime import init_ray
    from policies.maddpg import MADDPGConfig

    settings = MADDPGConfig()
    hiddens = list(settings.actor_hiddens)
    batch = settings.train_batch_size_per_learner
    utd = settings.updates_per_step
    started_ray = init_ray(num_cpus=2)
    try:
        maddpg = (
            MADDPGConfig()
            .training(num_steps_sampled_before_learning_starts=MADDPG_LEARNING_STARTS)
            .debugging(seed=config.seed, log_level="ERROR")
            .build_algo()
        )
        sac = sac_config(hiddens, batch, utd, config.seed).build_algo()
        learner, replay = bare_learner(settings, config.seed)

        def sampled(result: dict) -> float:
            return result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME]

        def time_algo(algo, seconds: float) -> float:
            start = time.perf_counter()
            before = after = None
            while True:
                result = algo.train()
                after = sampled(result)
                if before is None:  # the first iteration's end is the clock's start
                    before, start = after, time.perf_counter()
                    continue
                if time.perf_counter() - start >= seconds:
                    return (after - before) / (time.perf_counter() - start)

        def time_bare(seconds: float) -> float:
            updates = 0
            chunk = 16
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                learner.update_from_replay(replay.sample(chunk, batch))
                updates += chunk
            return updates / (time.perf_counter() - start) / utd

        _log("bench train: warming up (until both algorithms have started learning)")
        while sampled(maddpg.train()) < MADDPG_LEARNING_STARTS + batch:
            pass
        while sampled(sac.train()) < SAC_LEARNING_STARTS + batch:
            pass
        time_bare(1.0)
        contenders = {
            "maddpg": lambda s: time_algo(maddpg, s),
            "rllib_sac": lambda s: time_algo(sac, s),
            "bare_loop": time_bare,
        }
        labels = {
            "maddpg": "our MADDPG (RLlib)",
            "rllib_sac": "RLlib SAC (multi-agent)",
            "bare_loop": "MADDPG learner, bare loop",
        }
        rates = interleave(contenders, config.rounds, config.train_seconds, labels)
        maddpg.stop()
        sac.stop()
    finally:
        if started_ray:
            ray.shutdown()
    ours = statistics.median(rates["maddpg"])
    sac_rate = statistics.median(rates["rllib_sac"])
    bare = statistics.median(rates["bare_loop"])
    result = {
        "target": "train",
        "maddpg_env_steps_per_s": ours,
        "rllib_sac_env_steps_per_s": sac_rate,
        "bare_loop_env_steps_per_s": bare,
        "ratio_vs_rllib_sac": ours / sac_rate,
        "ratio_vs_bare_loop": ours / bare,
        **{f"{name}_rounds": values for name, values in rates.items()},
        "hiddens": hiddens,
        "train_batch_size": batch,
        "updates_per_step": utd,
        "seconds": config.train_seconds,
        "rounds": config.rounds,
        "seed": config.seed,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    _log(
        f"bench train: maddpg {ours:,.1f}, rllib sac {sac_rate:,.2f}, bare loop {bare:,.1f} env "
        f"steps/s (ratio_vs_rllib_sac {result['ratio_vs_rllib_sac']:.1f}, ratio_vs_bare_loop "
        f"{result['ratio_vs_bare_loop']:.2f})"
    )
    return result


def sac_config(hiddens: list[int], batch: int, utd: float, seed: int):
    """RLlib's SAC, one policy per slice, making ``utd`` updates of ``batch`` rows per env step."""
    from ray.rllib.algorithms.sac import SACConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from envs.rllib_env import SlicingMultiAgentEnv
    from envs.slicing_v0 import parallel_env

    agents = parallel_env().possible_agents
    return (
        SACConfig()
        .environment(SlicingMultiAgentEnv, env_config={})
        .multi_agent(policies=set(agents), policy_mapping_fn=lambda agent_id, *a, **k: agent_id)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=hiddens))
        .training(
            train_batch_size_per_learner=batch,
            # replayed rows per sampled env step; with 1-step fragments: utd updates per env step
            training_intensity=batch * utd,
            num_steps_sampled_before_learning_starts=SAC_LEARNING_STARTS,
            replay_buffer_config={"type": "MultiAgentEpisodeReplayBuffer", "capacity": 100_000},
        )
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1, rollout_fragment_length=1)
        .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=64)
        .debugging(seed=seed, log_level="ERROR")
    )


def bare_learner(settings, seed: int):
    """Our MADDPG learner built outside Ray, and a replay filled with random joint transitions."""
    from deepslicing.model import NUM_FEATURES
    from policies.maddpg.env_runner import joint_spaces
    from policies.maddpg.replay import SynchronizedReplay

    num_slices, num_features = 3, NUM_FEATURES
    observation_space, action_space = joint_spaces(num_slices)
    learner = settings.build_learner(
        env=None, spaces={"default_policy": (observation_space, action_space)}
    )
    learner.build()
    rng = np.random.default_rng(seed)
    rows = 20_000
    replay = SynchronizedReplay(rows, num_slices, num_features, seed=seed)
    replay.add(
        {
            "obs": rng.random((rows, num_slices, num_features), dtype=np.float32),
            "actions": rng.random((rows, num_slices), dtype=np.float32),
            "rewards": rng.random((rows, num_slices), dtype=np.float32) / num_slices,
            "costs": (rng.random((rows, num_slices)) < 0.2).astype(np.float32),
            "next_obs": rng.random((rows, num_slices, num_features), dtype=np.float32),
            "dones": (rng.random(rows) < 1 / 200).astype(np.float32),
        }
    )
    return learner, replay

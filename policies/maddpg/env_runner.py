"""MADDPG's env runner: steps the batched slicing simulator with the actors, no episode objects.

RLlib's generic ``MultiAgentEnvRunner`` builds per-agent episode objects and runs connector
pipelines at every step, which costs far more than our whole simulator step. This runner instead
steps ``num_envs_per_env_runner`` cells of :class:`deepslicing.simulator.SlicingSimulator` as
``(num_envs, num_slices)`` arrays, asks the inference-only actor module for all cells' requests in
one forward pass, and returns joint transitions for the synchronized replay
(:mod:`policies.maddpg.replay`).

``sample()`` runs ``rollout_fragment_length`` intervals of every cell and returns a dict of numpy
arrays with ``num_envs x rollout_fragment_length`` rows. Exploration: Gaussian noise of standard
deviation ``exploration_noise`` (share units) on the actors' requests, clipped to [0, 1]; before
learning starts, uniform random requests. All cells' episodes run in lockstep (fixed length), and a
new batch of episodes starts, from seeds drawn from the runner's seeded generator, when they end.

Per finished episode it logs (names from :mod:`deepslicing.metrics`): the return (sum over
intervals of the cell utility), the mean utility, the SLA violation rate, each slice's
per-interval cost, and per step the ADMM residuals and capacity violations.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.env import INPUT_ENV_SPACES
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import (
    EPISODE_LEN_MEAN,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES,
    NUM_EPISODES_LIFETIME,
    WEIGHTS_SEQ_NO,
)

from deepslicing import metrics
from deepslicing.config import from_mapping
from deepslicing.coordinator import capacity_violations
from deepslicing.model import FEATURE_HIGH, NUM_FEATURES
from deepslicing.simulator import SlicingConfig, SlicingSimulator


def slicing_config(config) -> SlicingConfig:
    """The simulator config of a MADDPG config: ``env_config`` plus the variant's coordinator."""
    env_config = dict(config.env_config or {})
    env_config["coordinator"] = "admm" if config.variant in ("admm", "both") else "projection"
    env_config["admm_rho"] = config.admm_rho
    env_config["admm_iterations"] = config.admm_iterations
    return from_mapping(SlicingConfig, env_config)


def joint_spaces(num_slices: int) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation ``(S, 6)`` (each slice's own features) and action ``(S,)`` (requested shares)."""
    high = np.broadcast_to(FEATURE_HIGH, (num_slices, NUM_FEATURES)).astype(np.float32)
    observation = gym.spaces.Box(0.0, high, dtype=np.float32)
    action = gym.spaces.Box(0.0, 1.0, shape=(num_slices,), dtype=np.float32)
    return observation, action


class MADDPGEnvRunner(EnvRunner, Checkpointable):
    """Samples joint transitions from batched slicing cells with the inference-only actors."""

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        if self.config.torch_num_threads is not None:
            torch.set_num_threads(int(self.config.torch_num_threads))
        self.worker_index = kwargs.get("worker_index") or 0
        self.rng = np.random.default_rng(self._seed)
        self.num_envs = int(self.config.num_envs_per_env_runner)
        self.sim: SlicingSimulator | None = None
        self.module: RLModule | None = None
        self._weights_seq_no = 0
        self.make_env()
        self.make_module()
        self._obs: np.ndarray | None = None

    # -- construction ------------------------------------------------------------------------

    def make_env(self) -> None:
        self.sim = SlicingSimulator(slicing_config(self.config), num_envs=self.num_envs)
        self.slice_names = tuple(s.name for s in self.sim.specs)
        self._obs = None

    def make_module(self) -> None:
        spec = self.config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
        self.module = spec.build()
        self.module.eval()

    def get_spaces(self) -> dict[str, tuple[gym.Space, gym.Space]]:
        spaces = joint_spaces(self.sim.num_slices)
        return {INPUT_ENV_SPACES: spaces, DEFAULT_MODULE_ID: spaces}

    def assert_healthy(self) -> None:
        assert self.sim is not None and self.module is not None

    # -- sampling ----------------------------------------------------------------------------

    def sample(
        self,
        *,
        num_timesteps: int | None = None,
        explore: bool = True,
        random_actions: bool = False,
        **kwargs,
    ) -> dict[str, np.ndarray]:
        """Step every cell ``rollout_fragment_length`` intervals (or ``num_timesteps`` env steps
        in all, rounded up to whole intervals); returns joint transitions, one row per env step."""
        steps = (
            int(self.config.rollout_fragment_length)
            if num_timesteps is None
            else max(1, -(-int(num_timesteps) // self.num_envs))
        )
        if self._obs is None:
            self._start_episodes()
        rows: dict[str, list[np.ndarray]] = {k: [] for k in _COLUMNS}
        noise = float(self.config.exploration_noise) if explore else 0.0
        for _ in range(steps):
            obs = self._obs
            actions = self._requests(obs, noise, random_actions)
            out = self.sim.step(actions)
            done = out.done
            rows["obs"].append(obs)
            rows["actions"].append(actions)
            rows["rewards"].append(out.reward)
            rows["costs"].append(out.cost)
            rows["next_obs"].append(out.observation)
            rows["dones"].append(np.full(self.num_envs, float(done)))
            self._track(out)
            self._obs = out.observation
            if done:
                self._finish_episodes()
                self._start_episodes()
        num_steps = steps * self.num_envs
        self._log_steps(num_steps)
        return {
            k: np.concatenate(v, axis=0).astype(np.float32, copy=False) for k, v in rows.items()
        }

    def _requests(self, obs: np.ndarray, noise: float, random_actions: bool) -> np.ndarray:
        if random_actions:
            return self.rng.random((self.num_envs, self.sim.num_slices), dtype=np.float32)
        with torch.no_grad():
            requests = self.module.act(torch.from_numpy(obs)).numpy()
        if noise > 0:
            requests = requests + noise * self.rng.standard_normal(requests.shape, np.float32)
        return np.clip(requests, 0.0, 1.0)

    def _start_episodes(self) -> None:
        self._obs = self.sim.reset(int(self.rng.integers(2**63)))
        self._utility = np.zeros(self.num_envs)
        self._cost = np.zeros((self.num_envs, self.sim.num_slices))
        self._intervals = 0

    def _track(self, out) -> None:
        self._utility += out.reward.sum(axis=-1)
        self._cost += out.cost
        self._intervals += 1
        log = self.metrics.log_value
        log(metrics.ADMM_PRIMAL_RESIDUAL_MEAN, float(out.primal_residual.mean()), window=100)
        log(metrics.ADMM_DUAL_RESIDUAL_MEAN, float(out.dual_residual.mean()), window=100)
        log(metrics.CAPACITY_VIOLATIONS, int(capacity_violations(out.shares).sum()), reduce="sum")

    def _finish_episodes(self) -> None:
        window = int(self.config.metrics_num_episodes_for_smoothing)
        log = self.metrics.log_value
        returns = self._utility
        cost_rate = self._cost / self._intervals  # (num_envs, num_slices)
        for e in range(self.num_envs):
            log(metrics.EPISODE_RETURN_MEAN, float(returns[e]), window=window)
            log(metrics.UTILITY_MEAN, float(returns[e] / self._intervals), window=window)
            log(metrics.SLA_VIOLATION_RATE, float(cost_rate[e].mean()), window=window)
            log(EPISODE_LEN_MEAN, self._intervals, window=window)
        # this iteration's mean cost per slice, the input of the constraint callback's dual ascent
        for i, name in enumerate(self.slice_names):
            log((metrics.EPISODE_COST, name), float(cost_rate[:, i].mean()), window=self.num_envs)
        log(NUM_EPISODES, self.num_envs, reduce="sum")
        log(NUM_EPISODES_LIFETIME, self.num_envs, reduce="lifetime_sum")

    def _log_steps(self, num_steps: int) -> None:
        self.num_env_steps_sampled_lifetime += num_steps
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED, num_steps, reduce="sum")
        self.metrics.log_value(
            NUM_ENV_STEPS_SAMPLED_LIFETIME, num_steps, reduce="lifetime_sum", with_throughput=True
        )

    def get_metrics(self) -> dict[str, Any]:
        return self.metrics.reduce()

    # -- state -------------------------------------------------------------------------------

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state: dict[str, Any] = {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime
        }
        if self._check_component(COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = self.module.get_state()
            state[WEIGHTS_SEQ_NO] = self._weights_seq_no
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if COMPONENT_RL_MODULE in state:
            seq_no = state.get(WEIGHTS_SEQ_NO, 0)
            if seq_no == 0 or self._weights_seq_no < seq_no:
                module_state = state[COMPONENT_RL_MODULE]
                if not isinstance(module_state, dict):  # an ObjectRef from a remote sync
                    import ray

                    module_state = ray.get(module_state)
                module_state = module_state.get(DEFAULT_MODULE_ID, module_state)
                self.module.set_state(module_state)
            if seq_no > 0:
                self._weights_seq_no = seq_no
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]

    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config}

    def get_checkpointable_components(self):
        return [(COMPONENT_RL_MODULE, self.module)]

    def stop(self) -> None:
        self.sim = None


_COLUMNS = ("obs", "actions", "rewards", "costs", "next_obs", "dones")

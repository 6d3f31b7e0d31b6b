"""RLlib adapter: slicing_v0 as an RLlib ``MultiAgentEnv`` (new API stack).

Same agents, spaces, rewards and infos as :mod:`envs.slicing_v0`; RLlib's ``"__all__"`` keys are
added to terminations and truncations. ``env_config`` takes the
:class:`deepslicing.simulator.SlicingConfig` fields. Register with
``tune.register_env("slicing_v0", SlicingMultiAgentEnv)`` or pass the class as ``env``.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.env.multi_agent_env import MultiAgentEnv

from envs.slicing_v0 import parallel_env


class SlicingMultiAgentEnv(MultiAgentEnv):
    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.env = parallel_env(**dict(config or {}))
        self.possible_agents = list(self.env.possible_agents)
        self.agents = list(self.possible_agents)
        self.observation_spaces = {a: self.env.observation_space(a) for a in self.possible_agents}
        self.action_spaces = {a: self.env.action_space(a) for a in self.possible_agents}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        observations, infos = self.env.reset(seed=seed, options=options)
        self.agents = list(self.env.agents)
        return observations, infos

    def step(self, action_dict: dict[str, Any]):
        observations, rewards, terminations, truncations, infos = self.env.step(action_dict)
        self.agents = list(self.env.agents)
        terminations["__all__"] = all(terminations.values())
        truncations["__all__"] = all(truncations.values())
        return observations, rewards, terminations, truncations, infos

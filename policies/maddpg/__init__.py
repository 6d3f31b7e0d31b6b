"""MADDPG on RLlib's new API stack: config, algorithm, learner, RL module, env runner, and a loader
that turns a checkpoint into an allocation policy (see :mod:`policies.maddpg.maddpg`)."""

from policies.maddpg.maddpg import MADDPG, VARIANTS, MADDPGConfig
from policies.maddpg.policy import load_actor_policy

__all__ = ["MADDPG", "VARIANTS", "MADDPGConfig", "load_actor_policy"]

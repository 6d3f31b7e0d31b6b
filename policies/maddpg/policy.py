"""Turn a MADDPG checkpoint into an allocation policy: observations -> requested shares.

The policy has the shape :mod:`deepslicing.evaluation` and :mod:`deepslicing.baselines` use:
``policy(obs)`` maps observations ``(num_envs, num_slices, 6)`` to requested shares
``(num_envs, num_slices)`` in [0, 1] (float64), deterministically (no exploration noise). Only the
actors are loaded (an inference-only module), so no critic weights are kept in memory. No Ray
needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.rl_module import RLModule

MODULE_ID = "default_policy"


def module_dir(checkpoint_path: str | Path) -> Path:
    """Where an algorithm checkpoint keeps the trained (learner) module."""
    return (
        Path(checkpoint_path).resolve()  # RLlib reads relative paths as URIs and fails
        / COMPONENT_LEARNER_GROUP
        / COMPONENT_LEARNER
        / COMPONENT_RL_MODULE
        / MODULE_ID
    )


def is_checkpoint(path: str | Path) -> bool:
    return module_dir(path).is_dir()


def load_actor_module(checkpoint_path: str | Path) -> RLModule:
    """The inference-only (actors only) module of an algorithm checkpoint."""
    directory = module_dir(checkpoint_path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"policy: {str(checkpoint_path)!r} is not a MADDPG checkpoint (no {directory})"
        )
    full = RLModule.from_checkpoint(directory)
    actors = type(full)(
        observation_space=full.observation_space,
        action_space=full.action_space,
        inference_only=True,
        model_config=full.model_config,
    )
    actors.set_state(full.get_state(inference_only=True))
    actors.eval()
    return actors


def load_actor_policy(checkpoint_path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A deterministic policy ``obs (E, S, 6) -> requested shares (E, S)`` from a checkpoint."""
    module = load_actor_module(checkpoint_path)
    expected = tuple(module.observation_space.shape)

    def policy(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.shape[1:] != expected:
            raise ValueError(
                f"observation: the policy was trained on {expected[0]} slices of "
                f"{expected[1]} features, got shape {obs.shape}"
            )
        with torch.no_grad():
            return module.act(torch.from_numpy(obs)).numpy().astype(np.float64)

    return policy

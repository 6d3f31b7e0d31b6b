"""Turn a MADDPG checkpoint into an allocation policy: observations -> requested shares.

The policy has the shape :mod:`deepslicing.evaluation` and :mod:`deepslicing.baselines` use:
``policy(obs)`` maps observations ``(num_envs, num_slices, 14)`` to requested shares
``(num_envs, num_slices)`` in [0, 1] (float64), deterministically (no exploration noise). Only the
actors are loaded (an inference-only module), so no critic weights are kept in memory. No Ray
needed.

Actors are shared by slice kind and read only their own slice, so a checkpoint trained on one
slice mix runs on any other (1..20 slices) whose kinds it has seen trained: pass the cell's
``kinds``. A kind the checkpoint never trained is refused before anything runs
(:class:`PolicyMismatchError`, one line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.rl_module import RLModule

from deepslicing.model import NUM_FEATURES
from policies.maddpg.env_runner import joint_spaces

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


class PolicyMismatchError(ValueError):
    """A checkpoint that cannot drive the given cell (a slice kind it never trained, an old
    observation layout); the message says what and what to do."""


def load_actor_module(checkpoint_path: str | Path, kinds: Sequence[str] | None = None) -> RLModule:
    """The inference-only (actors only) module of an algorithm checkpoint, for slices of
    ``kinds`` (default: the slices it trained on)."""
    directory = module_dir(checkpoint_path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"policy: {str(checkpoint_path)!r} is not a MADDPG checkpoint (no {directory})"
        )
    full = RLModule.from_checkpoint(directory)
    trained = list(full.model_config.get("slice_kinds") or [])
    num_features = full.observation_space.shape[-1]
    if not trained or num_features != NUM_FEATURES:
        raise PolicyMismatchError(
            f"policy: {str(checkpoint_path)!r} is from an older deepslicing ({num_features} "
            f"features per slice, no kind-shared actors); train it again"
        )
    kinds = list(trained if kinds is None else kinds)
    unseen = sorted(set(kinds) - set(trained))
    if unseen:
        raise PolicyMismatchError(
            f"policy: {str(checkpoint_path)!r} trained actors for {sorted(set(trained))} only; "
            f"this cell also has {unseen} slices"
        )
    observation_space, action_space = joint_spaces(len(kinds))
    actors = type(full)(
        observation_space=observation_space,
        action_space=action_space,
        inference_only=True,
        model_config={**full.model_config, "slice_kinds": kinds},
    )
    actors.set_state(full.get_state(inference_only=True))
    actors.eval()
    return actors


def load_actor_policy(
    checkpoint_path: str | Path, kinds: Sequence[str] | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A deterministic policy ``obs (E, S, 14) -> requested shares (E, S)`` from a checkpoint,
    for slices of ``kinds`` (default: the slices it trained on)."""
    module = load_actor_module(checkpoint_path, kinds)
    expected = tuple(module.observation_space.shape)

    def policy(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.shape[1:] != expected:
            raise ValueError(
                f"observation: the policy runs {expected[0]} slices of {expected[1]} features, "
                f"got shape {obs.shape}"
            )
        with torch.no_grad():
            return module.act(torch.from_numpy(obs)).numpy().astype(np.float64)

    return policy

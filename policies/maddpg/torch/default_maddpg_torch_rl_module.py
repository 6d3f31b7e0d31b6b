"""MADDPG networks as one RLlib ``TorchRLModule``: per-slice actors, per-slice centralised critics.

Spaces (``S`` slices, ``F`` = 6 features, see :mod:`deepslicing.model`):

- observation ``Box(0, high, (S, F))``: every slice's own feature vector, stacked;
- action ``Box(0, 1, (S,))``: every slice's requested share.

Networks, each a stack of small MLPs evaluated for all slices at once (one batched matmul per
layer, :class:`StackedMLP`), so the cost of a forward pass hardly grows with ``S``:

- ``actor``: mu_i(o_i) = sigmoid(MLP_i(o_i)), slice i's request from its OWN observation only
  (decentralised execution). With ``actor_groups`` slices of the same kind share one MLP.
- ``critic`` (learner only): Q_i(o_1..o_S, a_1..a_S), one MLP per slice over all observations and
  all actions (centralised training; Lowe et al. 2017, arXiv:1706.02275, section 4.1).
- ``target_actor``, ``target_critic`` (learner only): Polyak-averaged copies.

Observations are standardised per slice and feature, (o - shift) * scale, with statistics the
learner sets once from the warm-up data (``set_obs_normalizer``); they are buffers of the module,
so they travel with the actor weights.

The inference-only module (``inference_only=True``: env runners, export, serving) is built without
the critic and target networks, so it holds actor weights only.

``model_config`` keys: ``actor_hiddens`` (default (64, 64)), ``critic_hiddens`` (default
(128, 128)), ``actor_groups`` (per slice, the index of its actor's parameter set; default one set
per slice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

DEFAULT_ACTOR_HIDDENS = (64, 64)
DEFAULT_CRITIC_HIDDENS = (128, 128)
MIN_OBS_STD = 0.01  # floor of the standardisation's std, in feature units
CRITIC_ONLY = ("critic", "target_critic", "target_actor")


class StackedMLP(nn.Module):
    """``len(groups)`` ReLU MLPs applied side by side: input ``(A, N, in)`` -> ``(A, N, out)``.

    Agent ``a`` uses parameter set ``groups[a]``; agents with the same group share weights (their
    gradients add up). Weights are ``(G, in, out)`` tensors, so a layer is one ``baddbmm`` for all
    agents instead of a Python loop over them.
    """

    def __init__(self, sizes: Sequence[int], groups: Sequence[int]):
        super().__init__()
        groups = [int(g) for g in groups]
        num_groups = max(groups) + 1
        if sorted(set(groups)) != list(range(num_groups)):
            raise ValueError(f"actor_groups: must number groups 0..G-1 without gaps, got {groups}")
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter(torch.empty(num_groups, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(num_groups, 1, fan_out)))
            nn.init.uniform_(self.weights[-1], -bound, bound)
            nn.init.uniform_(self.biases[-1], -bound, bound)
        self.shared = num_groups < len(groups)
        self.register_buffer("groups", torch.tensor(groups, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """``frozen``: use detached weights, so gradients reach the input but not the weights."""
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if self.shared:
                w, b = w[self.groups], b[self.groups]
            if frozen:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)
            if k < last:
                x = torch.relu(x)
        return x


class MADDPGTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Decentralised deterministic actors and centralised critics for ``S`` slices."""

    def setup(self) -> None:
        num_slices, num_features = self.observation_space.shape
        config = self.model_config or {}
        actor_hiddens = tuple(config.get("actor_hiddens") or DEFAULT_ACTOR_HIDDENS)
        critic_hiddens = tuple(config.get("critic_hiddens") or DEFAULT_CRITIC_HIDDENS)
        actor_groups = config.get("actor_groups") or list(range(num_slices))
        if len(actor_groups) != num_slices:
            raise ValueError(
                f"actor_groups: needs one group per slice ({num_slices}), got {actor_groups}"
            )
        self.num_slices = num_slices
        # observation standardisation (x - shift) * scale, set once from the warm-up data and
        # saved with the weights, so actors on env runners and in exports normalise the same way
        self.register_buffer("obs_shift", torch.zeros(num_slices, num_features))
        self.register_buffer("obs_scale", torch.ones(num_slices, num_features))
        self.actor = StackedMLP((num_features, *actor_hiddens, 1), actor_groups)
        if not self.inference_only:
            critic_in = num_slices * num_features + num_slices
            self.critic = StackedMLP((critic_in, *critic_hiddens, 1), range(num_slices))
            # slice i's critic sees slice i's action replaced by its actor's (actor loss)
            self.register_buffer(
                "own", torch.eye(num_slices, dtype=torch.bool)[:, None, :], persistent=False
            )

    def make_target_networks(self) -> None:
        self.target_actor = make_target_network(self.actor)
        self.target_critic = make_target_network(self.critic)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self.target_actor), (self.critic, self.target_critic)]

    def forward_target(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Target actor's actions and target critics' values at ``batch["obs"]``."""
        obs = batch[Columns.OBS]
        actions = self.act(obs, target=True)
        return {Columns.ACTIONS: actions, "q_target": self.q_values(obs, actions, target=True)}

    def get_non_inference_attributes(self) -> list[str]:
        return list(CRITIC_ONLY)

    def set_obs_normalizer(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise observations with these per-slice, per-feature statistics ``(S, F)``."""
        self.obs_shift.copy_(mean)
        self.obs_scale.copy_(1.0 / std.clamp(min=MIN_OBS_STD))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_shift) * self.obs_scale

    def act(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Requested shares ``(N, S)`` in [0, 1] from observations ``(N, S, F)``."""
        net = self.target_actor if target else self.actor
        return torch.sigmoid(net(self.normalize(obs).transpose(0, 1))).squeeze(-1).T

    def q_values(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        target: bool = False,
        frozen: bool = False,
    ) -> torch.Tensor:
        """Q_i for every slice, ``(N, S)``.

        ``actions`` is ``(N, S)`` (the same joint action for every critic) or ``(S, N, S)``
        (critic i judges ``actions[i]``).
        """
        n = obs.shape[0]
        flat_obs = self.normalize(obs).reshape(n, -1).expand(self.num_slices, n, -1)
        if actions.dim() == 2:
            actions = actions.expand(self.num_slices, n, self.num_slices)
        net = self.target_critic if target else self.critic
        return net(torch.cat((flat_obs, actions), dim=-1), frozen=frozen).squeeze(-1).T

    def actions_with_own(self, replay_actions: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """``(S, N, S)``: for critic i, the replayed joint action with a_i replaced by ``own[:, i]``."""
        return torch.where(self.own, own.unsqueeze(0), replay_actions.unsqueeze(0))

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.act(batch[Columns.OBS])}

"""MADDPG networks as one RLlib ``TorchRLModule``: actors shared by slice kind, one critic that is
invariant to the number and order of slices.

Spaces (``S`` slices, ``F`` = 14 features, see :mod:`deepslicing.model`):

- observation ``Box(0, high, (S, F))``: every slice's own feature vector, stacked;
- action ``Box(0, 1, (S,))``: every slice's requested share.

No weight depends on ``S``: one module's state loads into a module built for any number of slices
of known kinds (``model_config["slice_kinds"]``), which is how a policy trained on 3 slices runs
on 1..20 in evaluation, export and serving.

**Actor inputs** (:func:`actor_inputs`, ``K`` = 12 per slice, scale-free so that a slice with a
tenth of the cell reads like one with half of it): with f = max(need_forecast, 1e-3),
log(need / f), log(previous_need / f), forecast_error / f, log(allocated / f), satisfaction,
demand_ratio, spectral_efficiency, time_sin, time_cos, min(5, capacity_price x f) (above 1: the
coordinator would not serve a request of f in full), demand_level and channel_level. Standardised
per kind, (x - shift) * scale, with statistics the learner fits once from the warm-up data; they are
buffers, so they travel with the actor weights. For ablations, ``model_config["drop_inputs"]``
names groups of :data:`INPUT_GROUPS` whose scale is held at 0, so the actor sees a constant 0
there (the network is unchanged, exports too).

**Actor** (decentralised; one MLP per kind in :data:`deepslicing.slices.KINDS`, shared by every
slice of that kind): a multiplicative correction of the slice's own forecast,
``request = min(1, f x exp(HEADROOM_LOG_RANGE x tanh(MLP_kind(input))))``, so an untrained actor
requests about its forecast and training learns the headroom (down to f / 2, up to 2 f) that the
utility and the SLA multipliers reward, per kind and per situation (forecast error, overload, time).

**Critic** (learner only), deep sets over slices (Zaheer et al. 2017, arXiv:1703.06114), the
permutation-invariant form of MADDPG's centralised critic: per slice j, e_j = phi([x_j, log(a_j / f_j),
a_j, f_j, onehot(kind_j)]) with x_j the standardised actor input and a_j the action; the cell
summary is mean_j e_j with the totals sum_j a_j and sum_j f_j (whether the cell is overloaded);
Q_i = psi([e_i, mean_j e_j, sum_j a_j, sum_j f_j]). phi and psi are MLPs shared by all slices.
Target copies of actors and critic are Polyak-averaged by the learner.

The inference-only module (``inference_only=True``: env runners, export, serving) is built without
the critic and target networks, so it holds actor weights only.

``model_config`` keys: ``actor_hiddens`` (default (64, 64)), ``critic_hiddens`` (default
(128, 128)), ``slice_kinds`` (the kind of each slice; default the kinds cycling embb, urllc, mmtc),
``drop_inputs`` (default none).
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
from ray.util import log_once
from torch import nn

from deepslicing.model import FEATURES
from deepslicing.slices import KINDS

DEFAULT_ACTOR_HIDDENS = (64, 64)
DEFAULT_CRITIC_HIDDENS = (128, 128)
MIN_INPUT_STD = 0.01  # floor of the standardisation's std
MIN_FORECAST = 1e-3  # share; keeps the scale-free inputs finite for a slice that needs nothing
HEADROOM_LOG_RANGE = math.log(2.0)  # the actor's request is within [f / 2, 2 f]
CRITIC_ONLY = ("critic", "target_critic", "target_actor")
NUM_ACTOR_INPUTS = 12
# columns of actor_inputs that come from one source, for ablations (drop_inputs)
INPUT_GROUPS = {"history": (1, 2), "time": (7, 8), "price": (9,), "levels": (10, 11)}
_F = {name: i for i, name in enumerate(FEATURES)}

# Every module here is built with keyword arguments (observation_space=, action_space=,
# inference_only=, model_config=), the new signature. RLlib 2.60's own RLModule.__init__ still
# builds the deprecated RLModuleConfig for old subclasses (rl_module.py, "TODO (sven): Deprecate
# this"), and that warns "RLModule(config=[RLModuleConfig object]) has been deprecated" once per
# process; it does not concern our constructor, so this module takes that one-time warning slot.
log_once("RLModule(config=[RLModuleConfig object])")


def actor_inputs(obs: torch.Tensor) -> torch.Tensor:
    """Scale-free actor inputs ``(..., S, 14)`` from raw observations ``(..., S, 14)``."""
    f = obs[..., _F["need_forecast"]].clamp(min=MIN_FORECAST)

    def log_ratio(name: str) -> torch.Tensor:
        return torch.log((obs[..., _F[name]] + MIN_FORECAST) / f).clamp(-5.0, 5.0)

    return torch.stack(
        (
            log_ratio("needed_share"),
            log_ratio("previous_need"),
            (obs[..., _F["forecast_error"]] / f).clamp(max=5.0),
            log_ratio("allocated_share"),
            obs[..., _F["satisfaction"]],
            obs[..., _F["demand_ratio"]],
            obs[..., _F["spectral_efficiency"]],
            obs[..., _F["time_sin"]],
            obs[..., _F["time_cos"]],
            (obs[..., _F["capacity_price"]] * f).clamp(max=5.0),
            obs[..., _F["demand_level"]],
            obs[..., _F["channel_level"]],
        ),
        dim=-1,
    )


def forecast_share(obs: torch.Tensor) -> torch.Tensor:
    """The slice's own forecast of its next needed share, ``(..., S)``, at least 1e-3."""
    return obs[..., _F["need_forecast"]].clamp(min=MIN_FORECAST)


def dropped_columns(groups: Sequence[str]) -> list[int]:
    """Actor input columns of the named :data:`INPUT_GROUPS`."""
    unknown = [g for g in groups if g not in INPUT_GROUPS]
    if unknown:
        raise ValueError(f"drop_inputs: must be among {tuple(INPUT_GROUPS)}, got {unknown}")
    return sorted(c for g in groups for c in INPUT_GROUPS[g])


def kind_indices(kinds: Sequence[str]) -> list[int]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"slice_kinds: must be among {KINDS}, got {unknown}")
    return [KINDS.index(k) for k in kinds]


class StackedMLP(nn.Module):
    """``num_groups`` ReLU MLPs applied side by side: input ``(A, N, in)`` -> ``(A, N, out)``.

    Agent ``a`` uses parameter set ``groups[a]``; agents of the same group share weights (their
    gradients add up). Weights are ``(G, in, out)`` tensors, so a layer is one ``baddbmm`` for all
    agents instead of a Python loop over them, and no weight depends on the number of agents.
    """

    def __init__(self, sizes: Sequence[int], num_groups: int, groups: Sequence[int]):
        super().__init__()
        groups = [int(g) for g in groups]
        if any(not 0 <= g < num_groups for g in groups):
            raise ValueError(f"groups: must be in 0..{num_groups - 1}, got {groups}")
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter(torch.empty(num_groups, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(num_groups, 1, fan_out)))
            nn.init.uniform_(self.weights[-1], -bound, bound)
            nn.init.uniform_(self.biases[-1], -bound, bound)
        self.register_buffer("groups", torch.tensor(groups, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b[self.groups], x, w[self.groups])
            if k < last:
                x = torch.relu(x)
        return x


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SetCritic(nn.Module):
    """Q_i for every slice from every slice's input and action, invariant to their number and
    order (see the module docstring)."""

    def __init__(self, hiddens: Sequence[int]):
        super().__init__()
        slice_in = NUM_ACTOR_INPUTS + 3 + len(KINDS)
        width = hiddens[-1]
        self.phi = mlp((slice_in, *hiddens))
        self.psi = mlp((2 * width + 2, *hiddens, 1))

    def forward(
        self,
        inputs: torch.Tensor,
        actions: torch.Tensor,
        forecast: torch.Tensor,
        kinds: torch.Tensor,
    ) -> torch.Tensor:
        """``inputs (N, S, K)`` standardised, ``actions``/``forecast`` ``(N, S)``, ``kinds``
        one-hot ``(S, len(KINDS))`` -> ``(N, S)``."""
        ratio = torch.log((actions + MIN_FORECAST) / forecast).clamp(-5.0, 5.0)
        per_slice = torch.cat(
            (
                inputs,
                ratio.unsqueeze(-1),
                actions.unsqueeze(-1),
                forecast.unsqueeze(-1),
                kinds.expand(*actions.shape, -1),
            ),
            dim=-1,
        )
        e = torch.relu(self.phi(per_slice))
        totals = torch.stack((actions.sum(-1), forecast.sum(-1)), dim=-1)
        cell = torch.cat((e.mean(dim=-2), totals), dim=-1)
        joint = torch.cat((e, cell.unsqueeze(-2).expand(*e.shape[:-1], -1)), dim=-1)
        return self.psi(joint).squeeze(-1)


class MADDPGTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Kind-shared decentralised deterministic actors and a slice-set critic for ``S`` slices."""

    def setup(self) -> None:
        num_slices, _ = self.observation_space.shape
        config = self.model_config or {}
        actor_hiddens = tuple(config.get("actor_hiddens") or DEFAULT_ACTOR_HIDDENS)
        critic_hiddens = tuple(config.get("critic_hiddens") or DEFAULT_CRITIC_HIDDENS)
        slice_kinds = list(
            config.get("slice_kinds") or [KINDS[i % len(KINDS)] for i in range(num_slices)]
        )
        if len(slice_kinds) != num_slices:
            raise ValueError(
                f"slice_kinds: needs one kind per slice ({num_slices}), got {slice_kinds}"
            )
        kind = torch.tensor(kind_indices(slice_kinds), dtype=torch.long)
        self.num_slices = num_slices
        self.slice_kinds = tuple(slice_kinds)
        self.register_buffer("kind", kind, persistent=False)
        self.register_buffer("kind_onehot", nn.functional.one_hot(kind, len(KINDS)).float(), False)
        # standardisation of the actor inputs per kind, fitted once from the warm-up data and
        # saved with the weights, so actors on env runners and in exports normalise the same way
        self.register_buffer("input_shift", torch.zeros(len(KINDS), NUM_ACTOR_INPUTS))
        self.register_buffer("input_scale", torch.ones(len(KINDS), NUM_ACTOR_INPUTS))
        self.dropped = dropped_columns(config.get("drop_inputs") or ())
        self.input_scale[:, self.dropped] = 0.0
        self.actor = StackedMLP((NUM_ACTOR_INPUTS, *actor_hiddens, 1), len(KINDS), kind.tolist())
        if not self.inference_only:
            self.critic = SetCritic(critic_hiddens)

    def make_target_networks(self) -> None:
        self.target_actor = make_target_network(self.actor)
        self.target_critic = make_target_network(self.critic)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self.target_actor), (self.critic, self.target_critic)]

    def forward_target(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Target actor's actions and target critic's values at ``batch["obs"]``."""
        obs = batch[Columns.OBS]
        actions = self.act(obs, target=True)
        return {Columns.ACTIONS: actions, "q_target": self.q_values(obs, actions, target=True)}

    def get_non_inference_attributes(self) -> list[str]:
        return list(CRITIC_ONLY)

    def fit_normalizer(self, obs: torch.Tensor) -> None:
        """Standardise the actor inputs per kind with statistics of raw observations ``(N, S, F)``
        of this module's slices; kinds absent from ``obs`` keep (0, 1)."""
        inputs = actor_inputs(obs)
        for k in range(len(KINDS)):
            mine = inputs[:, self.kind == k].reshape(-1, NUM_ACTOR_INPUTS)
            if len(mine) > 1:
                self.input_shift[k] = mine.mean(dim=0)
                self.input_scale[k] = 1.0 / mine.std(dim=0).clamp(min=MIN_INPUT_STD)
        self.input_scale[:, self.dropped] = 0.0

    def normalized_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """Standardised actor inputs ``(N, S, K)``."""
        return (actor_inputs(obs) - self.input_shift[self.kind]) * self.input_scale[self.kind]

    def act(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Requested shares ``(N, S)`` in [0, 1] from observations ``(N, S, F)``."""
        net = self.target_actor if target else self.actor
        correction = torch.tanh(net(self.normalized_inputs(obs).transpose(0, 1))).squeeze(-1).T
        return (forecast_share(obs) * torch.exp(HEADROOM_LOG_RANGE * correction)).clamp(max=1.0)

    def q_values(
        self, obs: torch.Tensor, actions: torch.Tensor, target: bool = False
    ) -> torch.Tensor:
        """Q_i for every slice, ``(N, S)``.

        ``actions`` is ``(N, S)`` (one joint action for every Q_i) or ``(S, N, S)`` (Q_i judges
        ``actions[i]``).
        """
        net = self.target_critic if target else self.critic
        inputs, forecast = self.normalized_inputs(obs), forecast_share(obs)
        if actions.dim() == 2:
            return net(inputs, actions, forecast, self.kind_onehot)
        s = self.num_slices
        q = net(
            inputs.expand(s, *inputs.shape), actions, forecast.expand(s, -1, -1), self.kind_onehot
        )
        return torch.diagonal(q, dim1=0, dim2=2)  # (N, S): Q_i under actions[i]

    def actions_with_own(self, replay_actions: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """``(S, N, S)``: for Q_i, the replayed joint action with a_i replaced by ``own[:, i]``."""
        eye = torch.eye(self.num_slices, dtype=torch.bool, device=own.device)[:, None, :]
        return torch.where(eye, own.unsqueeze(0), replay_actions.unsqueeze(0))

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.act(batch[Columns.OBS])}

"""MADDPG losses and the torch ``Learner`` that applies them to replayed, time-aligned batches.

For slice i with actor mu_i, critic Q_i, their targets mu_i' and Q_i', Lagrange multiplier lambda_i
and a replayed transition (o, a, r, c, o', done) of ALL slices (Lowe et al. 2017, "Multi-Agent
Actor-Critic for Mixed Cooperative-Competitive Environments", arXiv:1706.02275, eqs. 5-6):

    y_i          = r_i - lambda_i c_i + gamma (1 - done) Q_i'(o', mu_1'(o_1'), ..., mu_S'(o_S'))
    critic loss  = sum_i mean_batch (Q_i(o, a) - y_i)^2
    critic term  = -sum_i mean_batch Q_i(o, a_1, ..., mu_i(o_i), ..., a_S)        (per slice)
            or     -sum_i mean_batch Q_i(o, mu_1(o_1), ..., mu_S(o_S))          (cooperative)
    known term   = -sum_i mean_batch [R_i(mu_i(o_i), N_i') - lambda_i C_i(mu_i(o_i), N_i')]
    actor loss   = (1 - beta) critic term + beta known term
                   + request_penalty mean_batch max(0, sum_i mu_i(o_i) - 1)

The known term (``beta`` = ``known_reward_weight``) uses what the model already knows: slice i's
reward is R_i(x, N) = u_i min(1, x / N) - waste max(0, x - N) of its share x and the need N its
interval turned out to have, which the replay holds (the ``needed_share`` of o'); the SLA cost is
C_i = 1{x < N}, smoothed to sigmoid((N - x) / (0.05 N)) so that it has a gradient. Its gradient
is exact where the critic's is an estimate; what it leaves out is coupling, the coordinator
cutting requests that together exceed the cell, which the critic term and the request penalty
cover. Because the traffic is exogenous, every replayed need is a sample of the need that
follows o, so maximising the known term is the newsvendor problem per slice: request the
quantile of the need at which the marginal utility u_i / N_i of serving more (plus the
multiplier's weight on the SLA) equals the waste weight of giving too much.

Per slice (``cooperative=False``) is the paper's actor loss: each actor climbs its own critic, so
each slice maximises its own reward, a game over the shared capacity in which a slice gains by
taking share from the others through the coordinator. Cooperative (``cooperative=True``, the
default) suits slicing, where the operator wants the cell's utility, the sum of the slices'
rewards: every actor climbs the SUM of the critics at the actors' joint action, so actor i's
gradient counts what its request costs the other slices (sum_j dQ_j / da_i). The critics keep
their per-slice targets (lower variance than one summed target).

The request penalty: the coordinator's projection onto {sum z <= 1} cuts requests by a common
amount once they exceed the cell, so raising every request alike changes no allocation and no
reward. Without a pull back, the actors drift into requesting far more than the cell and lose the
ability to leave share unused when the slices need less than the cell (over-provisioning costs
utility). The penalty prices requests beyond the cell, at the waste weight by default.

With ``gamma`` 0 the next-state term is dropped and the target networks are not evaluated: the
traffic is exogenous, so an allocation only scores its own interval, and a per-interval critic
is the easiest to learn.

Costs are stored raw in the replay and the multipliers applied here, at learning time, so a batch
always uses the current multipliers. ``done`` is 1 on the last interval of an episode; the
observation carries the episode progress, so that interval is terminal and is not bootstrapped.

Both losses are one backward pass: the actor loss reads the critic with its weights frozen
(``requires_grad`` off while that forward runs), so its gradient reaches only the actors, and the
critic loss only the critic. All slices are
updated by the same batched tensor ops (no Python loop over slices). After each step the targets
move by Polyak averaging, theta' <- tau theta + (1 - tau) theta'.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    NUM_ENV_STEPS_TRAINED,
    NUM_ENV_STEPS_TRAINED_LIFETIME,
)

from deepslicing import metrics
from deepslicing.model import FEATURES, SliceArrays
from policies.maddpg.env_runner import slicing_config
from policies.maddpg.torch.default_maddpg_torch_rl_module import MADDPGTorchRLModule

MULTIPLIERS_STATE = "multipliers"
NEEDED = FEATURES.index("needed_share")
COST_SMOOTHING = 0.05  # width of the smoothed SLA cost, as a fraction of the need
MIN_COST_WIDTH = 1e-4  # share; keeps the width positive for a slice that needs nothing
_TINY = 1e-12  # as deepslicing.model.satisfaction: 0 / 0 is satisfied
BATCH_KEYS = ("obs", "actions", "rewards", "costs", "next_obs", "dones")


def maddpg_losses(
    module: MADDPGTorchRLModule,
    batch: Mapping[str, torch.Tensor],
    multipliers: torch.Tensor,
    gamma: float,
    *,
    cooperative: bool = False,
    request_penalty: float = 0.0,
    known: KnownReward | None = None,
    known_reward_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Critic loss, actor loss and the mean Q(o, a) of one batch (see the module docstring)."""
    obs, actions = batch["obs"], batch["actions"]
    with torch.no_grad():
        y = batch["rewards"] - multipliers * batch["costs"]
        if gamma:
            next_q = module.q_values(
                batch["next_obs"], module.act(batch["next_obs"], target=True), target=True
            )
            y = y + gamma * (1.0 - batch["dones"]).unsqueeze(-1) * next_q
    q = module.q_values(obs, actions)
    critic_loss = (q - y).square().mean(dim=0).sum()
    own = module.act(obs)
    actor_loss = torch.zeros((), device=obs.device)
    if known_reward_weight < 1.0:
        with frozen(module.critic):
            if cooperative:  # every actor climbs the sum of all critics at the actors' joint action
                q_own = module.q_values(obs, own)
            else:
                q_own = module.q_values(obs, module.actions_with_own(actions, own))
        actor_loss = -(1.0 - known_reward_weight) * q_own.mean(dim=0).sum()
    if known_reward_weight > 0.0:
        need = batch["next_obs"][..., NEEDED]  # the need of the interval the request was for
        priced = known.priced_reward(own, need, multipliers)
        actor_loss = actor_loss - known_reward_weight * priced.mean(dim=0).sum()
    if request_penalty:  # requests beyond the cell change no allocation: price them
        actor_loss = actor_loss + request_penalty * (own.sum(dim=-1) - 1.0).clamp(min=0.0).mean()
    return critic_loss, actor_loss, q.detach().mean()


class KnownReward(NamedTuple):
    """The model's per-slice reward as a function of the slice's own request (as if granted in
    full) and the need its interval turned out to have, with the SLA cost smoothed so that it has
    a gradient: the known part of what the critic would otherwise have to learn."""

    utility_weight: torch.Tensor  # (S,) weight_i / sum(weights)
    waste_weight: float

    def priced_reward(
        self, requests: torch.Tensor, need: torch.Tensor, multipliers: torch.Tensor
    ) -> torch.Tensor:
        """u_i min(1, x_i / N_i) - waste max(0, x_i - N_i) - lambda_i sigmoid((N_i - x_i) / w_i),
        ``(B, S)``; w_i = COST_SMOOTHING x N_i, so the cost falls from 1 to 0 within a few
        percent of the need (1 / (1 + e) at 5 % above it)."""
        satisfaction = torch.clamp((requests + _TINY) / (need + _TINY), max=1.0)
        reward = self.utility_weight * satisfaction - self.waste_weight * torch.relu(
            requests - need
        )
        cost = torch.sigmoid((need - requests) / (COST_SMOOTHING * need + MIN_COST_WIDTH))
        return reward - multipliers * cost


@contextmanager
def frozen(net: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``net``'s weights are constants to autograd (gradients still flow
    through its inputs)."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class MADDPGTorchLearner(TorchLearner):
    """Trains the MADDPG module; holds the Lagrange multipliers (one per slice) as its state."""

    def build(self) -> None:
        super().build()
        (self.module_id,) = self.module.keys()  # one module holds every slice's networks
        module = self.module[self.module_id].unwrapped()
        module.make_target_networks()
        self._targets, self._sources = _polyak_pairs(module)
        start = self.config.initial_multiplier if self.config.uses_multipliers else 0.0
        self.multipliers = torch.full(
            (module.num_slices,), float(start), dtype=torch.float32, device=self._device
        )
        sim = slicing_config(self.config)
        weights = SliceArrays.from_specs(sim.resolved_slices()).utility_weight
        self.known = KnownReward(
            torch.as_tensor(weights, dtype=torch.float32, device=self._device),
            float(sim.waste_weight),
        )

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        for name, net, lr in (
            ("actor", module.actor, config.actor_lr),
            ("critic", module.critic, config.critic_lr),
        ):
            params = self.get_parameters(net)
            optimizer = torch.optim.Adam(params, **_adam_kwargs())
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=optimizer,
                params=params,
                lr_or_lr_schedule=lr,
            )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """RLlib's generic ``Learner.update`` path, for a batch keyed like the replay's columns:
        the summed MADDPG losses. ``MADDPG.training_step`` uses :meth:`update_from_replay`."""
        module = self.module[module_id].unwrapped()
        critic_loss, actor_loss, _ = maddpg_losses(
            module, batch, self.multipliers, config.gamma, **_actor_options(config, self.known)
        )
        return critic_loss + actor_loss

    def update_from_replay(self, batches: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Run one gradient step per leading index of ``batches`` (arrays ``(K, B, ...)``).

        This is the hot loop: the ``K`` batches arrive as one numpy block from the replay, so the
        per-update cost is the maths plus a few microseconds. Returns the reduced learner metrics.
        """
        module_id = self.module_id
        module = self.module[module_id].unwrapped()
        config = self.config.get_config_for_module(module_id)
        actor_opt = self.get_optimizer(module_id, "actor")
        critic_opt = self.get_optimizer(module_id, "critic")
        tensors = {k: torch.from_numpy(batches[k]).to(self._device) for k in BATCH_KEYS}
        num_updates, batch_size = tensors["obs"].shape[:2]
        targets, sources = self._targets, self._sources
        sums = torch.zeros(3)
        options = _actor_options(config, self.known)
        for k in range(num_updates):
            batch = {key: value[k] for key, value in tensors.items()}
            critic_loss, actor_loss, q_mean = maddpg_losses(
                module, batch, self.multipliers, config.gamma, **options
            )
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            (critic_loss + actor_loss).backward()
            if config.grad_clip:  # one global norm over actor and critic gradients
                torch.nn.utils.clip_grad_norm_(sources, config.grad_clip)
            critic_opt.step()
            actor_opt.step()
            with torch.no_grad():
                # Polyak: target += tau * (online - target), all tensors in one foreach call
                torch._foreach_lerp_(targets, sources, config.tau)
                sums += torch.stack((critic_loss.detach(), actor_loss.detach(), q_mean))
        self._log_update_metrics(module_id, sums / max(1, num_updates), num_updates, batch_size)
        return self.metrics.reduce()

    def set_obs_normalizer(self, obs: np.ndarray) -> None:
        """Fit the module's input standardisation to ``obs`` ``(N, S, F)`` (warm-up data)."""
        obs = torch.from_numpy(np.asarray(obs, dtype=np.float32)).to(self._device)
        module = self.module[self.module_id].unwrapped()
        module.fit_normalizer(obs)

    def set_multipliers(self, values: np.ndarray | list[float]) -> None:
        values = torch.as_tensor(np.asarray(values, dtype=np.float32), device=self._device)
        if values.shape != self.multipliers.shape or not torch.isfinite(values).all():
            raise ValueError(
                f"multipliers: need {tuple(self.multipliers.shape)} finite values, got {values}"
            )
        self.multipliers = values.clamp(min=0.0)

    def get_multipliers(self) -> np.ndarray:
        return self.multipliers.cpu().numpy().astype(np.float64)

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[MULTIPLIERS_STATE] = self.get_multipliers().tolist()
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if MULTIPLIERS_STATE in state:
            self.set_multipliers(state[MULTIPLIERS_STATE])

    def _log_update_metrics(self, module_id, means, num_updates, batch_size) -> None:
        critic_loss, actor_loss, q_mean = means.tolist()
        log = self.metrics.log_value
        log((module_id, metrics.CRITIC_LOSS), critic_loss, window=1)
        log((module_id, metrics.ACTOR_LOSS), actor_loss, window=1)
        log((module_id, metrics.Q_MEAN), q_mean, window=1)
        log((ALL_MODULES, metrics.NUM_UPDATES), num_updates, reduce="sum")
        log((ALL_MODULES, NUM_ENV_STEPS_TRAINED), num_updates * batch_size, reduce="sum")
        log(
            (ALL_MODULES, NUM_ENV_STEPS_TRAINED_LIFETIME),
            num_updates * batch_size,
            reduce="lifetime_sum",
        )


def _actor_options(config, known: KnownReward) -> dict[str, Any]:
    return {
        "cooperative": bool(config.cooperative),
        "request_penalty": float(config.request_penalty),
        "known": known,
        "known_reward_weight": float(config.known_reward_weight),
    }


def _polyak_pairs(module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Target and online parameters, in matching order, for one foreach Polyak update."""
    targets, sources = [], []
    for source_net, target_net in module.get_target_network_pairs():
        for p, t in zip(source_net.parameters(), target_net.parameters(), strict=True):
            sources.append(p)
            targets.append(t)
    return targets, sources


def _adam_kwargs() -> dict[str, Any]:
    # the fused CPU kernel updates all of a network's tensors in one call
    return {"fused": True}

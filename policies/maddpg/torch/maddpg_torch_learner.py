"""MADDPG losses and the torch ``Learner`` that applies them to replayed, time-aligned batches.

For slice i with actor mu_i, critic Q_i, their targets mu_i' and Q_i', Lagrange multiplier lambda_i
and a replayed transition (o, a, r, c, o', done) of ALL slices (Lowe et al. 2017, "Multi-Agent
Actor-Critic for Mixed Cooperative-Competitive Environments", arXiv:1706.02275, eqs. 5-6):

    y_i          = r_i - lambda_i c_i + gamma (1 - done) Q_i'(o', mu_1'(o_1'), ..., mu_S'(o_S'))
    critic loss  = sum_i mean_batch (Q_i(o, a) - y_i)^2
    actor loss   = -sum_i mean_batch Q_i(o, a_1, ..., mu_i(o_i), ..., a_S)        (per slice)
            or     -sum_i mean_batch Q_i(o, mu_1(o_1), ..., mu_S(o_S))          (cooperative)
                   + request_penalty mean_batch max(0, sum_i mu_i(o_i) - 1)     (both forms)

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
from typing import Any

import numpy as np
import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    NUM_ENV_STEPS_TRAINED,
    NUM_ENV_STEPS_TRAINED_LIFETIME,
)

from deepslicing import metrics
from policies.maddpg.torch.default_maddpg_torch_rl_module import MADDPGTorchRLModule

MULTIPLIERS_STATE = "multipliers"
BATCH_KEYS = ("obs", "actions", "rewards", "costs", "next_obs", "dones")


def maddpg_losses(
    module: MADDPGTorchRLModule,
    batch: Mapping[str, torch.Tensor],
    multipliers: torch.Tensor,
    gamma: float,
    *,
    cooperative: bool = False,
    request_penalty: float = 0.0,
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
    with frozen(module.critic):
        if cooperative:  # every actor climbs the sum of all critics at the actors' joint action
            q_own = module.q_values(obs, own)
        else:
            q_own = module.q_values(obs, module.actions_with_own(actions, own))
    actor_loss = -q_own.mean(dim=0).sum()
    if request_penalty:  # requests beyond the cell change no allocation: price them
        actor_loss = actor_loss + request_penalty * (own.sum(dim=-1) - 1.0).clamp(min=0.0).mean()
    return critic_loss, actor_loss, q.detach().mean()


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
        self.multipliers = torch.zeros(module.num_slices, dtype=torch.float32, device=self._device)

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
            module, batch, self.multipliers, config.gamma, **_actor_options(config)
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
        options = _actor_options(config)
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


def _actor_options(config) -> dict[str, Any]:
    return {
        "cooperative": bool(config.cooperative),
        "request_penalty": float(config.request_penalty),
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

"""MADDPG on RLlib: structure of the networks, config validation, training, checkpoints, policy.

Runs on a real local Ray (2 CPUs). The whole module takes well under a minute: training uses
two short iterations of a few cells.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from deepslicing import metrics
from deepslicing.evaluation import check_policy, evaluate_pair
from deepslicing.simulator import SlicingConfig
from policies.constraints import dual_ascent
from policies.maddpg import MADDPG, MADDPGConfig, load_actor_policy
from policies.maddpg.maddpg import actor_groups
from policies.maddpg.replay import SynchronizedReplay
from policies.maddpg.torch.default_maddpg_torch_rl_module import MADDPGTorchRLModule
from policies.maddpg.torch.maddpg_torch_learner import maddpg_losses

NUM_SLICES, NUM_FEATURES = 3, 6


def make_module(inference_only: bool = False, groups=None) -> MADDPGTorchRLModule:
    torch.manual_seed(0)
    spaces = (
        gym.spaces.Box(0.0, 10.0, (NUM_SLICES, NUM_FEATURES), np.float32),
        gym.spaces.Box(0.0, 1.0, (NUM_SLICES,), np.float32),
    )
    module = MADDPGTorchRLModule(
        observation_space=spaces[0],
        action_space=spaces[1],
        inference_only=inference_only,
        model_config={"actor_groups": groups} if groups else {},
    )
    if not inference_only:
        module.make_target_networks()
    return module


def tiny_config(**training) -> MADDPGConfig:
    """Two short iterations: 4 cells x 20-interval episodes, learning after the first."""
    return (
        MADDPGConfig()
        .environment(env_config={"episode_length": 20})
        .env_runners(num_envs_per_env_runner=4, rollout_fragment_length=20)
        .training(
            num_steps_sampled_before_learning_starts=80,
            train_batch_size_per_learner=32,
            updates_per_step=0.1,
            **training,
        )
        .reporting(min_sample_timesteps_per_iteration=80)
        .debugging(seed=0)
    )


def test_actor_ignores_other_slices_observations():
    module = make_module()
    obs = torch.rand(5, NUM_SLICES, NUM_FEATURES)
    changed = obs.clone()
    changed[:, 1:] = torch.rand(5, NUM_SLICES - 1, NUM_FEATURES) * 5
    with torch.no_grad():
        before, after = module.act(obs), module.act(changed)
    torch.testing.assert_close(before[:, 0], after[:, 0])
    assert not torch.allclose(before[:, 1:], after[:, 1:])
    assert ((before >= 0) & (before <= 1)).all()


def test_shared_actor_ignores_other_slices_too():
    module = make_module(groups=[0, 1, 0])  # slices 0 and 2 share one actor
    obs = torch.rand(5, NUM_SLICES, NUM_FEATURES)
    changed = obs.clone()
    changed[:, 2] += 1.0
    with torch.no_grad():
        before, after = module.act(obs), module.act(changed)
    torch.testing.assert_close(before[:, :2], after[:, :2])
    same_obs = obs.clone()
    same_obs[:, 2] = same_obs[:, 0]
    with torch.no_grad():
        shared = module.act(same_obs)
    torch.testing.assert_close(shared[:, 0], shared[:, 2])


def test_critic_sees_other_slices_observations_and_actions():
    module = make_module()
    obs = torch.rand(5, NUM_SLICES, NUM_FEATURES)
    actions = torch.rand(5, NUM_SLICES)
    with torch.no_grad():
        q = module.q_values(obs, actions)
        changed_obs = obs.clone()
        changed_obs[:, 2] += 1.0
        q_obs = module.q_values(changed_obs, actions)
        changed_actions = actions.clone()
        changed_actions[:, 2] = 1.0 - changed_actions[:, 2]
        q_act = module.q_values(obs, changed_actions)
    assert q.shape == (5, NUM_SLICES)
    # slice 0's critic reacts to slice 2's observation and action
    assert not torch.allclose(q[:, 0], q_obs[:, 0])
    assert not torch.allclose(q[:, 0], q_act[:, 0])


def test_inference_only_module_has_no_critic_weights():
    full = make_module()
    actors = make_module(inference_only=True)
    names = [n for n, _ in actors.named_parameters()]
    assert names and all(n.startswith("actor.") for n in names)
    assert not hasattr(actors, "critic")
    state = full.get_state(inference_only=True)
    # actor weights and the observation standardisation the actors use, nothing else
    assert {k.split(".")[0] for k in state} == {"actor", "obs_shift", "obs_scale"}
    actors.set_state(state)
    obs = torch.rand(3, NUM_SLICES, NUM_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(actors.act(obs), full.act(obs))


def random_batch(cost: float, n: int = 16) -> dict[str, torch.Tensor]:
    """Replay columns of ``n`` random joint transitions, every slice's cost set to ``cost``."""
    return {
        "obs": torch.rand(n, NUM_SLICES, NUM_FEATURES),
        "actions": torch.rand(n, NUM_SLICES),
        "rewards": torch.rand(n, NUM_SLICES),
        "costs": torch.full((n, NUM_SLICES), cost),
        "next_obs": torch.rand(n, NUM_SLICES, NUM_FEATURES),
        "dones": torch.zeros(n),
    }


def test_losses_train_only_their_own_networks():
    module = make_module()
    batch = random_batch(cost=1.0)
    critic_loss, actor_loss, _ = maddpg_losses(module, batch, torch.zeros(NUM_SLICES), 0.9)
    actor_loss.backward()
    assert all(p.grad is None for p in module.critic.parameters())
    assert all(p.grad is not None for p in module.actor.parameters())
    module.zero_grad(set_to_none=True)
    critic_loss.backward()
    assert all(p.grad is None for p in module.actor.parameters())
    # multipliers price the raw costs: a higher lambda lowers the target, raises the loss here
    with torch.no_grad():
        priced, _, _ = maddpg_losses(module, batch, torch.full((NUM_SLICES,), 5.0), 0.9)
    assert priced > critic_loss


def test_cooperative_actor_loss_climbs_every_critic_and_prices_excess_requests():
    module = make_module()
    batch = random_batch(cost=0.0)
    zero = torch.zeros(NUM_SLICES)
    with torch.no_grad():
        own = module.act(batch["obs"])
        joint_q = module.q_values(batch["obs"], own)  # every critic at the actors' joint action
        excess = (own.sum(dim=-1) - 1.0).clamp(min=0.0).mean()
        _, cooperative, _ = maddpg_losses(module, batch, zero, 0.0, cooperative=True)
        _, penalised, _ = maddpg_losses(
            module, batch, zero, 0.0, cooperative=True, request_penalty=2.0
        )
    torch.testing.assert_close(cooperative, -joint_q.mean(dim=0).sum())
    torch.testing.assert_close(penalised, cooperative + 2.0 * excess)
    # actor 0's gradient reaches it through the OTHER slices' critics too
    others_only = -module.q_values(batch["obs"], module.act(batch["obs"]), frozen=True)[:, 1:]
    others_only.mean(dim=0).sum().backward()
    assert module.actor.weights[0].grad[0].abs().sum() > 0


def test_replay_keeps_transitions_time_aligned():
    replay = SynchronizedReplay(10, NUM_SLICES, NUM_FEATURES, seed=0)
    rows = 14
    step = np.arange(rows, dtype=np.float32)
    replay.add(
        {
            "obs": np.broadcast_to(step[:, None, None], (rows, NUM_SLICES, NUM_FEATURES)),
            "actions": np.broadcast_to(step[:, None], (rows, NUM_SLICES)),
            "rewards": np.broadcast_to(step[:, None], (rows, NUM_SLICES)),
            "costs": np.broadcast_to(step[:, None], (rows, NUM_SLICES)),
            "next_obs": np.broadcast_to(step[:, None, None] + 1, (rows, NUM_SLICES, NUM_FEATURES)),
            "dones": step,
        }
    )
    assert len(replay) == 10
    batch = replay.sample(3, 8)
    assert batch["obs"].shape == (3, 8, NUM_SLICES, NUM_FEATURES)
    t = batch["dones"]
    assert t.min() >= 4  # the oldest rows were overwritten
    for key in ("actions", "rewards", "costs"):
        np.testing.assert_array_equal(batch[key], np.broadcast_to(t[..., None], batch[key].shape))
    np.testing.assert_array_equal(batch["next_obs"][..., 0, 0], t + 1)


def test_actor_groups_by_kind():
    kinds = ["embb", "urllc", "mmtc", "embb", "urllc"]
    assert actor_groups(kinds, share_by_kind=False) == [0, 1, 2, 3, 4]
    assert actor_groups(kinds, share_by_kind=True) == [0, 1, 2, 0, 1]


def test_dual_ascent_projects_onto_nonnegative():
    new = dual_ascent(np.array([0.0, 1.0, 0.05]), np.array([0.5, 0.0, 0.0]), 0.1, 0.5)
    np.testing.assert_allclose(new, [0.2, 0.95, 0.0])


@pytest.mark.parametrize(
    ("training", "key"),
    [
        ({"actor_lr": -1.0}, "actor_lr"),
        ({"critic_lr": float("nan")}, "critic_lr"),
        ({"tau": 0.0}, "tau"),
        ({"gamma": 1.5}, "gamma"),
        ({"updates_per_step": 0}, "updates_per_step"),
        ({"exploration_noise": -0.1}, "exploration_noise"),
        ({"request_penalty": -0.5}, "request_penalty"),
        ({"cooperative": "yes"}, "cooperative"),
        ({"replay_capacity": 8}, "replay_capacity"),
        ({"variant": "penalty"}, "variant"),
        ({"admm_rho": 0.0}, "admm_rho"),
        ({"admm_iterations": 0}, "admm_iterations"),
        ({"cost_budget": 2.0}, "cost_budget"),
        ({"multiplier_lr": -1.0}, "multiplier_lr"),
        ({"share_parameters_by_kind": "yes"}, "share_parameters_by_kind"),
        ({"actor_hiddens": [64, 0]}, "actor_hiddens"),
    ],
)
def test_validate_names_the_bad_value(training, key):
    config = MADDPGConfig().training(**training)
    with pytest.raises(ValueError, match=key):
        config.validate()


def test_validate_rejects_bad_env_config_and_combinations():
    with pytest.raises(ValueError, match="env_config.coordinator"):
        MADDPGConfig().environment(env_config={"coordinator": "admm"}).validate()
    with pytest.raises(ValueError, match="episode_lenght"):
        MADDPGConfig().environment(env_config={"episode_lenght": 5}).validate()
    with pytest.raises(ValueError, match="num_learners"):
        MADDPGConfig().learners(num_learners=2).validate()
    with pytest.raises(ValueError, match="env"):
        MADDPGConfig().environment("CartPole-v1").validate()


def test_unknown_training_key_is_named():
    with pytest.raises(TypeError, match="actr_lr"):
        MADDPGConfig().training(actr_lr=1e-3)


def test_tiny_training_reports_metrics_and_restores_multipliers(ray_local, tmp_path):
    algo = tiny_config(variant="both", multiplier_lr=1.0, cost_budget=0.0).build_algo()
    try:
        assert isinstance(algo, MADDPG)
        for _ in range(2):
            result = algo.train()
        section = result[metrics.SECTION]
        for name in (
            metrics.EPISODE_RETURN_MEAN,
            metrics.UTILITY_MEAN,
            metrics.SLA_VIOLATION_RATE,
            metrics.ENV_STEPS_PER_S,
            metrics.ADMM_PRIMAL_RESIDUAL_MEAN,
            metrics.ADMM_DUAL_RESIDUAL_MEAN,
            metrics.CRITIC_LOSS,
        ):
            assert math.isfinite(section[name]), name
        assert section[metrics.CAPACITY_VIOLATIONS] == 0
        assert section[metrics.ENV_STEPS_PER_S] > 0
        multipliers = algo.get_multipliers()
        names = [k for k in section if k.startswith(metrics.MULTIPLIER + "/")]
        assert names == [f"multiplier/{s}" for s in ("embb", "urllc", "mmtc")]
        np.testing.assert_allclose([section[k] for k in names], multipliers, rtol=1e-6)
        assert multipliers.max() > 0  # a zero budget makes any violation raise its multiplier
        # the env runner holds actors only
        runner_params = [n for n, _ in algo.env_runner.module.named_parameters()]
        assert runner_params and all(n.startswith("actor.") for n in runner_params)
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        algo.set_multipliers([9.0, 9.0, 9.0])
        algo.restore_from_path(checkpoint)
        np.testing.assert_allclose(algo.get_multipliers(), multipliers, rtol=1e-6)
        obs = np.random.default_rng(0).random((2, 3, 6)).astype(np.float32)
        with torch.no_grad():
            expected = algo.get_module().act(torch.from_numpy(obs)).numpy()
    finally:
        algo.stop()

    restored = MADDPG.from_checkpoint(checkpoint)
    try:
        np.testing.assert_allclose(restored.get_multipliers(), multipliers, rtol=1e-6)
        assert restored.iteration == 2
    finally:
        restored.stop()

    policy = load_actor_policy(checkpoint)
    shares = policy(obs)
    assert shares.shape == (2, 3) and shares.dtype == np.float64
    np.testing.assert_allclose(shares, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="slices"):
        policy(np.zeros((2, 4, 6)))
    with pytest.raises(FileNotFoundError, match="not a MADDPG checkpoint"):
        load_actor_policy(tmp_path / "missing")

    # `deepslicing evaluate --policy <checkpoint>` resolves the checkpoint to its actors
    row = evaluate_pair(SlicingConfig(episode_length=20), checkpoint, episodes=2, seed=0).row
    assert row["policy"] == checkpoint and row["capacity_violations"] == 0
    assert 0.0 < row["utility_mean"] <= 1.0
    with pytest.raises(ValueError, match="MADDPG checkpoint"):
        check_policy(str(tmp_path / "missing"))


def test_unconstrained_variant_keeps_multipliers_at_zero(ray_local):
    algo = tiny_config(variant="unconstrained", cost_budget=0.0).build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        assert result[metrics.SECTION][metrics.ADMM_PRIMAL_RESIDUAL_MEAN] == 0
        np.testing.assert_array_equal(algo.get_multipliers(), 0.0)
    finally:
        algo.stop()

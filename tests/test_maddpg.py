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
from deepslicing.model import FEATURE_HIGH, FEATURES
from deepslicing.simulator import SlicingConfig
from policies.constraints import dual_ascent, slice_budgets, unreachable
from policies.maddpg import MADDPG, MADDPGConfig, load_actor_policy
from policies.maddpg.policy import PolicyMismatchError
from policies.maddpg.replay import SynchronizedReplay
from policies.maddpg.torch.default_maddpg_torch_rl_module import MADDPGTorchRLModule
from policies.maddpg.torch.maddpg_torch_learner import KnownReward, frozen, maddpg_losses

NUM_SLICES, NUM_FEATURES = 3, len(FEATURES)
FORECAST = FEATURES.index("need_forecast")


def make_module(
    inference_only: bool = False, kinds=("embb", "urllc", "mmtc"), seed: int = 0, **model_config
) -> MADDPGTorchRLModule:
    torch.manual_seed(seed)
    spaces = (
        gym.spaces.Box(0.0, np.tile(FEATURE_HIGH, (len(kinds), 1)), dtype=np.float32),
        gym.spaces.Box(0.0, 1.0, (len(kinds),), np.float32),
    )
    module = MADDPGTorchRLModule(
        observation_space=spaces[0],
        action_space=spaces[1],
        inference_only=inference_only,
        model_config={"slice_kinds": list(kinds), **model_config},
    )
    if not inference_only:
        module.make_target_networks()
    return module


def test_dropped_input_groups_read_as_zero_after_fitting():
    module = make_module(drop_inputs=["levels", "time"])
    obs = random_obs(64, NUM_SLICES)
    module.fit_normalizer(obs)
    inputs = module.normalized_inputs(obs)
    assert torch.count_nonzero(inputs[..., [7, 8, 10, 11]]) == 0
    assert torch.count_nonzero(inputs[..., [0, 1, 9]]) > 0
    with pytest.raises(ValueError, match="drop_inputs"):
        make_module(drop_inputs=["weather"])


def random_obs(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, NUM_FEATURES) * torch.from_numpy(FEATURE_HIGH).clamp(max=1.0)


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
    obs = random_obs(5, NUM_SLICES)
    changed = obs.clone()
    changed[:, 1:] = random_obs(5, NUM_SLICES - 1)
    with torch.no_grad():
        before, after = module.act(obs), module.act(changed)
    torch.testing.assert_close(before[:, 0], after[:, 0])
    assert not torch.allclose(before[:, 1:], after[:, 1:])
    assert ((before >= 0) & (before <= 1)).all()


def test_actor_corrects_its_forecast_within_a_factor_of_two():
    module = make_module()
    obs = random_obs(64, NUM_SLICES)
    obs[..., FORECAST] = 0.2
    with torch.no_grad():
        shares = module.act(obs)
    assert (shares >= 0.1 - 1e-6).all() and (shares <= 0.4 + 1e-6).all()
    assert shares.std() > 0  # the correction depends on the other inputs


def test_slices_of_one_kind_share_an_actor_and_any_slice_mix_loads_the_weights():
    three = make_module(inference_only=True)
    mix = make_module(inference_only=True, kinds=("urllc", "embb", "urllc", "mmtc", "embb"), seed=1)
    mix.set_state(three.get_state())  # no weight depends on the number of slices
    obs = random_obs(4, NUM_SLICES)
    five = torch.stack((obs[:, 1], obs[:, 0], obs[:, 1], obs[:, 2], obs[:, 0]), dim=1)
    with torch.no_grad():
        a, b = three.act(obs), mix.act(five)
    torch.testing.assert_close(b, torch.stack((a[:, 1], a[:, 0], a[:, 1], a[:, 2], a[:, 0]), 1))


def test_critic_is_invariant_to_the_order_of_slices():
    kinds = ("embb", "urllc", "mmtc", "embb")
    module = make_module(kinds=kinds)
    swapped = make_module(kinds=tuple(kinds[i] for i in (3, 2, 1, 0)))
    swapped.set_state(module.get_state())
    obs, actions = random_obs(5, 4), torch.rand(5, 4)
    order = [3, 2, 1, 0]
    with torch.no_grad():
        q = module.q_values(obs, actions)
        q_swapped = swapped.q_values(obs[:, order], actions[:, order])
    torch.testing.assert_close(q_swapped, q[:, order])


def test_critic_sees_other_slices_observations_and_actions():
    module = make_module()
    obs = random_obs(5, NUM_SLICES)
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
    # actor weights and the input standardisation the actors use, nothing else
    assert {k.split(".")[0] for k in state} == {"actor", "input_shift", "input_scale"}
    actors.set_state(state)
    obs = random_obs(3, NUM_SLICES)
    with torch.no_grad():
        torch.testing.assert_close(actors.act(obs), full.act(obs))


def random_batch(cost: float, n: int = 16) -> dict[str, torch.Tensor]:
    """Replay columns of ``n`` random joint transitions, every slice's cost set to ``cost``."""
    return {
        "obs": random_obs(n, NUM_SLICES),
        "actions": torch.rand(n, NUM_SLICES),
        "rewards": torch.rand(n, NUM_SLICES),
        "costs": torch.full((n, NUM_SLICES), cost),
        "next_obs": random_obs(n, NUM_SLICES),
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
    with frozen(module.critic):
        others_only = -module.q_values(batch["obs"], module.act(batch["obs"]))[:, 1:]
    others_only.mean(dim=0).sum().backward()
    assert module.actor.weights[0].grad[0].abs().sum() > 0  # the eMBB actor, slice 0


def test_known_reward_is_the_models_reward_with_a_smoothed_cost():
    known = KnownReward(torch.tensor([0.5, 0.3, 0.2]), waste_weight=0.5)
    need = torch.tensor([[0.4, 0.1, 0.0]])
    lam = torch.tensor([0.2, 0.2, 0.2])
    # half the eMBB need, 1.5 x the URLLC need, something to a slice that needs nothing
    priced = known.priced_reward(torch.tensor([[0.2, 0.15, 0.05]]), need, lam)
    expected_reward = torch.tensor([0.5 * 0.5, 0.3 - 0.5 * 0.05, 0.2 - 0.5 * 0.05])
    # the cost is ~1 well below the need and ~0 well above it
    torch.testing.assert_close(
        priced[0], expected_reward - lam * torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0
    )
    # its gradient raises a request just short of the need and lowers one beyond it
    requests = torch.tensor([[0.39, 0.2, 0.05]], requires_grad=True)
    known.priced_reward(requests, need, lam).sum().backward()
    assert requests.grad[0, 0] > 0.5 / 0.4 and requests.grad[0, 1] < 0 and requests.grad[0, 2] < 0


def test_actor_loss_takes_the_known_reward_in_its_share():
    module = make_module()
    batch = random_batch(cost=0.0)
    lam = torch.full((NUM_SLICES,), 0.3)
    known = KnownReward(torch.tensor([0.4, 0.3, 0.3]), waste_weight=0.5)
    need = batch["next_obs"][..., FEATURES.index("needed_share")]
    with torch.no_grad():
        own = module.act(batch["obs"])
        known_term = -known.priced_reward(own, need, lam).mean(dim=0).sum()
        critic_term = -module.q_values(batch["obs"], own).mean(dim=0).sum()
        losses = {
            w: maddpg_losses(
                module, batch, lam, 0.0, cooperative=True, known=known, known_reward_weight=w
            )[1]
            for w in (0.0, 0.25, 1.0)
        }
    torch.testing.assert_close(losses[0.0], critic_term)
    torch.testing.assert_close(losses[1.0], known_term)
    torch.testing.assert_close(losses[0.25], 0.75 * critic_term + 0.25 * known_term)
    # with the whole weight on the known reward the critic is not read by the actor loss
    _, actor_loss, _ = maddpg_losses(module, batch, lam, 0.0, known=known, known_reward_weight=1.0)
    actor_loss.backward()
    assert all(p.grad is None for p in module.critic.parameters())
    assert all(p.grad is not None for p in module.actor.parameters())


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


def test_dual_ascent_projects_onto_nonnegative():
    new = dual_ascent(np.array([0.0, 1.0, 0.05]), np.array([0.5, 0.0, 0.0]), 0.1, 0.5)
    np.testing.assert_allclose(new, [0.2, 0.95, 0.0])


def test_a_slice_without_a_budget_keeps_its_price():
    budget = np.array([np.nan, 0.1, np.nan])
    new = dual_ascent(np.array([0.05, 0.05, 0.3]), np.array([0.9, 0.5, 0.0]), budget, 0.5)
    np.testing.assert_allclose(new, [0.05, 0.25, 0.3])
    stuck = unreachable(np.array([1.0, 1.0, 1.0]), np.array([0.9, 0.5, 0.9]), budget, 1.0)
    np.testing.assert_array_equal(stuck, [False, True, False])


def test_budgets_per_kind_and_unreachable_ones_are_named():
    kinds = ("embb", "urllc", "mmtc", "urllc")
    nan = np.nan
    np.testing.assert_allclose(slice_budgets({"urllc": 0.02}, kinds), [nan, 0.02, nan, 0.02])
    np.testing.assert_allclose(slice_budgets(0.1, kinds), [0.1] * 4)
    np.testing.assert_allclose(slice_budgets(None, kinds), [nan] * 4)
    budget = np.array([0.25, 0.02, 0.25])
    stuck = unreachable(np.array([1.0, 1.0, 0.3]), np.array([0.2, 0.05, 0.5]), budget, 1.0)
    np.testing.assert_array_equal(stuck, [False, True, False])


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
        ({"known_reward_weight": 1.5}, "known_reward_weight"),
        ({"cooperative": "yes"}, "cooperative"),
        ({"replay_capacity": 8}, "replay_capacity"),
        ({"variant": "penalty"}, "variant"),
        ({"admm_rho": 0.0}, "admm_rho"),
        ({"admm_iterations": 0}, "admm_iterations"),
        ({"cost_budget": 2.0}, "cost_budget"),
        ({"cost_budget": {"urllc": -0.1}}, "cost_budget.urllc"),
        ({"cost_budget": {"voice": 0.1}}, "cost_budget.voice"),
        ({"multiplier_lr": -1.0}, "multiplier_lr"),
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
        for s in ("embb", "urllc", "mmtc"):  # the `budget` rows of the metrics table
            assert section[metrics.per_slice(metrics.COST_BUDGET, s)] == 0.0
            assert section[metrics.per_slice(metrics.BUDGET_UNREACHABLE, s)] in (0.0, 1.0)
        # the env runner holds actors only
        runner_params = [n for n, _ in algo.env_runner.module.named_parameters()]
        assert runner_params and all(n.startswith("actor.") for n in runner_params)
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        algo.set_multipliers([9.0, 9.0, 9.0])
        algo.restore_from_path(checkpoint)
        np.testing.assert_allclose(algo.get_multipliers(), multipliers, rtol=1e-6)
        obs = random_obs(2, 3).numpy()
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
        policy(np.zeros((2, 4, NUM_FEATURES)))
    # the same checkpoint drives any slice mix of the kinds it trained
    five = load_actor_policy(checkpoint, kinds=("mmtc", "embb", "urllc", "embb", "mmtc"))
    np.testing.assert_allclose(
        five(obs[:, [2, 0, 1, 0, 2]]), expected[:, [2, 0, 1, 0, 2]], rtol=1e-5
    )
    with pytest.raises(PolicyMismatchError, match="trained actors for"):
        load_actor_policy(checkpoint, kinds=("embb", "voice"))
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

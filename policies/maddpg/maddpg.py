"""MADDPG (Lowe et al. 2017, arXiv:1706.02275) for network slicing on RLlib's new API stack.

One agent per slice. Each slice's deterministic actor (shared by the slices of its kind) requests
a share of the cell from its own 14-feature observation; the critic, used only while learning,
gives every slice a value Q_i from every slice's observation and action, invariant to their number
and order (:mod:`policies.maddpg.torch.default_maddpg_torch_rl_module`). The coordinator
(projection or ADMM, utility objective by default) turns requests into a feasible
allocation, so capacity is never violated; SLA violations are costs, priced by Lagrange
multipliers that :class:`policies.constraints.ConstraintCallback` adapts by dual ascent.

Build it like RLlib's SAC::

    config = (
        MADDPGConfig()
        .environment(env_config={"scenario": "steady"})  # SlicingConfig fields
        .training(variant="both", actor_lr=3e-4, cost_budget={"urllc": 0.05})
        .env_runners(num_envs_per_env_runner=8)
        .debugging(seed=0)
    )
    algo = config.build_algo()
    result = algo.train()  # result["deepslicing"] holds the headline metrics

Variants (``training(variant=...)``):

| variant         | coordinator | multipliers                         |
|-----------------|-------------|-------------------------------------|
| `unconstrained` | projection  | none (stay 0)                       |
| `lagrangian`    | projection  | dual ascent on per-slice SLA costs  |
| `admm`          | ADMM        | none                                |
| `both`          | ADMM        | dual ascent                         |

One ``training_step``: every env runner steps its ``num_envs_per_env_runner`` cells
``rollout_fragment_length`` intervals (exploration noise on), the joint transitions go into the
synchronized replay, and - once ``num_steps_sampled_before_learning_starts`` env steps exist - the
learner makes ``updates_per_step`` gradient updates per new env step (an env step is one cell for
one interval), each on ``train_batch_size_per_learner`` replayed rows, then the actors' weights go
back to the env runners. At the first learning step the input standardisation (per slice kind) is
fitted to the warm-up data in the replay.

Defaults (first tuned on the `steady` scenario, 3 slices, on a 2-core machine; the default env of
``deepslicing train`` is the `mix` scenario): actors 64 x 64 and critic 64 x 64 ReLU; Adam,
actor_lr 3e-4, critic_lr 1e-3; tau 0.01; gamma 0 (the traffic is exogenous: an allocation changes
no future traffic and scores only its own interval, so the best policy is myopic and a
per-interval critic is the easiest to learn); known_reward_weight 1 (the actors climb the known
reward of their own request against the need that followed, priced by their multipliers; the
critic still learns, for coupling when the weight is below 1 and for ``q_mean``), cooperative
critic term and request_penalty 0.5 on requests beyond the cell (see
:mod:`policies.maddpg.torch.maddpg_torch_learner`); batch 256; updates_per_step 0.5;
exploration_noise 0 (the known reward's gradient needs no exploration, and noise-free rollouts
are what the multipliers should measure); replay 100,000; 3,200 warm-up env steps; variant
"both" with the utility objective's ADMM (rho 2 x 100 iterations), no cost budgets and one fixed
price of a violation for every slice, initial_multiplier 0.055
(:data:`policies.constraints.DEFAULT_VIOLATION_PRICE`; docs/scorecard.md has the trade-off
measured), multiplier_lr 0.5 for the budgets a user sets, multiplier_max 1.0; one local env runner with 8
cells, 50 intervals per sample, and a local learner (num_learners=0). One iteration is at least
1,600 env steps, that is one 200-interval episode of every cell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from deepslicing import metrics
from deepslicing.config import ConfigError
from deepslicing.coordinator import UTILITY_ITERATIONS, UTILITY_RHO, check_admm
from envs.rllib_env import SlicingMultiAgentEnv
from policies.constraints import (
    DEFAULT_VIOLATION_PRICE,
    ConstraintCallback,
    CostBudget,
    check_budget,
)
from policies.maddpg.env_runner import MADDPGEnvRunner, slicing_config
from policies.maddpg.replay import SynchronizedReplay

VARIANTS = ("unconstrained", "lagrangian", "admm", "both")
MAX_UPDATES_PER_CALL = 256  # bounds the replay block handed to the learner at once
ENV_NAMES = (None, "slicing_v0", SlicingMultiAgentEnv)


class MADDPGConfig(AlgorithmConfig):
    """Configuration of :class:`MADDPG`; builder methods take keyword-only arguments."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or MADDPG)
        # .training()
        self.actor_lr = 3e-4
        self.critic_lr = 1e-3
        self.lr = None  # use actor_lr and critic_lr
        self.tau = 0.01
        self.gamma = 0.0
        self.train_batch_size_per_learner = 256
        self.updates_per_step = 0.5
        self.exploration_noise = 0.0
        self.cooperative = True
        self.request_penalty = 0.5
        self.known_reward_weight = 1.0
        self.replay_capacity = 100_000
        self.num_steps_sampled_before_learning_starts = 3_200
        self.actor_hiddens = (64, 64)
        self.drop_inputs: tuple[str, ...] = ()
        self.critic_hiddens = (64, 64)
        self.variant = "both"
        self.admm_rho = UTILITY_RHO
        self.admm_iterations = UTILITY_ITERATIONS
        self.cost_budget: CostBudget = None
        self.multiplier_lr = 0.5
        self.multiplier_max = 1.0
        self.initial_multiplier = DEFAULT_VIOLATION_PRICE
        self.torch_num_threads = 1
        # .environment() / .env_runners()
        self.env = SlicingMultiAgentEnv
        self.env_runner_cls = MADDPGEnvRunner
        self.num_env_runners = 0
        self.num_envs_per_env_runner = 8
        self.rollout_fragment_length = 50
        # .reporting(): one iteration = one episode of every cell with the defaults
        self.min_time_s_per_iteration = None
        self.min_sample_timesteps_per_iteration = 1_600
        self.metrics_num_episodes_for_smoothing = 32
        # .callbacks()
        self.callbacks_class = ConstraintCallback

    def training(
        self,
        *,
        actor_lr: float = NotProvided,
        critic_lr: float = NotProvided,
        tau: float = NotProvided,
        updates_per_step: float = NotProvided,
        exploration_noise: float = NotProvided,
        cooperative: bool = NotProvided,
        request_penalty: float = NotProvided,
        known_reward_weight: float = NotProvided,
        replay_capacity: int = NotProvided,
        num_steps_sampled_before_learning_starts: int = NotProvided,
        actor_hiddens: Sequence[int] = NotProvided,
        drop_inputs: Sequence[str] = NotProvided,
        critic_hiddens: Sequence[int] = NotProvided,
        variant: str = NotProvided,
        admm_rho: float = NotProvided,
        admm_iterations: int = NotProvided,
        cost_budget: CostBudget = NotProvided,
        multiplier_lr: float = NotProvided,
        multiplier_max: float = NotProvided,
        initial_multiplier: float = NotProvided,
        torch_num_threads: int | None = NotProvided,
        **kwargs,
    ) -> MADDPGConfig:
        """Sets MADDPG's training settings (and, through ``kwargs``, RLlib's common ones such as
        ``gamma``, ``train_batch_size_per_learner`` and ``grad_clip``).

        Args:
            actor_lr: Adam learning rate of the actors (> 0).
            critic_lr: Adam learning rate of the critics (> 0).
            tau: Polyak coefficient of the target networks, in (0, 1].
            updates_per_step: update-to-data ratio: gradient updates per env step sampled (one
                env step = one cell for one interval), > 0; fractions carry over.
            exploration_noise: std of the Gaussian noise added to requested shares, >= 0.
            cooperative: True: every actor climbs the sum of all slices' critics (the cell's
                priced utility) at the actors' joint action; False: each actor climbs its own
                slice's critic (the paper's per-agent loss, slices compete for capacity).
            request_penalty: actor-loss weight (>= 0) on the requested total above the cell,
                max(0, sum_i mu_i - 1); keeps requests where the coordinator need not cut them.
            known_reward_weight: share, in [0, 1], of the actor's objective taken from the known
                reward of the slice's own request against the need its interval turned out to
                have (priced by its multiplier); the rest from the centralised critic.
            replay_capacity: joint transitions kept, >= train_batch_size_per_learner.
            num_steps_sampled_before_learning_starts: env steps of uniform random requests
                before the first update.
            actor_hiddens: hidden layer sizes of each actor MLP.
            drop_inputs: groups of actor inputs held at 0, for ablations: any of "history",
                "time", "price", "levels" (the RL module's INPUT_GROUPS).
            critic_hiddens: hidden layer sizes of each critic MLP.
            variant: "unconstrained", "lagrangian", "admm" or "both" (see the module docstring).
            admm_rho: ADMM penalty rho (> 0) for the "admm" and "both" variants.
            admm_iterations: ADMM iterations (1..10000).
            cost_budget: allowed per-interval SLA cost of each slice (its violation rate), in
                [0, 1], or a map kind -> rate (None or a kind not named: no budget, the
                multiplier stays at ``initial_multiplier``); dual ascent raises a slice's
                multiplier while its cost is above its budget and lowers it while below.
            multiplier_lr: dual ascent step size per iteration, >= 0.
            multiplier_max: upper bound of every multiplier (projected dual ascent onto
                [0, multiplier_max]), > 0; keeps an unreachable budget from swamping the rewards.
            initial_multiplier: every multiplier's value before the first dual ascent step, in
                [0, multiplier_max]: the fixed price of a violation of a slice without a budget.
            torch_num_threads: torch intra-op threads in the learner and env runner processes
                (None leaves torch's default); 1 is fastest for these small networks.
        """
        super().training(**kwargs)
        given = {
            "actor_lr": actor_lr,
            "critic_lr": critic_lr,
            "tau": tau,
            "updates_per_step": updates_per_step,
            "exploration_noise": exploration_noise,
            "cooperative": cooperative,
            "request_penalty": request_penalty,
            "known_reward_weight": known_reward_weight,
            "replay_capacity": replay_capacity,
            "num_steps_sampled_before_learning_starts": num_steps_sampled_before_learning_starts,
            "actor_hiddens": actor_hiddens,
            "drop_inputs": drop_inputs,
            "critic_hiddens": critic_hiddens,
            "variant": variant,
            "admm_rho": admm_rho,
            "admm_iterations": admm_iterations,
            "cost_budget": cost_budget,
            "multiplier_lr": multiplier_lr,
            "multiplier_max": multiplier_max,
            "initial_multiplier": initial_multiplier,
            "torch_num_threads": torch_num_threads,
        }
        for name, value in given.items():
            if value is not NotProvided:
                if name in ("actor_hiddens", "critic_hiddens", "drop_inputs") and isinstance(
                    value, list
                ):
                    value = tuple(value)
                setattr(self, name, value)
        return self

    @property
    def uses_multipliers(self) -> bool:
        return self.variant in ("lagrangian", "both")

    def validate(self) -> None:
        """Raises ValueError naming the key (or the combination) that is wrong."""
        super().validate()
        _positive("actor_lr", self.actor_lr)
        _positive("critic_lr", self.critic_lr)
        _number_in("tau", self.tau, 0.0, 1.0, low_open=True)
        _number_in("gamma", self.gamma, 0.0, 1.0)
        _positive("updates_per_step", self.updates_per_step)
        _number_in("exploration_noise", self.exploration_noise, 0.0, 10.0)
        _number_in("request_penalty", self.request_penalty, 0.0, 1e6)
        _number_in("known_reward_weight", self.known_reward_weight, 0.0, 1.0)
        if not isinstance(self.cooperative, bool):
            _fail("cooperative", f"must be true or false, got {self.cooperative!r}")
        check_budget(self.cost_budget)
        _number_in("multiplier_lr", self.multiplier_lr, 0.0, 1e6)
        _positive("multiplier_max", self.multiplier_max)
        _number_in("initial_multiplier", self.initial_multiplier, 0.0, self.multiplier_max)
        _integer("train_batch_size_per_learner", self.train_batch_size_per_learner, 1)
        _integer("replay_capacity", self.replay_capacity, self.train_batch_size_per_learner)
        _integer(
            "num_steps_sampled_before_learning_starts",
            self.num_steps_sampled_before_learning_starts,
            0,
        )
        _integer("num_envs_per_env_runner", self.num_envs_per_env_runner, 1)
        _integer("rollout_fragment_length", self.rollout_fragment_length, 1)
        from policies.maddpg.torch.default_maddpg_torch_rl_module import dropped_columns

        dropped_columns(self.drop_inputs)  # raises naming drop_inputs and the groups
        for name in ("actor_hiddens", "critic_hiddens"):
            sizes = getattr(self, name)
            if not isinstance(sizes, tuple | list) or not sizes:
                _fail(name, f"must be a non-empty list of layer sizes, got {sizes!r}")
            for size in sizes:
                _integer(name, size, 1)
        if self.variant not in VARIANTS:
            _fail("variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        try:
            check_admm(self.admm_rho, self.admm_iterations)
        except ValueError as e:
            raise ValueError(str(e)) from None
        if self.torch_num_threads is not None:
            _integer("torch_num_threads", self.torch_num_threads, 1)
        if self.env not in ENV_NAMES:
            _fail(
                "env",
                f"MADDPG steps the slicing simulator itself; must be 'slicing_v0', got {self.env!r}",
            )
        if "coordinator" in (self.env_config or {}):
            _fail(
                "env_config.coordinator",
                "is set by training(variant=...): 'admm' and 'both' use ADMM, the others the "
                "projection; remove it",
            )
        try:
            slicing_config(self)
        except ConfigError as e:
            raise ValueError(f"env_config.{e}") from None
        if not (
            isinstance(self.env_runner_cls, type)
            and issubclass(self.env_runner_cls, MADDPGEnvRunner)
        ):
            _fail(
                "env_runner_cls",
                f"must be MADDPGEnvRunner or a subclass, got {self.env_runner_cls!r}",
            )
        if self.num_learners > 1:
            _fail(
                "num_learners",
                f"must be 0 (local) or 1: the replay feeds one learner, got {self.num_learners}",
            )
        if self.lr is not None:
            _fail("lr", "is not used by MADDPG; set actor_lr and critic_lr (and leave lr None)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from policies.maddpg.torch.default_maddpg_torch_rl_module import MADDPGTorchRLModule

        return RLModuleSpec(
            module_class=MADDPGTorchRLModule, model_config=self.maddpg_model_config()
        )

    def maddpg_model_config(self) -> dict[str, Any]:
        specs = slicing_config(self).resolved_slices()
        return {
            "actor_hiddens": list(self.actor_hiddens),
            "drop_inputs": list(self.drop_inputs),
            "critic_hiddens": list(self.critic_hiddens),
            "slice_kinds": [s.kind for s in specs],
        }

    def get_default_learner_class(self):
        from policies.maddpg.torch.maddpg_torch_learner import MADDPGTorchLearner

        return MADDPGTorchLearner


class MADDPG(Algorithm):
    """Multi-agent DDPG with synchronized replay, a batched env runner and one fused learner."""

    @classmethod
    def get_default_config(cls) -> MADDPGConfig:
        return MADDPGConfig()

    def setup(self, config: MADDPGConfig) -> None:
        _set_torch_threads(config.torch_num_threads)
        super().setup(config)
        if self.config.torch_num_threads is not None:
            self.learner_group.foreach_learner(
                lambda _learner, n=self.config.torch_num_threads: _set_torch_threads(n)
            )
        spaces = self.env_runner_group.get_spaces()
        num_slices, num_features = spaces["default_policy"][0].shape
        self.replay = SynchronizedReplay(
            self.config.replay_capacity, num_slices, num_features, seed=self.config.seed
        )
        specs = slicing_config(self.config).resolved_slices()
        self.slice_names = tuple(s.name for s in specs)
        self.slice_kinds = tuple(s.kind for s in specs)
        self._update_credit = 0.0

    def training_step(self) -> None:
        config = self.config
        sampled_before = self.metrics.peek(
            (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
        )
        warmup = sampled_before < config.num_steps_sampled_before_learning_starts
        local_only = self.env_runner_group.num_remote_env_runners() == 0
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            outputs = self.env_runner_group.foreach_env_runner(
                lambda runner: (runner.sample(random_actions=warmup), runner.get_metrics()),
                local_env_runner=local_only,
            )
        new_steps = 0
        for batch, _ in outputs:
            self.replay.add(batch)
            new_steps += len(batch["obs"])
        self.metrics.aggregate([m for _, m in outputs], key=ENV_RUNNER_RESULTS)

        starts = config.num_steps_sampled_before_learning_starts
        if sampled_before + new_steps < starts:
            return
        if sampled_before < starts or sampled_before == 0:  # first learning step: fit once
            obs = self.replay.data["obs"][: len(self.replay)]
            self.learner_group.foreach_learner(lambda learner: learner.set_obs_normalizer(obs))
        self._update_credit += new_steps * config.updates_per_step
        num_updates = int(self._update_credit)
        self._update_credit -= num_updates
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            while num_updates > 0:
                chunk = min(num_updates, MAX_UPDATES_PER_CALL)
                batches = self.replay.sample(chunk, config.train_batch_size_per_learner)
                results = self.learner_group.foreach_learner(
                    lambda learner, b=batches: learner.update_from_replay(b)
                )
                self.metrics.aggregate([r.get() for r in results], key=LEARNER_RESULTS)
                num_updates -= chunk
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group, inference_only=True
            )

    def step(self) -> dict:
        """One iteration; adds ``result[metrics.SECTION]``, the headline metrics, flat."""
        start = time.perf_counter()
        result = super().step()
        elapsed = time.perf_counter() - start
        runners = result.get(ENV_RUNNER_RESULTS, {})
        learners = result.get(LEARNER_RESULTS, {}).get("default_policy", {})
        summary = {
            name: _scalar(runners.get(name))
            for name in (
                metrics.EPISODE_RETURN_MEAN,
                metrics.UTILITY_MEAN,
                metrics.SLA_VIOLATION_RATE,
                metrics.CAPACITY_VIOLATIONS,
                metrics.ADMM_PRIMAL_RESIDUAL_MEAN,
                metrics.ADMM_DUAL_RESIDUAL_MEAN,
            )
        }
        costs = runners.get(metrics.EPISODE_COST, {})
        for name in self.slice_names:
            summary[metrics.per_slice(metrics.EPISODE_COST, name)] = _scalar(costs.get(name))
        for name in (metrics.CRITIC_LOSS, metrics.ACTOR_LOSS, metrics.Q_MEAN):
            summary[name] = _scalar(learners.get(name))
        summary[metrics.ENV_STEPS_PER_S] = float(runners.get(NUM_ENV_STEPS_SAMPLED, 0)) / max(
            elapsed, 1e-9
        )
        for name, value in zip(self.slice_names, self.get_multipliers(), strict=True):
            summary[metrics.per_slice(metrics.MULTIPLIER, name)] = float(value)
        result[metrics.SECTION] = summary
        return result

    def get_multipliers(self) -> np.ndarray:
        """The learner's Lagrange multipliers, one per slice."""
        results = self.learner_group.foreach_learner(lambda learner: learner.get_multipliers())
        return np.asarray(next(iter(results)).get())

    def set_multipliers(self, values: Sequence[float]) -> None:
        """Send new multipliers to the learner(s); they are used from the next update on."""
        values = [float(v) for v in values]
        self.learner_group.foreach_learner(lambda learner: learner.set_multipliers(values))


def _set_torch_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(int(n))


def _scalar(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)


def _fail(key: str, message: str) -> None:
    raise ValueError(f"{key}: {message}")


def _positive(key: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        _fail(key, f"must be a finite number > 0, got {value!r}")


def _number_in(key: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        bracket = "(" if low_open else "["
        _fail(key, f"must be a number in {bracket}{low}, {high}], got {value!r}")


def _integer(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        _fail(key, f"must be an integer >= {low}, got {value!r}")

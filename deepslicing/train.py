"""``deepslicing train`` (also ``python -m deepslicing.train``): train MADDPG on the slicing env.

Ray: a local Ray instance (``num_cpus``, a small object store) unless ``RAY_ADDRESS`` is set, as it
is inside ``ray job submit``; then the job joins that cluster.

Run directory (``run_dir``, default ``runs/maddpg``)::

    config.yaml           the resolved config of the run
    progress.csv          one row of headline metrics per iteration (deepslicing.metrics names)
    state.json            last checkpoint, its iteration and the MLflow run id (written atomically)
    checkpoints/iter_NNNNNN/   algorithm checkpoints every ``checkpoint_every`` iterations and at the end
    eval/                 the final evaluation against the baselines (summary.csv, plots)

``--resume`` continues from ``state.json``'s checkpoint: the iteration counter, networks, replay-free
learner state and Lagrange multipliers come back, and the same MLflow run keeps logging. A resume
without a checkpoint, or whose env or network shape differs from the checkpoint's, stops before
Ray starts and changes nothing. Without ``--resume`` a run directory that already holds a run is
refused, so nothing is overwritten.

MLflow (``tracking``): the run is logged to ``tracking_uri`` (default ``MLFLOW_TRACKING_URI`` or
``sqlite:///mlflow.db``) in ``experiment`` (a model-training experiment, see
:mod:`deepslicing.tracking`), named ``<variant>-<scenario>-seed<seed>``: the resolved config as
params, the training metrics and ``objective`` per iteration, the final evaluation as ``eval/...``
metrics (names in :mod:`deepslicing.metrics`), the final checkpoint and evaluation as artifacts.
When the store cannot be reached the command says so and trains anyway, results landing in the run
directory, and exits with code 3. Every iteration's progress is also a Prometheus metric, tag
``run`` the run directory's name (:mod:`deepslicing.training_metrics`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from ray.util import log_once

from deepslicing import metrics
from deepslicing.config import ConfigError, check_int, option, to_dict
from deepslicing.ray_runtime import init_ray
from deepslicing.simulator import SlicingConfig
from deepslicing.training_metrics import TrainingMetrics
from policies.constraints import check_budget
from policies.maddpg import VARIANTS, MADDPGConfig

# RLlib warns once per process that an algorithm runs on the new API stack; ours only does.
log_once("MADDPG_on_new_api_stack")
_DEFAULTS = MADDPGConfig()
STATE_FILE = "state.json"
PROGRESS_FILE = "progress.csv"
CHECKPOINTS = "checkpoints"
EXIT_TRACKING_FAILED = 3
# settings that change the networks' shapes: a checkpoint only fits a run that agrees on them
SHAPE_KEYS = ("actor_hiddens", "critic_hiddens")
TRAINING_SCENARIO = "mix"  # the default: every synthetic scenario, random load and outages
EXPERIMENT_DESCRIPTION = (
    "MADDPG training runs (`deepslicing train`, `deepslicing run`), one run per training: the "
    "resolved config as params, training curves per iteration, the final evaluation (eval/...), "
    "plots and the checkpoint as artifacts. A registered checkpoint is this run's logged model, "
    "with the registry suite's scores (suite/...). Metric names: deepslicing/metrics.py."
)


@dataclass(frozen=True)
class CostBudgets:
    """Allowed SLA violation rate per slice kind, each in [0, 1], or none: that kind's
    violations keep the fixed price maddpg.initial_multiplier."""

    embb: float | None = option(None, "eMBB slices' allowed violation rate (none: no budget)")
    urllc: float | None = option(None, "URLLC slices' allowed violation rate (none: no budget)")
    mmtc: float | None = option(None, "mMTC slices' allowed violation rate (none: no budget)")

    def __post_init__(self) -> None:
        check_budget(dataclasses.asdict(self))


@dataclass(frozen=True)
class MaddpgSettings:
    """MADDPG's hyperparameters (see policies.maddpg.MADDPGConfig.training for each)."""

    variant: Literal["unconstrained", "lagrangian", "admm", "both"] = option(
        _DEFAULTS.variant,
        "constraint handling: unconstrained, lagrangian (SLA multipliers), admm (ADMM "
        "coordinator) or both",
    )
    actor_lr: float = option(_DEFAULTS.actor_lr, "actor learning rate (Adam)")
    critic_lr: float = option(_DEFAULTS.critic_lr, "critic learning rate (Adam)")
    gamma: float = option(_DEFAULTS.gamma, "discount factor in [0, 1)")
    tau: float = option(_DEFAULTS.tau, "Polyak coefficient of the target networks, (0, 1]")
    batch_size: int = option(
        _DEFAULTS.train_batch_size_per_learner, "replayed joint transitions per update"
    )
    updates_per_step: float = option(
        _DEFAULTS.updates_per_step, "update-to-data ratio: gradient updates per env step sampled"
    )
    exploration_noise: float = option(
        _DEFAULTS.exploration_noise, "std of the Gaussian noise on requested shares"
    )
    cooperative: bool = option(
        _DEFAULTS.cooperative,
        "every actor maximises the sum of all slices' critics (the cell's utility), not its own",
    )
    request_penalty: float = option(
        _DEFAULTS.request_penalty, "actor-loss weight on requested shares beyond the cell (>= 0)"
    )
    known_reward_weight: float = option(
        _DEFAULTS.known_reward_weight,
        "share of the actor's objective from the known reward of its own request (the rest from "
        "the critic), in [0, 1]",
    )
    replay_capacity: int = option(_DEFAULTS.replay_capacity, "joint transitions kept in replay")
    learning_starts: int = option(
        _DEFAULTS.num_steps_sampled_before_learning_starts,
        "env steps of random requests before the first update",
    )
    actor_hiddens: tuple[int, ...] = option(
        tuple(_DEFAULTS.actor_hiddens), "hidden layer sizes of each actor"
    )
    drop_inputs: tuple[str, ...] = option(
        (), "ablation: actor input groups held at 0 (history, time, price, levels)"
    )
    critic_hiddens: tuple[int, ...] = option(
        tuple(_DEFAULTS.critic_hiddens), "hidden layer sizes of each centralised critic"
    )
    admm_rho: float = option(_DEFAULTS.admm_rho, "ADMM penalty rho (admm and both variants)")
    admm_iterations: int = option(_DEFAULTS.admm_iterations, "ADMM iterations per decision")
    cost_budget: CostBudgets = option(
        CostBudgets(),
        "allowed SLA violation rate of each slice kind (dual ascent on its Lagrange multipliers "
        "keeps it); a kind without one has the fixed price initial_multiplier",
    )
    multiplier_lr: float = option(
        _DEFAULTS.multiplier_lr, "dual ascent step of the Lagrange multipliers per iteration"
    )
    initial_multiplier: float = option(
        _DEFAULTS.initial_multiplier,
        "price of a violation (Lagrange multiplier) before the first dual ascent step; it stays "
        "there for kinds without a budget",
    )
    num_envs: int = option(
        _DEFAULTS.num_envs_per_env_runner, "cells each env runner steps side by side"
    )
    rollout_fragment_length: int = option(
        _DEFAULTS.rollout_fragment_length, "intervals each env runner samples per round"
    )
    num_env_runners: int = option(
        _DEFAULTS.num_env_runners, "remote env runner actors (0 samples in the driver)"
    )


@dataclass(frozen=True)
class TrainConfig:
    """Train MADDPG slice allocators on RLlib (local Ray, or the cluster at RAY_ADDRESS), with
    checkpoints in RUN_DIR, MLflow tracking and a final evaluation against the baselines."""

    iterations: int = option(45, "training iterations (an iteration is about one episode per cell)")
    checkpoint_every: int = option(5, "save a checkpoint every N iterations (and at the end)")
    run_dir: str = option("runs/maddpg", "directory for checkpoints, progress and evaluation")
    resume: bool = option(False, "continue the run in run_dir from its last checkpoint")
    init_from: str | None = option(
        None,
        "checkpoint directory to start a new run from (fine-tuning, e.g. a fast-model run "
        "continued with --set env.backend=ns3): its networks, optimizers and multipliers; "
        "iterations count from 1",
    )
    seed: int = option(0, "seed of the networks, exploration, replay and traffic")
    eval_episodes: int = option(
        5, "episodes of the final evaluation against equal and proportional (0 skips it)"
    )
    tracking: bool = option(True, "log the run to MLflow")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    experiment: str = option("deepslicing", "MLflow experiment name")
    num_cpus: int = option(2, "CPUs of the local Ray instance (ignored with RAY_ADDRESS)")
    env: SlicingConfig = dataclasses.field(
        default_factory=lambda: SlicingConfig(scenario=TRAINING_SCENARIO),
        metadata={
            "help": "cell, slices and traffic scenario (set with --set env.KEY=VALUE); "
            "training defaults to the 'mix' scenario"
        },
    )
    maddpg: MaddpgSettings = dataclasses.field(
        default_factory=MaddpgSettings,
        metadata={"help": "MADDPG hyperparameters (set with --set maddpg.KEY=VALUE)"},
    )

    def __post_init__(self) -> None:
        for name, low in (
            ("iterations", 1),
            ("checkpoint_every", 1),
            ("seed", 0),
            ("eval_episodes", 0),
            ("num_cpus", 1),
        ):
            check_int(name, getattr(self, name), low)
        if not isinstance(self.run_dir, str) or not self.run_dir.strip():
            raise ValueError(f"run_dir: must be a non-empty path, got {self.run_dir!r}")
        defaults = SlicingConfig()
        for key in COORDINATOR_KEYS:
            if getattr(self.env, key) != getattr(defaults, key):
                where = "maddpg.variant" if key == "coordinator" else f"maddpg.{key}"
                raise ValueError(f"env.{key}: when training, {where} sets it; leave env.{key} out")
        if self.maddpg.variant not in VARIANTS:
            raise ValueError(f"maddpg.variant: must be one of {VARIANTS}")
        try:
            algorithm_config(self).validate()
        except ValueError as e:
            raise ValueError(
                f"maddpg.{e}" if not str(e).startswith("maddpg.") else str(e)
            ) from None


COORDINATOR_KEYS = ("coordinator", "admm_rho", "admm_iterations")  # set by maddpg.variant


def env_config(env: SlicingConfig) -> dict[str, Any]:
    """The env section for RLlib, without the coordinator keys that maddpg.variant decides."""
    return {k: v for k, v in to_dict(env).items() if k not in COORDINATOR_KEYS}


def algorithm_config(config: TrainConfig) -> MADDPGConfig:
    """The RLlib config of a training run."""
    m = config.maddpg
    return (
        MADDPGConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(env_config=env_config(config.env))
        .training(
            variant=m.variant,
            actor_lr=m.actor_lr,
            critic_lr=m.critic_lr,
            gamma=m.gamma,
            tau=m.tau,
            train_batch_size_per_learner=m.batch_size,
            updates_per_step=m.updates_per_step,
            exploration_noise=m.exploration_noise,
            cooperative=m.cooperative,
            request_penalty=m.request_penalty,
            known_reward_weight=m.known_reward_weight,
            replay_capacity=m.replay_capacity,
            num_steps_sampled_before_learning_starts=m.learning_starts,
            actor_hiddens=m.actor_hiddens,
            drop_inputs=m.drop_inputs,
            critic_hiddens=m.critic_hiddens,
            admm_rho=m.admm_rho,
            admm_iterations=m.admm_iterations,
            cost_budget=dataclasses.asdict(m.cost_budget),
            multiplier_lr=m.multiplier_lr,
            initial_multiplier=m.initial_multiplier,
        )
        .env_runners(
            num_env_runners=m.num_env_runners,
            num_envs_per_env_runner=m.num_envs,
            rollout_fragment_length=m.rollout_fragment_length,
        )
        .debugging(seed=config.seed, log_level="ERROR")
    )


# --- run directory ---------------------------------------------------------------------------


def read_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomic: a run killed mid-write keeps the previous state."""
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)


def check_run_dir(config: TrainConfig) -> dict[str, Any] | None:
    """The state to resume from (None for a fresh run); raises ConfigError before anything changes."""
    run_dir = Path(config.run_dir)
    state = read_state(run_dir)
    if config.init_from is not None:
        if config.resume:
            raise ConfigError("init_from: starts a new run; it cannot be combined with --resume")
        from policies.maddpg.policy import is_checkpoint  # torch and RLlib only when needed

        if not is_checkpoint(config.init_from):
            raise ConfigError(
                f"init_from: {config.init_from} is not a MADDPG checkpoint directory "
                "(for example RUN_DIR/checkpoints/iter_000030)"
            )
    if not config.resume:
        if state is not None:
            raise ConfigError(
                f"run_dir: {run_dir} already holds a run (iteration {state['iteration']}); "
                "pass --resume to continue it or choose another --run-dir"
            )
        return None
    if state is None:
        raise ConfigError(
            f"resume: no checkpoint in {run_dir} (no {STATE_FILE}); nothing to resume"
        )
    checkpoint = Path(state["checkpoint"])
    if not checkpoint.is_dir():
        raise ConfigError(f"resume: the checkpoint {checkpoint} named in {STATE_FILE} is missing")
    saved = state["config"]
    now = to_dict(config)
    differing = [f"env.{k}" for k in now["env"] if now["env"][k] != saved["env"].get(k)]
    differing += [f"maddpg.{k}" for k in SHAPE_KEYS if now["maddpg"][k] != saved["maddpg"].get(k)]
    if differing:
        raise ConfigError(
            f"resume: the checkpoint in {run_dir} was trained with different {differing}; "
            "it is incompatible with this config"
        )
    if state["iteration"] >= config.iterations:
        raise ConfigError(
            f"iterations: the run in {run_dir} already reached iteration {state['iteration']}; "
            f"ask for more than that to resume"
        )
    return state


def append_progress(run_dir: Path, iteration: int, summary: dict[str, float]) -> None:
    path = run_dir / PROGRESS_FILE
    row = {"iteration": iteration, **summary}
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_progress(run_dir: Path, last_iteration: int) -> None:
    """Drop rows of iterations after the checkpoint (a killed run may have logged a few)."""
    path = run_dir / PROGRESS_FILE
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= last_iteration]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


MAX_SLICES_LISTED = 6  # the progress line names each slice's multiplier up to this many slices


def progress_line(iteration: int, total: int, summary: dict[str, float], slices, seconds) -> str:
    def fmt(value: float, spec: str) -> str:
        return "-" if value is None or not math.isfinite(value) else format(value, spec)

    values = {name: summary.get(metrics.per_slice(metrics.MULTIPLIER, name)) for name in slices}
    stuck = [n for n in slices if summary.get(metrics.per_slice(metrics.BUDGET_UNREACHABLE, n))]
    if len(slices) <= MAX_SLICES_LISTED:
        multipliers = " ".join(
            f"{name} {fmt(value, '.2f')}" + (" (budget not reachable)" if name in stuck else "")
            for name, value in values.items()
        )
    else:  # one readable line per iteration: the range over the slices
        known = [v for v in values.values() if v is not None and math.isfinite(v)]
        low, high = (min(known), max(known)) if known else (math.nan, math.nan)
        multipliers = f"{fmt(low, '.2f')}..{fmt(high, '.2f')} over {len(slices)} slices"
        if stuck:
            multipliers += f"; budget not reachable: {' '.join(stuck)}"
    return (
        f"iter {iteration:>4}/{total}  "
        f"return {fmt(summary.get(metrics.EPISODE_RETURN_MEAN), '8.2f')}  "
        f"utility {fmt(summary.get(metrics.UTILITY_MEAN), '.4f')}  "
        f"SLA viol {fmt(100 * summary.get(metrics.SLA_VIOLATION_RATE, math.nan), '5.1f')} %  "
        f"lambda [{multipliers}]  "
        f"{fmt(summary.get(metrics.ENV_STEPS_PER_S), ',.0f')} steps/s  ({seconds:.1f} s)"
    )


# --- the command ---------------------------------------------------------------------------


def run(config: TrainConfig) -> int:
    try:
        state = check_run_dir(config)
    except ConfigError as e:
        print(f"deepslicing train: error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    tracker, tracking_error = start_tracking(config, state)
    import ray

    started_ray = init_ray(config.num_cpus)
    status = "FAILED"
    try:
        final = train_loop(config, state, tracker)
        if config.eval_episodes:
            final_evaluation(config, final, tracker)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(status)
        if started_ray:
            ray.shutdown()
    print(f"final checkpoint: {final}")
    if tracker is not None:
        print(f"MLflow run {tracker.run_id} in experiment {config.experiment!r} at {tracker.uri}")
    if tracking_error:
        print(f"deepslicing train: error: {tracking_error}", file=sys.stderr)
        return EXIT_TRACKING_FAILED
    return 0


def start_tracking(config: TrainConfig, state: dict[str, Any] | None):
    """The MLflow tracker, or (None, the reason) when tracking is off or the store is down."""
    if not config.tracking:
        return None, None
    from deepslicing.tracking import RunTracker, TrackingError

    try:
        tracker = RunTracker(
            config.experiment,
            command="deepslicing train",
            description=EXPERIMENT_DESCRIPTION,
            uri=config.tracking_uri,
            run_name=f"{config.maddpg.variant}-{config.env.scenario}-seed{config.seed}",
            run_id=(state or {}).get("mlflow_run_id"),
            tags={
                "scenario": config.env.scenario,
                "variant": config.maddpg.variant,
                "seed": str(config.seed),
                "run_dir": str(Path(config.run_dir).resolve()),
            },
        )
        tracker.log_params(to_dict(config))
        return tracker, None
    except TrackingError as e:
        print(f"warning: {e}\nTraining goes on; results land in {config.run_dir}.", file=sys.stderr)
        return None, str(e)


def train_loop(config: TrainConfig, state: dict[str, Any] | None, tracker) -> Path:
    """Build (or restore) the algorithm, train, checkpoint; returns the final checkpoint."""
    run_dir = Path(config.run_dir)
    algo = algorithm_config(config).build_algo()
    try:
        start = 0
        if state is not None:
            algo.restore_from_path(state["checkpoint"])
            start = state["iteration"]
            truncate_progress(run_dir, start)
            restored = ", ".join(
                f"{name} {value:.10g}"
                for name, value in zip(algo.slice_names, algo.get_multipliers(), strict=True)
            )
            print(
                f"resumed from {state['checkpoint']} at iteration {start}; "
                f"multipliers restored: {restored}",
                flush=True,
            )
        elif config.init_from is not None:
            algo.restore_from_path(str(Path(config.init_from).resolve()))
            print(f"initialised from {config.init_from}", flush=True)
        checkpoint = Path(state["checkpoint"]) if state else None
        exported = TrainingMetrics(run_dir.name)
        for iteration in range(start + 1, config.iterations + 1):
            began = time.perf_counter()
            result = algo.train()
            summary = result[metrics.SECTION]
            exported.record(summary)
            append_progress(run_dir, iteration, summary)
            print(
                progress_line(
                    iteration,
                    config.iterations,
                    summary,
                    algo.slice_names,
                    time.perf_counter() - began,
                ),
                flush=True,
            )
            if tracker is not None:
                tracker.log_metrics(metrics.with_objective(summary), step=iteration)
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                checkpoint = run_dir / CHECKPOINTS / f"iter_{iteration:06d}"
                algo.save_to_path(str(checkpoint.resolve()))
                write_state(
                    run_dir,
                    {
                        "iteration": iteration,
                        "checkpoint": str(checkpoint.resolve()),
                        "mlflow_run_id": tracker.run_id if tracker else None,
                        "config": to_dict(config),
                    },
                )
        assert checkpoint is not None
        if tracker is not None:
            tracker.log_artifacts(checkpoint, "checkpoint")
        return checkpoint
    finally:
        algo.stop()


def final_evaluation(config: TrainConfig, checkpoint: Path, tracker) -> None:
    """The trained policy beside equal and proportional on the training scenario (on every
    synthetic scenario when it trained on the mix)."""
    from deepslicing.evaluation import EvaluateConfig, evaluate_pairs, format_table, write_outputs

    eval_config = EvaluateConfig(
        policy=("equal", "proportional", str(checkpoint)),
        scenario=("all",) if config.env.scenario == "mix" else (config.env.scenario,),
        episodes=config.eval_episodes,
        seed=config.seed + 10_000,  # traffic the training never saw
        out=str(Path(config.run_dir) / "eval"),
        env=config.env,
    )
    results = evaluate_pairs(eval_config)
    write_outputs(eval_config, results, Path(eval_config.out))
    print(format_table([r.row for r in results]))
    if tracker is not None:
        trained = [r.row for r in results if r.row["policy"] == str(checkpoint)]
        tracker.log_metrics(metrics.scenario_metrics(metrics.EVAL, trained), step=config.iterations)
        tracker.log_artifacts(eval_config.out, "eval")


if __name__ == "__main__":
    from deepslicing.cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))

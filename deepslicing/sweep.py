"""``deepslicing tune SWEEP.yaml``: Ray Tune hyperparameter sweeps of MADDPG, tracked in MLflow.

A sweep file (``tune_configs/maddpg_asha*.yaml``) is a :class:`SweepConfig`: the base training
settings (``env``, ``maddpg``, as in ``deepslicing train``), a ``search_space`` of dimensions over
dotted keys of those sections, a scheduler, and stop criteria.

Search dimensions (``{key: maddpg.actor_lr, kind: loguniform, values: [1.0e-4, 3.0e-3]}``):

| kind         | values                | samples                                   |
|--------------|-----------------------|-------------------------------------------|
| `choice`     | any list              | one of the values, uniformly              |
| `grid`       | any list              | every value (multiplies the trial count)  |
| `uniform`    | [low, high]           | uniform float                             |
| `loguniform` | [low, high], low > 0  | log-uniform float                         |
| `randint`    | [low, high)           | uniform integer                           |

Schedulers: ``asha`` (default; stops trials whose ``metric`` lags at rungs grace_period x
reduction_factor^k iterations) or ``pbt`` (every ``perturbation_interval`` iterations the worse
trials copy a better trial's checkpoint and perturb its hyperparameters within the search space).
Each trial is one MADDPG run in its own Tune actor with ``cpus_per_trial`` CPUs; at most
``max_concurrent_trials`` run at once (2 fits a 2-core machine). Every iteration reports the
headline metrics of :mod:`deepslicing.metrics`, the sweep ``objective``, and each swept value as
``hp/<key>`` (so PBT's changes are visible as metrics; MLflow params cannot change).

MLflow (``experiment``, a model-training experiment, see :mod:`deepslicing.tracking`): the sweep is
one parent run named after the sweep (its settings and search space as params), and every trial is
a child run nested under it (``mlflow.parentRunId``), named ``trial_<id>``, written by Tune's
``MLflowLoggerCallback``: the trial's full resolved config as params, the training metrics of
:mod:`deepslicing.metrics` per iteration (Tune's own bookkeeping results are left out), and tags
for scenario, variant and sweep. When the sweep ends the best trial's run is tagged
``best_trial=true`` and the parent names it (``best_trial``, ``best_trial_run_id``, ``best_<metric>``).
With ``register`` (default on) the best trial's last checkpoint then goes through
:func:`deepslicing.registry.register` (suite evaluation, export, champion gate), its logged model
logged from the best trial's run; the registered version is tagged on that run and the parent
(``registered_version``).
Tune's own results and checkpoints go to ``storage_path/name``.

Everything is checked before Ray starts: unknown keys, an empty search space, a search key that
names no setting, bad values, a metric that is never reported, an unreachable MLflow server.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deepslicing import metrics
from deepslicing.config import check_int, from_mapping, option, to_dict
from deepslicing.ray_runtime import init_ray
from deepslicing.simulator import SlicingConfig
from deepslicing.train import MaddpgSettings, TrainConfig, algorithm_config
from deepslicing.training_metrics import TrainingMetrics

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SECTIONS = ("env", "maddpg")
DEFAULT_METRIC = metrics.OBJECTIVE
COMMAND = "deepslicing tune"
EXPERIMENT_DESCRIPTION = (
    "Ray Tune sweeps of MADDPG (`deepslicing tune`): one parent run per sweep, its trials nested "
    "under it as child runs with their params and training curves; the best trial is tagged "
    "best_trial=true and its registered model is logged from its run. Metric names: "
    "deepslicing/metrics.py."
)


@dataclass(frozen=True)
class SearchDimension:
    """One swept setting: a dotted key of the env or maddpg section and how to sample it."""

    key: str = option("", "dotted key, e.g. maddpg.actor_lr or env.waste_weight")
    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"] = option(
        "choice", "choice, grid, uniform, loguniform or randint"
    )
    values: tuple[Any, ...] = option((), "the choices, or [low, high] for ranges")

    def __post_init__(self) -> None:
        where = f"search_space[{self.key or '?'}]"
        section, _, name = self.key.partition(".")
        if section not in SECTIONS or not name:
            raise ValueError(f"{where}.key: must be env.<field> or maddpg.<field>")
        fields = {
            f.name
            for f in dataclasses.fields(SlicingConfig if section == "env" else MaddpgSettings)
        }
        if name not in fields:
            raise ValueError(
                f"{where}.key: {section} has no setting {name!r}; see {sorted(fields)}"
            )
        if not self.values:
            raise ValueError(f"{where}.values: must not be empty")
        if self.kind in ("uniform", "loguniform", "randint"):
            ok = len(self.values) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in self.values
            )
            if not ok or not self.values[0] < self.values[1]:
                raise ValueError(f"{where}.values: {self.kind} needs [low, high] with low < high")
            if self.kind == "loguniform" and self.values[0] <= 0:
                raise ValueError(f"{where}.values: loguniform needs low > 0")

    def sampler(self):
        from ray import tune

        low_high = self.values
        return {
            "choice": lambda: tune.choice(list(self.values)),
            "grid": lambda: tune.grid_search(list(self.values)),
            "uniform": lambda: tune.uniform(*low_high),
            "loguniform": lambda: tune.loguniform(*low_high),
            "randint": lambda: tune.randint(int(low_high[0]), int(low_high[1])),
        }[self.kind]()


@dataclass(frozen=True)
class SweepConfig:
    """Sweep MADDPG hyperparameters with Ray Tune (ASHA or PBT) on local Ray or RAY_ADDRESS; every
    trial is an MLflow run. Give the sweep YAML as the first argument (or --config)."""

    name: str = option("maddpg_asha", "sweep name: Tune's folder under storage_path")
    scheduler: Literal["asha", "pbt"] = option("asha", "asha (early stopping) or pbt")
    metric: str = option(
        DEFAULT_METRIC, "metric to optimise: objective (utility - 0.25 x SLA violation rate)"
    )
    mode: Literal["max", "min"] = option("max", "maximise or minimise the metric")
    num_samples: int = option(8, "trials drawn from the search space (x each grid value)")
    max_concurrent_trials: int = option(2, "trials running at once")
    cpus_per_trial: float = option(1.0, "CPUs reserved per trial (fractions allowed)")
    max_iterations: int = option(30, "stop a trial after this many training iterations")
    grace_period: int = option(5, "asha: iterations before a trial can be stopped")
    reduction_factor: int = option(2, "asha: keep 1 / reduction_factor of trials at each rung")
    perturbation_interval: int = option(5, "pbt: iterations between exploit/explore steps")
    checkpoint_every: int = option(5, "trial checkpoint interval in iterations (pbt: every step)")
    seed: int = option(0, "seed of the search and of every trial")
    storage_path: str = option("runs/tune", "where Tune writes results and checkpoints")
    tracking: bool = option(True, "log every trial to MLflow")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    experiment: str = option("deepslicing-sweeps", "MLflow experiment of the trials")
    num_cpus: int = option(2, "CPUs of the local Ray instance (ignored with RAY_ADDRESS)")
    register: bool = option(
        True,
        "evaluate the best trial on the suite, export it and register it in MLflow as "
        "deepslicing-allocator (the champion alias moves only if it beats the champion)",
    )
    search_space: tuple[SearchDimension, ...] = option((), "the swept settings (see the docstring)")
    env: SlicingConfig = dataclasses.field(
        default_factory=SlicingConfig,
        metadata={"help": "base cell, slices and scenario of every trial"},
    )
    maddpg: MaddpgSettings = dataclasses.field(
        default_factory=MaddpgSettings,
        metadata={"help": "base MADDPG settings of every trial (swept keys override them)"},
    )

    def __post_init__(self) -> None:
        for name, low in (
            ("num_samples", 1),
            ("max_concurrent_trials", 1),
            ("max_iterations", 1),
            ("grace_period", 1),
            ("reduction_factor", 2),
            ("perturbation_interval", 1),
            ("checkpoint_every", 1),
            ("seed", 0),
            ("num_cpus", 1),
        ):
            check_int(name, getattr(self, name), low)
        if not (isinstance(self.cpus_per_trial, float) and 0 < self.cpus_per_trial <= 64):
            raise ValueError(f"cpus_per_trial: must be in (0, 64], got {self.cpus_per_trial!r}")
        if not self.search_space:
            raise ValueError("search_space: is empty; a sweep needs at least one dimension")
        keys = [d.key for d in self.search_space]
        if len(set(keys)) < len(keys):
            raise ValueError(f"search_space: each key may appear once, got {keys}")
        if self.scheduler == "pbt" and any(d.kind == "grid" for d in self.search_space):
            raise ValueError("search_space: pbt cannot perturb grid dimensions; use choice")
        if not metrics.is_training_metric(self.metric):
            raise ValueError(
                f"metric: {self.metric!r} is never reported; choose one of {metrics.ALL} "
                f"or a per-slice metric such as {metrics.per_slice(metrics.MULTIPLIER, 'embb')}"
            )
        if self.grace_period > self.max_iterations:
            raise ValueError("grace_period: must not exceed max_iterations")
        # the base, and the base with each candidate value, must make valid training runs
        base = param_space(self, samplers=False)
        trial_config(base)
        for d in self.search_space:
            section, name = d.key.split(".", 1)
            candidates = d.values if d.kind in ("choice", "grid") else d.values[:2]
            for value in candidates:
                trial_config({**base, section: {**base[section], name: value}})


def trial_config(params: dict[str, Any]) -> TrainConfig:
    """The training config of one trial from its Tune params (env, maddpg, sweep sections)."""
    return from_mapping(
        TrainConfig,
        {
            "env": params["env"],
            "maddpg": params["maddpg"],
            "seed": params["sweep"]["seed"],
            "tracking": False,
            "eval_episodes": 0,
        },
    )


def param_space(sweep: SweepConfig, samplers: bool = True) -> dict[str, Any]:
    """Tune's param space: the full base config with the swept keys replaced by samplers, plus
    the sweep settings a trial needs. MLflow logs it, flattened, as each run's params."""
    space: dict[str, Any] = {"env": to_dict(sweep.env), "maddpg": to_dict(sweep.maddpg)}
    for d in sweep.search_space:
        section, name = d.key.split(".", 1)
        space[section][name] = d.sampler() if samplers else d.values[0]
    space["sweep"] = {
        "name": sweep.name,
        "scheduler": sweep.scheduler,
        "max_iterations": sweep.max_iterations,
        "checkpoint_every": sweep.checkpoint_every,
        "seed": sweep.seed,
        "swept": [d.key for d in sweep.search_space],
    }
    return space


def train_trial(params: dict[str, Any]) -> None:
    """A Tune function trainable: one MADDPG run reporting every iteration."""
    import torch  # noqa: F401  (import before Ray's workers set thread counts)
    from ray import tune

    sweep = params["sweep"]
    swept = {key: _lookup(params, key) for key in sweep["swept"]}
    algo = algorithm_config(trial_config(params)).build_algo()
    try:
        start = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # PBT exploit, or a restored trial
            with checkpoint.as_directory() as directory:
                algo.restore_from_path(directory)
                start = int((Path(directory) / "iteration").read_text())
        every = 1 if sweep["scheduler"] == "pbt" else sweep["checkpoint_every"]
        exported = TrainingMetrics(tune.get_context().get_trial_name())
        for iteration in range(start + 1, sweep["max_iterations"] + 1):
            summary = metrics.with_objective(algo.train()[metrics.SECTION])
            exported.record(summary)
            for key, value in swept.items():
                summary[metrics.per_slice(metrics.HYPERPARAMETER, key)] = value
            summary = {k: v for k, v in summary.items() if not _is_nan(v)}
            if iteration % every == 0 or iteration == sweep["max_iterations"]:
                with tempfile.TemporaryDirectory() as directory:
                    algo.save_to_path(directory)
                    (Path(directory) / "iteration").write_text(str(iteration))
                    tune.report(summary, checkpoint=tune.Checkpoint.from_directory(directory))
            else:
                tune.report(summary)
    finally:
        algo.stop()


def _lookup(params: dict[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return params[section][name]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def build_tuner(sweep: SweepConfig, tracking_uri: str | None, parent_run_id: str | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            max_t=sweep.max_iterations,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
    else:
        random.seed(sweep.seed)  # PBT draws its exploit/explore choices from `random`
        scheduler = PopulationBasedTraining(
            perturbation_interval=sweep.perturbation_interval,
            hyperparam_mutations=_nested({d.key: d.sampler() for d in sweep.search_space}),
        )
    from deepslicing.tracking import run_tags

    callbacks = []
    if tracking_uri is not None:
        callbacks.append(
            _mlflow_logger()(
                tracking_uri=tracking_uri,
                experiment_name=sweep.experiment,
                tags={**run_tags(COMMAND, parent_run_id), **sweep_tags(sweep)},
            )
        )
    return tune.Tuner(
        tune.with_resources(train_trial, {"cpu": sweep.cpus_per_trial}),
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
            search_alg=_seeded_search(sweep),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(Path(sweep.storage_path).resolve()),
            stop={"training_iteration": sweep.max_iterations},
            callbacks=callbacks,
            # PBT exploits other trials' recent checkpoints; keeping 4 leaves them in place
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            verbose=1,  # the status table, not every result of every trial
        ),
    )


def _mlflow_logger():
    """Tune's MLflow logger, logging a trial's params once (PBT restarts trials with mutated
    values, which MLflow params cannot take; params keep the first values and the ``hp/<key>``
    metrics follow every change) and only the training metrics of :mod:`deepslicing.metrics`
    (not Tune's bookkeeping, nor the config as metrics), at step = training iteration."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.result import TRAINING_ITERATION

    class VocabularyLogger(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            if trial not in self._trial_runs:
                super().log_trial_start(trial)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            self.mlflow_util.log_metrics(
                run_id=self._trial_runs[trial],
                metrics_to_log={k: v for k, v in result.items() if metrics.is_training_metric(k)},
                step=result[TRAINING_ITERATION],
            )

    return VocabularyLogger


def _trial_name(trial) -> str:
    return _trial_name_of(trial.trial_id)


def _trial_name_of(trial_id: str) -> str:
    return f"trial_{trial_id}"


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def _seeded_search(sweep: SweepConfig):
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed)


def resolved_tracking_uri(sweep: SweepConfig) -> str | None:
    """The MLflow store (an absolute path for sqlite), checked before any trial starts."""
    if not sweep.tracking:
        return None
    from deepslicing.tracking import check_server, tracking_uri

    uri = tracking_uri(sweep.tracking_uri)
    check_server(uri)
    return uri


def run(sweep: SweepConfig) -> int:
    import ray

    from deepslicing.tracking import TrackingError

    try:
        uri = resolved_tracking_uri(sweep)
    except TrackingError as e:
        print(f"deepslicing tune: error: {e}", file=sys.stderr)
        return 2
    parent = None if uri is None else start_parent_run(sweep, uri)
    started_ray = init_ray(sweep.num_cpus)
    try:
        results = build_tuner(sweep, uri, parent and parent.run_id).fit()
    except BaseException:
        if parent is not None:
            parent.finish("FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    errors = [r for r in results if r.error]
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="all")
    print(f"\n{len(results)} trials, {len(errors)} failed; results in {results.experiment_path}")
    print(f"best trial: {sweep.metric} = {best.metrics.get(sweep.metric)}")
    for d in sweep.search_space:
        print(f"  {d.key} = {_lookup(best.config, d.key)}")
    if best.checkpoint is not None:
        print(f"best checkpoint: {best.checkpoint.path}")
    best_run_id = None
    if parent is not None:
        best_run_id = mark_best_trial(parent, sweep, best)
        print(f"MLflow experiment {sweep.experiment!r} at {uri}: sweep run {parent.run_id}")
    if sweep.register and uri and best.checkpoint is not None:
        from deepslicing.registry import register, report

        outcome = register(
            best.checkpoint.path,
            tracking_uri=uri,
            run_id=best_run_id,
            out=str(Path(results.experiment_path) / "best_export"),
        )
        print(f"\nbest trial, registered:\n{report(outcome)}")
        if parent is not None:
            parent.set_tags({"registered_version": outcome["version"]})
            parent.client.set_tag(best_run_id, "registered_version", outcome["version"])
    if parent is not None:
        parent.finish("FAILED" if errors else "FINISHED")
    return 1 if errors else 0


def sweep_tags(sweep: SweepConfig) -> dict[str, str]:
    return {"scenario": sweep.env.scenario, "variant": sweep.maddpg.variant, "sweep": sweep.name}


def start_parent_run(sweep: SweepConfig, uri: str):
    """The sweep's parent run: the sweep settings and the search space as params."""
    from deepslicing.tracking import RunTracker

    parent = RunTracker(
        sweep.experiment,
        command=COMMAND,
        description=EXPERIMENT_DESCRIPTION,
        uri=uri,
        run_name=sweep.name,
        tags={**sweep_tags(sweep), "scheduler": sweep.scheduler},
    )
    parent.log_params(
        {
            **{k: v for k, v in to_dict(sweep).items() if k not in ("env", "maddpg")},
            "search_space": {d.key: f"{d.kind} {list(d.values)}" for d in sweep.search_space},
        }
    )
    return parent


def mark_best_trial(parent, sweep: SweepConfig, best) -> str | None:
    """Tag the best trial's run and name it on the parent; returns its run id (None if Tune's
    logger never created it)."""
    name = _trial_name_of(best.metrics["trial_id"])
    runs = parent.client.search_runs(
        [parent.experiment_id],
        filter_string=(
            f"tags.trial_name = '{name}' and tags.`mlflow.parentRunId` = '{parent.run_id}'"
        ),
    )
    if not runs:
        return None
    run_id = runs[0].info.run_id
    parent.client.set_tag(run_id, "best_trial", "true")
    parent.set_tags(
        {
            "best_trial": name,
            "best_trial_run_id": run_id,
            f"best_{sweep.metric}": best.metrics.get(sweep.metric),
        }
    )
    return run_id

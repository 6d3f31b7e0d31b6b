"""Metric names, in one place for the learner's logging, Tune, MLflow and ``deepslicing compare``.

One vocabulary: a name means the same thing wherever it appears. MADDPG's training result
(``Algorithm.train()``) holds the training metrics under ``result[SECTION]``, one flat dict per
iteration, so Tune metrics read ``"deepslicing/utility_mean"`` and MLflow logs the same names.
Measurements of a finished policy carry a prefix saying which measurement they are: ``eval/`` (a
training run's final evaluation on traffic it never saw) and ``suite/`` (the registry's suite that
the champion gate compares). The MLflow UI's chart view groups metrics by the part before their
last ``/`` (3.17, seen in its chart view), so the suite's means are one section (``suite``), each
scenario of it another (``suite/steady``), the same for ``eval``, and each per-slice family one.

Units: utility and returns are the model's per-interval cell utility (at most 1 per interval, see
:mod:`deepslicing.model`); rates are fractions in [0, 1]; multipliers are in utility per unit of
cost (cost 1 = one slice-interval in SLA violation). Step = training iteration everywhere; the
``eval/`` and ``suite/`` metrics sit at the step of the checkpoint they measured.

Logged in (checked by ``tests/test_mlflow_ui.py``; `budget` by ``tests/test_maddpg.py``):
`train` = a ``deepslicing train`` run; `trial` = a sweep trial's run (``deepslicing tune``);
`budget` = either of those when the slice's kind has a ``maddpg.cost_budget`` (by default none
has); `model` = the MLflow logged model of a registered checkpoint (and its training run).
``<slice>`` is a slice name, ``<scenario>`` a suite or evaluation scenario, ``<m>`` one of
``utility_mean``, ``sla_violation_rate``, ``objective``, ``resource_usage``.

| name                          | logged in    | meaning                                                              |
|-------------------------------|--------------|----------------------------------------------------------------------|
| `episode_return_mean`         | train, trial | mean over recent episodes of the sum over intervals of the cell utility |
| `utility_mean`                | train, trial | mean over recent training episodes of the mean per-interval cell utility |
| `sla_violation_rate`          | train, trial | share of recent training (interval, slice) pairs in SLA violation    |
| `objective`                   | train, trial | utility_mean - SLA_PENALTY x sla_violation_rate (what sweeps optimise) |
| `episode_cost/<slice>`        | train, trial | this iteration's mean per-interval cost (violation rate) of one slice |
| `multiplier/<slice>`          | train, trial | the Lagrange multiplier of a slice's SLA after this iteration's update |
| `cost_budget/<slice>`         | budget       | the slice's allowed violation rate                                   |
| `budget_unreachable/<slice>`  | budget       | 1 when the multiplier sits at its cap and the slice is still over budget |
| `capacity_violations`         | train, trial | allocations this iteration that broke sum <= 1 or share >= 0 (must be 0) |
| `env_steps_per_s`             | train, trial | env steps (one cell, one interval) per wall-clock second, sampling and learning |
| `admm_primal_residual_mean`   | train, trial | mean over steps of the ADMM primal residual norm(x - z) (0 with projection) |
| `admm_dual_residual_mean`     | train, trial | mean over steps of the ADMM dual residual rho norm(z - z_prev)     |
| `critic_loss`, `actor_loss`   | train, trial | mean MADDPG losses over this iteration's updates                     |
| `q_mean`                      | train, trial | mean critic value Q_i(o, a) over this iteration's batches            |
| `hp/<key>`                    | trial        | a swept hyperparameter's current value (PBT changes them mid-trial)  |
| `eval/<m>`                    | train        | final evaluation: mean over its scenarios of the trained policy's `<m>` |
| `eval/<scenario>/<m>`         | train        | final evaluation: the trained policy's `<m>` on one scenario          |
| `suite/objective`             | model        | the champion gate's score: mean over the suite's scenarios of `objective`; also a version tag |
| `suite/<m>`                   | model        | registry suite: mean over its scenarios of `<m>`                     |
| `suite/<scenario>/<m>`        | model        | registry suite: `<m>` on one scenario                                |

In the ``eval/`` and ``suite/`` rows, `utility_mean` is the mean per-interval cell utility over
the measurement's episodes, `sla_violation_rate` its share of (interval, slice) pairs in
violation, `objective` the same formula as in training, and `resource_usage` the mean sum of
allocated shares per interval, in [0, 1].

``SLA_PENALTY`` = 0.25 utility per unit of violation rate: a policy that keeps utility but violates
SLAs 10 % less often gains 0.025, about the utility gap between the best heuristic and MADDPG.
"""

from __future__ import annotations

import re

SECTION = "deepslicing"

EPISODE_RETURN_MEAN = "episode_return_mean"
UTILITY_MEAN = "utility_mean"
SLA_VIOLATION_RATE = "sla_violation_rate"
EPISODE_COST = "episode_cost"  # per slice: f"{EPISODE_COST}/{slice}"
MULTIPLIER = "multiplier"  # per slice: f"{MULTIPLIER}/{slice}"
COST_BUDGET = "cost_budget"  # per slice
BUDGET_UNREACHABLE = "budget_unreachable"  # per slice
CAPACITY_VIOLATIONS = "capacity_violations"
ENV_STEPS_PER_S = "env_steps_per_s"
ADMM_PRIMAL_RESIDUAL_MEAN = "admm_primal_residual_mean"
ADMM_DUAL_RESIDUAL_MEAN = "admm_dual_residual_mean"
CRITIC_LOSS = "critic_loss"
ACTOR_LOSS = "actor_loss"
Q_MEAN = "q_mean"
NUM_UPDATES = "num_updates"
OBJECTIVE = "objective"
RESOURCE_USAGE = "resource_usage"
HYPERPARAMETER = "hp"  # per swept key: f"{HYPERPARAMETER}/{key}"
EVAL = "eval"  # prefix of a training run's final evaluation
SUITE = "suite"  # prefix of the registry suite
SUITE_SCORE = f"{SUITE}/{OBJECTIVE}"  # the champion gate's score
SLA_PENALTY = 0.25

ALL = (
    EPISODE_RETURN_MEAN,
    UTILITY_MEAN,
    SLA_VIOLATION_RATE,
    CAPACITY_VIOLATIONS,
    ENV_STEPS_PER_S,
    ADMM_PRIMAL_RESIDUAL_MEAN,
    ADMM_DUAL_RESIDUAL_MEAN,
    CRITIC_LOSS,
    ACTOR_LOSS,
    Q_MEAN,
    NUM_UPDATES,
    OBJECTIVE,
)


def per_slice(name: str, slice_name: str) -> str:
    """The key of a per-slice metric, e.g. ``multiplier/urllc``."""
    return f"{name}/{slice_name}"


def objective(utility_mean: float, sla_violation_rate: float) -> float:
    """The sweep objective: utility with a penalty per unit of SLA violation rate."""
    return utility_mean - SLA_PENALTY * sla_violation_rate


def vocabulary() -> list[tuple[str, tuple[str, ...]]]:
    """The table of this module's docstring as data: one ``(name, logged_in)`` per name, e.g.
    ``("multiplier/<slice>", ("train", "trial"))``; names keep their ``<placeholders>``."""
    rows = []
    for line in (__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 3:
            continue
        names = [n.strip().strip("`") for n in cells[0].split(",")]
        where = tuple(w.strip() for w in cells[1].split(","))
        rows.extend((name, where) for name in names)
    return rows


def documented_name(key: str) -> str | None:
    """The name of the table that a logged metric ``key`` is (``multiplier/<slice>`` for
    ``multiplier/urllc``), or None when the table does not document it."""
    measured = "|".join((UTILITY_MEAN, SLA_VIOLATION_RATE, OBJECTIVE, RESOURCE_USAGE))
    some = {"<slice>": "[^/]+", "<scenario>": "[^/]+", "<key>": "[^/]+", "<m>": f"({measured})"}
    for name, _ in vocabulary():
        parts = re.split(r"(<[a-z]+>)", name)
        if re.fullmatch("".join(some.get(p, re.escape(p)) for p in parts), key):
            return name
    return None


def with_objective(summary: dict[str, float]) -> dict[str, float]:
    """A training iteration's summary with its ``objective`` added."""
    return {
        **summary,
        OBJECTIVE: objective(summary[UTILITY_MEAN], summary[SLA_VIOLATION_RATE]),
    }


PER_SLICE = (EPISODE_COST, MULTIPLIER, COST_BUDGET, BUDGET_UNREACHABLE)


def is_training_metric(name: str) -> bool:
    """Whether ``name`` is one of the per-iteration training metrics (the table's `train` rows,
    and `hp/<key>`)."""
    prefix, _, rest = name.partition("/")
    return name in ALL or (prefix in (*PER_SLICE, HYPERPARAMETER) and bool(rest))


def scenario_metrics(prefix: str, rows: list[dict]) -> dict[str, float]:
    """``<prefix>/<m>`` (mean over scenarios) and ``<prefix>/<scenario>/<m>`` of one policy's
    evaluation rows (:mod:`deepslicing.evaluation` summary rows, one per scenario)."""
    per_scenario = {
        row["scenario"]: {
            UTILITY_MEAN: float(row["utility_mean"]),
            SLA_VIOLATION_RATE: float(row["violation_rate"]),
            OBJECTIVE: objective(float(row["utility_mean"]), float(row["violation_rate"])),
            RESOURCE_USAGE: float(row["resource_usage"]),
        }
        for row in rows
    }
    out = {
        f"{prefix}/{name}": sum(m[name] for m in per_scenario.values()) / len(per_scenario)
        for name in (UTILITY_MEAN, SLA_VIOLATION_RATE, OBJECTIVE, RESOURCE_USAGE)
    }
    for scenario, values in per_scenario.items():
        out.update({f"{prefix}/{scenario}/{name}": value for name, value in values.items()})
    return out


# --- the allocation service's Prometheus metrics ---------------------------------------------
# Recorded through Ray's metrics (ray.serve.metrics, which adds deployment and replica tags);
# Ray exports them with a "ray_" prefix, counters with "_total", at each node's metrics port and
# on the service's GET /metrics. Latency in milliseconds.
SERVE_REQUESTS = "deepslicing_requests"  # counter, tags endpoint, status
SERVE_LATENCY_MS = "deepslicing_request_latency_ms"  # histogram, tags endpoint, status
# counter, tag reason: unauthorized, rate_limited, invalid, too_large, unsupported_media_type or
# infeasible
SERVE_REJECTIONS = "deepslicing_rejections"
SERVE_SHARE = "deepslicing_allocation_share"  # gauge, tag slice: the last share given
SERVE_SLA_RISK = "deepslicing_sla_risk"  # gauge, tag slice: the last 1 - min(1, share / need)
SERVE_NEED = "deepslicing_slice_need"  # gauge, tag slice: the last needed share, in [0, 1]
# gauges, tag slice, set only for slices with a bandwidth_mbps target whose request carries
# readings (a measured demand): the predicted throughput, and what the SLA asks for at that
# demand, min(demand, bandwidth_mbps); both in Mbps
SERVE_THROUGHPUT_MBPS = "deepslicing_slice_throughput_mbps"
SERVE_TARGET_MBPS = "deepslicing_slice_target_mbps"
# gauge, tag model_version: when the served model was exported (Unix seconds; its metadata's
# "created"), set when a replica loads it
SERVE_MODEL_CREATED = "deepslicing_model_created_timestamp_seconds"
SERVE_MAX_REPLICAS = "deepslicing_max_replicas"  # gauge: the autoscaling max_replicas in force
SERVE_ADMM_RESIDUAL = "deepslicing_admm_primal_residual"  # histogram: worst cell of a request
SERVE_ALLOCATIONS = "deepslicing_slice_allocations"  # counter: slice allocations answered
SERVE_LATENCY_BOUNDARIES_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
SERVE_RESIDUAL_BOUNDARIES = (1e-12, 1e-9, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)

# --- a training job's Prometheus metrics --------------------------------------------------------
# Recorded through ray.util.metrics by deepslicing.training_metrics once per training iteration
# (`deepslicing train`, and every trial of `deepslicing tune`), tag run: the run directory's name
# or the Tune trial's name; exported like the service's, with a "ray_" prefix.
TRAIN_ITERATIONS = "deepslicing_train_iterations"  # counter: iterations finished
TRAIN_ENV_STEPS_PER_S = "deepslicing_train_env_steps_per_s"  # gauge: env_steps_per_s
TRAIN_UTILITY = "deepslicing_train_utility"  # gauge: utility_mean
TRAIN_SLA_VIOLATION_RATE = "deepslicing_train_sla_violation_rate"  # gauge: sla_violation_rate
TRAIN_MULTIPLIER = "deepslicing_train_multiplier"  # gauge, tag slice: multiplier/<slice>

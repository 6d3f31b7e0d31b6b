"""A training job's progress as Prometheus metrics, exported through Ray like the service's.

Once per training iteration, :meth:`TrainingMetrics.record` hands the iteration's summary
(``result["deepslicing"]``, names in :mod:`deepslicing.metrics`) to ``ray.util.metrics``; Ray
exports them at the metrics port of the node the job runs on, so the Prometheus that scrapes the
service (``cluster/prometheus/``) scrapes training too, and the dashboard's training row reads them.

| exported as                                   | type    | unit / source                              |
|-----------------------------------------------|---------|--------------------------------------------|
| `ray_deepslicing_train_iterations_total`      | counter | iterations finished; its rate is iterations/s |
| `ray_deepslicing_train_env_steps_per_s`       | gauge   | `env_steps_per_s`                           |
| `ray_deepslicing_train_utility`               | gauge   | `utility_mean` (per-interval cell utility)  |
| `ray_deepslicing_train_sla_violation_rate`    | gauge   | `sla_violation_rate`, in [0, 1]             |
| `ray_deepslicing_train_multiplier{slice}`     | gauge   | `multiplier/<slice>`, utility per unit cost |

Every series carries the tag ``run``: the run directory's name (``deepslicing train``) or the
Tune trial's name (``deepslicing tune``). A value that is NaN this iteration (utility before the
first finished episode) leaves its gauge at its previous value. Ray must be initialised.
"""

from __future__ import annotations

import math
from typing import Any

from deepslicing import metrics

GAUGES = {
    metrics.ENV_STEPS_PER_S: (metrics.TRAIN_ENV_STEPS_PER_S, "env steps per second"),
    metrics.UTILITY_MEAN: (metrics.TRAIN_UTILITY, "mean per-interval cell utility"),
    metrics.SLA_VIOLATION_RATE: (
        metrics.TRAIN_SLA_VIOLATION_RATE,
        "share of (interval, slice) pairs in SLA violation",
    ),
}


class TrainingMetrics:
    """The Ray metrics of one training run (``run``: its name, the ``run`` tag)."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = {"run": run}
        self.iterations = Counter(
            metrics.TRAIN_ITERATIONS, "training iterations finished", tag_keys=("run",)
        )
        self.iterations.set_default_tags(tags)
        self.gauges = {}
        for key, (name, description) in GAUGES.items():
            self.gauges[key] = Gauge(name, description, tag_keys=("run",))
            self.gauges[key].set_default_tags(tags)
        self.multiplier = Gauge(
            metrics.TRAIN_MULTIPLIER,
            "Lagrange multiplier of a slice's SLA (utility per unit of cost)",
            tag_keys=("run", "slice"),
        )
        self.multiplier.set_default_tags(tags)

    def record(self, summary: dict[str, Any]) -> None:
        """One finished iteration with its summary."""
        self.iterations.inc()
        for key, gauge in self.gauges.items():
            value = summary.get(key)
            if value is not None and not math.isnan(value):
                gauge.set(float(value))
        prefix = metrics.per_slice(metrics.MULTIPLIER, "")
        for key, value in summary.items():
            if key.startswith(prefix) and not math.isnan(value):
                self.multiplier.set(float(value), tags={"slice": key.removeprefix(prefix)})

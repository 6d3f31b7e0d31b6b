"""MLflow tracking for training runs: one MLflow run per training run, resumable.

Where: ``MLFLOW_TRACKING_URI`` if set, else the embedded store ``sqlite:///mlflow.db`` in the
working directory. For a sqlite store the artifacts go to ``mlartifacts/`` beside the database file,
so a run directory copied by ``ray job submit --working-dir`` still logs where the user looks.

What: params are the full resolved config, flattened to dotted keys (``maddpg.actor_lr``);
metrics are the per-iteration training metrics of :mod:`deepslicing.metrics` at step = iteration;
tags name the scenario and variant; the final checkpoint is logged as the ``checkpoint`` artifact.

Why a thin class and not ``mlflow.start_run``: a resumed training run reopens its MLflow run by id,
and a tracking server that is down must give one clear error while training results still land in
the run directory (the caller decides to continue without tracking).
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or written; the message says which and how to fix it."""


def tracking_uri(explicit: str | None = None) -> str:
    """The store to use; a relative sqlite path is made absolute, so Ray workers in other
    directories and a resumed run reach the same database."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys; lists and tuples become comma lists."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = value
    return flat


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read()
    except (OSError, urllib.error.URLError) as e:
        raise TrackingError(
            f"MLflow tracking server {uri!r} is not reachable ({e}). Start it (for example "
            "`mlflow server --host 127.0.0.1 --port 5000`) or point MLFLOW_TRACKING_URI elsewhere."
        ) from None


def _artifact_location(uri: str, experiment: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None  # servers and file stores choose their own
    database = Path(uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / "mlartifacts" / experiment).as_uri()


class RunTracker:
    """Logs one training run to MLflow; ``run_id`` lets a resumed run continue the same record."""

    def __init__(
        self,
        experiment: str,
        *,
        uri: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        check_server(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    experiment, artifact_location=_artifact_location(self.uri, experiment)
                )
            )
            if run_id:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                run = self.client.create_run(
                    experiment_id, run_name=run_name, tags=dict(tags or {})
                )
                self.run_id = run.info.run_id
        except Exception as e:  # mlflow raises many types for an unreachable store
            raise TrackingError(
                f"MLflow tracking at {self.uri!r} failed: {type(e).__name__}: {e}. "
                "Check MLFLOW_TRACKING_URI (or --set tracking_uri=...) and that the server is up."
            ) from None
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        batch = [
            Param(key, str(value)[:MAX_PARAM_LENGTH])
            for key, value in flatten(params).items()
            if key not in existing  # params are immutable; a resumed run keeps its first values
        ]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in flatten(metrics).items()
            if isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

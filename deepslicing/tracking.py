"""MLflow tracking for training runs: one MLflow run per training run, resumable.

Where: ``MLFLOW_TRACKING_URI`` if set, else the embedded store ``sqlite:///mlflow.db`` in the
working directory. For a sqlite store the artifacts go to ``mlartifacts/`` beside the database file,
so a run directory copied by ``ray job submit --working-dir`` still logs where the user looks.

What: params are the full resolved config, flattened to dotted keys (``maddpg.actor_lr``);
metrics are the per-iteration training metrics of :mod:`deepslicing.metrics` at step = iteration;
tags name the scenario and variant; the final checkpoint is logged as the ``checkpoint`` artifact.

How the MLflow UI sees it:

- Every experiment we create or write to is tagged ``mlflow.experimentKind =
  custom_model_development`` (:data:`MODEL_TRAINING`; the value MLflow's UI itself writes when a
  user marks an experiment as model training, ``genai_development`` being the other kind) and
  carries a description (``mlflow.note.content``, shown at the top of the experiment page). MLflow
  3.17's UI picks its views from one global "GenAI | Model training" switch in its sidebar (URL
  ``?workflowType=machine_learning``) rather than from this tag; docs/mlflow.md says so.
- Every run records who and what made it, as MLflow's own fluent ``start_run`` would
  (:func:`run_tags`): ``mlflow.user``, ``mlflow.source.type`` (``LOCAL``), ``mlflow.source.name``
  (the command, e.g. ``deepslicing train``) and, when the code is a git checkout,
  ``mlflow.source.git.commit`` / ``.branch`` / ``.repoURL``. A run given a ``parent_run_id`` is
  nested under that run in the UI (``mlflow.parentRunId``).

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
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT
DESCRIPTION = "mlflow.note.content"  # an experiment's (or run's) description in the UI


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


def ensure_experiment(client, name: str, description: str) -> str:
    """The id of experiment ``name``, created if missing; either way tagged as a model-training
    experiment, and given ``description`` unless it already has one (a user's edit in the UI
    stays)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(
            name,
            artifact_location=_artifact_location(client.tracking_uri, name),
            tags={EXPERIMENT_KIND: MODEL_TRAINING, DESCRIPTION: description},
        )
    if found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    if not found.tags.get(DESCRIPTION):
        client.set_experiment_tag(found.experiment_id, DESCRIPTION, description)
    return found.experiment_id


def run_tags(command: str, parent_run_id: str | None = None) -> dict[str, str]:
    """The tags MLflow's UI reads for "User", "Source" and the git commit of a run made by
    ``command`` (e.g. ``deepslicing train``); git tags only when the code is a git checkout."""
    from mlflow.tracking.context.default_context import DefaultRunContext
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_PARENT_RUN_ID,
        MLFLOW_SOURCE_NAME,
    )

    tags = {**DefaultRunContext().tags(), MLFLOW_SOURCE_NAME: command}
    code = str(Path(__file__).resolve().parent)
    for key, value in (
        (MLFLOW_GIT_COMMIT, git_utils.get_git_commit(code)),
        (MLFLOW_GIT_BRANCH, git_utils.get_git_branch(code)),
        (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url(code)),
    ):
        if value:
            tags[key] = value
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return tags


class RunTracker:
    """Logs one run to MLflow; ``run_id`` lets a resumed run continue the same record.
    ``command`` names what makes the run (its "Source" in the UI), ``description`` is the
    experiment's should it be created here, ``parent_run_id`` nests the run under another."""

    def __init__(
        self,
        experiment: str,
        *,
        command: str,
        description: str,
        uri: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        check_server(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            experiment_id = ensure_experiment(self.client, experiment, description)
            if run_id:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                run = self.client.create_run(
                    experiment_id,
                    run_name=run_name,
                    tags={**run_tags(command, parent_run_id), **(tags or {})},
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

"""A registered model's MLflow lineage: training run -> logged model -> registered version.

What ``deepslicing register`` (:mod:`deepslicing.registry`) writes to MLflow, so that a user can
click from a registered version to the run that trained it, its params, curves and plots:

1. **The run.** The MLflow run that trained the checkpoint: ``run_id`` when given (a sweep passes
   its best trial's run), else the one named in the checkpoint's run directory (``state.json`` of
   ``deepslicing train``), when that run exists in this store. Without one (training ran with
   ``--no-tracking``, or into another store) a registration run is created in the fallback
   experiment (``deepslicing-registry``) and finished after the registration.
2. **The logged model** (MLflow 3 ``LoggedModel``), logged from that run at the checkpoint's
   training iteration (``step``): the ONNX actors (``mlflow.onnx`` flavour, ``metadata.json`` and
   the suite table in its ``extra_files``), a signature and an input example built from
   ``metadata.json`` (:func:`signature`), the feature names and slice layout in the MLmodel's
   ``metadata``, the run's params, and the suite metrics of
   :func:`deepslicing.metrics.scenario_metrics` (``suite/...``) linked to both the model and the
   run. The training metrics of the checkpoint's iteration are linked to it too (MLflow links the
   run's metrics of the model's step).
3. **The version.** ``mlflow.register_model("models:/<model_id>")``: the version's source is the
   logged model and its run is the training run. Its tags hold the suite settings, the score and
   the gate decision (:func:`record_gate`), and its description says the decision in a sentence,
   so the registry page shows it without opening the tags.

Signature (tensor-based, as the exported graph): input ``obs`` float32 ``(-1, num_slices,
num_features)``, output ``shares`` float32 ``(-1, num_slices)``; the input example is one seeded
observation from ``[0, FEATURE_HIGH]`` (``metadata["feature_high"]``), so ``mlflow.pyfunc`` loads
the model and answers ``predict(obs)`` with ``{"shares": ...}`` (checked against our export by
``tests/test_mlflow_ui.py``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deepslicing import metrics

MODEL_NAME_IN_RUN = "allocator"  # the logged model's name, shown on the run's Models tab
MODEL_TYPE = "maddpg-actors"
MLMODEL_METADATA_KEYS = ("model_version", "features", "feature_high", "slices", "variant")
REGISTRATION_COMMAND = "deepslicing register"
REGISTRATION_DESCRIPTION = (
    "Registrations of checkpoints whose training run is not in this MLflow store "
    "(trained with --no-tracking or elsewhere). Each run evaluates one checkpoint on the "
    "registry suite and logs the model that became a version of deepslicing-allocator."
)


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging reads the global tracking URI; set it for a block and restore it."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def signature(metadata: Mapping[str, Any]):
    """The model signature of an export: input and output names, dtypes and shapes from its
    ``metadata.json`` (the batch axis is -1)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(section: str) -> TensorSpec:
        io = metadata[section]
        shape = tuple(-1 if d == "batch" else int(d) for d in io["shape"])
        return TensorSpec(np.dtype(io["dtype"]), shape, name=io["name"])

    return ModelSignature(inputs=Schema([spec("input")]), outputs=Schema([spec("output")]))


def input_example(metadata: Mapping[str, Any], seed: int) -> np.ndarray:
    """One observation ``(1, num_slices, num_features)`` float32, uniform in
    ``[0, feature_high]``, seeded."""
    high = np.asarray(metadata["feature_high"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    shape = (1, int(metadata["num_slices"]), int(metadata["num_features"]))
    return (rng.random(shape) * high).astype(np.float32)


def checkpoint_iteration(checkpoint: Path) -> int:
    """The training iteration a checkpoint was saved at: ``iter_NNNNNN`` of ``deepslicing
    train``, the ``iteration`` file of a sweep trial's checkpoint, else 0."""
    if checkpoint.name.startswith("iter_") and checkpoint.name[5:].isdigit():
        return int(checkpoint.name[5:])
    marker = checkpoint / "iteration"
    return int(marker.read_text()) if marker.is_file() else 0


def training_run_id(client, checkpoint: Path, run_id: str | None) -> str | None:
    """The training run to log the model from (see the module docstring, step 1). An explicit
    ``run_id`` must exist in the store; one found in ``state.json`` is used only if it does."""
    from mlflow.exceptions import MlflowException

    from deepslicing.train import CHECKPOINTS, read_state

    if run_id is not None:
        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:
            raise ValueError(f"run_id: no MLflow run {run_id!r} in {client.tracking_uri}") from None
    # every checkpoint under RUN_DIR/checkpoints/ is of the one run that RUN_DIR holds
    state = read_state(checkpoint.parent.parent) or {}
    found = state.get("mlflow_run_id") if checkpoint.parent.name == CHECKPOINTS else None
    if found is None:
        return None
    try:
        return client.get_run(found).info.run_id
    except MlflowException:
        return None  # trained into another store


def log_model(
    client,
    run_id: str,
    export_dir: Path,
    extra_files: list[Path],
    step: int,
    suite: Mapping[str, float],
    tags: Mapping[str, str],
    seed: int,
) -> str:
    """Log the exported ONNX actors as a logged model of ``run_id`` at ``step`` with signature,
    input example and the suite metrics linked to it; returns the model id."""
    import mlflow
    import onnx
    from mlflow.entities import Metric

    from deepslicing.export import FILES, METADATA_FILE

    metadata = json.loads((export_dir / METADATA_FILE).read_text())
    run = client.get_run(run_id)
    # created here, not by log_model, so that it lives in the run's experiment (log_model would
    # put it in the active one) and carries the run's params
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=MODEL_NAME_IN_RUN,
        source_run_id=run_id,
        tags=dict(tags),
        params=dict(run.data.params),
        model_type=MODEL_TYPE,
    )
    with _tracking_uri(client.tracking_uri):
        mlflow.onnx.log_model(
            onnx.load(str(export_dir / FILES["onnx"])),
            name=MODEL_NAME_IN_RUN,
            model_id=model.model_id,
            run_id=run_id,
            step=step,
            signature=signature(metadata),
            input_example=input_example(metadata, seed),
            metadata={k: metadata.get(k) for k in MLMODEL_METADATA_KEYS},
            extra_files=[str(export_dir / METADATA_FILE), *map(str, extra_files)],
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(key, float(value), now, step, model_id=model.model_id)
            for key, value in suite.items()
        ],
    )
    return model.model_id


def register_version(client, model_id: str, model_name: str, tags: Mapping[str, str]) -> str:
    """Register the logged model as a new version of ``model_name``; returns the version."""
    import mlflow

    with _tracking_uri(client.tracking_uri):
        version = mlflow.register_model(f"models:/{model_id}", model_name, tags=dict(tags))
    return str(version.version)


def gate_sentence(gate: Mapping[str, str], alias: str) -> str:
    """The gate decision of a version in one sentence, decision first (its description in the
    registry, where the versions table shows the first words)."""
    score = f"{metrics.SUITE_SCORE} {float(gate['challenger_score']):.4f}"
    if gate["champion_version"] == "none":
        return f"Became the {alias} (there was none): {score}."
    against = (
        f"{alias} version {gate['champion_version']}'s {float(gate['champion_score']):.4f} "
        f"({gate['champion_score_source']})"
    )
    if gate["gate_decision"] == "promoted":
        return f"Became the {alias}: {score} beat {against}."
    return f"Not promoted: {score} did not beat {against}; the {alias} stays."


def record_gate(
    client, model_name: str, version: str, model_id: str, gate: Mapping[str, str], alias: str
) -> None:
    """The gate decision as tags of the version and the logged model, and as the version's
    description."""
    for key, value in gate.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_logged_model_tags(model_id, dict(gate))
    client.update_model_version(model_name, version, description=gate_sentence(gate, alias))

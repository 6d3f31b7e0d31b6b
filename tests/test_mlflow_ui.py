"""What the MLflow UI shows, read back through MLflow's client API from a real sqlite store after a
real `deepslicing train` (3 iterations, with its final evaluation) and `deepslicing register`: a
model-training experiment with a description, runs that name their user, source and git commit, the
logged model linked to its training run with metrics, the registered version whose source is that
model and which states the gate decision, a signature and input example, the registered champion
loaded through `mlflow.pyfunc` equal to our export, and every metric name of the vocabulary table
(deepslicing/metrics.py) where the table says it is logged. Sweeps (parent and child runs, `trial`
rows of the table) and a local `mlflow server` are checked in tests/test_tune.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from deepslicing import metrics
from deepslicing.export import METADATA_FILE, load_exported, random_observations
from deepslicing.lineage import input_example
from deepslicing.registry import CHAMPION, MODEL_NAME, PROMOTED, register
from deepslicing.tracking import EXPERIMENT_KIND, MODEL_TRAINING

REPO = Path(__file__).resolve().parents[1]
SEED = 3
SUITE = ("steady", "burst")


def missing(logged_in: str, keys: set[str]) -> list[str]:
    """Documented names (logged in ``logged_in``) that no key in ``keys`` is."""
    found = {metrics.documented_name(k) for k in keys}
    return [
        name for name, where in metrics.vocabulary() if logged_in in where and name not in found
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One tracked training run and its registration; the run's facts for the tests."""
    root = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, "-m", "deepslicing.cli", "train", "--iterations", "3"]
        + ["--eval-episodes", "1", "--checkpoint-every", "1", "--seed", str(SEED)]
        + ["--set", "maddpg.learning_starts=400", "--set", "env.episode_length=50"]
        + ["--run-dir", str(root / "run"), "--tracking-uri", uri],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = register(
        root / "run" / "checkpoints" / "iter_000003",
        tracking_uri=uri,
        scenario=SUITE,
        episodes=1,
        out=str(root / "export"),
    )
    return {"uri": uri, "root": root, "result": result, "client": MlflowClient(uri, uri)}


def test_the_experiment_is_a_model_training_experiment_with_a_description(store):
    client = store["client"]
    run = client.get_run(store["result"]["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "deepslicing"
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert "deepslicing train" in experiment.tags["mlflow.note.content"]


def test_the_kind_is_the_value_the_installed_mlflow_ui_uses():
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    text = "".join(p.read_text(errors="ignore") for p in bundle.glob("main.*.js"))
    assert f'CUSTOM_MODEL_DEVELOPMENT="{MODEL_TRAINING}"' in text
    assert f'"{EXPERIMENT_KIND}"' in text


def test_the_training_run_names_its_user_source_commit_and_what_it_is(store):
    run = store["client"].get_run(store["result"]["run_id"])
    tags = run.data.tags
    params = run.data.params
    assert run.info.run_name == f"{params['maddpg.variant']}-{params['env.scenario']}-seed{SEED}"
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "deepslicing train"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert run.info.status == "FINISHED"


def test_the_logged_model_is_linked_to_its_training_run_with_its_metrics(store):
    client, result = store["client"], store["result"]
    run = client.get_run(result["run_id"])
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(result["model_id"], 3)]
    model = client.get_logged_model(result["model_id"])
    assert model.source_run_id == run.info.run_id
    assert model.experiment_id == run.info.experiment_id
    assert model.params["maddpg.variant"] == run.data.params["maddpg.variant"]
    linked = {m.key: m for m in model.metrics}
    assert linked[metrics.SUITE_SCORE].value == pytest.approx(result["score"])
    assert linked[metrics.SUITE_SCORE].step == 3
    # the checkpoint's own training iteration is linked too
    assert linked[metrics.UTILITY_MEAN].value == run.data.metrics[metrics.UTILITY_MEAN]


def test_the_registered_version_comes_from_the_logged_model_and_states_the_gate(store):
    client, result = store["client"], store["result"]
    version = client.get_model_version(MODEL_NAME, result["version"])
    assert version.source == f"models:/{result['model_id']}"
    assert version.run_id == result["run_id"]
    assert version.tags["gate_decision"] == PROMOTED
    assert float(version.tags[metrics.SUITE_SCORE]) == result["score"]
    assert version.description.startswith("Became the champion")
    assert client.get_logged_model(result["model_id"]).tags["gate_decision"] == PROMOTED


def test_signature_input_example_and_pyfunc_parity_with_our_export(store):
    import mlflow

    export = load_exported(store["root"] / "export")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store["uri"])  # models:/ URIs resolve against the global store
    try:
        info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@{CHAMPION}")
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
        example = model.input_example
    finally:
        mlflow.set_tracking_uri(previous)
    (inputs,) = info.signature.inputs.inputs
    (outputs,) = info.signature.outputs.inputs
    assert (inputs.name, inputs.shape, inputs.type) == ("obs", (-1, 3, 14), np.dtype("float32"))
    assert (outputs.name, outputs.shape) == ("shares", (-1, 3))
    assert info.metadata["features"] == export.metadata["features"]
    assert info.saved_input_example_info is not None
    # the seeded observation of the registration (seed 0), named as the graph's input
    np.testing.assert_array_equal(example["obs"], input_example(export.metadata, seed=0))
    assert example["obs"].shape == (1, 3, 14) and example["obs"].dtype == np.float32
    obs = random_observations(3, 512, seed=11)
    served = np.asarray(model.predict(obs)["shares"])
    np.testing.assert_allclose(served, export(obs), rtol=0, atol=1e-6)
    assert (store["root"] / "export" / METADATA_FILE).is_file()


def test_every_documented_name_is_logged_where_the_table_says(store):
    client, result = store["client"], store["result"]
    run_keys = set(client.get_run(result["run_id"]).data.metrics)
    model_keys = {m.key for m in client.get_logged_model(result["model_id"]).metrics}
    assert missing("train", run_keys) == []
    assert missing("model", model_keys) == []
    # and nothing logged is outside the vocabulary
    assert [k for k in run_keys if metrics.documented_name(k) is None] == []


def test_an_unknown_training_run_is_refused_naming_run_id(store):
    checkpoint = store["root"] / "run" / "checkpoints" / "iter_000003"
    with pytest.raises(ValueError, match="run_id: no MLflow run 'nope'"):
        register(checkpoint, tracking_uri=store["uri"], run_id="nope", out=str(store["root"] / "x"))
    versions = store["client"].search_model_versions(f"name='{MODEL_NAME}'")
    assert [v.version for v in versions] == [int(store["result"]["version"])]  # nothing registered

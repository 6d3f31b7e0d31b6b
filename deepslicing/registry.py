"""``deepslicing register``: evaluate a checkpoint, export it, register it, gate the champion alias.

Steps, for one MADDPG checkpoint (the best trial of a sweep, or ``--checkpoint PATH``):

1. **Suite.** Every scenario of ``scenario`` (default ``all``: the synthetic ones), ``episodes``
   episodes each, traffic seeded by ``seed``, on the cell the checkpoint was trained for (its
   ``env_config``, with its own coordinator settings). Score (``suite/objective`` in
   :mod:`deepslicing.metrics`) = mean over the scenarios of
   ``objective(utility_mean, violation_rate)``; higher is better.
2. **Export** to ``out`` (ONNX always; TorchScript and int8 when ``format`` asks), with
   ``metadata.json``, via :mod:`deepslicing.export`.
3. **Logged model** (:mod:`deepslicing.lineage`): the ONNX actors are logged as an MLflow logged
   model of the run that trained the checkpoint (``run_id``, else the one in the run directory's
   ``state.json``; without one, a registration run in ``experiment``), with a signature and input
   example from ``metadata.json``, and the suite metrics (``suite/<m>``,
   ``suite/<scenario>/<m>``) linked to the model and the run.
4. **Registry.** The logged model becomes a new version of ``model_name``
   (``deepslicing-allocator``), its source that model and its run the training run. The version
   carries the score and the suite settings as tags (``suite/objective``, ``suite_scenarios``,
   ``suite_episodes``, ``suite_seed``, ``suite_cell``, ``run_id``).
5. **Champion/challenger gate.** The alias ``alias`` (``champion``) moves to the new version only if
   its score is strictly better than the current champion's; with no champion the new version takes
   the alias. The decision (``gate_decision`` = ``promoted`` | ``kept_champion``), both scores
   (``challenger_score``, ``champion_score``), the champion's version and where its score came
   from (``champion_score_source`` = ``recorded`` | ``re-evaluated`` | ``none``) are tags on the
   new version and its logged model, and the version's description says it in one sentence.

Comparability (scores compare like with like): a score depends on the cell, the scenarios, the
episodes and the seed. ``suite_cell`` is a hash of the cell's config without the scenario and the
coordinator keys (the coordinator belongs to the model: each model is evaluated with its own).

- Same cell and same scenarios/episodes/seed: the champion's recorded ``suite_score`` is used.
- Same cell, other scenarios/episodes/seed: the champion is re-evaluated from its registered ONNX
  model (and the ``metadata.json`` beside it) on the challenger's suite, common random numbers and
  all, so both scores come from the same traffic.
- Another cell (slice count, SLAs, PRBs, ...): the two models solve different problems; the command
  refuses before any work (:class:`GateError`, exit 1) and says to register under another
  ``model_name``.

Exit codes: 0 registered (promoted or not); 1 the gate refused, export parity failed, or MLflow is
unreachable; 2 bad input (the message names the field).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepslicing import metrics
from deepslicing.config import check_int, from_mapping, option, to_dict
from deepslicing.evaluation import evaluate_pair, write_summary
from deepslicing.export import FILES, FORMATS, METADATA_FILE, ExportConfig, checkpoint_dir
from deepslicing.scenarios import SCENARIOS, SYNTHETIC_SCENARIOS
from deepslicing.simulator import SlicingConfig

MODEL_NAME = "deepslicing-allocator"
CHAMPION = "champion"
EXPERIMENT = "deepslicing-registry"
PROMOTED = "promoted"
KEPT = "kept_champion"
COORDINATOR_KEYS = ("coordinator", "admm_rho", "admm_iterations")
SUITE_FILE = "suite_summary.csv"


class GateError(RuntimeError):
    """The champion/challenger gate cannot compare the two models; the message says why."""


class ExportError(RuntimeError):
    """The export of the checkpoint failed its parity check (``export`` printed which format)."""


@dataclass(frozen=True)
class RegisterConfig:
    """Evaluate a MADDPG checkpoint on the evaluation suite, export it (ONNX + metadata.json), log
    it to MLflow with the ONNX flavour, register it as a new version of MODEL_NAME and move the
    ALIAS (champion) to it only if its suite score beats the current champion's."""

    checkpoint: str = option(
        "", "required: a MADDPG checkpoint directory (RUN_DIR/checkpoints/iter_NNNNNN) or run dir"
    )
    scenario: tuple[str, ...] = option(
        ("all",),
        f"suite scenarios, comma-separated: all (the synthetic ones) or any of "
        f"{', '.join(s for s in SCENARIOS if s != 'trace')}",
    )
    episodes: int = option(3, "suite episodes per scenario, >= 1")
    seed: int = option(0, "seed of the suite's traffic, >= 0")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    run_id: str | None = option(
        None,
        "MLflow run that trained the checkpoint, to log the model from (default: the run named "
        "in RUN_DIR/state.json)",
    )
    experiment: str = option(
        EXPERIMENT, "MLflow experiment of a registration run, when the training run is unknown"
    )
    model_name: str = option(MODEL_NAME, "registered model name")
    alias: str = option(CHAMPION, "alias the gate moves to a better version")
    out: str = option("register_out", "directory for the export (actor.onnx, metadata.json, ...)")
    format: tuple[Literal["onnx", "torchscript", "int8"], ...] = option(
        ("onnx",), "export formats: onnx (always), plus torchscript and/or int8 if listed"
    )

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError("checkpoint: required, the directory of a MADDPG checkpoint")
        checkpoint_dir(self.checkpoint)  # raises naming `checkpoint`
        if isinstance(self.scenario, str) or not self.scenario:
            raise ValueError(f"scenario: must name at least one scenario, got {self.scenario!r}")
        for name in self.scenario:
            if name == "trace" or (name != "all" and name not in SCENARIOS):
                raise ValueError(
                    f"scenario: unknown suite scenario {name!r}; must be 'all' or one of "
                    f"{SYNTHETIC_SCENARIOS}"
                )
        if len(set(self.scenario)) != len(self.scenario):
            raise ValueError(f"scenario: lists a scenario twice: {self.scenario}")
        if "all" in self.scenario and len(self.scenario) > 1:
            raise ValueError("scenario: 'all' already names every scenario; give it alone")
        for name, low in (("episodes", 1), ("seed", 0)):
            check_int(name, getattr(self, name), low)
        for name in ("experiment", "model_name", "alias", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
        for name in ("tracking_uri", "run_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
        for f in self.format:
            if f not in FORMATS:
                raise ValueError(f"format: must be among {FORMATS}, got {f!r}")

    def scenarios(self) -> tuple[str, ...]:
        return SYNTHETIC_SCENARIOS if self.scenario == ("all",) else tuple(self.scenario)

    def formats(self) -> tuple[str, ...]:
        return ("onnx", *(f for f in self.format if f != "onnx"))


# --- the suite --------------------------------------------------------------------------------


def cell_fingerprint(env: SlicingConfig) -> str:
    """A hash of the cell a score was measured on: the env config without the scenario and the
    coordinator (which belongs to the model)."""
    data = to_dict(env)
    for key in ("scenario", *COORDINATOR_KEYS):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def suite_tags(config: RegisterConfig, env: SlicingConfig) -> dict[str, str]:
    return {
        "suite_scenarios": ",".join(config.scenarios()),
        "suite_episodes": str(config.episodes),
        "suite_seed": str(config.seed),
        "suite_cell": cell_fingerprint(env),
    }


def evaluate_suite(
    env: SlicingConfig,
    scenarios: tuple[str, ...],
    episodes: int,
    seed: int,
    label: str,
    policy=None,
) -> tuple[float, list[dict[str, Any]]]:
    """The suite score and one evaluation row per scenario of one policy (a checkpoint directory
    as ``label``, or ``policy`` a callable such as an exported ONNX actor)."""
    rows = [
        evaluate_pair(dataclasses.replace(env, scenario=s), label, episodes, seed, policy).row
        for s in scenarios
    ]
    score = float(
        np.mean([metrics.objective(r["utility_mean"], r["violation_rate"]) for r in rows])
    )
    return score, rows


def suite_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The suite's MLflow metrics: ``suite/<m>`` and ``suite/<scenario>/<m>`` (the score is
    ``suite/objective``)."""
    return metrics.scenario_metrics(metrics.SUITE, rows)


# --- the gate ---------------------------------------------------------------------------------


def current_champion(client, config: RegisterConfig):
    """The model version holding the alias, or None (no registered model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(config.model_name, config.alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def check_comparable(champion, tags: dict[str, str], config: RegisterConfig) -> None:
    cell = champion.tags.get("suite_cell")
    if cell != tags["suite_cell"]:
        raise GateError(
            f"model_name: the {config.alias} of {config.model_name!r} (version "
            f"{champion.version}) was scored on another cell (suite_cell {cell}, this checkpoint's "
            f"is {tags['suite_cell']}: different slices, SLAs or PRBs), so their scores do not "
            "compare. Register this model under another --model-name."
        )


def champion_score(
    client, champion, tags: dict[str, str], config: RegisterConfig, uri: str
) -> tuple[float, str]:
    """The champion's score on the challenger's suite: its recorded tag when the suite is the
    same, else a re-evaluation of its registered ONNX model on this suite."""
    same = all(champion.tags.get(k) == v for k, v in tags.items())
    recorded = champion.tags.get(metrics.SUITE_SCORE)
    if same and recorded is not None:
        return float(recorded), "recorded"

    from deepslicing.export import load_exported

    with tempfile.TemporaryDirectory() as scratch:
        export, _ = download_export(
            f"models:/{config.model_name}/{champion.version}", Path(scratch), uri
        )
        actor = load_exported(export, "onnx")
        env = from_mapping(SlicingConfig, actor.metadata["env"])
        score, _ = evaluate_suite(
            env,
            config.scenarios(),
            config.episodes,
            config.seed,
            f"{config.model_name}/{champion.version}",
            lambda obs: actor(obs).astype(np.float64),
        )
    return score, "re-evaluated"


def download_export(model_uri: str, destination: Path, uri: str) -> tuple[Path, str]:
    """Download a registered model (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) as an
    export directory that :func:`deepslicing.export.load_exported` reads (ONNX + metadata);
    returns the directory and the version it resolved to, as ``NAME/VERSION``."""
    import mlflow
    from mlflow import MlflowClient

    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([A-Za-z0-9_\-]+))", model_uri)
    if match is None:
        raise ValueError(
            f"model: must look like models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri!r}"
        )
    name, version, alias = match.groups()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if alias is not None:
        try:
            version = str(client.get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException as e:
            raise ValueError(
                f"model: {model_uri} does not resolve in {uri}: {e.message} (register a model "
                "with `deepslicing register --checkpoint RUN_DIR` or run `deepslicing run`)"
            ) from None
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version),
            dst_path=str(destination / "download"),
            tracking_uri=uri,
            registry_uri=uri,
        )
    )
    export = destination / "export"
    export.mkdir(parents=True, exist_ok=True)
    (local / "model.onnx").replace(export / FILES["onnx"])
    (local / "extra_files" / METADATA_FILE).replace(export / METADATA_FILE)
    return export, f"{name}/{version}"


# --- registration -----------------------------------------------------------------------------


def register(checkpoint: str | Path, **settings: Any) -> dict[str, Any]:
    """Register ``checkpoint`` (see the module docstring); ``settings`` are
    :class:`RegisterConfig` fields. Returns the version, scores and gate decision. Raises
    ``ValueError`` (bad input, naming the field), :class:`GateError` or
    :class:`~deepslicing.tracking.TrackingError`."""
    return register_config(RegisterConfig(checkpoint=str(checkpoint), **settings))


def register_config(config: RegisterConfig) -> dict[str, Any]:
    from mlflow import MlflowClient

    from deepslicing import export, lineage
    from deepslicing.tracking import RunTracker, check_server, tracking_uri
    from policies.maddpg.env_runner import slicing_config

    checkpoint = checkpoint_dir(config.checkpoint)
    uri = tracking_uri(config.tracking_uri)
    check_server(uri)
    env = slicing_config(export.algorithm_config(checkpoint))
    tags = suite_tags(config, env)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = current_champion(client, config)
    if champion is not None:
        check_comparable(champion, tags, config)  # refuse before any work
    run_id = lineage.training_run_id(client, checkpoint, config.run_id)

    score, rows = evaluate_suite(
        env, config.scenarios(), config.episodes, config.seed, str(checkpoint)
    )
    out = Path(config.out)
    code = export.run(
        ExportConfig(
            checkpoint=str(checkpoint), format=config.formats(), out=config.out, seed=config.seed
        )
    )
    if code:
        raise ExportError(f"format: the export to {out} is outside its parity tolerance")
    metadata = json.loads((out / METADATA_FILE).read_text())
    write_summary(rows, out / SUITE_FILE)

    tracker = None
    if run_id is None:  # no training run in this store: a registration run stands in
        tracker = RunTracker(
            config.experiment,
            command=lineage.REGISTRATION_COMMAND,
            description=lineage.REGISTRATION_DESCRIPTION,
            uri=uri,
            run_name=f"register-{checkpoint.parent.parent.name}-{checkpoint.name}",
            tags={"source_checkpoint": str(checkpoint), **tags},
        )
        tracker.log_params({"checkpoint": str(checkpoint), "variant": metadata.get("variant")})
        run_id = tracker.run_id
    try:
        model_id = lineage.log_model(
            client,
            run_id,
            out,
            [out / SUITE_FILE],
            lineage.checkpoint_iteration(checkpoint),
            suite_metrics(rows),
            tags,
            config.seed,
        )
        version = lineage.register_version(
            client,
            model_id,
            config.model_name,
            # full precision: the gate compares a later challenger against this exact number
            {metrics.SUITE_SCORE: repr(score), **tags, "run_id": run_id},
        )
        if champion is None:
            best, source, decision = None, "none", PROMOTED
        else:
            best, source = champion_score(client, champion, tags, config, uri)
            decision = PROMOTED if score > best else KEPT
        if decision == PROMOTED:
            client.set_registered_model_alias(config.model_name, config.alias, version)
        gate = {
            "gate_decision": decision,
            "challenger_score": f"{score:.10g}",
            "champion_score": "none" if best is None else f"{best:.10g}",
            "champion_version": "none" if champion is None else str(champion.version),
            "champion_score_source": source,
            "registered_version": version,
        }
        lineage.record_gate(client, config.model_name, version, model_id, gate, config.alias)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.finish()
    return {
        "model_name": config.model_name,
        "version": version,
        "run_id": run_id,
        "model_id": model_id,
        "model_uri": f"models:/{config.model_name}/{version}",
        "score": score,
        "champion_version": None if champion is None else str(champion.version),
        "champion_score": best,
        "champion_score_source": source,
        "decision": decision,
        "alias": config.alias,
        "alias_version": version if decision == PROMOTED else str(champion.version),
        "suite": tags,
        "scenarios": rows,
        "tracking_uri": uri,
    }


def report(result: dict[str, Any]) -> str:
    lines = [f"{'scenario':<12}  {'utility':>8}  {'SLA viol %':>10}  {'objective':>9}"]
    for r in result["scenarios"]:
        objective = metrics.objective(r["utility_mean"], r["violation_rate"])
        lines.append(
            f"{r['scenario']:<12}  {r['utility_mean']:8.4f}  {100 * r['violation_rate']:10.1f}  "
            f"{objective:9.4f}"
        )
    lines.append(f"suite score {result['score']:.4f}")
    lines.append(
        f"registered {result['model_name']} version {result['version']} "
        f"(run {result['run_id']}, {result['tracking_uri']})"
    )
    if result["champion_version"] is None:
        lines.append(f"gate: no {result['alias']} yet; version {result['version']} takes the alias")
    else:
        verdict = (
            f"promoted: version {result['version']} is the new {result['alias']}"
            if result["decision"] == PROMOTED
            else f"kept {result['alias']} version {result['champion_version']}"
        )
        lines.append(
            f"gate: challenger {result['score']:.4f} vs {result['alias']} version "
            f"{result['champion_version']} {result['champion_score']:.4f} "
            f"({result['champion_score_source']}); {verdict}"
        )
    return "\n".join(lines)


def run(config: RegisterConfig) -> int:
    from deepslicing.tracking import TrackingError

    try:
        result = register_config(config)
    except (GateError, ExportError, TrackingError) as e:
        print(f"deepslicing register: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"deepslicing register: error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    return 0

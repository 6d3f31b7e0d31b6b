"""``deepslicing export``: a MADDPG checkpoint's actors as ONNX, TorchScript and int8 ONNX files.

Only the decentralised actors are exported (no critics, no target networks), with the input
transform and standardisation inside the graph, so an exported file maps raw observations to
requested shares:

- input ``obs``: float32 ``(batch, num_slices, 14)``, each slice's own features in
  :data:`deepslicing.model.FEATURES` order (units and ranges in :mod:`deepslicing.model`; the
  actors were trained on values in ``[0, FEATURE_HIGH]``); ``batch`` is a dynamic axis;
- output ``shares``: float32 ``(batch, num_slices)``, each slice's requested share of the cell's
  PRBs in [0, 1] (before the coordinator turns requests into a feasible allocation), computed
  exactly as the RL module's ``act`` (the slice's forecast times its kind's learned correction,
  see :mod:`policies.maddpg.torch.default_maddpg_torch_rl_module`), deterministically.

Files written to ``--out`` (files of formats not asked for are removed, so the directory always
matches its metadata):

| file               | format      | how                                                          |
|--------------------|-------------|--------------------------------------------------------------|
| ``actor.onnx``     | `onnx`      | ``torch.onnx.export(..., dynamo=False)``, opset ``--opset``   |
| ``actor.pt``       | `torchscript` | ``torch.jit.trace`` of the same wrapper; ``torch.jit.load`` |
| ``actor.int8.onnx``| `int8`      | ``onnxruntime.quantization.quantize_dynamic`` of the ONNX model, int8 weights |
| ``metadata.json``  | always      | slice layout, features, normalisation, shapes, versions, parity |

The ONNX exporter is torch's TorchScript-based one (``dynamo=False``): the ``torch.export``-based
exporter, torch's default since 2.9, needs the ``onnxscript`` package, which is not a dependency
here, and the actors are a fixed feed-forward graph that the TorchScript-based exporter handles
exactly (no control flow, no data-dependent shapes).

int8: dynamic quantisation stores MatMul weights as int8 and quantises activations to uint8 with
one scale per call (computed from that call's whole input), then dequantises. The input layer
(10 heterogeneous standardised inputs sharing one activation scale) and the output layer (one
unit per slice, straight into the tanh correction) stay float32 when the actor has a
hidden-to-hidden layer to quantise: they lose the most precision and hold about 16 % of the
weights of the default 64 x 64 actors (769 of 4,929 per kind). With a single hidden layer every
MatMul is quantised.

Parity (measured at every export on ``parity_samples`` observations drawn uniformly from
``[0, FEATURE_HIGH]`` with ``seed``, run as one batch, against the inference-only RL module's
``act``; recorded in ``metadata.json`` under ``parity``; an export outside a tolerance exits 1):

| format        | tolerance (absolute error in share units)        | measured (tiny checkpoints, 3 and 20 slices) |
|---------------|--------------------------------------------------|----------------------------------------------|
| `onnx`        | max <= 1e-5                                      | max 2e-7..9e-7; trained 3-slice: 4.8e-7      |
| `torchscript` | exactly equal (max 0)                            | exactly equal                                |
| `int8`        | max <= 0.5, 99th percentile <= 0.02, mean <= 0.005 | max 0.001..0.23, p99 2e-4..3e-3, mean 1e-4..1e-3; trained 3-slice (default `deepslicing train`, 30 iterations): max 0.093, p99 0.018, mean 8.4e-4 |

The int8 error is heavy-tailed: almost every share is within 1e-3, but a few observations whose
actor output sits on a steep part of its squashing function move by up to about 0.2 (0.2 % of shares by more
than 0.05 on a 3-slice checkpoint whose standardisation scales some features by 20x). Hence the
percentile and mean bounds, and only a loose ceiling on the maximum. The error also depends on the
call's batch: activations share one scale per call, so a batch of widely spread observations
quantises each coarser than one observation alone (batch-1 calls measured a maximum about 30 %
lower). The uniform draw over the whole feature box is harsher than real traffic, which stays near
the standardisation's centre. Use `int8` where a few hundredths of a share do not matter; the
float formats are exact to float32 rounding.

:func:`load_exported` loads any format back as a numpy callable ``(E, S, 14) -> (E, S)`` float32
(onnxruntime sessions with one intra-op thread; ``torch.jit.load``), which the Serve app uses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pickle
import platform
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepslicing.config import check_int, option, to_dict
from deepslicing.model import FEATURE_HIGH, FEATURES, NUM_FEATURES
from deepslicing.slices import KINDS

FORMATS = ("onnx", "torchscript", "int8")
FILES = {"onnx": "actor.onnx", "torchscript": "actor.pt", "int8": "actor.int8.onnx"}
METADATA_FILE = "metadata.json"
INPUT_NAME = "obs"
OUTPUT_NAME = "shares"
DEFAULT_OPSET = 17
MAX_OPSET = 20  # the TorchScript-based exporter's newest opset
MIN_OPSET = 11
# parity tolerances, in share units (see the module docstring for the measured values)
ONNX_MAX_ABS = 1e-5
INT8_MAX_ABS = 0.5
INT8_P99_ABS = 0.02
INT8_MEAN_ABS = 0.005
TOLERANCES: dict[str, dict[str, float]] = {
    "onnx": {"max_abs": ONNX_MAX_ABS},
    "torchscript": {"max_abs": 0.0},
    "int8": {"max_abs": INT8_MAX_ABS, "p99_abs": INT8_P99_ABS, "mean_abs": INT8_MEAN_ABS},
}
TRACE_BATCH = 4  # example batch for tracing; the batch axis stays dynamic


@dataclass(frozen=True)
class ExportConfig:
    """Export a MADDPG checkpoint's actors (no critics) as ONNX, TorchScript and int8 ONNX, with
    metadata.json (slice layout, feature order, normalisation, shapes, model version, parity)."""

    checkpoint: str = option(
        "", "required: a MADDPG checkpoint directory (RUN_DIR/checkpoints/iter_NNNNNN) or run dir"
    )
    format: tuple[Literal["onnx", "torchscript", "int8"], ...] = option(
        FORMATS, "formats to write: onnx, torchscript, int8 (int8 is quantised from the ONNX model)"
    )
    out: str = option("export", "directory for the exported files and metadata.json")
    opset: int = option(DEFAULT_OPSET, f"ONNX opset ({MIN_OPSET}..{MAX_OPSET})")
    model_version: str = option(
        "", "version recorded in metadata.json (default: checkpoint name + weights hash)"
    )
    parity_samples: int = option(
        10_000, "random observations the parity check runs through every format (1..1000000)"
    )
    seed: int = option(0, "seed of the parity check's observations, >= 0")

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError("checkpoint: required, the directory of a MADDPG checkpoint")
        checkpoint_dir(self.checkpoint)  # raises naming `checkpoint`
        if not self.format:
            raise ValueError(f"format: choose at least one of {FORMATS}")
        for f in self.format:
            if f not in FORMATS:
                raise ValueError(f"format: must be among {FORMATS}, got {f!r}")
        if len(set(self.format)) != len(self.format):
            raise ValueError(f"format: lists a format twice: {self.format}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError("out: must be a directory path")
        for name, low, high in (
            ("opset", MIN_OPSET, MAX_OPSET),
            ("parity_samples", 1, 1_000_000),
            ("seed", 0, 2**32 - 1),
        ):
            check_int(name, getattr(self, name), low, high)
        if not isinstance(self.model_version, str):
            raise ValueError(f"model_version: must be a string, got {self.model_version!r}")


def checkpoint_dir(path: str | Path) -> Path:
    """The algorithm checkpoint at ``path``: a checkpoint directory, or a ``deepslicing train`` run
    directory (its last checkpoint, from ``state.json``). Raises ``ValueError`` naming
    ``checkpoint`` when there is none."""
    from policies.maddpg.policy import is_checkpoint, module_dir

    path = Path(path).expanduser().resolve()
    state = path / "state.json"
    if not is_checkpoint(path) and state.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            path = Path(json.loads(state.read_text())["checkpoint"])
    if not path.is_dir():
        raise ValueError(f"checkpoint: {str(path)!r} is not a directory")
    if not is_checkpoint(path) or not (path / "class_and_ctor_args.pkl").is_file():
        raise ValueError(
            f"checkpoint: {str(path)!r} is not a MADDPG checkpoint (expected "
            f"{module_dir(path).relative_to(path)} and class_and_ctor_args.pkl in it)"
        )
    return path


def algorithm_config(checkpoint: Path):
    """The ``MADDPGConfig`` a checkpoint was trained with (how RLlib itself restores it)."""
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    with open(checkpoint / "class_and_ctor_args.pkl", "rb") as f:
        saved = pickle.load(f)  # a checkpoint is trusted code, as for Algorithm.from_checkpoint
    if getattr(saved.get("class"), "__name__", None) != "MADDPG":
        raise ValueError(
            f"checkpoint: {str(checkpoint)!r} holds a {saved.get('class')!r} algorithm, not MADDPG"
        )
    return AlgorithmConfig.from_state(saved["ctor_args_and_kwargs"][0][0])


# --- the exported network ---------------------------------------------------------------------


def actor_wrapper(module):
    """A plain ``nn.Module`` around a copy of an inference-only MADDPG module whose forward is
    the module's ``act``: ``obs (batch, S, 14) -> shares (batch, S)``."""
    import torch
    from torch import nn

    class ExportedActor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = copy.deepcopy(module)

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.module.act(obs)

    wrapper = ExportedActor().eval()
    wrapper.requires_grad_(False)
    return wrapper


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's deprecation notices for the TorchScript paths we choose on purpose, and
    onnxruntime quantisation's advice to pre-process (our graph is already shape-complete)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        root.setLevel(level)


def export_onnx(wrapper, num_slices: int, path: Path, opset: int, props: dict[str, str]) -> None:
    import onnx
    import torch

    example = torch.zeros(TRACE_BATCH, num_slices, NUM_FEATURES)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def export_torchscript(wrapper, num_slices: int, path: Path) -> None:
    import torch

    example = torch.zeros(TRACE_BATCH, num_slices, NUM_FEATURES)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,))
    traced.save(str(path))


def export_int8(onnx_path: Path, path: Path) -> dict[str, list[str]]:
    """Dynamic int8 quantisation of the ONNX actor; returns which MatMuls were quantised."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "MatMul"]
    kept = [matmuls[0], matmuls[-1]] if len(matmuls) >= 3 else []
    with _quiet():
        quantize_dynamic(
            str(onnx_path),
            str(path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=kept,
        )
    return {"quantized": [m for m in matmuls if m not in kept], "float32": kept}


# --- loading ----------------------------------------------------------------------------------


class ExportedPolicy:
    """An exported actor as a numpy callable ``obs (E, S, 14) -> shares (E, S)`` float32."""

    def __init__(self, directory: str | Path, format: str = "onnx") -> None:
        directory = Path(directory)
        if format not in FORMATS:
            raise ValueError(f"format: must be one of {FORMATS}, got {format!r}")
        meta_path = directory / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"directory: no {METADATA_FILE} in {directory} (not an export)")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        file = directory / FILES[format]
        if format not in self.metadata["files"] or not file.is_file():
            raise FileNotFoundError(
                f"format: {directory} has no {format} export (it has {list(self.metadata['files'])})"
            )
        self.format = format
        self.path = file
        self.num_slices = int(self.metadata["num_slices"])
        if format == "torchscript":
            import torch

            self._module = torch.jit.load(str(file))
            self._module.eval()
            self._run = self._run_torch
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(
                str(file), options, providers=["CPUExecutionProvider"]
            )
            self._run = self._run_onnx

    def _run_onnx(self, obs: np.ndarray) -> np.ndarray:
        return self._session.run(None, {INPUT_NAME: obs})[0]

    def _run_torch(self, obs: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._module(torch.from_numpy(obs)).numpy()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim != 3 or obs.shape[1:] != (self.num_slices, NUM_FEATURES):
            raise ValueError(
                f"observation: the model takes (batch, {self.num_slices}, {NUM_FEATURES}) "
                f"float32, got shape {obs.shape}"
            )
        return self._run(obs)


def load_exported(directory: str | Path, format: str = "onnx") -> ExportedPolicy:
    """Load an export written by :func:`run` as a numpy callable ``(E, S, 14) -> (E, S)``."""
    return ExportedPolicy(directory, format)


# --- export -----------------------------------------------------------------------------------


def random_observations(num_slices: int, samples: int, seed: int) -> np.ndarray:
    """``samples`` observations drawn uniformly from ``[0, FEATURE_HIGH]``, float32."""
    rng = np.random.default_rng(seed)
    return (rng.random((samples, num_slices, NUM_FEATURES)) * FEATURE_HIGH).astype(np.float32)


def export_module(
    module,
    out: str | Path,
    formats: tuple[str, ...] = FORMATS,
    opset: int = DEFAULT_OPSET,
    info: dict[str, Any] | None = None,
    parity_samples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``module``'s actors (an inference-only MADDPG RL module) to ``out`` in ``formats``,
    check parity against ``module.act`` and write ``metadata.json`` (``info`` merged in).
    Returns the metadata."""
    import onnx
    import onnxruntime
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_slices = int(module.observation_space.shape[0])
    info = dict(info or {})
    model_version = info.get("model_version") or "untrained"
    wrapper = actor_wrapper(module)
    files: dict[str, str] = {}
    int8_layers = None
    props = {"model_version": model_version, "num_slices": str(num_slices)}
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = out / FILES["onnx"] if "onnx" in formats else Path(scratch) / FILES["onnx"]
        if "onnx" in formats or "int8" in formats:
            export_onnx(wrapper, num_slices, onnx_path, opset, props)
        if "int8" in formats:
            int8_layers = export_int8(onnx_path, out / FILES["int8"])
    if "torchscript" in formats:
        export_torchscript(wrapper, num_slices, out / FILES["torchscript"])
    for fmt in FORMATS:
        path = out / FILES[fmt]
        if fmt in formats:
            files[fmt] = FILES[fmt]
        elif path.exists():
            path.unlink()  # a stale file of an earlier export would not match this metadata

    high = [float(v) for v in FEATURE_HIGH]
    metadata: dict[str, Any] = {
        "model_version": model_version,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "num_slices": num_slices,
        "num_features": NUM_FEATURES,
        "features": list(FEATURES),
        "feature_high": high,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", num_slices, NUM_FEATURES],
            "dtype": "float32",
            "meaning": "each slice's own features in `features` order, raw (not standardised)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", num_slices],
            "dtype": "float32",
            "meaning": "requested share of the cell's PRBs per slice, in [0, 1], before the "
            "coordinator makes the allocation feasible",
        },
        "normalization": {
            "formula": "(actor_inputs(obs) - input_shift[kind]) * input_scale[kind], inside "
            "the exported graph; rows of input_shift/input_scale follow `kinds`",
            "kinds": list(KINDS),
            "input_shift": module.input_shift.detach().cpu().numpy().tolist(),
            "input_scale": module.input_scale.detach().cpu().numpy().tolist(),
        },
        "actor": {
            "hiddens": [int(w.shape[-1]) for w in module.actor.weights][:-1],
            "slice_kinds": list(module.slice_kinds),
            "activation": "relu, tanh correction of the slice's need forecast "
            "(request = min(1, forecast x 2^tanh(.)))",
        },
        "files": files,
        "onnx": {
            "opset": opset,
            "exporter": "torch.onnx.export(dynamo=False), TorchScript-based",
        },
        "int8": (
            None
            if int8_layers is None
            else {
                "method": "onnxruntime.quantization.quantize_dynamic, int8 weights, uint8 "
                "activations with a per-call scale",
                "matmuls": int8_layers,
            }
        ),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        **info,
    }
    metadata["parity"] = measure_parity(module, out, files, metadata, parity_samples, seed)
    write_json(out / METADATA_FILE, metadata)
    return metadata


def measure_parity(
    module, out: Path, files: dict[str, str], metadata: dict, samples: int, seed: int
) -> dict[str, Any]:
    """Every written format against ``module.act`` on ``samples`` random observations."""
    import torch

    write_json(out / METADATA_FILE, metadata)  # the loaders read it
    obs = random_observations(int(metadata["num_slices"]), samples, seed)
    with torch.no_grad():
        reference = module.act(torch.from_numpy(obs)).numpy()
    parity: dict[str, Any] = {
        "samples": samples,
        "seed": seed,
        "distribution": "uniform over [0, feature_high], one batch",
        "reference": "the inference-only RL module's act() in torch",
    }
    for fmt in files:
        shares = load_exported(out, fmt)(obs)
        error = np.abs(shares.astype(np.float64) - reference.astype(np.float64))
        tolerance = TOLERANCES[fmt]
        measured = {
            "max_abs": float(error.max()),
            "p99_abs": float(np.quantile(error, 0.99)),
            "mean_abs": float(error.mean()),
        }
        within = all(measured[key] <= bound for key, bound in tolerance.items())
        parity[fmt] = {**measured, "tolerance": tolerance, "within_tolerance": within}
        if fmt == "torchscript":
            parity[fmt]["exact"] = bool(np.array_equal(shares, reference))
    return parity


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def weights_hash(checkpoint: Path) -> str:
    from policies.maddpg.policy import module_dir

    digest = hashlib.sha256()
    for file in sorted(module_dir(checkpoint).glob("*.pkl")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def slice_layout(env) -> list[dict[str, Any]]:
    """The resolved slice specs of a ``SlicingConfig`` as plain data."""
    return [dataclasses.asdict(s) for s in env.resolved_slices()]


def run(config: ExportConfig) -> int:
    """Export, print what was written and the parity numbers; exit 1 if a format misses its
    tolerance."""
    from policies.maddpg.env_runner import slicing_config
    from policies.maddpg.policy import load_actor_module

    checkpoint = checkpoint_dir(config.checkpoint)
    algo_config = algorithm_config(checkpoint)
    env = slicing_config(algo_config)
    module = load_actor_module(checkpoint)
    slices = slice_layout(env)
    num_slices = int(module.observation_space.shape[0])
    if len(slices) != num_slices:
        raise ValueError(
            f"checkpoint: its env config has {len(slices)} slices but its actors take {num_slices}"
        )
    version = config.model_version or f"{checkpoint.name}-{weights_hash(checkpoint)}"
    info = {
        "model_version": version,
        "source_checkpoint": str(checkpoint),
        "algorithm": "MADDPG",
        "variant": algo_config.variant,
        "slices": slices,
        "env": to_dict(env),
    }
    metadata = export_module(
        module,
        config.out,
        config.format,
        config.opset,
        info,
        config.parity_samples,
        config.seed,
    )
    out = Path(config.out)
    for fmt, file in metadata["files"].items():
        print(f"wrote {out / file} ({fmt}, {(out / file).stat().st_size:,} bytes)")
    print(f"wrote {out / METADATA_FILE} (model_version {version}, {num_slices} slices)")
    failed = []
    for fmt in metadata["files"]:
        p = metadata["parity"][fmt]
        status = "ok" if p["within_tolerance"] else "OUT OF TOLERANCE"
        print(
            f"parity {fmt:<11}: max abs {p['max_abs']:.3g}, mean abs {p['mean_abs']:.3g} over "
            f"{config.parity_samples:,} observations (tolerance {p['tolerance']}) {status}"
        )
        if not p["within_tolerance"]:
            failed.append(fmt)
    if failed:
        print(f"error: {', '.join(failed)} outside tolerance", file=sys.stderr)
        return 1
    return 0


def untrained_actor_module(num_slices: int, seed: int = 0):
    """A freshly initialised inference-only MADDPG module for ``num_slices`` default slices, built
    from ``MADDPGConfig``'s defaults and seeded; identity standardisation."""
    import torch

    from policies.maddpg import MADDPGConfig
    from policies.maddpg.env_runner import joint_spaces

    config = MADDPGConfig().environment(env_config={"num_slices": num_slices})
    spec = config.get_default_rl_module_spec()
    spec.observation_space, spec.action_space = joint_spaces(num_slices)
    spec.inference_only = True
    torch.manual_seed(seed)
    module = spec.build()
    module.eval()
    return module


def export_untrained(
    out: str | Path, seed: int, model_version: str, num_slices: int = 3
) -> dict[str, Any]:
    """An ONNX export of a freshly initialised, seeded actor for the default cell of
    ``num_slices`` slices: real files with the same layout as a trained export, for tests and
    benchmarks that need a model but not a good one. Returns the metadata."""
    from deepslicing.simulator import SlicingConfig

    env = SlicingConfig(num_slices=num_slices)
    info = {
        "model_version": model_version,
        "source_checkpoint": "none (untrained)",
        "algorithm": "MADDPG",
        "variant": "both",
        "slices": slice_layout(env),
        "env": to_dict(env),
    }
    module = untrained_actor_module(num_slices, seed=seed)
    return export_module(module, out, ("onnx",), DEFAULT_OPSET, info, 256, seed)

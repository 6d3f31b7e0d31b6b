"""`deepslicing export`: ONNX, TorchScript and int8 actors from a real (tiny) MADDPG checkpoint match
the torch actors within the documented tolerances, metadata.json describes the checkpoint, and bad
input stops with exit 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from deepslicing.cli import main
from deepslicing.export import (
    FILES,
    INT8_MAX_ABS,
    INT8_MEAN_ABS,
    INT8_P99_ABS,
    METADATA_FILE,
    ONNX_MAX_ABS,
    export_module,
    load_exported,
    random_observations,
    untrained_actor_module,
)
from deepslicing.model import FEATURE_HIGH, FEATURES, NUM_FEATURES
from policies.maddpg.policy import load_actor_module

SAMPLES = 10_000
SLICES = [
    {
        "name": "cam",
        "kind": "embb",
        "sst": 1,
        "sd": "0x000001",
        "five_qi": 9,
        "targets": {"bandwidth_mbps": 60.0},
    },
    {"name": "agv", "kind": "urllc", "sst": 2, "five_qi": 82, "targets": {"latency_ms_p95": 8.0}},
    {"name": "meters", "kind": "mmtc", "sst": 3},
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-iteration MADDPG run on a custom 3-slice layout (with 5G identifiers), trained by
    `deepslicing train` on a real local Ray."""
    root = tmp_path_factory.mktemp("export_run")
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump({"env": {"episode_length": 50, "slices": SLICES}}))
    run = root / "run"
    code = main(  # starts and stops its own local Ray
        ["train", "--config", str(config), "--iterations", "3", "--run-dir", str(run)]
        + ["--no-tracking", "--eval-episodes", "0", "--seed", "0"]
        + ["--set", "maddpg.learning_starts=400", "--set", "maddpg.batch_size=64"]
    )
    assert code == 0
    return run


@pytest.fixture(scope="module")
def checkpoint(run_dir) -> Path:
    return run_dir / "checkpoints" / "iter_000003"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "actor"
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert code == 0
    return out


def test_exported_actors_match_torch(checkpoint, exported):
    module = load_actor_module(checkpoint)
    obs = random_observations(3, SAMPLES, seed=123)
    assert obs.min() >= 0 and np.all(obs.max(axis=(0, 1)) <= FEATURE_HIGH)
    with torch.no_grad():
        reference = module.act(torch.from_numpy(obs)).numpy()

    onnx_shares = load_exported(exported, "onnx")(obs)
    assert onnx_shares.shape == (SAMPLES, 3) and onnx_shares.dtype == np.float32
    assert np.abs(onnx_shares - reference).max() <= ONNX_MAX_ABS

    assert np.array_equal(load_exported(exported, "torchscript")(obs), reference)

    int8_error = np.abs(load_exported(exported, "int8")(obs) - reference)
    assert int8_error.max() <= INT8_MAX_ABS
    assert np.quantile(int8_error, 0.99) <= INT8_P99_ABS
    assert int8_error.mean() <= INT8_MEAN_ABS

    # the batch axis is dynamic: single observations and odd batches give the same shares
    for fmt in ("onnx", "torchscript"):
        policy = load_exported(exported, fmt)
        single = np.concatenate([policy(obs[i : i + 1]) for i in range(5)])
        assert np.abs(single - reference[:5]).max() <= ONNX_MAX_ABS
        assert policy(obs[:7]).shape == (7, 3)


def test_int8_model_is_quantised(exported):
    graph = onnx.load(str(exported / FILES["int8"])).graph
    ops = [node.op_type for node in graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert (exported / FILES["int8"]).stat().st_size < (exported / FILES["onnx"]).stat().st_size


def test_metadata_round_trips_and_matches_the_checkpoint(checkpoint, exported):
    metadata = json.loads((exported / METADATA_FILE).read_text())
    assert json.loads(json.dumps(metadata)) == metadata
    assert metadata["num_slices"] == 3
    assert metadata["features"] == list(FEATURES)
    assert metadata["feature_high"] == FEATURE_HIGH.tolist()
    assert metadata["source_checkpoint"] == str(checkpoint.resolve())
    assert metadata["model_version"].startswith("iter_000003-")
    assert metadata["files"] == FILES
    assert metadata["input"]["name"] == "obs" and metadata["input"]["shape"] == [
        "batch",
        3,
        NUM_FEATURES,
    ]
    assert metadata["output"]["name"] == "shares" and metadata["output"]["shape"] == ["batch", 3]
    for spec, saved in zip(SLICES, metadata["slices"], strict=True):
        for key in ("name", "kind", "sst", "sd", "five_qi"):
            assert saved[key] == spec.get(key), key
        for target, value in spec.get("targets", {}).items():
            assert saved["targets"][target] == value
    assert metadata["slices"][2]["targets"]["availability"] == 99.0  # the mMTC kind default
    assert metadata["env"]["episode_length"] == 50

    module = load_actor_module(checkpoint)
    norm = metadata["normalization"]
    assert np.array_equal(np.float32(norm["input_shift"]), module.input_shift.numpy())
    assert np.array_equal(np.float32(norm["input_scale"]), module.input_scale.numpy())
    assert set(metadata["versions"]) >= {"torch", "onnx", "onnxruntime"}
    parity = metadata["parity"]
    assert parity["samples"] == SAMPLES
    assert all(parity[fmt]["within_tolerance"] for fmt in FILES)
    assert parity["torchscript"]["exact"] is True

    # the ONNX graph itself carries the names, the dynamic batch axis and the model version
    model = onnx.load(str(exported / FILES["onnx"]))
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "obs" and dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, NUM_FEATURES]
    assert model.graph.output[0].name == "shares"
    props = {p.key: p.value for p in model.metadata_props}
    assert props["model_version"] == metadata["model_version"]


def test_run_dir_and_one_format_leave_only_that_file(run_dir, exported, tmp_path):
    out = tmp_path / "onnx_only"
    out.mkdir()
    (out / FILES["torchscript"]).write_bytes(b"stale")
    code = main(["export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [FILES["onnx"], METADATA_FILE]
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["files"] == {"onnx": FILES["onnx"]}
    assert metadata["source_checkpoint"].endswith("iter_000003")
    with pytest.raises(FileNotFoundError, match="format: .* no int8 export"):
        load_exported(out, "int8")
    with pytest.raises(
        ValueError, match=rf"observation: the model takes \(batch, 3, {NUM_FEATURES}\)"
    ):
        load_exported(out, "onnx")(np.zeros((2, 4, NUM_FEATURES), np.float32))


def test_twenty_slices_with_shared_actors(tmp_path):
    module = untrained_actor_module(20, seed=3)
    module.fit_normalizer(torch.from_numpy(random_observations(20, 512, seed=4)))
    metadata = export_module(module, tmp_path, info={"model_version": "twenty"})
    assert metadata["actor"]["slice_kinds"] == [("embb", "urllc", "mmtc")[i % 3] for i in range(20)]
    obs = random_observations(20, SAMPLES, seed=5)
    with torch.no_grad():
        reference = module.act(torch.from_numpy(obs)).numpy()
    assert np.abs(load_exported(tmp_path, "onnx")(obs) - reference).max() <= ONNX_MAX_ABS
    assert np.array_equal(load_exported(tmp_path, "torchscript")(obs), reference)
    int8_error = np.abs(load_exported(tmp_path, "int8")(obs) - reference)
    assert int8_error.max() <= INT8_MAX_ABS and int8_error.mean() <= INT8_MEAN_ABS
    assert np.quantile(int8_error, 0.99) <= INT8_P99_ABS


@pytest.mark.parametrize(
    ("args", "field", "message"),
    [
        ([], "checkpoint", "required"),
        (["--checkpoint", "{tmp}"], "checkpoint", "is not a MADDPG checkpoint"),
        (["--checkpoint", "{tmp}/missing"], "checkpoint", "is not a directory"),
        (["--checkpoint", "{ckpt}", "--format", "onnx,pdf"], "format[1]", "'pdf'"),
        (["--checkpoint", "{ckpt}", "--format", "onnx,onnx"], "format", "twice"),
        (["--checkpoint", "{ckpt}", "--opset", "99"], "opset", "11..20"),
    ],
)
def test_bad_input_exits_2_naming_the_field(args, field, message, checkpoint, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err and message in err
    assert not (tmp_path / "out").exists()

"""`deepslicing train` on the ns-3 backend: from scratch and fine-tuned from a fast-model checkpoint
(``--init-from``); a bad ``--init-from`` stops before Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "--eval-episodes",
    "0",
    "--set",
    "maddpg.learning_starts=40",
    "--set",
    "maddpg.batch_size=32",
    "--set",
    "maddpg.num_envs=2",
    "--set",
    "maddpg.rollout_fragment_length=20",
    "--set",
    "env.episode_length=20",
]


def train(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "deepslicing.train",
            "--run-dir",
            str(tmp_path / name),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            *SMALL,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_bad_init_from_fails_before_ray(tmp_path):
    out = train(tmp_path, "run", "--init-from", str(tmp_path / "nowhere"))
    assert out.returncode == 2, out.stderr
    assert "init_from:" in out.stderr and "not a MADDPG checkpoint" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_on_ns3_from_scratch_and_from_a_fast_checkpoint(tmp_path):
    pytest.importorskip("ns", reason="needs `pip install -e '.[ns3]'`")
    fast = train(tmp_path, "fast", "--iterations", "1")
    assert fast.returncode == 0, fast.stderr[-3000:]
    checkpoint = tmp_path / "fast" / "checkpoints" / "iter_000001"
    assert checkpoint.is_dir()

    tuned = train(
        tmp_path, "tuned", "--iterations", "2", "--set", "env.backend=ns3",
        "--init-from", str(checkpoint),
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert f"initialised from {checkpoint}" in tuned.stdout
    assert "iter    2/2" in tuned.stdout
    assert (tmp_path / "tuned" / "checkpoints" / "iter_000002").is_dir()

    scratch = train(tmp_path, "scratch", "--iterations", "2", "--set", "env.backend=ns3")
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    assert "iter    2/2" in scratch.stdout

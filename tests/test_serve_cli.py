"""`deepslicing run` (the main job) and `deepslicing serve` from the command line, each in a fresh
process or before any Ray starts: the main job trains, registers, serves and answers; bad settings
stop `serve` with one line naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray

from deepslicing.cli import main
from deepslicing.export import export_untrained


def test_main_job_trains_registers_serves_and_answers(tmp_path):
    port = 8160
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "DEEPSLICING_API_KEYS")
    }
    result = subprocess.run(
        [sys.executable, "-m", "deepslicing.cli", "run", "--no-keep-serving"]
        + ["--set", "train.iterations=2", "--set", "train.eval_episodes=0"]
        + ["--set", "train.maddpg.learning_starts=200", "--set", f"serve.port={port}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "POST /allocate answered by model deepslicing-allocator/1" in out
    answer = json.loads(out[out.index("{\n") : out.rindex("}") + 1])
    assert [s["name"] for s in answer["slices"]] == ["eMBB", "URLLC", "mMTC"]
    assert answer["total_share"] <= 1 + 1e-9
    key_file = tmp_path / "runs" / "maddpg" / "api_key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = key_file.read_text().strip()
    assert key not in out and key not in result.stderr
    assert (tmp_path / "mlflow.db").is_file()


def test_serve_command_refuses_bad_settings_before_starting_anything(tmp_path, capsys):
    export = tmp_path / "export"
    export_untrained(export, seed=0, model_version="v")
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "model: " in capsys.readouterr().err
    missing = tmp_path / "no_keys"
    assert main(["serve", "--model", str(export), "--api-keys-file", str(missing)]) == 2
    assert "api_keys_file: no such file" in capsys.readouterr().err
    short = tmp_path / "short_keys"
    short.write_text("tooshort\n")
    assert main(["serve", "--model", str(export), "--api-keys-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert not ray.is_initialized()
    with pytest.raises(SystemExit):
        main(["serve", "--qos-floor", "2"])
    assert "qos_floor: must be a number in [0, 1]" in capsys.readouterr().err

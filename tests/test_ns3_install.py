"""The ns-3 backend is optional: the fast path imports nothing of ns-3, and without the package
``backend="ns3"`` says which command installs it. Runs with or without ns-3 installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from deepslicing.simulator import SlicingConfig, SlicingSimulator
from ns3_gym import engine


def test_fast_path_imports_no_ns3():
    code = (
        "import sys\n"
        "import deepslicing.cli, deepslicing.evaluation, envs.slicing_v0 as e\n"
        "env = e.parallel_env(episode_length=2); env.reset(seed=0)\n"
        "env.step({a: [0.3] for a in env.agents})\n"
        "loaded = [m for m in ('ns', 'cppyy', 'ns3_gym.engine') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_ns3_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec

    def without_ns3(name, *args, **kwargs):
        return None if name in ("ns", "cppyy") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_ns3)
    with pytest.raises(engine.Ns3NotInstalledError, match=r"pip install -e '\.\[ns3\]'"):
        SlicingSimulator(SlicingConfig(backend="ns3"))

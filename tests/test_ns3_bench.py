"""`deepslicing bench ns3`: one round runs and reports the ratio against bare ns-3 as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ns", reason="the ns-3 backend needs `pip install -e '.[ns3]'`")


@pytest.mark.slow
def test_bench_ns3_reports_its_ratio():
    out = subprocess.run(
        [sys.executable, "-m", "deepslicing.cli", "bench", "ns3", "--json", "--rounds", "1",
         "--seconds", "0.01"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["target"] == "ns3"
    for key in ("env_intervals_per_s", "bare_intervals_per_s", "fast_intervals_per_s"):
        assert result[key] > 0
    assert result["ratio_vs_bare_ns3"] == pytest.approx(
        result["env_intervals_per_s"] / result["bare_intervals_per_s"]
    )
    assert result["packets_per_episode"] > 200 * 5000  # the default cell: > 5,000 packets/interval
    assert result["goals"] == {"ratio_vs_bare_ns3": 0.7}
    assert out.returncode == (0 if result["goals_met"] else 1)

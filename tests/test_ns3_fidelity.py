"""`deepslicing fidelity`: both backends on the same traffic; the CSVs and plots it writes."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("ns", reason="the ns-3 backend needs `pip install -e '.[ns3]'`")

from deepslicing.fidelity import SUMMARY_COLUMNS, FidelityConfig, run  # noqa: E402
from deepslicing.simulator import SlicingConfig  # noqa: E402


def test_fidelity_writes_the_table_and_plots(tmp_path, capsys):
    config = FidelityConfig(
        policy=("proportional", "oracle"),
        scenario=("steady",),
        out=str(tmp_path),
        env=SlicingConfig(episode_length=6),
    )
    assert run(config) == 0
    with (tmp_path / "fidelity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert {(r["policy"], r["kind"]) for r in rows} == {
        (p, k) for p in ("proportional", "oracle") for k in ("embb", "urllc", "mmtc")
    }
    for r in rows:
        assert int(r["slice_intervals"]) == 6
        assert 0 <= float(r["sla_agreement_pct"]) <= 100
    # eMBB is a constant-rate flow: delivered throughput is what the fluid model predicts
    embb = [r for r in rows if r["kind"] == "embb" and r["policy"] == "oracle"][0]
    assert float(embb["throughput_error_pct"]) < 5
    with (tmp_path / "intervals.csv").open() as f:
        assert sum(1 for _ in csv.DictReader(f)) == 2 * 6 * 3
    assert (tmp_path / "fidelity_steady.png").stat().st_size > 10_000
    assert "sla_agreement_pct" not in capsys.readouterr().out  # the printed table is for people


def test_bad_policy_names_the_field():
    with pytest.raises(ValueError, match="policy"):
        FidelityConfig(policy=("greedy",))

"""The `mix` training scenario: seeded per-cell draws of scenario, load and channel loss."""

import numpy as np
import pytest

from deepslicing import model
from deepslicing.evaluation import EvaluateConfig
from deepslicing.scenarios import (
    MIX_LOAD_RANGE,
    MIX_OUTAGE_PROBABILITY,
    MIX_PROBABILITIES,
    MIX_SCENARIOS,
    MIX_SLICE_LOAD_RANGE,
    OUTAGE_FACTOR,
    SCENARIOS,
    SPECTRAL_EFFICIENCY_RANGE,
    SYNTHETIC_SCENARIOS,
    ScenarioError,
    check_scenario,
    generate,
    mix_draws,
)
from deepslicing.simulator import SlicingConfig, SlicingSimulator
from deepslicing.slices import default_slices

HORIZON = 201


def slice_arrays(num_slices=3):
    return model.SliceArrays.from_specs(default_slices(num_slices))


def mix(seed, num_envs, num_slices=3, horizon=HORIZON):
    s = slice_arrays(num_slices)
    return generate(
        "mix",
        np.random.default_rng(seed),
        num_envs=num_envs,
        horizon=horizon,
        mean_demand=s.mean_demand,
        mean_spectral_efficiency=s.mean_spectral_efficiency,
        kinds=s.kind,
    )


def outage_detected(traffic, mean_spectral_efficiency, horizon=HORIZON):
    """Per env: some window of T/8 intervals where the slices' mean log spectral efficiency (relative
    to the mean) is far below what fading alone gives (about -0.45 at worst; x0.35 is -1.05)."""
    length = horizon // 8
    x = np.log(traffic.spectral_efficiency / mean_spectral_efficiency).mean(axis=-1)
    c = np.cumsum(np.pad(x, ((0, 0), (1, 0))), axis=1)
    rolling = (c[:, length:] - c[:, :-length]) / length
    return rolling.min(axis=1) < -0.6


def test_scenario_lists():
    assert SYNTHETIC_SCENARIOS == ("steady", "diurnal", "burst", "outage", "flash_crowd")
    assert set(SCENARIOS) == {*SYNTHETIC_SCENARIOS, "trace", "mix"}
    assert MIX_SCENARIOS == SYNTHETIC_SCENARIOS
    assert len(MIX_PROBABILITIES) == len(MIX_SCENARIOS)
    assert sum(MIX_PROBABILITIES) == pytest.approx(1.0)
    assert check_scenario("mix") == "mix"
    with pytest.raises(ScenarioError, match="must be one of"):
        check_scenario("mixed")


def test_evaluating_all_never_includes_mix(tmp_path):
    assert EvaluateConfig().resolved_scenarios() == SYNTHETIC_SCENARIOS
    trace = tmp_path / "t.csv"
    trace.write_text("embb,urllc,mmtc\n1,2,3\n")
    env = SlicingConfig(trace_path=str(trace))
    assert EvaluateConfig(env=env).resolved_scenarios() == (*SYNTHETIC_SCENARIOS, "trace")
    assert EvaluateConfig(scenario=("mix",)).resolved_scenarios() == ("mix",)


def test_same_seed_same_traffic_other_seed_differs():
    a, b, c = mix(11, 8), mix(11, 8), mix(12, 8)
    np.testing.assert_array_equal(a.demand, b.demand)
    np.testing.assert_array_equal(a.spectral_efficiency, b.spectral_efficiency)
    assert not np.allclose(a.demand, c.demand)
    assert not np.allclose(a.spectral_efficiency, c.spectral_efficiency)
    da = mix_draws(np.random.default_rng(11), 50, 3)
    dc = mix_draws(np.random.default_rng(12), 50, 3)
    assert not np.array_equal(da.scenario, dc.scenario)
    assert not np.allclose(da.load, dc.load)


@pytest.mark.parametrize("num_slices", [1, 3, 5, 20])
@pytest.mark.parametrize("num_envs", [1, 7])
def test_shapes_and_positivity(num_envs, num_slices):
    t = mix(3, num_envs, num_slices, horizon=41)
    assert t.demand.shape == t.spectral_efficiency.shape == (num_envs, 41, num_slices)
    assert t.demand.dtype == t.spectral_efficiency.dtype == np.float64
    assert np.isfinite(t.demand).all() and (t.demand > 0).all()
    low, high = SPECTRAL_EFFICIENCY_RANGE
    assert (t.spectral_efficiency >= low).all() and (t.spectral_efficiency <= high).all()


def test_draw_distributions():
    n = 20_000
    d = mix_draws(np.random.default_rng(0), n, 4)
    assert d.scenario.shape == d.load.shape == d.outage.shape == (n,)
    assert d.slice_load.shape == (n, 4)
    freq = np.bincount(d.scenario, minlength=len(MIX_SCENARIOS)) / n
    np.testing.assert_allclose(freq, MIX_PROBABILITIES, atol=0.015)
    assert set(d.names()) == set(SYNTHETIC_SCENARIOS)
    low, high = MIX_LOAD_RANGE
    assert low <= d.load.min() < 0.7 and 1.3 < d.load.max() <= high
    assert d.load.mean() == pytest.approx(1.0, abs=0.01)
    low, high = MIX_SLICE_LOAD_RANGE
    assert low <= d.slice_load.min() and d.slice_load.max() <= high
    assert d.slice_load.mean() == pytest.approx(1.0, abs=0.01)
    # slices of one cell get different factors, so their relative loads vary
    assert (d.slice_load.max(axis=1) / d.slice_load.min(axis=1)).mean() > 1.2
    is_outage = d.scenario == MIX_SCENARIOS.index("outage")
    assert d.outage[is_outage].all()
    assert d.outage[~is_outage].mean() == pytest.approx(MIX_OUTAGE_PROBABILITY, abs=0.015)
    expected = MIX_PROBABILITIES[MIX_SCENARIOS.index("outage")]
    expected += (1 - expected) * MIX_OUTAGE_PROBABILITY
    assert d.outage.mean() == pytest.approx(expected, abs=0.015)


@pytest.fixture(scope="module")
def many_cells():
    seed, n = 5, 2000
    s = slice_arrays(3)
    return s, mix(seed, n), mix_draws(np.random.default_rng(seed), n, 3)


def test_generated_traffic_follows_the_draws(many_cells):
    s, traffic, d = many_cells
    ratio = traffic.demand / s.mean_demand  # (envs, T, slices), demand relative to the kind mean
    # over every cell, mean demand / kind mean is near 1 (flash crowds and bursts add a few %)
    assert ratio.mean() == pytest.approx(1.0, abs=0.06)
    # cells whose scenario has mean multiplier 1: mean demand / (kind mean x slice factor) is the
    # cell load factor, and per slice the product of both factors
    flat = np.isin(d.scenario, [MIX_SCENARIOS.index(n) for n in ("steady", "diurnal", "outage")])
    cell = (ratio / d.slice_load[:, None, :]).mean(axis=(1, 2))
    np.testing.assert_allclose(cell[flat], d.load[flat], rtol=0.04)
    assert cell[flat].min() < 0.7 and cell[flat].max() > 1.3
    steady = d.scenario == MIX_SCENARIOS.index("steady")
    per_slice = ratio[steady].mean(axis=1)
    np.testing.assert_allclose(per_slice, d.load[steady, None] * d.slice_load[steady], rtol=0.05)
    # the chosen multiplier shows: bursts have two levels, flash crowds a peak near 3 x load
    scaled = ratio / (d.load[:, None, None] * d.slice_load[:, None, :])
    burst = d.scenario == MIX_SCENARIOS.index("burst")
    flash = d.scenario == MIX_SCENARIOS.index("flash_crowd")
    assert np.log(scaled[steady]).std() < 0.12
    assert np.log(scaled[burst]).std() > 0.3
    c = np.cumsum(np.pad(scaled, ((0, 0), (1, 0), (0, 0))), axis=1)
    peak = ((c[:, 5:] - c[:, :-5]) / 5).max(axis=(1, 2))  # highest 5-interval mean of any slice
    assert (peak[flash] > 2.3).all()
    assert (peak[steady | burst] < 2.1).all()


def test_outage_windows_in_the_configured_fraction(many_cells):
    s, traffic, d = many_cells
    detected = outage_detected(traffic, s.mean_spectral_efficiency)
    assert (detected == d.outage).mean() > 0.995
    expected = 0.2 + 0.8 * MIX_OUTAGE_PROBABILITY
    assert detected.mean() == pytest.approx(expected, abs=0.04)
    # the window is T/8 intervals of spectral efficiency x OUTAGE_FACTOR on every slice
    e = int(np.flatnonzero(d.outage)[0])
    x = np.log(traffic.spectral_efficiency[e] / s.mean_spectral_efficiency).mean(axis=-1)
    length = HORIZON // 8
    c = np.cumsum(np.pad(x, (1, 0)))
    start = int(np.argmin(c[length:] - c[:-length]))
    assert (x[start : start + length].mean()) == pytest.approx(np.log(OUTAGE_FACTOR), abs=0.35)


def test_simulator_runs_mix():
    config = SlicingConfig(scenario="mix", episode_length=20)
    sim = SlicingSimulator(config, num_envs=4)
    obs = sim.reset(seed=1)
    assert obs.shape == (4, 3, model.NUM_FEATURES) and np.isfinite(obs).all()
    np.testing.assert_array_equal(obs, SlicingSimulator(config, num_envs=4).reset(seed=1))
    rng = np.random.default_rng(0)
    steps = 0
    while True:
        step = sim.step(rng.random((4, 3)))
        steps += 1
        assert np.isfinite(step.reward).all() and np.isfinite(step.observation).all()
        assert (step.shares.sum(axis=1) <= 1 + 1e-9).all()
        if step.done:
            break
    assert steps == 20

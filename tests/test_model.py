"""The slicing model: the SLA test agrees with the physical KPIs, and rewards add up to utility."""

import numpy as np
import pytest

from deepslicing import forecast, model
from deepslicing.slices import default_slices

CELL = model.Cell()
SLICES = model.SliceArrays.from_specs(default_slices(3))  # embb 50 Mbps, urllc p95 10 ms, mmtc 99 %


@pytest.fixture(scope="module")
def random_cells():
    """Demand, channel and shares spread widely, away from the SLA boundary by 1e-6."""
    rng = np.random.default_rng(11)
    n = 20_000
    demand = SLICES.mean_demand * rng.lognormal(0.0, 0.6, (n, 3))
    se = rng.uniform(0.3, 7.0, (n, 3))
    shares = rng.dirichlet(np.ones(3), n) * rng.uniform(0.3, 1.0, (n, 1))
    need = model.needed_share(SLICES, CELL, demand, se)
    keep = np.all(np.abs(shares - need) > 1e-6, axis=1)
    return demand[keep], se[keep], shares[keep], need[keep]


def test_sla_met_is_exactly_the_kpi_check(random_cells):
    demand, se, shares, need = random_cells
    kpi = model.qos(SLICES, CELL, shares, demand, se)
    met = model.sla_met(shares, need)
    embb_ok = kpi["throughput_mbps"][:, 0] >= np.minimum(kpi["offered_mbps"][:, 0], 50.0) - 1e-9
    urllc_ok = kpi["delay_p95_ms"][:, 1] <= 10.0
    mmtc_ok = kpi["served_fraction"][:, 2] >= 0.99
    np.testing.assert_array_equal(met[:, 0], embb_ok)
    np.testing.assert_array_equal(met[:, 1], urllc_ok)
    np.testing.assert_array_equal(met[:, 2], mmtc_ok)
    # both outcomes occur, so the comparison above is not vacuous
    assert 0.05 < met.mean() < 0.95
    np.testing.assert_array_equal(model.sla_cost(shares, need), 1.0 - met)


def test_rewards_add_up_to_utility_and_utility_is_at_most_one(random_cells):
    _, _, shares, need = random_cells
    r = model.rewards(SLICES, CELL, shares, need)
    u = model.utility(SLICES, CELL, shares, need)
    np.testing.assert_allclose(r.sum(axis=1), u, rtol=0, atol=1e-12)
    assert u.max() <= 1.0 + 1e-12
    # giving every slice exactly what it needs (when that fits) earns the full utility
    fits = need.sum(axis=1) <= 1.0
    np.testing.assert_allclose(model.utility(SLICES, CELL, need[fits], need[fits]), 1.0, atol=1e-9)


def test_over_provisioning_costs_utility():
    need = np.array([[0.2, 0.1, 0.1]])
    exact = model.utility(SLICES, CELL, need, need)
    generous = model.utility(SLICES, CELL, need + 0.1, need)
    np.testing.assert_allclose(exact - generous, CELL.waste_weight * 0.3)


def test_urllc_delay_follows_mm1_p95():
    # at capacity mu packets/s and load lambda, p95 sojourn is ln(20) / (mu - lambda) plus base delay
    demand = np.array([[40.0, 3000.0, 5000.0]])
    se = np.array([[4.5, 2.5, 1.2]])
    shares = np.array([[0.3, 0.2, 0.2]])
    kpi = model.qos(SLICES, CELL, shares, demand, se)
    mu = 0.2 * CELL.mbps_per_share(2.5) * 1e6 / 2048
    expected = 1.0 + 1000 * np.log(20) / (mu - 3000.0)
    np.testing.assert_allclose(kpi["delay_p95_ms"][0, 1], expected)
    overloaded = model.qos(SLICES, CELL, np.array([[0.3, 0.001, 0.2]]), demand, se)
    assert np.isinf(overloaded["delay_p95_ms"][0, 1])


def test_observation_stays_in_its_documented_range():
    from envs.slicing_v0 import vector_env

    sim = vector_env(64, scenario="flash_crowd", episode_length=50)
    obs = sim.reset(seed=2)
    rng = np.random.default_rng(2)
    while True:
        assert obs.shape == (64, 3, model.NUM_FEATURES)
        assert (obs >= 0).all() and (obs <= model.FEATURE_HIGH).all()
        out = sim.step(rng.random((64, 3)))
        obs = out.observation
        if out.done:
            break


def test_slow_levels_smooth_the_demand_and_channel_readings():
    """Features 12, 13 start at the first readings (features 0, 1) and follow their EWMA."""
    from envs.slicing_v0 import vector_env

    sim = vector_env(4, scenario="burst", episode_length=30)
    obs = sim.reset(seed=3)
    np.testing.assert_allclose(obs[..., 12:14], obs[..., 0:2])
    level = obs[..., 0:2].astype(np.float64)
    rng = np.random.default_rng(3)
    for _ in range(30):
        obs = sim.step(rng.random((4, 3))).observation
        level = forecast.LEVEL_ALPHAS * obs[..., 0:2] + (1 - forecast.LEVEL_ALPHAS) * level
        np.testing.assert_allclose(obs[..., 12:14], level, rtol=1e-5, atol=1e-6)

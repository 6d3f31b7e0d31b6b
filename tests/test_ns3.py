"""The ns-3 packet backend (ns3_gym/): the env API on packets, seeding, and the physics.

Real ns-3 (pip ``ns3``) in this process, plus one Ray actor where the seed test needs a second
simulator. Episodes are short (a few intervals) so the module stays within a minute or two.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("ns", reason="the ns-3 backend needs `pip install -e '.[ns3]'`")

from pettingzoo.test import parallel_api_test, parallel_seed_test  # noqa: E402

from deepslicing import model  # noqa: E402
from deepslicing.simulator import ActionError, SlicingConfig, SlicingSimulator  # noqa: E402
from deepslicing.slices import BASE_DELAY_MS  # noqa: E402
from envs import slicing_v0  # noqa: E402
from ns3_gym.simulator import Ns3SlicingSimulator  # noqa: E402

SHORT = 6  # intervals per episode in the API tests


@pytest.mark.parametrize("scenario", ["steady", "burst", "outage"])
@pytest.mark.parametrize("num_slices", [3, 5])
def test_parallel_api(scenario, num_slices):
    env = slicing_v0.parallel_env(
        backend="ns3", scenario=scenario, num_slices=num_slices, episode_length=SHORT
    )
    assert isinstance(env.sim, Ns3SlicingSimulator)
    assert env.observation_space(env.possible_agents[0]).shape == (model.NUM_FEATURES,)
    parallel_api_test(env, num_cycles=SHORT + 2)
    env.close()


@pytest.mark.parametrize("scenario", ["steady", "burst", "outage"])
@pytest.mark.parametrize("num_slices", [3, 5])
def test_parallel_seed(ray_local, scenario, num_slices):
    """Two envs at once: the first runs ns-3 in this process, the second in a Ray actor; the same
    seed gives the same observations, rewards and (packet-measured) costs."""

    def make():
        return slicing_v0.parallel_env(
            backend="ns3", scenario=scenario, num_slices=num_slices, episode_length=SHORT
        )

    parallel_seed_test(make, num_cycles=SHORT + 2)


def test_same_as_fast_but_cost():
    """Observations and rewards are the fast backend's; only costs come from packets."""
    config = SlicingConfig(scenario="burst", episode_length=5)
    fast = SlicingSimulator(config)
    ns3 = SlicingSimulator(SlicingConfig(scenario="burst", episode_length=5, backend="ns3"))
    assert type(fast) is SlicingSimulator and isinstance(ns3, Ns3SlicingSimulator)
    np.testing.assert_array_equal(fast.reset(7), ns3.reset(7))
    rng = np.random.default_rng(0)
    for _ in range(5):
        requests = rng.random((1, 3))
        a, b = fast.step(requests), ns3.step(requests)
        np.testing.assert_array_equal(a.observation, b.observation)
        np.testing.assert_array_equal(a.reward, b.reward)
        assert set(np.unique(b.cost)) <= {0.0, 1.0}
    with pytest.raises(ActionError, match="NaN"):
        ns3.reset(1)
        ns3.step(np.full((1, 3), np.nan))
    ns3.close()


def _run(
    shares: list[float],
    intervals: int = 4,
    scenario: str = "steady",
    seed: int = 3,
    num_prbs: int = 100,
):
    """Fixed shares for a few intervals; per-interval costs and measurements."""
    config = SlicingConfig(
        scenario=scenario, episode_length=intervals, num_prbs=num_prbs, backend="ns3"
    )
    sim = SlicingSimulator(config)
    sim.reset(seed)
    costs, kpis = [], []
    for _ in range(intervals):
        step = sim.step(np.array([shares(sim) if callable(shares) else shares]))
        costs.append(step.cost[0])
        kpis.append({k: v[0].copy() for k, v in sim.kpis().items()})
    sim.close()
    return sim, np.array(costs), kpis


def test_over_provisioned_slice_loses_nothing():
    """Each slice gets well above its need (a 200-PRB cell): no loss, p95 near the base delay,
    cost 0."""
    sim, costs, kpis = _run([0.5, 0.2, 0.3], num_prbs=200)
    assert (sim.need[0, 1:] * 1.5 < np.array([0.5, 0.2, 0.3])).all()  # really over-provisioned
    for k in kpis:
        assert (k["loss_pct"] == 0).all()
        assert (k["served_fraction"] > 0.99).all()
        # base delay + a few packet transmissions (12,000 bits at >= 40 Mbps is 0.3 ms)
        assert (k["delay_p95_ms"] < BASE_DELAY_MS + 3.0).all()
        assert (k["delay_p95_ms"] >= BASE_DELAY_MS).all()
    assert (costs == 0).all()


def test_under_provisioned_slice_fails_its_sla():
    """eMBB at 60 % of its need: throughput short, delay grows, then the queue drops; cost 1."""
    sim, costs, kpis = _run([0.6 * 0.33, 0.3, 0.3], intervals=6)
    need = sim.need[0, 1:, 0]
    assert (0.8 * need > 0.6 * 0.33).all()
    assert (costs[:, 0] == 1).all()
    delays = np.array([k["delay_p95_ms"][0] for k in kpis])
    assert (np.diff(delays[:3]) > 0).all() and delays[0] > 10 * BASE_DELAY_MS
    assert (np.array([k["throughput_mbps"][0] for k in kpis]) < sim.demand[0, 1:, 0]).all()
    assert kpis[-1]["loss_pct"][0] > 0
    assert (costs[:, 1:] == 0).all()  # the other slices are untouched by eMBB's queue


def test_urllc_latency_sla_on_packets():
    """URLLC at 98 % utilisation: the queue is stable, yet queueing pushes p95 past the 10 ms
    target (cost 1); the other slices keep theirs."""

    def shares(sim):
        t = sim.t + 1  # the interval the step will play
        offered = model.offered_mbps(sim.slices, sim.cell, sim.demand[0, t])
        per_share = sim.cell.mbps_per_share(sim.spectral_efficiency[0, t])
        return [0.45, offered[1] / per_share[1] / 0.98, 0.3]

    sim, costs, kpis = _run(shares, intervals=3)
    offered = model.offered_mbps(sim.slices, sim.cell, sim.demand[0, 1:])[:, 1]  # Poisson mean
    capacity = np.array([k["capacity_mbps"][1] for k in kpis])
    assert (capacity > offered).all()  # stable queue, yet above the delay target
    assert (np.array([k["delay_p95_ms"][1] for k in kpis]) > 10).all()
    assert (costs[:, 1] == 1).all()


def test_delivered_bits_never_exceed_the_cell():
    """On an overloaded cell (burst, every request 1): per slice and interval, delivered bits stay
    within the allocated share x capacity (+ one packet on the wire), and so within the cell."""
    sim = SlicingSimulator(SlicingConfig(scenario="burst", episode_length=8, backend="ns3"))
    sim.reset(11)
    packet_bits = sim.slices.packet_bits
    for _ in range(8):
        step = sim.step(np.ones((1, 3)))
        assert step.shares.sum() <= 1 + 1e-9
        k = sim.kpis()
        allocated_bits = k["capacity_mbps"][0] * 1e6 * sim.config.interval_s
        assert (k["delivered_bits"][0] <= allocated_bits + packet_bits).all()
        cell_bits = (
            sim.cell.mbps_per_share(sim.spectral_efficiency[0, sim.t]).max()
            * 1e6
            * sim.config.interval_s
        )
        assert k["delivered_bits"][0].sum() <= cell_bits + packet_bits.sum()
    sim.close()


def test_same_seed_same_packets_and_different_seed_differs():
    _, c1, k1 = _run([0.4, 0.11, 0.2], intervals=3, scenario="burst", seed=5)
    _, c2, k2 = _run([0.4, 0.11, 0.2], intervals=3, scenario="burst", seed=5)
    _, _, k3 = _run([0.4, 0.11, 0.2], intervals=3, scenario="burst", seed=6)
    np.testing.assert_array_equal(c1, c2)
    for a, b in zip(k1, k2, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any((a["packets_sent"] != b["packets_sent"]).any() for a, b in zip(k1, k3, strict=True))


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="backend"):
        slicing_v0.parallel_env(backend="omnet")
    sim = SlicingSimulator(SlicingConfig(episode_length=1, backend="ns3"))
    with pytest.raises(RuntimeError, match="kpis"):
        sim.kpis()
    sim.reset(0)
    with pytest.raises(ActionError, match="shape"):
        sim.step(np.zeros((1, 4)))
    sim.step(np.zeros((1, 3)))
    with pytest.raises(RuntimeError, match="reset"):
        sim.step(np.zeros((1, 3)))
    sim.close()


def test_evaluate_runs_on_ns3_cells_side_by_side():
    """evaluation's pair runner on the ns-3 backend: two episodes as two cells of one ns-3."""
    from deepslicing.evaluation import evaluate_pair

    env = SlicingConfig(scenario="burst", episode_length=5, backend="ns3")
    fast = evaluate_pair(dataclasses.replace(env, backend="fast"), "proportional", 2, seed=4)
    ns3 = evaluate_pair(env, "proportional", 2, seed=4)
    assert ns3.row["episodes"] == 2 and ns3.row["capacity_violations"] == 0
    # the same allocations and rewards on both backends; only the SLA verdicts are the packets'
    np.testing.assert_array_equal(ns3.shares, fast.shares)
    assert ns3.row["utility_mean"] == fast.row["utility_mean"]
    assert 0 <= ns3.row["violation_rate"] <= 1

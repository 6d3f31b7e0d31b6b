"""The comparators read the observation as documented; mpc is the oracle's LP on the forecast."""

import cvxpy as cp
import numpy as np
import pytest

from deepslicing import model
from deepslicing.baselines import (
    BASELINES,
    COMPARATORS,
    FORECAST_ERROR,
    HEADROOM_SIGMAS,
    MPC_HEADROOM_SIGMAS,
    NEED_FORECAST,
    Oracle,
    make_policy,
)
from deepslicing.simulator import SlicingConfig, SlicingSimulator

ENV = SlicingConfig(episode_length=30)


def crafted_observation(need_forecast, forecast_error):
    """A full observation whose forecast features are the given ``(E, S)`` arrays; the other
    features are arbitrary in-range values (the forecast baselines must ignore them)."""
    need_forecast = np.asarray(need_forecast, dtype=np.float32)
    rng = np.random.default_rng(0)
    obs = (rng.random((*need_forecast.shape, model.NUM_FEATURES)) * model.FEATURE_HIGH).astype(
        np.float32
    )
    obs[..., NEED_FORECAST] = need_forecast
    obs[..., FORECAST_ERROR] = forecast_error
    return obs


def greedy_fill(need, weight):
    """The closed-form optimum of the utility LP: slices in decreasing w_i / need_i get their need
    while capacity lasts (a slice that needs nothing gets nothing)."""
    shares = np.zeros_like(need)
    for e in range(need.shape[0]):
        density = np.where(need[e] > 0, weight / np.where(need[e] > 0, need[e], 1.0), np.inf)
        room = 1.0
        for i in np.argsort(-density, kind="stable"):
            shares[e, i] = min(need[e, i], room)
            room -= shares[e, i]
    return shares


def test_comparators_are_the_deployable_baselines():
    assert COMPARATORS == ("equal", "proportional", "priority", "static", "forecast", "mpc")
    assert len(BASELINES) == len(COMPARATORS) + 1 and BASELINES[-1] == "oracle"
    assert BASELINES[:-1] == COMPARATORS
    sim = SlicingSimulator(ENV, num_envs=2)
    observation = sim.reset(0)
    for name in BASELINES:
        requests = make_policy(name, sim)(observation)
        assert requests.shape == (2, 3) and np.all((requests >= 0) & (requests <= 1 + 1e-9))
    with pytest.raises(ValueError, match="^policy: must be one of"):
        make_policy("genius", sim)


def test_forecast_requests_the_forecast_plus_headroom():
    sim = SlicingSimulator(ENV, num_envs=2)
    need_forecast = np.array([[0.30, 0.10, 0.05], [0.95, 0.0, 0.20]])
    error = np.array([[0.04, 0.02, 0.0], [0.40, 0.01, 0.08]])
    obs = crafted_observation(need_forecast, error)
    requests = make_policy("forecast", sim)(obs)
    expected = need_forecast + HEADROOM_SIGMAS * error
    expected[1, 0] = 1.0  # 0.95 + headroom x 0.40 > 1: a share is at most the whole cell
    assert HEADROOM_SIGMAS > 0
    np.testing.assert_allclose(requests, expected, rtol=1e-6)
    # stateless: the same observation gives the same requests, whatever came before
    np.testing.assert_array_equal(make_policy("forecast", sim)(obs), requests)


def test_mpc_is_the_lp_optimum_on_the_forecast_needs():
    sim = SlicingSimulator(ENV, num_envs=3)
    need_forecast = np.array(
        [
            [0.20, 0.10, 0.15],  # fits: each slice gets its planned need, nothing more
            [0.70, 0.30, 0.40],  # overload: filled by value density w_i / need_i
            [0.90, 0.0, 0.60],  # a slice that needs nothing gets nothing
        ]
    )
    error = np.array([[0.02, 0.01, 0.03], [0.05, 0.02, 0.10], [0.0, 0.0, 0.1]])
    planned = need_forecast + MPC_HEADROOM_SIGMAS * error
    shares = make_policy("mpc", sim)(crafted_observation(need_forecast, error))
    weight = sim.slices.utility_weight
    np.testing.assert_allclose(shares, greedy_fill(planned, weight), atol=1e-6)
    # and the same as a direct cvxpy solve of max sum_i w_i min(1, x_i / n_i) - waste (x_i - n_i)+
    x = cp.Variable(3, nonneg=True)
    for e in range(3):
        n = planned[e]
        sat = [cp.minimum(1.0, x[i] / n[i]) if n[i] > 0 else 1.0 for i in range(3)]
        objective = sum(weight[i] * sat[i] for i in range(3)) - sim.cell.waste_weight * cp.sum(
            cp.pos(x - n)
        )
        cp.Problem(cp.Maximize(objective), [cp.sum(x) <= 1]).solve(solver=cp.CLARABEL)
        np.testing.assert_allclose(shares[e], x.value, atol=1e-6)


@pytest.mark.parametrize("scenario", ["burst", "outage", "flash_crowd"])
def test_mpc_fed_the_true_next_need_is_the_oracle(scenario):
    sim = SlicingSimulator(SlicingConfig(scenario=scenario, episode_length=30), num_envs=4)
    oracle, mpc = make_policy("oracle", sim), make_policy("mpc", sim)
    assert isinstance(mpc, Oracle) and isinstance(oracle, Oracle)  # one LP, two need sources
    obs = sim.reset(11)
    done = False
    while not done:
        told = obs.copy()
        told[..., NEED_FORECAST] = sim.next_need()
        told[..., FORECAST_ERROR] = 0.0
        expected = oracle(obs)
        np.testing.assert_allclose(mpc(told), expected, atol=1e-5)
        np.testing.assert_allclose(
            expected, greedy_fill(sim.next_need(), sim.slices.utility_weight), atol=1e-6
        )
        step = sim.step(expected)
        obs, done = step.observation, step.done

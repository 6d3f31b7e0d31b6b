"""slicing_v0 against PettingZoo's own checks, seeding, and bad input."""

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from deepslicing import simulator
from deepslicing.config import ConfigError
from deepslicing.scenarios import Traffic
from deepslicing.simulator import ActionError
from envs.slicing_v0 import SCENARIOS, parallel_env, vector_env

SLICE_COUNTS = (3, 5, 20)


def write_trace(directory, num_slices):
    """A seeded demand trace with one column per default slice name."""
    names = parallel_env(num_slices=num_slices).possible_agents
    rng = np.random.default_rng(3)
    rows = [",".join(names)]
    rows += [",".join(f"{v:.3f}" for v in rng.uniform(1, 60, len(names))) for _ in range(40)]
    path = directory / f"trace_{num_slices}.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def make_kwargs(scenario, num_slices, directory):
    kwargs = {"scenario": scenario, "num_slices": num_slices, "episode_length": 30}
    if scenario == "trace":
        kwargs["trace_path"] = write_trace(directory, num_slices)
    return kwargs


@pytest.mark.parametrize("num_slices", SLICE_COUNTS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pettingzoo_api_and_seed(scenario, num_slices, tmp_path):
    kwargs = make_kwargs(scenario, num_slices, tmp_path)
    parallel_api_test(parallel_env(**kwargs), num_cycles=40)
    parallel_seed_test(lambda: parallel_env(**kwargs))


def rollout(seed, **kwargs):
    env = parallel_env(**kwargs)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    trajectory = [np.stack(list(obs.values()))]
    while env.agents:
        actions = {a: rng.random(1, dtype=np.float32) for a in env.agents}
        obs, rewards, _, _, infos = env.step(actions)
        trajectory.append(np.stack(list(obs.values())))
        trajectory.append(np.array(list(rewards.values())))
        trajectory.append(np.array([i["cost"] for i in infos.values()]))
    return trajectory


@pytest.mark.parametrize("scenario", ["steady", "burst", "flash_crowd"])
def test_same_seed_same_trajectory_and_other_seed_differs(scenario):
    a = rollout(7, scenario=scenario, episode_length=50)
    b = rollout(7, scenario=scenario, episode_length=50)
    c = rollout(8, scenario=scenario, episode_length=50)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_default_env_is_three_slices_of_twelve_features():
    env = parallel_env()
    assert env.possible_agents == ["embb", "urllc", "mmtc"]
    obs, _ = env.reset(seed=0)
    assert all(o.shape == (14,) and o.dtype == np.float32 for o in obs.values())


def test_capacity_is_never_exceeded_and_costs_are_apart_from_rewards():
    env = parallel_env(scenario="flash_crowd", num_slices=5, episode_length=100)
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    costs = 0.0
    while env.agents:
        _, rewards, _, _, infos = env.step({a: rng.random(1) * 2 for a in env.agents})
        shares = [i["share"] for i in infos.values()]
        assert min(shares) >= 0 and sum(shares) <= 1 + 1e-9
        costs += sum(i["cost"] for i in infos.values())
        assert all(i["cost"] in (0.0, 1.0) for i in infos.values())
        assert sum(rewards.values()) <= 1 + 1e-9
    assert costs > 0  # random requests break SLAs, and that shows up as cost


def test_out_of_range_actions_are_clipped_and_counted():
    env = parallel_env()
    env.reset(seed=0)
    actions = {"embb": np.array([1.7]), "urllc": np.array([-0.3]), "mmtc": np.array([0.2])}
    _, _, _, _, infos = env.step(actions)
    assert [infos[a]["clipped_actions"] for a in env.possible_agents] == [1, 1, 0]
    assert infos["urllc"]["share"] == 0.0
    assert sum(i["share"] for i in infos.values()) <= 1 + 1e-12


def test_nan_action_raises_naming_the_rule():
    env = parallel_env()
    env.reset(seed=0)
    with pytest.raises(ActionError, match="NaN"):
        env.step({"embb": np.array([np.nan]), "urllc": np.array([0.1]), "mmtc": np.array([0.1])})
    with pytest.raises(ActionError, match="no action"):
        env.step({"embb": np.array([0.1])})
    # the env is unharmed: a valid step still works
    env.step({a: np.array([0.3]) for a in env.possible_agents})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scenario": "rush_hour"}, "scenario"),
        ({"kinds": ("embb", "v2x", "mmtc")}, r"kinds\[1\]"),
        ({"num_slices": 0}, "num_slices"),
        ({"num_slices": 21}, "num_slices"),
        ({"episode_length": 0}, "episode_length"),
        ({"admm_rho": -1.0}, "admm_rho"),
        (
            {"slices": ({"name": "a", "kind": "embb", "targets": {"bandwidth_mbps": -5}},)},
            "bandwidth_mbps",
        ),
        (
            {"slices": ({"name": "a", "kind": "urllc", "targets": {"latency_ms_p95": -1}},)},
            "latency_ms_p95",
        ),
        ({"num_slices": "three"}, "num_slices"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises((ValueError, ConfigError), match=field):
        parallel_env(**kwargs)


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        ("", "empty"),
        ("embb,urllc,mmtc\n", "no data rows"),
        ("embb,urllc\n1,2\n", "mmtc"),
        ("embb,urllc,mmtc\n1,2,oops\n", "oops"),
        ("embb,urllc,mmtc\n1,2,-3\n", "-3"),
        ("embb,urllc,mmtc\n1,2\n", "line 2"),
    ],
)
def test_malformed_trace_csv_is_rejected_with_the_reason(tmp_path, content, rule):
    path = tmp_path / "trace.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match="trace_path") as info:
        parallel_env(scenario="trace", trace_path=str(path))
    assert rule in str(info.value)


def test_missing_trace_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="trace_path: no such file"):
        parallel_env(scenario="trace", trace_path=str(tmp_path / "absent.csv"))


@pytest.mark.parametrize("coordinator", ["projection", "admm"])
def test_vector_env_matches_single_envs_given_the_same_traffic(monkeypatch, coordinator):
    """A k-cell vector env draws all cells' traffic from one seed, so cell i is not any single
    env's seed; each single PettingZoo env is given cell i's traffic instead (the scenario
    generator replaced by one returning it), then both step with the same requests and must agree
    on every observation, reward, cost and share."""
    kwargs = {"scenario": "diurnal", "episode_length": 20, "coordinator": coordinator}
    num_cells = 4
    batched = vector_env(num_cells, **kwargs)
    batched_obs = batched.reset(seed=5)
    assert batched_obs.shape == (num_cells, 3, 14)
    assert not np.array_equal(batched.demand[0], batched.demand[1])  # the cells differ

    singles = []
    for i in range(num_cells):
        cell = Traffic(
            demand=batched.demand[i : i + 1],
            spectral_efficiency=batched.spectral_efficiency[i : i + 1],
        )

        def cell_traffic(scenario, rng, *, num_envs, horizon, cell=cell, **_):
            assert (scenario, num_envs, horizon) == ("diurnal", 1, cell.demand.shape[1])
            return cell

        monkeypatch.setattr(simulator, "generate", cell_traffic)
        env = parallel_env(**kwargs)
        obs, _ = env.reset(seed=100 + i)  # the seed no longer matters: the traffic is cell i's
        np.testing.assert_array_equal(np.stack([obs[a] for a in env.agents]), batched_obs[i])
        singles.append(env)
    monkeypatch.undo()

    rng = np.random.default_rng(0)
    done = False
    while not done:
        requests = rng.uniform(0.0, 1.2, size=(num_cells, 3))  # some above 1: clipped alike
        out = batched.step(requests)
        done = out.done
        for i, env in enumerate(singles):
            agents = env.agents
            obs, rewards, _, truncations, infos = env.step(
                {a: requests[i, k : k + 1] for k, a in enumerate(agents)}
            )
            np.testing.assert_array_equal(np.stack([obs[a] for a in agents]), out.observation[i])
            np.testing.assert_array_equal([rewards[a] for a in agents], out.reward[i])
            np.testing.assert_array_equal([infos[a]["cost"] for a in agents], out.cost[i])
            np.testing.assert_array_equal([infos[a]["share"] for a in agents], out.shares[i])
            np.testing.assert_array_equal(
                [infos[a]["clipped_actions"] for a in agents], out.clipped[i]
            )
            assert all(truncations[a] == done for a in agents)
    assert all(not env.agents for env in singles)


def test_rllib_adapter_passes_rllib_checks():
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    from envs.rllib_env import SlicingMultiAgentEnv

    env = SlicingMultiAgentEnv({"scenario": "burst", "num_slices": 5, "episode_length": 10})
    check_multiagent_environments(env)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        _, _, terminations, truncations, _ = env.step({a: np.array([0.2]) for a in obs})
        done = terminations["__all__"] or truncations["__all__"]
    assert truncations["__all__"]

"""`deepslicing bench TARGET` at a tiny budget: the JSON keys and consistency, never timings."""

from __future__ import annotations

import json
import math

import pytest

from deepslicing.bench import GOALS, BenchConfig
from deepslicing.cli import main

RATE_KEYS = (
    "api_steps_per_s",
    "mpe2_steps_per_s",
    "batched_env_steps_per_s",
    "batched_slice_steps_per_s",
    "ratio_vs_mpe2",
    "batched_vs_api",
)


def test_bench_env_json_line(capsys):
    argv = ["bench", "env", "--json", "--seconds", "0.2", "--rounds", "1", "--num-envs", "64"]
    code = main(argv)
    out, err = capsys.readouterr()
    (line,) = out.strip().splitlines()  # stdout holds the JSON line alone
    result = json.loads(line)
    # at this tiny budget the goals may be missed; the exit code must say which it was
    goals_met = all(result[key] >= floor for key, floor in GOALS["env"].items())
    assert result["goals"] == GOALS["env"] and result["goals_met"] is goals_met
    assert code == (0 if goals_met else 1)

    for key in RATE_KEYS:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert result["num_envs"] == 64
    assert result["seconds"] == 0.2
    assert result["rounds"] == 1
    assert len(result["api_steps_per_s_rounds"]) == 1
    assert result["ratio_vs_mpe2"] == pytest.approx(
        result["api_steps_per_s"] / result["mpe2_steps_per_s"], rel=1e-12
    )
    assert result["batched_slice_steps_per_s"] == pytest.approx(
        3 * result["batched_env_steps_per_s"], rel=1e-12
    )
    assert result["batched_vs_api"] == pytest.approx(
        result["batched_slice_steps_per_s"] / (3 * result["api_steps_per_s"]), rel=1e-12
    )
    assert "mpe2" in err  # progress goes to stderr


def test_bench_env_table_without_json(capsys):
    argv = ["bench", "env", "--seconds", "0.05", "--rounds", "1", "--num-envs", "8"]
    assert main(argv) in (0, 1)
    out = capsys.readouterr().out
    assert "ratio_vs_mpe2" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--rounds", "0"], "rounds"),
        (["--seconds", "-1"], "seconds"),
        (["--num-envs", "0"], "num_envs"),
        (["--seed", "-3"], "seed"),
    ],
)
def test_bench_rejects_invalid_values(capsys, flags, field):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "env", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err


def test_bench_config_validates_directly():
    with pytest.raises(ValueError, match="rounds: must be an integer in 1..1000"):
        BenchConfig(rounds=0)
    with pytest.raises(ValueError, match="seconds: must be a finite number"):
        BenchConfig(seconds=float("nan"))
    with pytest.raises(ValueError, match="target: must be one of"):
        BenchConfig(target="gpu")  # type: ignore[arg-type]


def test_bench_export_json_line(capsys):
    code = main(["bench", "export", "--json", "--seconds", "0.1", "--rounds", "1"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0  # export only reports; it has no goal
    assert result["target"] == "export" and result["goals"] == {} and result["goals_met"] is True
    assert result["sizes"] == [3, 20] and result["batch"] == 1 and result["rounds"] == 1
    for size in (3, 20):
        for fmt in ("torch", "torchscript", "onnx", "int8"):
            name = f"{fmt}_s{size}"
            median, p99 = result[f"{name}_median_us"], result[f"{name}_p99_us"]
            assert math.isfinite(median) and 0 < median <= p99, name
            assert result["calls"][name] > 0
            assert len(result[f"{name}_calls_per_s_rounds"]) == 1
        for fmt in ("torchscript", "onnx", "int8"):
            assert result[f"{fmt}_speedup_s{size}"] == pytest.approx(
                result[f"torch_s{size}_median_us"] / result[f"{fmt}_s{size}_median_us"], rel=1e-12
            )
    assert "20 slices" in err  # progress goes to stderr


def test_bench_serve_json_line(capsys):
    """Ray, Serve, both apps and the load generator at a tiny budget (about 25 s, mostly start-up);
    the JSON keys and their consistency, never timings; Ray is shut down afterwards."""
    import ray

    from deepslicing.bench import CEILINGS, meets_goal

    assert not ray.is_initialized()
    code = main(["bench", "serve", "--json", "--seconds", "0.2", "--rounds", "1"])
    out, err = capsys.readouterr()
    assert not ray.is_initialized()
    (line,) = out.strip().splitlines()  # stdout holds the JSON line alone, Ray's logs go to stderr
    result = json.loads(line)
    goals = GOALS["serve"]
    goals_met = all(meets_goal(key, result[key], goal) for key, goal in goals.items())
    assert result["goals"] == goals and result["goals_met"] is goals_met
    assert result["goal_ceilings"] == ["p95_ms_c1", "replica_rss_ratio_vs_noop"] == sorted(CEILINGS)
    assert code == (0 if goals_met else 1)

    assert result["target"] == "serve" and result["errors"] == 0
    assert result["concurrency"] == [1, 16] and result["rounds"] == 1 and result["seconds"] == 0.2
    for c in (1, 16):
        for name in ("noop", "ours"):
            prefix = f"{name}_c{c}"
            p50, p95, p99 = (result[f"{prefix}_{q}_ms"] for q in ("p50", "p95", "p99"))
            assert math.isfinite(p99) and 0 < p50 <= p95 <= p99, prefix
            assert result[f"{prefix}_rps"] > 0 and result[f"{prefix}_requests"] > 0
            [only] = result[f"{prefix}_rounds"]
            assert only["rps"] == result[f"{prefix}_rps"] and only["p95_ms"] == p95
        assert result[f"rps_ratio_vs_noop_c{c}"] == pytest.approx(
            result[f"ours_c{c}_rps"] / result[f"noop_c{c}_rps"], rel=1e-12
        )
    assert result["p95_ms_c1"] == result["ours_c1_p95_ms"]
    assert result["batch_allocations_per_s"] == pytest.approx(
        result["batch_requests_per_s"] * result["batch_cells"] * 3, rel=1e-12
    )
    assert result["guardrail_speedup_vs_cvxpy"] == pytest.approx(
        result["cvxpy_us"] / result["guardrail_us"], rel=1e-12
    )
    assert 0 <= result["guardrail_max_abs_diff_vs_cvxpy"] <= 1e-4
    assert result["cvxpy_solver"]
    for figure in ("rss", "uss"):
        ours, noop = result[f"ours_replica_{figure}_mb"], result[f"noop_replica_{figure}_mb"]
        assert noop > 0 and ours > 0
        assert result[f"replica_{figure}_ratio_vs_noop"] == pytest.approx(ours / noop, rel=1e-12)
    for unit, cells in (("noop_c16", 1), ("ours_c1", 1), ("ours_c16", 1), ("batch", 500)):
        assert result[f"decisions_{unit}"] > 0 and result[f"decisions_{unit}"] % cells == 0
        assert result[f"cpu_ms_per_decision_{unit}"] >= 0, unit  # clock ticks: 0 is possible
        assert result[f"ingress_cpu_ms_per_decision_{unit}"] >= 0, unit  # HAProxy or the proxy
    # the replica answers from a models:/ URI without MLflow, its data stack or cvxpy in it, and
    # its guardrail (the exact method on numpy) without numba
    assert "onnxruntime" in result["ours_replica_modules"]
    forbidden = {"mlflow", "sqlalchemy", "cvxpy", "torch", "numba", "scipy"}
    assert not forbidden & set(result["ours_replica_modules"])
    assert "rps_ratio_vs_noop" in err and "replica_rss_ratio_vs_noop" in err  # progress: stderr


def test_bench_train_bare_loop_updates_on_the_current_observation_layout():
    """The bare-loop contender of `bench train` (5 minutes in full) builds and updates on replayed
    rows of today's observation, no Ray needed."""
    from deepslicing import metrics
    from deepslicing.bench.train import bare_learner
    from deepslicing.model import NUM_FEATURES
    from policies.maddpg import MADDPGConfig

    learner, replay = bare_learner(MADDPGConfig(), seed=0)
    batches = replay.sample(2, 32)
    assert batches["obs"].shape == (2, 32, 3, NUM_FEATURES)
    result = learner.update_from_replay(batches)
    losses = result["default_policy"]
    for name in (metrics.CRITIC_LOSS, metrics.ACTOR_LOSS):
        assert math.isfinite(losses[name].peek()), name  # RLlib's reduced stats

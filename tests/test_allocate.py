"""The serving core without HTTP: kind inference, needs, the guardrail (feasible always, QoS floor,
409 reason), routing slices to actors, batch grouping; API keys and token buckets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepslicing import forecast, model
from deepslicing.allocate import (
    MAX_NEED,
    TARGETS,
    Guardrail,
    InfeasibleError,
    SliceInput,
    allocate,
    coordinate,
    guard,
    infer_kind,
    request_shares,
    slice_arrays,
)
from deepslicing.coordinator import coordinate as coordinate_shares
from deepslicing.slices import KIND_DEFAULTS, default_slices
from serve_apps.security import ApiKeyError, KeyRing, TokenBuckets, key_id, read_keys

KINDS = ("embb", "urllc", "mmtc")
CELL = model.Cell()


def constant_actor(value: float):
    return lambda obs: np.full(obs.shape[:2], value, dtype=np.float32)


def answer(cells, actor=None, guardrail=None, kinds=KINDS, times=None):
    guardrail = guardrail or Guardrail()
    times = [0.5] * len(cells) if times is None else times
    return allocate(cells, times, actor or constant_actor(0.4), kinds, CELL, guardrail)


def observations_seen(cells, times=None) -> list[np.ndarray]:
    """The observations the model's actor was given while answering ``cells`` one call at a time
    (each call answers every slice with 0.2)."""
    seen = []

    def recording(obs):
        seen.append(obs.copy())
        return np.full(obs.shape[:2], 0.2, dtype=np.float32)

    for cell in cells:
        answer([cell], recording, times=times)
    return seen


F = {name: i for i, name in enumerate(model.FEATURES)}


@pytest.mark.parametrize(
    ("name", "targets", "kind", "expected"),
    [
        ("URLLC_Control", {"bandwidth_mbps": 5}, None, "urllc"),
        ("CCTV_eMBB", {"latency_ms_p95": 5}, None, "embb"),
        ("AGV", {"latency_ms_p95": 10, "bandwidth_mbps": 5}, None, "urllc"),
        ("Video", {"bandwidth_mbps": 200}, None, "embb"),
        ("Voice", {"jitter_ms": 20, "loss_pct": 1}, None, "urllc"),
        ("Scanners", {"availability": 99.99}, None, "mmtc"),
        ("anything", {}, None, "embb"),
        ("Video", {"bandwidth_mbps": 200}, "mmtc", "mmtc"),
    ],
)
def test_kind_inference(name, targets, kind, expected):
    assert infer_kind(name, targets, kind) == expected


def test_needed_share_matches_the_model_for_default_slices():
    """A default 3-slice cell with no readings asks exactly what the simulator's model says."""
    cells = [[SliceInput(k, {}) for k in KINDS]]
    result, row = answer(cells)[0]
    specs = model.SliceArrays.from_specs(default_slices(3))
    need = model.needed_share(specs, CELL, specs.mean_demand, specs.mean_spectral_efficiency)
    np.testing.assert_allclose(result.needed_share[row], need, rtol=1e-12)


def test_guardrail_floor_reserves_each_need_when_the_needs_fit():
    cells = [
        [
            SliceInput("eMBB", {"bandwidth_mbps": 20}, 0, demand=20.0),
            SliceInput("URLLC", {"latency_ms_p95": 10}, 1),
            SliceInput("mMTC", {"availability": 99}, 2),
        ]
    ]
    starving = constant_actor(0.0)  # a policy that asks for nothing
    plain, row = answer(cells, starving)[0]
    assert not plain.sla_ok[row].any()
    floored, row = answer(cells, starving, Guardrail(qos_floor=1.0))[0]
    assert floored.sla_ok[row].all() and floored.share[row].sum() <= 1 + 1e-12
    half, row = answer(cells, starving, Guardrail(qos_floor=0.5))[0]
    np.testing.assert_allclose(half.share[row], 0.5 * half.needed_share[row], rtol=1e-9)


def test_unmeetable_slas_raise_naming_the_slices_only_when_asked():
    cells = [[SliceInput("big", {"bandwidth_mbps": 500}, 0, demand=500.0)]]
    with pytest.raises(InfeasibleError, match=r"big 6\.\d+\), more than 1"):
        answer(cells, guardrail=Guardrail(reject_infeasible=True))
    result, row = answer(cells)[0]
    assert result.total_need[row] > 1 and result.share[row].sum() <= 1 + 1e-12


def test_slices_go_to_the_actor_of_their_kind_and_unknown_kinds_ask_their_need():
    def by_actor(obs):  # actor i answers 0.1 * (i + 1)
        return np.tile(np.float32([0.1, 0.2, 0.3]), (obs.shape[0], 1))

    kind = np.array([["mmtc", "embb", "urllc", "embb"]])
    features = np.zeros((1, 4, model.NUM_FEATURES), dtype=np.float32)
    need = np.array([[0.05, 0.1, 0.2, 0.3]])
    requested, from_policy = request_shares(by_actor, ("embb", "urllc"), kind, features, need)
    np.testing.assert_allclose(requested, [[0.05, 0.1, 0.2, 0.1]], rtol=1e-6)
    assert from_policy.tolist() == [[False, True, True, True]]


def test_an_actor_sees_only_its_own_slice_features():
    cells = [
        [SliceInput("URLLC", {"latency_ms_p95": 10}), SliceInput("eMBB", {"bandwidth_mbps": 50})]
    ]
    (obs,) = observations_seen(cells, times=[0.75])
    assert obs.shape == (2, 3, model.NUM_FEATURES)
    # slice 0 (urllc) sits at actor 1, slice 1 (embb) at actor 0; everything else is zero
    assert np.count_nonzero(obs[0, [0, 2]]) == 0 and np.count_nonzero(obs[1, [1, 2]]) == 0
    assert obs[0, 1, 5] == pytest.approx(0.75) and obs[1, 0, 5] == pytest.approx(0.75)


def test_previous_demand_gives_the_actor_a_short_history():
    flat = SliceInput("eMBB", {"bandwidth_mbps": 50}, demand=40.0)
    rising = SliceInput("eMBB", {"bandwidth_mbps": 50}, demand=40.0, previous_demand=20.0)
    seen = observations_seen([[flat], [rising]], times=[0.75])
    without, with_history = seen[0][0, 0], seen[1][0, 0]
    need = without[F["needed_share"]]
    # no history: the single-reading defaults (forecast = previous need = need)
    assert without[F["need_forecast"]] == pytest.approx(need)
    assert without[F["previous_need"]] == pytest.approx(need)
    assert without[F["forecast_error"]] == pytest.approx(forecast.INITIAL_RELATIVE_ERROR * need)
    # 20 Mbps before, 40 now: half the need before, and the forecaster after both intervals
    assert with_history[F["previous_need"]] == pytest.approx(need / 2)
    expected = forecast.update(forecast.start(np.array(need / 2)), np.array(need))
    assert with_history[F["need_forecast"]] == pytest.approx(float(expected.next_need))
    assert with_history[F["forecast_error"]] == pytest.approx(float(expected.error))
    # time of day 0.75 as sin/cos in [0, 1]; no price known to the service
    assert with_history[F["time_sin"]] == pytest.approx(0.0, abs=1e-6)
    assert with_history[F["time_cos"]] == pytest.approx(0.5, abs=1e-6)
    assert with_history[F["capacity_price"]] == 0.0
    # slow levels: the readings themselves alone, smoothed from the previous demand with it
    mean = without[F["demand_ratio"]]
    assert without[F["demand_level"]] == pytest.approx(mean)
    assert without[F["channel_level"]] == pytest.approx(without[F["spectral_efficiency"]])
    alpha = forecast.LEVEL_ALPHAS[0]
    assert with_history[F["demand_level"]] == pytest.approx((1 - alpha) * mean / 2 + alpha * mean)


def test_level_readings_reach_the_actor():
    given = SliceInput(
        "eMBB",
        {"bandwidth_mbps": 50},
        demand=40.0,
        mean_demand=50.0,
        spectral_efficiency=4.0,
        demand_level=25.0,
        spectral_efficiency_level=3.7,
    )
    features = observations_seen([[given]])[0][0, 0]
    assert features[F["demand_level"]] == pytest.approx(0.5)
    assert features[F["channel_level"]] == pytest.approx(3.7 / 7.4)


def test_batch_of_mixed_sizes_keeps_order_and_equals_single_answers():
    small = [
        SliceInput("URLLC", {"latency_ms_p95": 10}),
        SliceInput("eMBB", {"bandwidth_mbps": 50}),
    ]
    large = [SliceInput(f"s{i}", {"bandwidth_mbps": 10 + i}, i) for i in range(5)]
    cells = [small, large, small, large]
    batch = answer(cells, constant_actor(0.3))
    for (result, row), cell in zip(batch, cells, strict=True):
        single, srow = answer([cell], constant_actor(0.3))[0]
        np.testing.assert_allclose(result.share[row], single.share[srow], rtol=0, atol=1e-15)
        assert result.share.shape[1] == len(cell)


def test_extreme_targets_give_finite_answers():
    cells = [
        [
            SliceInput(
                "x", {"jitter_ms": 5e-324, "latency_ms_p95": 1.0000000000000002}, mean_demand=5e-324
            )
        ]
    ]
    result, row = answer(cells)[0]
    assert result.needed_share[row, 0] == MAX_NEED
    for field in ("share", "requested_share", "throughput_mbps", "sla_risk", "primal_residual"):
        assert np.isfinite(getattr(result, field)).all(), field


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.floats(-1, 3, allow_nan=False), min_size=1, max_size=20),
    floor=st.floats(0, 1),
    iterations=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_guardrail_is_always_feasible_and_converges_to_the_capped_oracle(
    requests, floor, iterations, seed
):
    """Feasible after any number of iterations; at floor 0 it follows requests that fit, and
    otherwise converges to the best true utility any allocation within the requests can reach."""
    rng = np.random.default_rng(seed)
    a = np.array([requests])
    need = rng.random(a.shape) * 0.5
    w = rng.dirichlet(np.ones(a.shape[1]))
    shares, _, _ = coordinate(a, need, Guardrail(iterations=iterations, qos_floor=floor), w)
    assert shares.min() >= 0 and shares.sum() <= 1 + 1e-9
    if floor == 0:
        requested = np.maximum(a, 0.0)
        exact, _, _ = coordinate(a, need, Guardrail(iterations=3000), w)
        if requested.sum() <= 1:
            np.testing.assert_array_equal(exact, requested)
        within = np.minimum(requested, need)
        best = coordinate_shares(within, w * within / need).shares
        # within 0.1 %: a tiny request of a heavy slice (density 1e4 x the others) converges slowly
        assert true_utility(exact, need, w) >= true_utility(best, need, w) * (1 - 1e-3) - 1e-9
        assert (exact <= requested + 1e-12).all()


def true_utility(shares: np.ndarray, need: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_i w_i min(1, x_i / need_i): the cell's utility without the waste term."""
    return (w * model.satisfaction(shares, need)).sum(axis=-1)


def overloaded_cell(rng: np.random.Generator):
    """5-10 slices of mixed kinds with their default SLA targets and seeded readings (demand,
    spectral efficiency); demands scaled together so the slices need 1.5x-2x the cell. Returns
    the slices' arrays and their needed shares, computed as :func:`allocate` does."""
    n = int(rng.integers(5, 11))
    kind = rng.choice(KINDS, n)
    kind[:3] = KINDS
    targets = np.array(
        [
            [np.nan if (v := getattr(KIND_DEFAULTS[k].targets, t)) is None else v for t in TARGETS]
            for k in kind
        ]
    )[None]
    mean = np.array([KIND_DEFAULTS[k].mean_demand for k in kind]) * 3.0 / n
    slices = slice_arrays(kind[None], targets, mean[None])
    efficiency = slices.mean_spectral_efficiency * rng.uniform(0.6, 1.4, n)
    base = mean * rng.lognormal(0.0, 0.5, n)
    goal, low, high = rng.uniform(1.5, 2.0), 0.0, 100.0
    for _ in range(60):  # the total need grows with the demand: bisect the common scale
        mid = (low + high) / 2
        total = model.needed_share(slices, CELL, base * mid, efficiency).sum()
        low, high = (mid, high) if total < goal else (low, mid)
    need = model.needed_share(slices, CELL, base * high, efficiency)
    assert 1.5 - 1e-6 <= need.sum() <= 2.0 + 1e-6
    return slices, need


@pytest.mark.parametrize(
    ("requests", "mean_ratio"),
    [("need", 0.999), ("noisy need", 0.9), ("constant 0.4", 0.99)],
)
def test_overloaded_cells_keep_the_oracles_utility_without_starving_small_slices(
    requests, mean_ratio
):
    """Seeded cells of 5-10 mixed slices at 1.5x-2x overload: the guardrail's answer keeps >= 90 %
    of the oracle's utility (the LP on the true needs) in every cell when the policy asks for its
    need, on average when requests are the need x lognormal(0, 0.3) noise or a constant 0.4; and
    no slice whose need fits the cell is cut to zero while a slice needing more keeps more than
    its need."""
    rng = np.random.default_rng(42)
    ratios = []
    for _ in range(200):
        slices, need = overloaded_cell(rng)
        asked = {
            "need": need,
            "noisy need": need * rng.lognormal(0.0, 0.3, need.shape),
            "constant 0.4": np.full(need.shape, 0.4),
        }[requests]
        w = slices.utility_weight
        names = [str(k) for k in slices.kind[0]]
        share, _, _ = guard(asked, need, Guardrail(), lambda _, n=names: n, 1, w)
        assert share.min() >= 0 and share.sum() <= 1 + 1e-9
        oracle = coordinate_shares(need, w).shares  # the LP on true needs (never over-provisions)
        ratios.append(
            model.utility(slices, CELL, share, need) / model.utility(slices, CELL, oracle, need)
        )
        cut = (share < 1e-6) & (need <= 1) & (asked > 0)
        kept = (share > need * (1 + 1e-6)) & (need > need.min())
        for i in np.flatnonzero(cut[0]):
            assert not (kept[0] & (need[0] > need[0, i])).any(), (need, share)
    ratios = np.concatenate(ratios)
    assert ratios.mean() >= mean_ratio, ratios.mean()
    if requests == "need":
        assert ratios.min() >= 0.9


def test_guardrail_settings_are_checked():
    with pytest.raises(ValueError, match="qos_floor"):
        Guardrail(qos_floor=1.5)
    with pytest.raises(ValueError, match="admm_rho"):
        Guardrail(rho=0)
    with pytest.raises(ValueError, match="objective"):
        Guardrail(objective="fair")


def test_key_ring_matches_configured_keys_only(tmp_path, monkeypatch):
    keys = ["k" * 16, "another-key-0123456789"]
    ring = KeyRing(keys)
    assert ring.identify(keys[1]) == key_id(keys[1])
    for presented in (None, "", "k" * 15, "k" * 17, keys[1].upper()):
        assert ring.identify(presented) is None
    secret = tmp_path / "keys"
    secret.write_text("# comment\n\n  " + keys[0] + "  \n")
    assert read_keys(str(secret)) == [keys[0]]
    monkeypatch.setenv("DEEPSLICING_API_KEYS", f"{keys[0]}, {keys[1]}")
    assert read_keys(None) == keys
    monkeypatch.setenv("DEEPSLICING_API_KEYS", "")
    with pytest.raises(ApiKeyError, match="no API keys found"):
        read_keys(None)
    with pytest.raises(ApiKeyError, match="no such file"):
        read_keys(str(tmp_path / "missing"))
    secret.write_text("tiny-key\n")
    with pytest.raises(ApiKeyError, match="at least 16 characters") as info:
        read_keys(str(secret))
    assert "tiny-key" not in str(info.value)  # the key itself is never in a message


def test_token_bucket_allows_the_burst_then_the_rate_and_says_how_long_to_wait():
    now = [100.0]
    buckets = TokenBuckets(rate_per_s=2.0, burst=3.0, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("a")
    assert wait == pytest.approx(0.5) and TokenBuckets.retry_after(wait) == "1"
    assert buckets.take("b") == 0.0  # keys do not share a bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    now[0] += 100.0
    assert [buckets.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refills to the burst only


def test_exact_guardrail_is_the_limit_of_the_admm_one():
    """The default guardrail (the exact answer, no numba) gives what the compiled ADMM guardrail
    converges to, with and without a QoS floor, on both objectives; its residuals are 0."""
    rng = np.random.default_rng(11)
    for _ in range(50):
        slices, need = overloaded_cell(rng)
        asked = need * rng.lognormal(0.0, 0.3, need.shape)
        w = slices.utility_weight
        for floor, objective in ((0.0, "utility"), (0.5, "utility"), (0.0, "euclidean")):
            exact = coordinate(asked, need, Guardrail(qos_floor=floor, objective=objective), w)
            iterated = Guardrail(
                rho=0.5 if objective == "euclidean" else 2.0,
                iterations=3000,
                qos_floor=floor,
                objective=objective,
                method="admm",
            )
            admm = coordinate(asked, need, iterated, w)
            np.testing.assert_allclose(exact[0], admm[0], atol=1e-4)
            assert (exact[1] == 0).all() and (exact[2] == 0).all()
            assert exact[0].min() >= 0 and exact[0].sum() <= 1 + 1e-9
            assert true_utility(exact[0], need, w) >= true_utility(admm[0], need, w) - 1e-9
    with pytest.raises(ValueError, match="method"):
        Guardrail(method="simplex")


def test_the_serve_replica_answers_without_numba():
    """Importing the Serve app and answering an overloaded cell through its allocation core loads
    no numba (about 125 MiB per replica): the default guardrail runs on numpy."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import numpy as np\n"
        "import serve_apps.allocator\n"
        "from deepslicing import model\n"
        "from deepslicing.allocate import Guardrail, SliceInput, allocate, slice_answers\n"
        "cells = [[SliceInput(k, {}, kind=k, demand=1000.0 * d) for k, d in"
        " (('embb', 20), ('urllc', 5), ('mmtc', 9))]]\n"
        "actor = lambda obs: np.full(obs.shape[:2], 0.6, dtype=np.float32)\n"
        "result, row = allocate(cells, [0.5], actor, ('embb', 'urllc', 'mmtc'), model.Cell(),"
        " Guardrail())[0]\n"
        "assert result.total_need[row] > 1, result.total_need\n"
        "assert result.share[row].sum() <= 1 + 1e-9\n"
        "slice_answers(result, row, cells[0])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout

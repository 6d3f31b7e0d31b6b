"""The capacity coordinator against cvxpy, and feasibility in every case."""

import cvxpy as cp
import numpy as np
import pytest

from deepslicing.coordinator import (
    admm_allocate,
    capacity_violations,
    check_admm,
    project_capacity,
)

SIZES = (1, 2, 3, 5, 8, 20)
CASES = 10_000


def cvxpy_projection(v: np.ndarray) -> np.ndarray:
    """min ||z - v||^2 over {z >= 0, sum z <= 1}, every row in one problem."""
    z = cp.Variable(v.shape)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - v)), [z >= 0, cp.sum(z, axis=1) <= 1])
    # OSQP with polishing lands on the exact active set; Clarabel stops around 1e-5 here.
    problem.solve(solver=cp.OSQP, eps_abs=1e-12, eps_rel=1e-12, polish=True, max_iter=200_000)
    assert problem.status == cp.OPTIMAL
    return z.value


@pytest.fixture(scope="module")
def random_cases():
    """10,000 request vectors over several slice counts, mixing feasible, over-full and negative ones."""
    rng = np.random.default_rng(2024)
    per_size = CASES // len(SIZES) + 1
    cases = []
    for n in SIZES:
        scale = rng.choice([0.2, 1.0, 3.0], size=(per_size, 1))
        cases.append((n, rng.normal(0.5 / n, 1.0, size=(per_size, n)) * scale))
    assert sum(len(v) for _, v in cases) >= CASES
    return [(n, v, cvxpy_projection(v)) for n, v in cases]


def test_projection_matches_cvxpy(random_cases):
    for _, v, expected in random_cases:
        np.testing.assert_allclose(project_capacity(v), expected, atol=1e-6, rtol=0)


def test_admm_default_matches_cvxpy(random_cases):
    for _, v, expected in random_cases:
        result = admm_allocate(v)
        np.testing.assert_allclose(result.shares, expected, atol=1e-6, rtol=0)


def test_admm_residuals_vanish_as_it_converges(random_cases):
    # z settles first; the proposals x catch up as the dual variable grows to the request's excess.
    for _, v, _ in random_cases:
        short, long = admm_allocate(v, iterations=5), admm_allocate(v, iterations=200)
        assert long.primal_residual.max() < 1e-9 and long.dual_residual.max() < 1e-9
        assert long.primal_residual.max() <= short.primal_residual.max()


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_admm_is_feasible_after_any_number_of_iterations(random_cases, iterations):
    for _, v, _ in random_cases:
        shares = admm_allocate(v, rho=2.0, iterations=iterations).shares
        assert not capacity_violations(shares).any()


def test_projection_is_feasible_and_keeps_feasible_points():
    rng = np.random.default_rng(0)
    v = rng.normal(0.2, 2.0, size=(5000, 7))
    z = project_capacity(v)
    assert not capacity_violations(z).any()
    inside = rng.dirichlet(np.ones(7), size=100) * 0.9
    np.testing.assert_array_equal(project_capacity(inside), inside)


def test_batch_shapes_are_kept():
    v = np.random.default_rng(1).random((4, 6, 3))
    assert project_capacity(v).shape == (4, 6, 3)
    assert admm_allocate(v).shares.shape == (4, 6, 3)


@pytest.mark.parametrize(
    ("rho", "iterations", "field"),
    [(0.0, 5, "admm_rho"), (float("nan"), 5, "admm_rho"), (1.0, 0, "admm_iterations")],
)
def test_bad_admm_settings_name_the_field(rho, iterations, field):
    with pytest.raises(ValueError, match=field):
        check_admm(rho, iterations)

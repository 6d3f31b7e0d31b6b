"""Capacity coordinator: turns per-slice share requests into a feasible allocation.

Shares are fractions of the cell's PRB budget, arrays over ``(..., num_slices)``; every function
works on any leading batch shape. The feasible set is C = {z : z >= 0, sum(z) <= 1}.

``project_capacity`` is the exact Euclidean projection onto C: clip at 0; if the clipped vector fits,
it is the answer, else project onto the simplex {z >= 0, sum z = 1} with the sort-based threshold
rule (Held, Wolfe and Crowder 1974; Duchi et al. 2008), z = max(v - tau, 0), with
tau = max_j (sum of the j largest entries of v - 1) / j (Condat 2016, eq. 3).

``admm_allocate`` runs ADMM in sharing form (Boyd et al. 2011, section 7.3) on
    minimise  sum_i 1/2 (x_i - a_i)^2   subject to  x in C,
where a_i is slice i's request. Starting from z = u = 0, each iteration: local proposal x_i = (a_i + rho (z_i - u_i)) / (1 + rho),
coordinator z = project_capacity(x + u), dual update u += x - z. The answer is z, so it is feasible
after any number of iterations; it converges linearly to project_capacity(a) (from a cold start,
max error about 2e-5 after 10 iterations and 1e-14 after 30 at rho = 0.5). Defaults: rho = 0.5,
20 iterations (the same in training, evaluation and serving). The iterations run compiled (numba,
cached on disk after the first call in a fresh install): a 3-slice cell takes microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

DEFAULT_RHO = 0.5
DEFAULT_ITERATIONS = 20
CAPACITY_TOLERANCE = 1e-9  # sum of shares above 1 + this counts as a capacity violation


def project_capacity(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``v`` onto {z >= 0, sum z <= 1}."""
    v = np.asarray(v, dtype=np.float64)
    clipped = np.maximum(v, 0.0)
    over = np.add.reduce(clipped, axis=-1, keepdims=True) > 1.0
    if not over.any():
        return clipped
    # simplex threshold: tau = max_j (sum of the j largest entries - 1) / j
    descending = np.sort(v, axis=-1)[..., ::-1]
    ranks = np.arange(1.0, v.shape[-1] + 1.0)
    tau = np.maximum.reduce((descending.cumsum(axis=-1) - 1.0) / ranks, axis=-1, keepdims=True)
    return np.where(over, np.maximum(v - tau, 0.0), clipped)


@dataclass(frozen=True)
class AdmmResult:
    """Feasible shares ``z`` and the last iteration's residuals (per batch row)."""

    shares: np.ndarray
    primal_residual: np.ndarray  # ||x - z||_2
    dual_residual: np.ndarray  # rho ||z - z_prev||_2


def admm_allocate(
    requests: np.ndarray, *, rho: float = DEFAULT_RHO, iterations: int = DEFAULT_ITERATIONS
) -> AdmmResult:
    """Coordinate requested shares into a feasible allocation by ADMM (see module docstring)."""
    check_admm(rho, iterations)
    a = np.asarray(requests, dtype=np.float64)
    rows = np.ascontiguousarray(a.reshape(-1, a.shape[-1]))
    shares = np.empty_like(rows)
    primal = np.empty(rows.shape[0])
    dual = np.empty(rows.shape[0])
    _admm_rows(rows, float(rho), iterations, shares, primal, dual)
    return AdmmResult(
        shares=shares.reshape(a.shape),
        primal_residual=primal.reshape(a.shape[:-1]),
        dual_residual=dual.reshape(a.shape[:-1]),
    )


@numba.njit(cache=True)
def _admm_rows(a, rho, iterations, shares, primal, dual):  # pragma: no cover - compiled
    """ADMM row by row, compiled: at the few slices of a cell, numpy's per-call overhead would
    cost 10 to 100 times the arithmetic. Same iteration as the module docstring."""
    num_rows, n = a.shape
    ranks = np.arange(1.0, n + 1.0)
    for r in range(num_rows):
        z = np.zeros(n)
        u = np.zeros(n)
        x = np.zeros(n)
        z_prev = np.zeros(n)
        for _ in range(iterations):
            x = (a[r] + rho * (z - u)) / (1.0 + rho)
            z_prev = z
            z = _project_row(x + u, ranks)
            u = u + x - z
        shares[r] = z
        primal[r] = np.sqrt(np.sum((x - z) ** 2))
        dual[r] = rho * np.sqrt(np.sum((z - z_prev) ** 2))


@numba.njit(cache=True)
def _project_row(v, ranks):  # pragma: no cover - compiled
    """:func:`project_capacity` of one row."""
    clipped = np.maximum(v, 0.0)
    if clipped.sum() <= 1.0:
        return clipped
    descending = np.sort(v)[::-1]
    tau = np.max((np.cumsum(descending) - 1.0) / ranks)
    return np.maximum(v - tau, 0.0)


def check_admm(rho: float, iterations: int) -> None:
    if not (isinstance(rho, int | float) and np.isfinite(rho) and rho > 0):
        raise ValueError(f"admm_rho: must be a finite number > 0, got {rho!r}")
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, int)
        or not 1 <= iterations <= 10000
    ):
        raise ValueError(f"admm_iterations: must be an integer in 1..10000, got {iterations!r}")


def capacity_violations(shares: np.ndarray) -> np.ndarray:
    """Boolean per batch row: do the shares break the capacity constraint?"""
    shares = np.asarray(shares)
    return (shares.sum(axis=-1) > 1.0 + CAPACITY_TOLERANCE) | np.any(shares < 0.0, axis=-1)

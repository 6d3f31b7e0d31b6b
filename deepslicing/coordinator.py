"""Capacity coordinator: turns per-slice share requests into a feasible allocation.

Spaces and units. Shares are fractions of the cell's PRB budget, arrays over ``(..., S)`` for S
slices; every function works on any leading batch shape (cells, envs). The feasible set is
C = {z : z >= 0, sum(z) <= 1}. Utility weights w_i (>= 0; the slices' ``utility_weight``, which
sum to 1) are per slice, shape ``(S,)`` or like the requests. The capacity *price* is the Lagrange
multiplier of sum z <= 1: for the utility objective in utility per unit share of the cell (what one
more share of capacity would add to the cell's utility), for the Euclidean one a share (the common
cut). It is 0 when the requests fit.

:func:`coordinate` is the one entry point (``method`` "projection" = exact closed form, or "admm";
``objective`` "utility", the default, or "euclidean"; ``engine`` "numba", the default, or
"numpy", see the end); it returns :class:`Coordination` (shares, price, primal and dual
residual). ``project_capacity`` and ``admm_allocate`` are the Euclidean pieces under their old
names.

**Utility objective** (the default). The requests a_i >= 0 are taken as each slice's claimed need,
and the allocation is the optimum of the linear program

    maximise  sum_i w_i min(1, x_i / a_i)   subject to  0 <= x_i <= a_i,  sum_i x_i <= 1,

the cell's utility (:func:`deepslicing.model.rewards`: weighted satisfaction; over-provisioning
never pays, so x_i <= a_i costs nothing) as the slices claim it. It is a fractional knapsack
(Dantzig 1957): if sum a <= 1 the answer is x = a; else slices are filled in decreasing value
density v_i = w_i / a_i (utility per unit share) until the capacity runs out. Slices of equal
density (in decreasing order, each within a relative ``TIE_TOLERANCE`` of the one before) share
what is left so that each gets the same satisfaction (x_i proportional to a_i): the LP is
indifferent between them, this choice makes the answer unique and independent of slice order.
A slice requesting 0 gets 0. The price is the density of the first slice not fully served (the
marginal one): the KKT conditions give lambda = v_marginal, with x_i = a_i for v_i > lambda and
x_i = 0 for v_i < lambda. Unlike the projection, which cuts every request by the same amount (so
small slices such as URLLC or mMTC reach zero first), a small slice with a high density is served
first: a slice with a higher value density is never less satisfied than one with a lower density.

**ADMM on the utility objective** (sharing form, Boyd et al. 2011, section 7.3), with
f_i(x) = -v_i min(x, a_i) on [0, a_i] and the weights normalised to sum 1 per cell (so rho is in
units of utility per unit share at weights summing to 1, whatever the caller's weight scale).
Cells whose requests fit return them (the LP's answer, residuals 0). Otherwise, from z = u = 0,
each iteration: local step x_i = prox of f_i / rho = clip(z_i - u_i + v_i / rho, 0, a_i);
coordinator z = Euclidean projection of x + u onto C; u += x - z. The answer is z capped at the
requests (z may exceed a_i by the last iteration's error; capping only removes share nobody asked
for, so it stays feasible and loses no utility). Price: at a fixed point rho u_i equals the
capacity multiplier for every slice with z_i > 0 (the z-step's optimality: rho u is in the normal
cone of C at z), so the estimate is rho x (the normalising weight sum) x the mean u over the
partly served slices (0 < z_i < a_i), or over every served slice when none is partial, 0 when
none is served. Defaults ``UTILITY_RHO`` = 2, ``UTILITY_ITERATIONS`` = 100, measured on 2000
seeded overloaded cells per set (1.5-2x overload, mixed eMBB/URLLC/mMTC-sized requests, random
or equal weights; utility relative to the exact answer, mean / worst cell):

| rho, iterations | 5-10 slices       | 3 slices          | price rel. error (median, 5-10) |
|-----------------|-------------------|-------------------|---------------------------------|
| 1, 50           | 0.9953 / 0.68     | 0.9991 / 0.72     | 4e-3                            |
| 5, 50           | 0.9971 / 0.90     | 0.9982 / 0.86     | 2e-2                            |
| 2, 100          | 0.9998 / 0.94     | 0.9999 / 0.93     | 1e-4                            |
| 2, 200          | 0.99999 / 0.994   | 0.99999 / 0.998   | 2e-8                            |

rho 2 x 100 is the smallest setting with >= 99.97 % on average and >= 93 % in the worst cell;
an iteration costs about 60 ns on a 3-slice cell, so it adds ~6 us per cell (over-relaxation,
a rho scaled by the cell's densities, or a warm start from the projection did not help).

**Euclidean objective.** ``project_capacity`` is the exact Euclidean projection onto C: clip at 0;
if the clipped vector fits, it is the answer, else project onto the simplex {z >= 0, sum z = 1}
with the sort-based threshold rule (Held, Wolfe and Crowder 1974; Duchi et al. 2008),
z = max(v - tau, 0), with tau = max_j (sum of the j largest entries of v - 1) / j (Condat 2016,
eq. 3); tau is the price. ``admm_allocate`` runs ADMM in sharing form on
    minimise  sum_i 1/2 (x_i - a_i)^2   subject to  x in C,
where a_i is slice i's request. Starting from z = u = 0, each iteration: local proposal
x_i = (a_i + rho (z_i - u_i)) / (1 + rho), coordinator z = project_capacity(x + u), dual update
u += x - z. The answer is z, so it is feasible after any number of iterations; it converges
linearly to project_capacity(a) (from a cold start, max error about 2e-5 after 10 iterations and
1e-14 after 30 at rho = 0.5). Defaults ``DEFAULT_RHO`` = 0.5, ``DEFAULT_ITERATIONS`` = 20. Its
price estimate is rho x the mean u over the slices given a share.

**Engines.** With ``engine="numba"`` (the default) every method runs as compiled row loops
(numba, cached on disk after the first call in a fresh install), kept in the private module
``deepslicing._coordinator_kernels`` and imported on the first call, so importing this module does
not import numba (about 125 MiB in a process once a compiled function is loaded; the Serve
replica's guardrail, :mod:`deepslicing.allocate`, uses the numpy engine). ``engine="numpy"`` runs
the exact method only, on both objectives, with the same rules: up to ``ROW_LOOP_MAX`` = 8 rows in
a loop over Python floats (numpy's per-call overhead would dominate), more rows vectorised
(``argsort`` by density, ``cumsum`` for what the groups before each tie group take, the marginal
group pro rata; for the projection, sort, ``cumsum`` and the max of Condat's ratios). It agrees
with the compiled loops to 5e-16 in shares and exactly in prices on seeded random rows of 1-20
slices with ties, zeros and negative requests (tests/test_coordinator.py). Time per call through
:func:`coordinate`, 3-slice cells, equal weights (best of 7, on the 2-CPU machine of
``docs/benchmarks.md`` under a load average of about 20, so an upper bound):

| rows (cells) | utility: numba / numpy | euclidean: numba / numpy |
|--------------|------------------------|--------------------------|
| 1            | 2.9 / 3.9 us           | 2.5 / 3.0 us             |
| 8            | 5.0 / 18 us            | 2.7 / 15 us              |
| 16           | 6.8 / 42 us            | 3.2 / 13 us              |
| 500          | 114 / 113 us           | 30 / 55 us               |

Training, evaluation and the simulator keep the default, compiled engine.

Sources: S. Boyd et al., "Distributed Optimization and Statistical Learning via the Alternating
Direction Method of Multipliers", Found. Trends Mach. Learn. 3(1), 2011 (sections 4.4, 7.3);
G. B. Dantzig, "Discrete-variable extremum problems", Oper. Res. 5(2), 1957 (fractional
knapsack); L. Condat, "Fast projection onto the simplex and the l1 ball", Math. Program. 158,
2016; J. Duchi et al., "Efficient projections onto the l1-ball", ICML 2008.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

DEFAULT_RHO = 0.5
DEFAULT_ITERATIONS = 20
UTILITY_RHO = 2.0  # utility objective's ADMM defaults: measured, see the module docstring
UTILITY_ITERATIONS = 100
CAPACITY_TOLERANCE = 1e-9  # sum of shares above 1 + this counts as a capacity violation
TIE_TOLERANCE = 1e-12  # value densities within this relative distance count as equal
ROW_LOOP_MAX = 8  # the numpy engine loops over up to this many rows in Python, else vectorises

Method = Literal["projection", "admm"]
Engine = Literal["numba", "numpy"]
Objective = Literal["utility", "euclidean"]
OBJECTIVES = ("utility", "euclidean")


def project_capacity(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``v`` onto {z >= 0, sum z <= 1}."""
    return coordinate(v, objective="euclidean").shares


def admm_allocate(
    requests: np.ndarray, *, rho: float = DEFAULT_RHO, iterations: int = DEFAULT_ITERATIONS
) -> Coordination:
    """ADMM on the Euclidean objective (see the module docstring)."""
    return coordinate(
        requests, method="admm", objective="euclidean", rho=rho, iterations=iterations
    )


class Coordination(NamedTuple):
    """What :func:`coordinate` returns: feasible shares ``(..., S)``; the capacity price and the
    residuals shaped like the leading dims ``(...)`` (residuals 0 for the exact method)."""

    shares: np.ndarray
    price: np.ndarray  # multiplier of sum z <= 1 (module docstring); 0 when the requests fit
    primal_residual: np.ndarray  # ||x - z||_2 of the last ADMM iteration
    dual_residual: np.ndarray  # rho ||z - z_prev||_2 of the last ADMM iteration


def coordinate(
    requests: np.ndarray,
    weights: np.ndarray | float | None = None,
    *,
    method: Method = "projection",
    objective: Objective = "utility",
    rho: float | None = None,
    iterations: int | None = None,
    engine: Engine = "numba",
) -> Coordination:
    """Turn requested shares ``(..., S)`` into a feasible allocation (see the module docstring).

    ``weights``: the slices' utility weights (finite, >= 0), shape ``(S,)`` or like
    ``requests``; None means equal weights; the Euclidean objective ignores them. ``method``:
    "projection" (exact, closed form) or "admm"; ``rho`` and ``iterations`` apply to ADMM only
    and default to the objective's own (:data:`UTILITY_RHO` and :data:`UTILITY_ITERATIONS`, or
    :data:`DEFAULT_RHO` and :data:`DEFAULT_ITERATIONS`). ``engine``: "numba" (compiled row
    loops, imported on first use) or "numpy" (the exact method only, vectorised over the rows,
    without importing numba); both give the same answer.
    """
    a = np.asarray(requests, dtype=np.float64)
    n = a.shape[-1]
    rows = a.reshape(-1, n)
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    lead = a.shape[:-1]
    check_objective(objective)
    if method not in ("projection", "admm"):
        raise ValueError(f"method: must be 'projection' or 'admm', got {method!r}")
    if engine not in ("numba", "numpy"):
        raise ValueError(f"engine: must be 'numba' or 'numpy', got {engine!r}")
    if objective == "utility":
        w = _weight_rows(weights, a.shape, n)
    if engine == "numpy":
        if method != "projection":
            raise ValueError("engine: 'numpy' runs the exact method only (method='projection')")
        if objective == "utility":
            shares, price = _utility_numpy(rows, w)
        else:
            shares, price = _projection_numpy(rows)
        zero = np.zeros(lead)
        return Coordination(shares.reshape(a.shape), price.reshape(lead), zero, zero)
    from deepslicing import _coordinator_kernels as kernels

    shares = np.empty_like(rows)
    price = np.empty(rows.shape[0])
    if method == "projection":
        if objective == "utility":
            ok = kernels.utility_rows(rows, w, shares, price)
        else:
            ok = kernels.projection_rows(rows, shares, price)
        _check_weights(ok)
        zero = np.zeros(lead)
        return Coordination(shares.reshape(a.shape), price.reshape(lead), zero, zero)
    primal = np.empty(rows.shape[0])
    dual = np.empty(rows.shape[0])
    if objective == "utility":
        rho = UTILITY_RHO if rho is None else rho
        iterations = UTILITY_ITERATIONS if iterations is None else iterations
        check_admm(rho, iterations)
        ok = kernels.admm_utility_rows(rows, w, float(rho), iterations, shares, price, primal, dual)
        _check_weights(ok)
    else:
        rho = DEFAULT_RHO if rho is None else rho
        iterations = DEFAULT_ITERATIONS if iterations is None else iterations
        check_admm(rho, iterations)
        kernels.admm_rows(rows, float(rho), iterations, shares, primal, dual, price)
    return Coordination(
        shares.reshape(a.shape), price.reshape(lead), primal.reshape(lead), dual.reshape(lead)
    )


def _weight_rows(weights, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Weights as rows ``(1, S)`` (shared by every cell) or ``(num_rows, S)``; the compiled loops
    check them (finite, >= 0)."""
    if weights is None:
        return np.full((1, n), 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape == (n,) and w.flags.c_contiguous:
        return w.reshape(1, n)
    if w.ndim <= 1:
        return np.ascontiguousarray(np.broadcast_to(w, (n,)).reshape(1, n))
    return np.ascontiguousarray(np.broadcast_to(w, shape).reshape(-1, n))


def _utility_numpy(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The utility objective's exact answer without numba: rows ``a`` ``(R, S)``, weights
    ``(1, S)`` or ``(R, S)``; returns shares ``(R, S)`` and prices ``(R,)``. Up to
    :data:`ROW_LOOP_MAX` rows in a plain loop, more vectorised over the rows."""
    if a.shape[0] <= ROW_LOOP_MAX:
        weights = w.tolist()
        _check_weights(all(0.0 <= x < np.inf for row in weights for x in row))
        answers = [
            _utility_row(row, weights[0] if len(weights) == 1 else weights[r])
            for r, row in enumerate(a.tolist())
        ]
        return np.array([x for x, _ in answers]), np.array([p for _, p in answers])
    _check_weights(bool(((w >= 0.0) & (w < np.inf)).all()))  # False for NaN too
    return _utility_vectorised(np.maximum(a, 0.0), w)


def _utility_row(a: list[float], w: list[float]) -> tuple[list[float], float]:
    """One row of :func:`_utility_numpy`: the compiled loop's steps, on Python floats."""
    x = [v if v > 0.0 else 0.0 for v in a]
    if sum(x) <= 1.0:
        return x, 0.0
    # a slice requesting nothing sorts last (density -1) and keeps its 0
    density = [wi / xi if xi > 0.0 else -1.0 for wi, xi in zip(w, x, strict=True)]
    order = sorted(range(len(x)), key=density.__getitem__, reverse=True)  # stable
    left, k, n = 1.0, 0, len(x)
    while k < n and density[order[k]] >= 0.0:
        m, group = k + 1, x[order[k]]
        while m < n and density[order[m]] >= density[order[m - 1]] * (1.0 - TIE_TOLERANCE):
            group += x[order[m]]
            m += 1
        if group > left:  # the marginal group: each gets the same satisfaction left / group
            for j in order[k:m]:
                x[j] *= left / group
            for j in order[m:]:
                x[j] = 0.0
            return x, density[order[k]]
        left -= group
        k = m
    return x, 0.0


def _utility_vectorised(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_utility_numpy` for every row at once: sort by value density, cumulative sums give
    what the groups before each tie group take, and the marginal group gets the rest pro rata."""
    # a slice requesting nothing sorts last (density -1) and gets nothing
    density = np.divide(np.broadcast_to(w, a.shape), a, out=np.full(a.shape, -1.0), where=a > 0.0)
    order = np.argsort(-density, axis=-1, kind="stable")
    d = np.take_along_axis(density, order, axis=-1)
    s = np.take_along_axis(a, order, axis=-1)
    head = np.ones(a.shape, dtype=bool)  # a tie group starts where the density drops
    head[:, 1:] = d[:, 1:] < d[:, :-1] * (1.0 - TIE_TOLERANCE)
    last = np.ones(a.shape, dtype=bool)
    last[:, :-1] = head[:, 1:]
    through = np.cumsum(s, axis=-1)
    # shares taken by the groups before / up to and including each slice's group
    before = np.maximum.accumulate(np.where(head, through - s, -np.inf), axis=-1)
    upto = np.minimum.accumulate(np.where(last, through, np.inf)[:, ::-1], axis=-1)[:, ::-1]
    marginal = (before <= 1.0) & (upto > 1.0)
    fraction = np.where(
        upto <= 1.0,
        1.0,
        np.where(marginal, (1.0 - before) / np.where(marginal, upto - before, 1.0), 0.0),
    )
    shares = np.empty_like(a)
    np.put_along_axis(shares, order, s * fraction, axis=-1)
    price = np.where(marginal & head, d, 0.0).sum(axis=-1)
    return shares, price


def _projection_numpy(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`project_capacity` and its multiplier tau for every row ``(R, S)`` at once (the
    sort-based rule of the module docstring)."""
    if v.shape[0] <= ROW_LOOP_MAX:
        answers = [_projection_row(row) for row in v.tolist()]
        return np.array([x for x, _ in answers]), np.array([tau for _, tau in answers])
    clipped = np.maximum(v, 0.0)
    over = clipped.sum(axis=-1) > 1.0
    largest = np.cumsum(-np.sort(-v, axis=-1), axis=-1)  # sums of the j largest entries
    tau = np.where(over, ((largest - 1.0) / np.arange(1.0, v.shape[-1] + 1.0)).max(axis=-1), 0.0)
    shares = np.where(over[:, None], np.maximum(v - tau[:, None], 0.0), clipped)
    return shares, tau


def _projection_row(v: list[float]) -> tuple[list[float], float]:
    """One row of :func:`_projection_numpy` on Python floats."""
    clipped = [x if x > 0.0 else 0.0 for x in v]
    if sum(clipped) <= 1.0:
        return clipped, 0.0
    tau, running = -np.inf, 0.0
    for j, x in enumerate(sorted(v, reverse=True), start=1):
        running += x
        tau = max(tau, (running - 1.0) / j)
    return [max(x - tau, 0.0) for x in v], tau


def _check_weights(ok: bool) -> None:
    if not ok:
        raise ValueError("weights: must be finite numbers >= 0 (the slices' utility weights)")


def claimed_utility(shares: np.ndarray, requests: np.ndarray, weights) -> np.ndarray:
    """sum_i w_i min(1, x_i / a_i) per row, the utility objective (a slice requesting nothing
    counts as satisfied); ``weights`` broadcast against ``requests``."""
    a = np.maximum(np.asarray(requests, dtype=np.float64), 0.0)
    x = np.asarray(shares, dtype=np.float64)
    sat = np.where(a > 0.0, np.minimum(1.0, x / np.where(a > 0.0, a, 1.0)), 1.0)
    return (np.broadcast_to(weights, a.shape) * sat).sum(axis=-1)


def check_objective(objective: object) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")


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

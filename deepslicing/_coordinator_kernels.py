"""The coordinator's compiled row loops (numba), imported only when a compiled method runs.

Private to :mod:`deepslicing.coordinator`, whose docstring states what each loop computes. They
live apart so that importing the coordinator (as the Serve replica does, whose guardrail runs the
numpy path) does not import numba, which costs a process about 125 MiB once a compiled function is
loaded.
"""

import numba
import numpy as np

from deepslicing.coordinator import TIE_TOLERANCE


@numba.njit(cache=True)
def admm_rows(a, rho, iterations, shares, primal, dual, price):  # pragma: no cover - compiled
    """ADMM row by row, compiled: at the few slices of a cell, numpy's per-call overhead would
    cost 10 to 100 times the arithmetic. Same iteration as the module docstring; ``price`` gets
    rho x the mean dual u over the slices given a share."""
    num_rows, n = a.shape
    no_cap = np.full(n, np.inf)
    buffer = np.empty(n)
    for r in range(num_rows):
        z = np.zeros(n)
        u = np.zeros(n)
        x = np.zeros(n)
        z_prev = np.zeros(n)
        for _ in range(iterations):
            x = (a[r] + rho * (z - u)) / (1.0 + rho)
            z_prev = z
            z = np.empty(n)
            project_into(x + u, z, buffer)
            u = u + x - z
        shares[r] = z
        primal[r] = np.sqrt(np.sum((x - z) ** 2))
        dual[r] = rho * np.sqrt(np.sum((z - z_prev) ** 2))
        price[r] = rho * mean_served_dual(z, u, no_cap)


@numba.njit(cache=True)
def valid_weights(w):  # pragma: no cover - compiled
    for r in range(w.shape[0]):
        for i in range(w.shape[1]):
            if not (0.0 <= w[r, i] < np.inf):  # False for NaN too
                return False
    return True


@numba.njit(cache=True)
def utility_rows(a, w, shares, price):  # pragma: no cover - compiled
    """The utility objective's exact answer, row by row (module docstring): fill slices in
    decreasing value density; a group of equal densities shares what is left pro rata.
    Returns False (and does nothing) when a weight is negative or not finite."""
    if not valid_weights(w):
        return False
    num_rows, n = a.shape
    shared = w.shape[0] == 1
    density = np.empty(n)
    for r in range(num_rows):
        wr = w[0] if shared else w[r]
        total = 0.0
        for i in range(n):
            shares[r, i] = max(a[r, i], 0.0)
            total += shares[r, i]
        price[r] = 0.0
        if total <= 1.0:
            continue
        for i in range(n):
            # a slice requesting nothing sorts last and gets nothing
            density[i] = wr[i] / shares[r, i] if shares[r, i] > 0.0 else -1.0
        order = np.argsort(-density)
        left = 1.0
        k = 0
        while k < n:
            top = density[order[k]]
            if top < 0.0:
                break
            m = k
            group = 0.0
            # a group runs while each density is within the tolerance of the one before it
            while m < n and (
                m == k or density[order[m]] >= density[order[m - 1]] * (1.0 - TIE_TOLERANCE)
            ):
                group += shares[r, order[m]]
                m += 1
            if group > left:  # the marginal group: each gets the same satisfaction left / group
                fraction = left / group
                for j in range(k, m):
                    shares[r, order[j]] *= fraction
                for j in range(m, n):
                    shares[r, order[j]] = 0.0
                price[r] = top
                break
            left -= group
            k = m
    return True


@numba.njit(cache=True)
def projection_rows(a, shares, price):  # pragma: no cover - compiled
    """:func:`project_capacity` row by row, and the multiplier tau of sum z <= 1."""
    buffer = np.empty(a.shape[1])
    for r in range(a.shape[0]):
        price[r] = project_into(a[r], shares[r], buffer)
    return True


@numba.njit(cache=True)
def project_into(v, out, buffer):  # pragma: no cover - compiled
    """out = :func:`project_capacity` of the row ``v`` without allocating; returns tau (0 when
    the clipped row fits)."""
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        out[i] = max(v[i], 0.0)
        total += out[i]
    if total <= 1.0:
        return 0.0
    for i in range(n):  # insertion sort into buffer, ascending: a cell has few slices
        value = v[i]
        j = i
        while j > 0 and buffer[j - 1] > value:
            buffer[j] = buffer[j - 1]
            j -= 1
        buffer[j] = value
    tau = -np.inf
    running = 0.0
    for j in range(n):  # the j + 1 largest entries
        running += buffer[n - 1 - j]
        tau = max(tau, (running - 1.0) / (j + 1.0))
    for i in range(n):
        out[i] = max(v[i] - tau, 0.0)
    return tau


@numba.njit(cache=True)
def admm_utility_rows(a, w, rho, iterations, shares, price, primal, dual):  # pragma: no cover
    """ADMM on the utility objective, row by row and without allocating in the loop (module
    docstring). Returns False (and does nothing) when a weight is negative or not finite."""
    if not valid_weights(w):
        return False
    num_rows, n = a.shape
    shared = w.shape[0] == 1
    cap = np.empty(n)
    step = np.empty(n)
    x = np.empty(n)
    y = np.empty(n)
    z = np.empty(n)
    z_prev = np.empty(n)
    u = np.empty(n)
    buffer = np.empty(n)
    for r in range(num_rows):
        wr = w[0] if shared else w[r]
        total = 0.0
        scale = 0.0
        for i in range(n):
            cap[i] = max(a[r, i], 0.0)
            total += cap[i]
            scale += wr[i]
        primal[r] = 0.0
        dual[r] = 0.0
        price[r] = 0.0
        if total <= 1.0:  # the requests fit: they are the answer
            shares[r] = cap
            continue
        if scale <= 0.0:
            scale = 1.0
        for i in range(n):
            step[i] = wr[i] / scale / cap[i] / rho if cap[i] > 0.0 else 0.0
            z[i] = 0.0
            u[i] = 0.0
            x[i] = 0.0
            z_prev[i] = 0.0
        for _ in range(iterations):
            for i in range(n):
                x[i] = min(max(z[i] - u[i] + step[i], 0.0), cap[i])
                y[i] = x[i] + u[i]
                z_prev[i] = z[i]
            project_into(y, z, buffer)
            for i in range(n):
                u[i] += x[i] - z[i]
        primal_sq = 0.0
        dual_sq = 0.0
        for i in range(n):
            primal_sq += (x[i] - z[i]) ** 2
            dual_sq += (z[i] - z_prev[i]) ** 2
            shares[r, i] = min(z[i], cap[i])
        primal[r] = np.sqrt(primal_sq)
        dual[r] = rho * np.sqrt(dual_sq)
        price[r] = rho * scale * mean_served_dual(z, u, cap)
    return True


@numba.njit(cache=True)
def mean_served_dual(z, u, cap):  # pragma: no cover - compiled
    """Mean of u over the partly served slices (0 < z_i < cap_i), else over every served one
    (z_i > 0); 0 when none is served."""
    partial = 0.0
    partial_count = 0
    served = 0.0
    served_count = 0
    for i in range(z.shape[0]):
        if z[i] > 0.0:
            served += u[i]
            served_count += 1
            if z[i] < cap[i]:
                partial += u[i]
                partial_count += 1
    if partial_count:
        return partial / partial_count
    return served / served_count if served_count else 0.0

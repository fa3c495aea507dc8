"""The law fit: L(N, D) = E + A * N^-alpha + B * D^-beta by L-BFGS in log space, bootstrap intervals and the
held-out check (fit without the largest model, predict it)."""

from __future__ import annotations

import math

import torch

# ---- the fit ------------------------------------------------------------------------------------------------
# L(N, D) = E + A * N^-alpha + B * D^-beta, fitted as log L = logsumexp(e, a - alpha log N, b - beta log D)
# by least squares in log space (relative errors: the groups' losses differ by an order of magnitude), with
# L-BFGS from a grid of starts (the objective is non-convex; Chinchilla's approach 3, without the Huber term).

PARAM_NAMES = ("E", "A", "alpha", "B", "beta")


def _log_pred(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor) -> torch.Tensor:
    e, a, alpha, b, beta = theta.unbind(-1)
    terms = torch.stack([e.expand_as(logN), a - alpha * logN, b - beta * logD], -1)
    return torch.logsumexp(terms, -1)


_MAX_LOG = 700.0  # log of the largest constant a fit may return (exp(709.8) overflows float64)


def _lbfgs(theta0: torch.Tensor, logN, logD, logL, iters: int = 200) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((_log_pred(theta, logN, logD) - logL) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = float(((_log_pred(theta, logN, logD) - logL) ** 2).mean())
    return theta.detach(), loss if math.isfinite(loss) else float("inf")


def fit_law(N, D, L, starts: torch.Tensor | None = None) -> dict:
    """Fit L = E + A N^-alpha + B D^-beta to points (N, D, L); returns the constants and the fit's RMS error
    in log space. Needs at least 6 points with >= 2 distinct N and D."""
    N, D, L = (torch.as_tensor(x, dtype=torch.float64) for x in (N, D, L))
    if len(L) < 6 or len(set(N.tolist())) < 2 or len(set(D.tolist())) < 2:
        raise ValueError(f"fit_law: need >= 6 points over >= 2 sizes and >= 2 budgets, got {len(L)}")
    if (L <= 0).any():
        raise ValueError("fit_law: losses must be positive")
    logN, logD, logL = N.log(), D.log(), L.log()
    if starts is None:
        grid = torch.cartesian_prod(*(torch.tensor(v, dtype=torch.float64) for v in (
            [float(logL.min()) - 1.0, float(logL.min()) - 0.1],  # e = log E
            [0.0, 4.0, 8.0], [0.2, 0.6],  # a, alpha
            [0.0, 4.0, 8.0], [0.2, 0.6])))  # b, beta
        starts = grid
    best, best_loss = None, float("inf")
    for s in starts:
        theta, loss = _lbfgs(s, logN, logD, logL)
        # a start that ran off to a constant beyond float64's exp (log E, A or B > ~709) has not converged: such a
        # fit is degenerate (a bootstrap resample of the miniature's unseen group did this), and exp() would raise
        if loss < best_loss and torch.isfinite(theta).all() and float(theta[[0, 1, 3]].max()) < _MAX_LOG:
            best, best_loss = theta, loss
    if best is None:
        raise RuntimeError("fit_law: no start converged")
    e, a, alpha, b, beta = best.tolist()
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta,
            "rms_log_error": math.sqrt(best_loss), "theta": best.tolist()}


def predict(fit: dict, N, D) -> torch.Tensor:
    N, D = torch.as_tensor(N, dtype=torch.float64), torch.as_tensor(D, dtype=torch.float64)
    return _log_pred(torch.tensor(fit["theta"], dtype=torch.float64), N.log(), D.log()).exp()


def bootstrap(N, D, L, fit: dict, n: int, seed: int = 0) -> dict:
    """95 % percentile intervals of each constant over `n` refits on runs resampled with replacement (each
    refit starts from the full fit and from the grid's two best-spread starts)."""
    N, D, L = (torch.as_tensor(x, dtype=torch.float64) for x in (N, D, L))
    g = torch.Generator().manual_seed(seed)
    draws = []
    start = torch.tensor(fit["theta"], dtype=torch.float64)
    for _ in range(n):
        idx = torch.randint(len(L), (len(L),), generator=g)
        if len(set(N[idx].tolist())) < 2 or len(set(D[idx].tolist())) < 2 or len(set(idx.tolist())) < 6:
            continue
        try:
            f = fit_law(N[idx], D[idx], L[idx], starts=start[None])
        except (ValueError, RuntimeError):
            continue
        draws.append([f[k] for k in PARAM_NAMES])
    if not draws:
        return {"n": 0}
    t = torch.tensor(draws, dtype=torch.float64)
    lo, hi = torch.quantile(t, 0.025, dim=0), torch.quantile(t, 0.975, dim=0)
    return {"n": len(draws), **{k: [float(lo[i]), float(hi[i])] for i, k in enumerate(PARAM_NAMES)}}


def fits_for(rows: list[dict], group: str, n_boot: int) -> dict:
    """Fit, bootstrap and held-out check (fit without the largest model, predict it) for one loss group."""
    pts = [(r["params"], r["samples"], r["loss_groups"][group]) for r in rows
           if r["kind"] == "gemma2" and r["loss_groups"].get(group)]
    if not pts:
        return {"skipped": "no points"}
    N, D, L = zip(*pts)
    try:
        fit = fit_law(N, D, L)
    except ValueError as exc:
        return {"skipped": str(exc)}
    res = {"fit": fit, "points": len(pts), "bootstrap": bootstrap(N, D, L, fit, n_boot)}
    largest = max(N)
    train_pts = [p for p in pts if p[0] < largest]
    test_pts = [p for p in pts if p[0] == largest]
    try:
        small = fit_law(*zip(*train_pts))
        pred = predict(small, [p[0] for p in test_pts], [p[1] for p in test_pts]).tolist()
        res["held_out"] = {"params": largest, "fit_on_smaller": {k: small[k] for k in PARAM_NAMES},
                           "rows": [{"samples": p[1], "actual": p[2], "predicted": q, "rel_error": q / p[2] - 1}
                                    for p, q in zip(test_pts, pred)]}
        res["held_out"]["mean_abs_rel_error"] = sum(abs(r["rel_error"]) for r in res["held_out"]["rows"]) / len(pred)
    except ValueError as exc:
        res["held_out"] = {"skipped": str(exc)}
    return res

"""Benchmark of hypergrad: hypergradient accuracy against cost, and Hessian-vector products.

Usage::

    python benchmarks/hypergrad.py --json benchmarks/results/cpu.json [--quick]
        [--repeats 3] [--device cpu|cuda] [--threads N] [--no-memory]
        [--sections ridge,peers,hvp]

Writes one JSON list of records (and prints them as tables). Every record has ``section``:

``meta``
    Machine, torch version, sizes, conditioning of the ridge problem, total run time.
``ridge`` (``kind == "estimate"``)
    ``{"estimator", "budget", "rel_error", "seconds", "peak_mib", ...}``: one estimator at
    one budget on a per-feature ridge problem with a closed-form hypergradient.
    ``budget`` is the number of linear-solver iterations (implicit_*), of inner steps T
    (unrolled*) or of differentiated steps K (truncated). ``rel_error`` is
    ‖ĝ − g*‖/‖g*‖ against the closed form, ``seconds`` the median wall time of the
    estimator call, ``peak_mib`` its peak memory (null where not measured), ``repeats``
    the number of timed calls. ``implicit_cg`` uses linearized HVPs; ``implicit_cg_jvp``,
    ``_reverse`` and ``_auto`` the other ``Implicit(hvp=...)`` forms (``auto``, the
    default, probes jvp and linearized once per call when no state is passed).
    ``rel_to_reference`` compares with an estimator that computes the same quantity at the
    same budget (recompute/forward vs reverse unrolling, truncated K-RMD from w* vs K
    fixed-point steps). Peer libraries (torchopt, higher) appear as further estimators
    with ``rel_to_hypergrad`` (agreement with hypergrad's equivalent) and
    ``hypergrad_seconds`` (hypergrad's time, measured alternately with the peer's).
``ridge`` (``kind == "grad"``)
    ``seconds`` of one ∇_w f at w* (torch.func.grad), the unit of the ratios below.
``ridge`` (``kind == "time_to_tol"``)
    Implicit CG at the smallest iteration count ``hvps`` whose relative error is
    ≤ ``tol`` (1e-8): ``seconds``, ``grad_seconds`` (timed side by side) and
    ``ratio = seconds / (hvps · grad_seconds)``; ``best_rel_error`` over all CG runs.
``hvp``
    ``{"hvp_mode", "batch", "batched", "ratio_to_grad", "seconds", "grad_seconds"}`` on a
    784-1024-256-10 MLP: time per Hessian-vector product over the time of one gradient,
    timed alternately with that gradient. ``hvp_mode`` "linearized" is the per-product
    cost of ``Linearization.matvec`` (the cost inside a linear solve), "linearized_setup"
    the one-off linearization, "linearized_oneshot" ``hvp(mode="linearized")`` (both).
``targets``
    ``{"name", "value", "target", "met"}``: the figures compared with the project targets.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the
call. On CPU, each measured record runs once more in a fresh subprocess that loads the
data, warms up (implicit CG with 2 iterations and 2 unrolled steps), and reports the
increase of its peak resident size (``VmHWM`` in /proc/self/status, the per-process
``ru_maxrss``) over that baseline; ``peak_slack_mib`` is the baseline's peak minus its
resident size (allocations up to that amount could hide). ``ru_maxrss`` itself is not
used: after fork + exec it starts from the parent's peak, so it hides the child's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # bench_util
from bench_util import cuda_peak, proc_status_mib  # noqa: E402

import hypergrad as hg  # noqa: E402

Record = dict[str, Any]
START = time.perf_counter()
TOL = 1e-8
TRUNC_PREFIX = 20  # graph-free steps before the truncated window (from w*, a no-op)
#: estimators that compute the same quantity as another one at equal budget
REFERENCE = {"implicit_cg_jvp": "implicit_cg", "implicit_cg_reverse": "implicit_cg",
             "implicit_cg_auto": "implicit_cg",
             "unrolled_recompute": "unrolled", "unrolled_forward": "unrolled",
             "truncated": "implicit_fixed_point"}

FULL = {
    "min_total": 0.3,  # seconds: fast calls are repeated until they took this long
    "min_total_hvp": 1.5,
    "ridge": (5000, 1000, 1000),
    "mlp": {"sizes": (784, 1024, 256, 10), "batch": 256, "ks": (1, 2, 4, 8, 16, 32, 64),
            "ks_other": (1, 4, 16), "chunk": 8},
    "budgets": {
        "implicit_cg": (10, 25, 50, 75, 100, 125, 150, 200),
        "implicit_cg_jvp": (25,), "implicit_cg_reverse": (25,), "implicit_cg_auto": (100,),
        "implicit_gmres": (25, 50, 100, 150),
        "implicit_fixed_point": (10, 100, 1000, 3000),
        "implicit_neumann": (100,),
        "unrolled": (3, 10, 100, 300, 1000),
        "unrolled_recompute": (100, 300),
        "unrolled_forward": (3,),
        "truncated": (10, 100, 1000),
    },
    "memory": {"implicit_cg": (100,), "implicit_cg_jvp": (25,), "implicit_gmres": (100,),
               "unrolled": (100, 300), "unrolled_recompute": (100, 300),
               "unrolled_forward": (3,), "truncated": (100,)},
    "peer_budgets": {"torchopt_implicit_cg": (50, 100), "higher_unrolled": (100,)},
}
QUICK = {
    "min_total": 0.03,
    "min_total_hvp": 0.05,
    "ridge": (500, 100, 200),
    "mlp": {"sizes": (784, 128, 64, 10), "batch": 64, "ks": (1, 4, 16), "ks_other": (1, 16),
            "chunk": 8},
    "budgets": {
        "implicit_cg": (5, 20, 50, 100), "implicit_cg_jvp": (20,), "implicit_cg_reverse": (20,),
        "implicit_cg_auto": (20,),
        "implicit_gmres": (20, 50), "implicit_fixed_point": (10, 100), "implicit_neumann": (100,),
        "unrolled": (3, 100), "unrolled_recompute": (100,), "unrolled_forward": (3,),
        "truncated": (10, 100),
    },
    "memory": {"unrolled": (100,)},
    "peer_budgets": {"torchopt_implicit_cg": (50,), "higher_unrolled": (100,)},
}


# --------------------------------------------------------------------------- timing


def sync_fn(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None],
          min_total: float = 0.3, max_total: float = 6.0) -> tuple[float, int, Any]:
    """Median wall time of ``fn`` (already warm): at least ``repeats`` calls (more for fast
    calls, until ``min_total`` seconds), fewer once ``max_total`` seconds are spent."""
    times: list[float] = []
    out = None
    while len(times) < 100:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
        total = sum(times)
        if total > max_total or (len(times) >= repeats and total >= min_total):
            break
    return statistics.median(times), len(times), out


def timed_pair(fn: Callable[[], Any], ref: Callable[[], Any], repeats: int,
               sync: Callable[[], None], min_total: float = 0.5,
               max_total: float = 10.0) -> tuple[float, float, int]:
    """Medians of ``fn`` and ``ref`` timed alternately, so both see the same machine load
    (at least ``repeats`` rounds and ``min_total`` seconds, fewer after ``max_total``).

    Each round times ``fn`` once and ``ref`` three times: the first ``ref`` after a large
    call is slowed by its memory traffic (fresh pages), which the median then discards.
    """
    a: list[float] = []
    b: list[float] = []
    while len(a) < 200 and (len(a) < repeats or sum(a) + sum(b) < min_total) \
            and sum(a) + sum(b) < max_total:
        for f, acc in ((fn, a), (ref, b), (ref, b), (ref, b)):
            sync()
            start = time.perf_counter()
            f()
            sync()
            acc.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b), len(a)


# --------------------------------------------------------------------------- ridge problem


def ridge_inner(p: dict, h: dict, batch: tuple) -> torch.Tensor:
    """f(w, λ) = ½‖Xw − y‖²/n + ½ Σ_j e^{λ_j} w_j²."""
    X, y = batch
    r = X @ p["w"] - y
    return 0.5 * (r @ r) / X.shape[0] + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()


def ridge_outer(p: dict, h: dict, batch: tuple) -> torch.Tensor:
    """F(w) = ½‖X_v w − y_v‖²/n_v (half the validation MSE)."""
    X, y = batch
    r = X @ p["w"] - y
    return 0.5 * (r @ r) / X.shape[0]


@dataclass
class Ridge:
    """Data, closed-form solution w*, hypergradient g* and spectrum [mu, L] of A."""

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor
    w_star: torch.Tensor
    g_star: torch.Tensor
    mu: float
    L: float

    def problem(self, steps: int) -> hg.Problem:
        return hg.Problem(ridge_inner, ridge_outer, (self.X, self.y), (self.Xv, self.yv),
                          optimizer=hg.SGD(lr=1.0 / self.L), steps=steps)

    def hparams(self) -> dict:
        return {"lam": self.lam.clone()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("X", "y", "Xv", "yv", "lam", "w_star", "g_star")}


def make_ridge(n: int, d: int, nv: int, device: str, seed: int = 0) -> Ridge:
    """AR(1)-correlated features (ρ = 0.8), a sparse true w, e^λ log-uniform in [1e-3, 1]:
    κ(A) ≈ 130, so CG needs ~100 iterations and gradient descent thousands."""
    g = torch.Generator().manual_seed(seed)
    dt, rho = torch.float64, 0.8
    Xt = torch.randn(d, n + nv, generator=g, dtype=dt)
    for j in range(1, d):  # column j = ρ · column j−1 + √(1−ρ²) · noise
        Xt[j].mul_(math.sqrt(1 - rho**2)).add_(Xt[j - 1], alpha=rho)
    w_true = torch.randn(d, generator=g, dtype=dt) * (torch.rand(d, generator=g) < 0.2)
    y_all = w_true @ Xt + torch.randn(n + nv, generator=g, dtype=dt)
    lam = torch.empty(d, dtype=dt).uniform_(math.log(1e-3), 0.0, generator=g)
    X, Xv = Xt[:, :n].T.contiguous(), Xt[:, n:].T.contiguous()
    y, yv = y_all[:n].clone(), y_all[n:].clone()
    del Xt
    A = X.T @ X / n + torch.diag(lam.exp())
    chol = torch.linalg.cholesky(A)
    w = torch.cholesky_solve((X.T @ y / n)[:, None], chol)[:, 0]
    gF = Xv.T @ (Xv @ w - yv) / nv
    g_star = -lam.exp() * w * torch.cholesky_solve(gF[:, None], chol)[:, 0]
    eig = torch.linalg.eigvalsh(A)
    t = [x.to(device) for x in (X, y, Xv, yv, lam, w, g_star)]
    return Ridge(*t, mu=float(eig[0]), L=float(eig[-1]))


def make_case(name: str, budget: int, r: Ridge) -> tuple[hg.Estimator, hg.Problem, dict]:
    """The estimator ``name`` at ``budget``, its problem and its starting params."""
    star, zero = {"w": r.w_star.clone()}, {"w": torch.zeros_like(r.w_star)}
    alpha = 1.0 / r.L

    def implicit(solver: Any, hvp: str = "linearized") -> tuple:
        est = hg.Implicit(solver=solver, hvp=hvp, inner_steps=0, warm_start=False)
        return est, r.problem(0), star

    if name.startswith("implicit_cg"):
        mode = {"implicit_cg": "linearized", "implicit_cg_jvp": "jvp",
                "implicit_cg_reverse": "reverse", "implicit_cg_auto": "auto"}[name]
        return implicit(hg.ConjugateGradient(tol=0.0, maxiter=budget), mode)
    if name == "implicit_gmres":
        return implicit(hg.GMRES(tol=0.0, maxiter=budget))
    if name == "implicit_fixed_point":
        return implicit(hg.FixedPoint(alpha=alpha, tol=0.0, maxiter=budget))
    if name == "implicit_neumann":
        return implicit(hg.Neumann(alpha=alpha, terms=budget))
    if name == "truncated":
        return hg.Truncated(window=budget), r.problem(budget + TRUNC_PREFIX), star
    unrolled = {"unrolled": hg.Unrolled(), "unrolled_recompute": hg.Unrolled(recompute=True),
                "unrolled_forward": hg.Unrolled(mode="forward")}[name]
    return unrolled, r.problem(budget), zero


def rel_error(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


def run_case(name: str, budget: int, r: Ridge) -> torch.Tensor:
    est, problem, params = make_case(name, budget, r)
    return est(problem, r.hparams(), params).grad["lam"]


def memory_child(spec: dict) -> None:
    """Entry point of the fresh subprocess measuring one record's peak RSS increase."""
    torch.set_num_threads(spec["threads"])
    data = torch.load(spec["data"], mmap=True)
    r = Ridge(**data["tensors"], mu=data["mu"], L=data["L"])
    warnings.simplefilter("ignore")
    run_case("implicit_cg", 2, r)
    run_case("unrolled", 2, r)
    base = proc_status_mib("VmHWM")
    slack = base - proc_status_mib("VmRSS")
    run_case(spec["estimator"], spec["budget"], r)
    peak = proc_status_mib("VmHWM") - base
    print(json.dumps({"peak_mib": peak, "peak_slack_mib": slack}))


def cpu_peak(name: str, budget: int, data_path: str, threads: int) -> dict:
    spec = {"data": data_path, "estimator": name, "budget": budget, "threads": threads}
    out = subprocess.run([sys.executable, __file__, "--json", "-", "--memory-child",
                          json.dumps(spec)], capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_ridge(r: Ridge, cfg: dict, args: argparse.Namespace) -> list[Record]:
    """Rel. error, time and memory of every estimator over its budgets, then CG time to 1e-8."""
    sync = sync_fn(args.device)
    records: list[Record] = []
    grads: dict[tuple[str, int], torch.Tensor] = {}
    data_path = None
    if args.memory and args.device == "cpu":
        fd, data_path = tempfile.mkstemp(suffix=".pt")
        os.close(fd)
        torch.save({"tensors": r.tensors(), "mu": r.mu, "L": r.L}, data_path)
    w_star, batch = {"w": r.w_star}, (r.X, r.y)
    t_grad, n_grad, _ = timed(lambda: grad(ridge_inner)(w_star, r.hparams(), batch),
                              max(args.repeats, 20), sync, args.min_total)
    records.append({"section": "ridge", "kind": "grad", "estimator": "grad_f",
                    "seconds": t_grad, "repeats": n_grad})
    try:
        for name, budgets in cfg["budgets"].items():
            run_case(name, 2, r)  # warm-up: first-call costs, not size-dependent
            for b in budgets:
                t, reps, g = timed(lambda n=name, b=b: run_case(n, b, r), args.repeats, sync,
                                   args.min_total)
                rec = {"section": "ridge", "kind": "estimate", "estimator": name, "budget": b,
                       "rel_error": rel_error(g, r.g_star), "seconds": t, "peak_mib": None,
                       "repeats": reps}
                grads[name, b] = g
                if (REFERENCE.get(name), b) in grads:  # same estimate by another route
                    rec["reference"] = REFERENCE[name]
                    rec["rel_to_reference"] = rel_error(g, grads[REFERENCE[name], b])
                if args.device != "cpu":
                    rec["peak_mib"] = cuda_peak(lambda n=name, b=b: run_case(n, b, r))
                elif data_path and b in cfg["memory"].get(name, ()):
                    rec.update(cpu_peak(name, b, data_path, torch.get_num_threads()))
                records.append(rec)
                log_record(rec)
    finally:
        if data_path:
            os.unlink(data_path)
    records.append(time_to_tol(r, records, t_grad, args))
    return records


def time_to_tol(r: Ridge, records: list[Record], t_grad: float,
                args: argparse.Namespace) -> Record:
    """Smallest CG iteration count reaching rel. error ≤ TOL (bisection), timed beside ∇f."""
    sweep = sorted((x["budget"], x["rel_error"]) for x in records
                   if x.get("estimator") == "implicit_cg")
    best = min(e for _, e in sweep)
    hi = next((b for b, e in sweep if e <= TOL), None)
    rec = {"section": "ridge", "kind": "time_to_tol", "estimator": "implicit_cg", "tol": TOL,
           "best_rel_error": best}
    if hi is None:
        return {**rec, "hvps": None, "seconds": None}
    lo = max([b for b, e in sweep if b < hi and e > TOL], default=0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if rel_error(run_case("implicit_cg", mid, r), r.g_star) <= TOL \
            else (mid, hi)
    w_star, batch = {"w": r.w_star}, (r.X, r.y)
    t, tg, _ = timed_pair(lambda: run_case("implicit_cg", hi, r),
                          lambda: grad(ridge_inner)(w_star, r.hparams(), batch),
                          max(args.repeats, 7), sync_fn(args.device), args.min_total)
    return {**rec, "hvps": hi, "seconds": t, "grad_seconds": tg, "ratio": t / (hi * tg),
            "rel_error": rel_error(run_case("implicit_cg", hi, r), r.g_star)}


# --------------------------------------------------------------------------- peers


def bench_peers(r: Ridge, cfg: dict, args: argparse.Namespace) -> list[Record]:
    """torchopt's implicit CG and higher's unrolled GD on the same ridge problem, if present."""
    records: list[Record] = []
    sync = sync_fn(args.device)
    peers = {"torchopt_implicit_cg": (torchopt_cg, "implicit_cg"),
             "higher_unrolled": (higher_unrolled, "unrolled")}
    for name, (fn, ours) in peers.items():
        try:
            fn(r, 1)
        except Exception as exc:  # not installed, or broken with this torch
            print(f"# {name}: skipped ({type(exc).__name__}: {exc})")
            continue
        for b in cfg["peer_budgets"][name]:
            t, t_ours, reps = timed_pair(lambda f=fn, b=b: f(r, b),
                                         lambda o=ours, b=b: run_case(o, b, r),
                                         args.repeats, sync, args.min_total)
            g = fn(r, b)
            rec = {"section": "ridge", "kind": "estimate", "estimator": name, "budget": b,
                   "rel_error": rel_error(g, r.g_star), "seconds": t, "peak_mib": None,
                   "repeats": reps, "hypergrad_seconds": t_ours,
                   "rel_to_hypergrad": rel_error(g, run_case(ours, b, r))}
            records.append(rec)
            log_record(rec)
    return records


def torchopt_cg(r: Ridge, budget: int) -> torch.Tensor:
    """torchopt.diff.implicit.custom_root with solve_cg for ``budget`` iterations at w*."""
    import torchopt

    def optimality(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return grad(ridge_inner)({"w": w}, {"lam": lam}, (r.X, r.y))["w"]

    solve = torchopt.linear_solve.solve_cg(rtol=0.0, atol=0.0, maxiter=budget)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return r.w_star.clone()

    lam = r.lam.clone().requires_grad_(True)
    w = solver(torch.zeros_like(r.w_star), lam)
    (g,) = torch.autograd.grad(ridge_outer({"w": w}, None, (r.Xv, r.yv)), lam)
    return g


class Weights(torch.nn.Module):
    """The ridge weights as a module, for higher."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)


def higher_unrolled(r: Ridge, steps: int) -> torch.Tensor:
    """higher.innerloop_ctx: ``steps`` differentiable SGD steps (lr 1/L) from w = 0."""
    import higher

    model = Weights(torch.zeros_like(r.w_star))
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / r.L)
    lam = r.lam.clone().requires_grad_(True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(ridge_inner({"w": fmodel.w}, {"lam": lam}, (r.X, r.y)))
        loss = ridge_outer({"w": fmodel.w}, None, (r.Xv, r.yv))
        (g,) = torch.autograd.grad(loss, lam)
    return g


# --------------------------------------------------------------------------- HVP on an MLP


def mlp_loss(p: dict, h: dict, batch: tuple) -> torch.Tensor:
    """Cross-entropy of a ReLU MLP plus ½ e^{log_wd} Σ‖W‖²."""
    x, labels = batch
    n_layers = len(p) // 2
    for i in range(n_layers):
        x = x @ p[f"W{i}"].T + p[f"b{i}"]
        if i < n_layers - 1:
            x = torch.relu(x)
    decay = sum((p[f"W{i}"] ** 2).sum() for i in range(n_layers))
    return torch.nn.functional.cross_entropy(x, labels) + 0.5 * h["log_wd"].exp() * decay


def make_mlp(sizes: tuple[int, ...], batch: int, device: str) -> tuple[dict, dict, tuple]:
    g = torch.Generator().manual_seed(1)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"W{i}"] = (torch.randn(b, a, generator=g) / math.sqrt(a)).to(device)
        params[f"b{i}"] = torch.zeros(b, device=device)
    x = torch.randn(batch, sizes[0], generator=g).to(device)
    labels = torch.randint(0, sizes[-1], (batch,), generator=g).to(device)
    return params, {"log_wd": torch.tensor(-8.0, device=device)}, (x, labels)


def bench_hvp(cfg: dict, args: argparse.Namespace) -> list[Record]:
    """Time per HVP (single, batched) over the time of one gradient, timed alternately."""
    mc = cfg["mlp"]
    p, h, batch = make_mlp(mc["sizes"], mc["batch"], args.device)
    sync = sync_fn(args.device)
    one_grad = lambda: grad(mlp_loss)(p, h, batch)  # noqa: E731
    lin = hg.Linearization(mlp_loss, p, h, batch, mode="linearized")
    g = torch.Generator().manual_seed(2)
    rand = lambda *lead: {k: torch.randn(*lead, *x.shape, generator=g).to(x)  # noqa: E731
                          for k, x in p.items()}
    v = rand()
    singles: dict[str, Callable[[], Any]] = {
        "jvp": lambda: hg.hvp(mlp_loss, p, h, batch, v, mode="jvp"),
        "reverse": lambda: hg.hvp(mlp_loss, p, h, batch, v, mode="reverse"),
        "linearized": lambda: lin.matvec(v),
        "linearized_setup": lambda: hg.Linearization(mlp_loss, p, h, batch, mode="linearized"),
        "linearized_oneshot": lambda: hg.hvp(mlp_loss, p, h, batch, v, mode="linearized"),
    }
    records: list[Record] = []

    def add(mode: str, k: int, batched: bool, fn: Callable[[], Any]) -> None:
        fn()  # warm-up
        t, tg, reps = timed_pair(fn, one_grad, args.repeats, sync, cfg["min_total_hvp"])
        rec = {"section": "hvp", "hvp_mode": mode, "batch": k, "batched": batched,
               "ratio_to_grad": t / (k * tg), "seconds": t, "grad_seconds": tg,
               "repeats": reps, "params": sum(x.numel() for x in p.values())}
        records.append(rec)
        log_record(rec)

    one_grad()
    for mode, fn in singles.items():
        add(mode, 1, False, fn)
    chunk = mc["chunk"]
    for k in mc["ks"]:
        V = rand(k)
        add("linearized", k, True, lambda V=V: lin.matvec(V, batched=True))
        if k > chunk:  # the same k products as k / chunk batched calls of ``chunk`` vectors
            add(f"linearized_chunk{chunk}", k, True, lambda V=V: chunked(lin, V, chunk))
        for mode in ("jvp", "reverse") if k in mc["ks_other"] else ():
            add(mode, k, True, lambda V=V, m=mode: hg.hvp_batched(mlp_loss, p, h, batch, V,
                                                                    mode=m))
    return records


def chunked(lin: hg.Linearization, V: dict, chunk: int) -> dict:
    """``lin.matvec(V, batched=True)`` in slices of ``chunk`` vectors, concatenated."""
    k = next(iter(V.values())).shape[0]
    parts = [lin.matvec({n: x[i:i + chunk] for n, x in V.items()}, batched=True)
             for i in range(0, k, chunk)]
    return {n: torch.cat([q[n] for q in parts]) for n in V}


# --------------------------------------------------------------------------- report


def targets(records: list[Record]) -> list[Record]:
    """The measured figures against the project targets."""
    tt = next(x for x in records if x.get("kind") == "time_to_tol")
    hvp = {(x["hvp_mode"], x["batch"], x["batched"]): x["ratio_to_grad"]
           for x in records if x["section"] == "hvp"}
    k16 = max((k for _, k, b in hvp if b and k <= 16), default=1)
    rows = [("implicit CG best rel. error", tt["best_rel_error"], 1e-10),
            ("CG time to 1e-8 / (HVPs x grad)", tt.get("ratio"), 1.5),
            ("linearized HVP in a solve / grad", hvp.get(("linearized", 1, False)), 1.2),
            (f"linearized batched k={k16}, per vector / grad",
             hvp.get(("linearized", k16, True)), 1.0)]
    return [{"section": "targets", "name": n, "value": v, "target": t,
             "met": v is not None and v <= t} for n, v, t in rows]


def log_record(rec: Record) -> None:
    keys = ("estimator", "hvp_mode", "budget", "batch", "rel_error", "ratio_to_grad",
            "seconds", "peak_mib")
    parts = []
    for k in keys:
        if rec.get(k) is None:
            continue
        v = rec[k]
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    print(f"  [{time.perf_counter() - START:5.0f} s] " + " ".join(parts), flush=True)


def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def print_tables(records: list[Record]) -> None:
    print(f"\n{'estimator':24} {'budget':>7} {'rel_error':>10} {'seconds':>9} {'peak_MiB':>9}")
    for x in records:
        if x.get("kind") == "estimate":
            print(f"{x['estimator']:24} {x['budget']:>7} {fmt(x['rel_error'], '.2e'):>10} "
                  f"{fmt(x['seconds'], '.4f'):>9} {fmt(x['peak_mib'], '.1f'):>9}")
    for x in records:
        if x.get("kind") in ("grad", "time_to_tol"):
            print("  " + ", ".join(f"{k}={fmt(v)}" for k, v in x.items() if k != "section"))
    print(f"\n{'hvp_mode':20} {'batch':>5} {'batched':>7} {'ratio_to_grad':>13} {'seconds':>9}")
    for x in records:
        if x["section"] == "hvp":
            print(f"{x['hvp_mode']:20} {x['batch']:>5} {x['batched']!s:>7} "
                  f"{x['ratio_to_grad']:>13.3f} {x['seconds']:>9.4f}")
    print()
    for x in records:
        if x["section"] == "targets":
            print(f"{x['name']:44} {fmt(x['value'], '.3g'):>10} <= {x['target']:g}: "
                  f"{'met' if x['met'] else 'NOT met'}")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="output file for the JSON records")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per record (median)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--sections", default="ridge,peers,hvp",
                    help="comma-separated subset of ridge,peers,hvp (targets need all)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory subprocesses on CPU")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", hg.ConvergenceWarning)  # budgets stop solves on purpose
    warnings.simplefilter("ignore", FutureWarning)  # torchopt's use of functorch.vjp
    cfg, start = (QUICK if args.quick else FULL), time.perf_counter()
    args.min_total = cfg["min_total"]
    n, d, nv = cfg["ridge"]
    ridge = make_ridge(n, d, nv, args.device)
    meta = {"section": "meta", "torch": torch.__version__, "device": args.device,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "quick": args.quick, "repeats": args.repeats,
            "n": n, "d": d, "nv": nv, "mu": ridge.mu, "L": ridge.L, "kappa": ridge.L / ridge.mu,
            "mlp": list(cfg["mlp"]["sizes"]), "mlp_batch": cfg["mlp"]["batch"]}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    print(f"# ridge n={n} d={d} nv={nv} kappa={meta['kappa']:.1f}", flush=True)
    sections = set(args.sections.split(","))
    records = bench_ridge(ridge, cfg, args) if "ridge" in sections else []
    records += bench_peers(ridge, cfg, args) if "peers" in sections else []
    records += bench_hvp(cfg, args) if "hvp" in sections else []
    if {"ridge", "hvp"} <= sections:
        records += targets(records)
    meta["total_seconds"] = time.perf_counter() - start
    records.insert(0, meta)
    print_tables(records)
    print(f"\ntotal {meta['total_seconds']:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The library side by side with its peers and with hand-written references.

Usage::

    python benchmarks/peers.py --json benchmarks/results/peers_cpu.json [--quick]
        [--sections ridge,hvp_auto,hvp_batched,implicit_memory,distill,lvhba,maml,implicit_mlp]
        [--rounds N]

Every comparison runs in one process on one thread (``torch.set_num_threads(1)``): the
implementations compared are timed interleaved (A, B, A, B …, the order reversed every
other round) after one warm-up call each, by CPU time (``time.process_time``); a fast call
is repeated inside its sample until the sample lasts about 20 ms. Reported: the median
over rounds of each side, ``ratio`` = ours ÷ peer (ratio of the medians) and ``noise``,
the interquartile range of the per-round ratios over their median (5 % at least), which
``benchmarks/check_peers.py`` allows above each target.

Each comparison also checks that the two sides computed the same thing (``agree``,
``rel_diff`` = ‖ours − peer‖ / ‖peer‖ over all leaves, ``agree_tol``): a faster wrong
answer is recorded as ``agree: false`` and its target as not met. The tolerance is the
precision the computation can promise: κ(H)·tol for a CG solve stopped at relative
residual ``tol`` (both sides against the closed form), and √ε of the dtype (half the
digits) for two routes to the same arithmetic.

Sections (``--sections`` selects; the targets are those of the project's TARGETS.md):

``ridge``
    Per-feature ridge hypergradient given w* (n = 5000, d = 1000, float64;
    ``make_ridge`` of benchmarks/hypergrad.py): ``Implicit(ConjugateGradient(tol),
    hvp="linearized", inner_steps=0)`` against torchopt's ``custom_root`` + ``solve_cg``
    with ``rtol = tol, atol = 0`` (torchopt stops at ‖r‖ ≤ max(rtol·‖b‖, atol), the same
    relative residual as ours from x₀ = 0, so the work is equal) at tol 1e-6 and 1e-8,
    and against a hand-written torch.func CG (pullback of ∇_w f, the same stopping rule).
    Each side's relative error against the closed form and its iterations are recorded.
    Target ours ÷ torchopt ≤ 0.9; best relative error (tol 1e-14) ≤ 1e-10.
``hvp_auto``
    ``Implicit(hvp="auto")`` (no state passed between calls, as a user who keeps none)
    and ``hvp(mode="auto")`` against the faster fixed form ("linearized" or "jvp") on
    the ridge and on an MLP. Target ≤ 1.05 × the best fixed form.
``hvp_batched``
    Per-vector cost of k Hessian-vector products ÷ one gradient, k = 1 … 64, MLP
    784-1024-256-10 (batch 256): the library's ``Linearization(...).matvec(V,
    batched=True)`` against ``vmap`` over one pullback of ∇_w f and a loop over that
    cached pullback. Target ≤ 1.05 × the faster of the two, at every k.
``implicit_memory``
    Peak memory of ``Implicit`` (default hvp, CG 20 iterations) on an MLP 64-512-512-10
    on scikit-learn's digits against a hand-written CG (``torch.autograd.grad`` with
    ``create_graph=True`` once, then one pullback per iteration). Each figure comes from a
    fresh subprocess that warms its implementation up, returns freed heap to the OS,
    resets the peak resident size and reports the rise of ``VmHWM`` over ``VmRSS``; the
    subprocesses alternate (ours, hand, ours, …) and the median is taken. Agreement is
    checked in float64 in the parent. Target ours ÷ hand ≤ 1.0.
``distill``
    The dataset-distillation outer step against a hand-written BPTT, from
    benchmarks/distill_step.py (``build_case``, ``library_step``, ``hand_step``) when it
    exists. Target ≤ 1.05.
``lvhba``
    LV-HBA on the known-solution toy, from benchmarks/lvhba.py (``run_ours(iterations,
    compiled)``, ``run_numpy(iterations)``) when it exists. Targets: eager ≤ 0.4 ms per
    iteration, compiled ≤ 0.1 ms, 20 000 compiled iterations ≤ 2 s.
``maml``
    MAML meta-gradient (digits-D4, 5-way 5-shot, 32 tasks, 5 inner steps; the
    implementations of benchmarks/maml.py): ``MetaLearner.meta_gradient`` against
    torchopt ``MetaSGD`` and ``higher``, agreement against the torch.func reference.
    Target ≤ 0.6 × torchopt.
``implicit_mlp``
    Implicit hypergradient on the digits MLP (float64) against torchopt's implicit
    (``custom_root`` + ``solve_cg``) with the same number of CG iterations.

The JSON is ``{"meta": {...}, "results": [row, ...]}``; a row holds ``section``,
``name``, ``ours_s``, ``peer``, ``peer_s``, ``ratio``, ``value`` (the figure compared
with ``target``: the ratio, a relative error or ms per iteration, see ``metric``),
``target``, ``met``, ``agree``, ``rel_diff``, ``agree_tol``, ``noise``, ``rounds`` and
extras; a section whose code is missing has one row with ``available: false`` and
``why``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.func import grad, vjp, vmap

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the package hypergrad, not benchmarks/hypergrad.py
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

import hypergrad as hg  # noqa: E402


def _load_bench_hypergrad() -> Any:
    """benchmarks/hypergrad.py under another name (it shares the package's name)."""
    spec = importlib.util.spec_from_file_location("bench_hypergrad", HERE / "hypergrad.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_hypergrad"] = mod
    spec.loader.exec_module(mod)
    return mod


bh = _load_bench_hypergrad()

Row = dict[str, Any]
SECTIONS = ("ridge", "hvp_auto", "hvp_batched", "implicit_memory", "distill", "lvhba", "maml",
            "implicit_mlp")
NOISE_FLOOR = 0.05
MIN_SAMPLE = 0.02  # seconds: a fast call is repeated inside one timed sample up to this
EPS_AGREE = {torch.float32: math.sqrt(torch.finfo(torch.float32).eps),
             torch.float64: math.sqrt(torch.finfo(torch.float64).eps)}
FULL = {"rounds": 7, "ridge": (5000, 1000, 1000), "ridge_maxiter": 1000,
        "mlp": ((784, 1024, 256, 10), 256), "ks": (1, 2, 4, 8, 16, 32, 64),
        "digits_mlp": (64, 512, 512, 10), "digits_train": 1000, "cg_iters": 20, "auto_cg_iters": 10,
        "memory_repeats": 3, "maml_tasks": 32, "lvhba_iters": 2000,
        "lvhba_long": 20000}
QUICK = {"rounds": 3, "ridge": (1000, 200, 200), "ridge_maxiter": 500,
         "mlp": ((784, 128, 64, 10), 64), "ks": (1, 4, 16),
         "digits_mlp": (64, 128, 128, 10), "digits_train": 500, "cg_iters": 10, "auto_cg_iters": 5,
         "memory_repeats": 1, "maml_tasks": 8, "lvhba_iters": 500,
         "lvhba_long": None}


# --------------------------------------------------------------------------- timing


def _calibrate(fn: Callable[[], Any]) -> int:
    """Calls per timed sample so that one sample lasts about ``MIN_SAMPLE`` seconds (the
    call timed is also the warm-up; a fast one is timed again once warm)."""
    once = math.inf
    for _ in range(2):
        start = time.process_time()
        fn()
        once = time.process_time() - start
        if once >= MIN_SAMPLE:
            break
    return max(1, min(1000, math.ceil(MIN_SAMPLE / max(once, 1e-6))))


def interleave(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds per call of each function, over ``rounds`` interleaved rounds.

    Every function is warmed up (one or two calls, which also calibrate), then each round
    times every function once, in the given order on even rounds and reversed on odd
    ones, so that a drift of the machine's load falls on all of them alike.
    """
    reps = {}
    for name, fn in fns.items():
        reps[name] = _calibrate(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, n = fns[name], reps[name]
            start = time.process_time()
            for _ in range(n):
                fn()
            times[name].append((time.process_time() - start) / n)
    return times


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def spread(xs: list[float]) -> float:
    """Interquartile range over the median, at least ``NOISE_FLOOR``."""
    q1, q2, q3 = quartiles(xs)
    return max(NOISE_FLOOR, (q3 - q1) / q2 if q2 > 0 else 0.0)


def paired(times: dict[str, list[float]], ours: str, peer: str) -> dict[str, Any]:
    """Medians of two sides, their ratio, and the noise of the per-round ratios."""
    a, b = times[ours], times[peer]
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    ours_s, peer_s = statistics.median(a), statistics.median(b)
    return {"ours_s": ours_s, "peer_s": peer_s, "ratio": ours_s / peer_s,
            "noise": spread(per_round), "rounds": len(a),
            "paired_ratio": statistics.median(per_round)}


# --------------------------------------------------------------------------- agreement


def leaves(x: Any) -> list[torch.Tensor]:
    """The tensors of a result (tensor, NumPy array, number, dict, list, tuple, object
    with ``grad``), in a fixed order, detached, as float64."""
    if isinstance(x, torch.Tensor):
        return [x.detach().to(torch.float64).reshape(-1)]
    if isinstance(x, dict):
        return [t for k in sorted(x, key=str) for t in leaves(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in leaves(v)]
    if isinstance(x, (int, float)):
        return [torch.tensor([float(x)], dtype=torch.float64)]
    if hasattr(x, "__array__"):
        return [torch.as_tensor(x.__array__(), dtype=torch.float64).reshape(-1)]
    if hasattr(x, "grad"):
        return leaves(x.grad)
    raise TypeError(f"cannot compare a result of type {type(x).__name__}")


def rel_diff(a: Any, b: Any) -> float:
    """‖a − b‖ / ‖b‖ over all leaves (inf when the structures differ)."""
    la, lb = leaves(a), leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb, strict=True)):
        return math.inf
    num = math.sqrt(sum(float((x - y).square().sum()) for x, y in zip(la, lb, strict=True)))
    den = math.sqrt(sum(float(y.square().sum()) for y in lb))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def row(section: str, name: str, *, peer: str | None, target: float | None,
        agree: bool | None, rel: float | None = None, agree_tol: float | None = None,
        metric: str = "ratio", value: float | None = None, **extra: Any) -> Row:
    """One result; ``value`` (default: ``extra["ratio"]``) is compared with ``target``,
    and a disagreement makes the target not met."""
    if value is None and metric == "ratio":
        value = extra.get("ratio")
    met = None if target is None or value is None else \
        bool(value <= target) and agree is not False
    out = {"section": section, "name": name, "peer": peer, "metric": metric, "value": value,
           "target": target, "met": met, "agree": agree, "rel_diff": rel,
           "agree_tol": agree_tol, **extra}
    out.setdefault("noise", 0.0 if metric in ("rel_error",) else NOISE_FLOOR)
    for key in ("ours_s", "peer_s", "ratio"):
        out.setdefault(key, None)
    return out


def unavailable(section: str, why: str) -> Row:
    return {"section": section, "name": section, "available": False, "why": why,
            "peer": None, "ours_s": None, "peer_s": None, "ratio": None, "value": None,
            "target": None, "met": None, "agree": None, "rel_diff": None}


def log(r: Row) -> None:
    if r.get("available") is False:
        print(f"  {r['section']:16} {r['name']:34} not available: {r['why']}", flush=True)
        return
    val = r.get("value")
    print(f"  {r['section']:16} {r['name']:34} value={fmt(val)} target={fmt(r.get('target'))} "
          f"met={r.get('met')} agree={r.get('agree')} rel_diff={fmt(r.get('rel_diff'))}",
          flush=True)


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


# --------------------------------------------------------------------------- ridge


def ours_ridge(r: Any, tol: float, maxiter: int, hvp: str = "linearized") -> Callable[[], Any]:
    """hypergrad's implicit CG on the ridge at w* (estimator built once)."""
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=tol, maxiter=maxiter), hvp=hvp,
                      inner_steps=0)
    problem = r.problem(0)

    def run() -> Any:
        return est(problem, {"lam": r.lam}, {"w": r.w_star})

    return run


def torchopt_ridge(r: Any, tol: float, maxiter: int,
                   counter: list[int] | None = None) -> Callable[[], torch.Tensor]:
    """torchopt ``custom_root`` + ``solve_cg(rtol=tol, atol=0)`` at w* (cf.
    ``torchopt_cg`` of benchmarks/hypergrad.py, which fixes the iterations instead)."""
    import torchopt

    def optimality(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return grad(bh.ridge_inner)({"w": w}, {"lam": lam}, (r.X, r.y))["w"]

    cg = torchopt.linear_solve.solve_cg(rtol=tol, atol=0.0, maxiter=maxiter)

    def solve(matvec: Callable, b: Any) -> Any:
        if counter is None:
            return cg(matvec, b)

        def counted(v: Any) -> Any:
            counter[0] += 1
            return matvec(v)

        return cg(counted, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return r.w_star.clone()

    def run() -> torch.Tensor:
        lam = r.lam.clone().requires_grad_(True)
        w = solver(r.w_star, lam)
        (g,) = torch.autograd.grad(bh.ridge_outer({"w": w}, None, (r.Xv, r.yv)), lam)
        return g

    return run


def hand_cg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float,
            maxiter: int) -> tuple[torch.Tensor, int]:
    """Plain CG from 0 on one tensor, stopped at ‖r‖ ≤ tol·‖b‖ (one host sync per step)."""
    x = torch.zeros_like(b)
    res = b.clone()
    p = res.clone()
    rs = torch.dot(res.reshape(-1), res.reshape(-1))
    stop = (tol * b.norm()) ** 2
    k = 0
    while k < maxiter and bool(rs > stop):
        Ap = matvec(p)
        alpha = rs / torch.dot(p.reshape(-1), Ap.reshape(-1))
        x.add_(alpha * p)
        res.sub_(alpha * Ap)
        rs_new = torch.dot(res.reshape(-1), res.reshape(-1))
        p = res + (rs_new / rs) * p
        rs = rs_new
        k += 1
    return x, k


def torchfunc_ridge(r: Any, tol: float, maxiter: int,
                    counter: list[int] | None = None) -> Callable[[], torch.Tensor]:
    """Hand-written: v = H⁻¹∇_w F by CG on the pullback of ∇_w f, then −∂²_λw f · v."""
    batch = (r.X, r.y)

    def grad_w(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return grad(bh.ridge_inner)({"w": w}, {"lam": lam}, batch)["w"]

    def run() -> torch.Tensor:
        _, pull_w = vjp(lambda w: grad_w(w, r.lam), r.w_star)
        b = grad(bh.ridge_outer)({"w": r.w_star}, None, (r.Xv, r.yv))["w"]
        v, k = hand_cg(lambda u: pull_w(u)[0], b, tol, maxiter)
        if counter is not None:
            counter[0] = k
        _, pull_lam = vjp(lambda lam: grad_w(r.w_star, lam), r.lam)
        return -pull_lam(v)[0]

    return run


def ridge_agree_tol(r: Any, tol: float) -> float:
    """Relative error a solve stopped at relative residual ``tol`` may leave: κ(A)·tol
    (and never below the float64 rounding floor √ε)."""
    return max((r.L / r.mu) * tol, EPS_AGREE[torch.float64])


def section_ridge(cfg: dict, rounds: int) -> list[Row]:
    n, d, nv = cfg["ridge"]
    r = bh.make_ridge(n, d, nv, "cpu")
    kappa = r.L / r.mu
    print(f"# ridge n={n} d={d} nv={nv} kappa={kappa:.1f}", flush=True)
    rows = []
    maxiter = cfg["ridge_maxiter"]
    for tol in (1e-6, 1e-8):
        fns = {"ours": ours_ridge(r, tol, maxiter), "torchopt": torchopt_ridge(r, tol, maxiter),
               "torchfunc": torchfunc_ridge(r, tol, maxiter)}
        times = interleave(fns, rounds)
        res = fns["ours"]()
        g_ours = res.grad["lam"]
        count_to, count_tf = [0], [0]
        g_to = torchopt_ridge(r, tol, maxiter, count_to)()
        g_tf = torchfunc_ridge(r, tol, maxiter, count_tf)()
        err = {"ours": bh.rel_error(g_ours, r.g_star), "torchopt": bh.rel_error(g_to, r.g_star),
               "torchfunc": bh.rel_error(g_tf, r.g_star)}
        iters = {"ours": res.diagnostics.solve_iterations,
                 "torchopt": count_to[0] - 1,  # less the product A x₀ for r₀ = b − A x₀
                 "torchfunc": count_tf[0]}
        atol = ridge_agree_tol(r, tol)
        for peer, peer_name in (("torchopt", "torchopt solve_cg"),
                                ("torchfunc", "torch.func CG (hand)")):
            g_peer = g_to if peer == "torchopt" else g_tf
            rel = rel_diff(g_ours, g_peer)
            rows.append(row(
                "ridge", f"ridge tol={tol:g} vs {peer}", peer=peer_name,
                target=0.9 if peer == "torchopt" else None,
                agree=err["ours"] <= atol and rel <= atol, rel=rel, agree_tol=atol,
                **paired(times, "ours", peer), tol=tol, kappa=kappa,
                ours_rel_error=err["ours"], peer_rel_error=err[peer],
                ours_iterations=iters["ours"], peer_iterations=iters[peer],
                n=n, d=d, dtype="float64"))
            log(rows[-1])
    # the best relative error reachable (the peers at the same setting, for reference)
    tol = 1e-14
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ours_ridge(r, tol, maxiter)()
        g_to = torchopt_ridge(r, tol, maxiter)()
        g_tf = torchfunc_ridge(r, tol, maxiter)()
    err_ours = bh.rel_error(res.grad["lam"], r.g_star)
    rel = rel_diff(res.grad["lam"], g_to)
    rows.append(row("ridge", "ridge best rel. error (tol=1e-14)", peer="torchopt solve_cg",
                    target=1e-10, agree=rel <= ridge_agree_tol(r, tol), metric="rel_error",
                    value=err_ours, rel=rel, agree_tol=ridge_agree_tol(r, tol),
                    ours_rel_error=err_ours, peer_rel_error=bh.rel_error(g_to, r.g_star),
                    torchfunc_rel_error=bh.rel_error(g_tf, r.g_star),
                    ours_iterations=res.diagnostics.solve_iterations, tol=tol, noise=0.0))
    log(rows[-1])
    return rows


# --------------------------------------------------------------------------- MLPs


def mlp_outer(p: dict, h: dict, batch: tuple) -> torch.Tensor:
    """Cross-entropy of the MLP of ``bh.mlp_loss`` (no decay)."""
    return bh.mlp_loss(p, {"log_wd": torch.tensor(-math.inf)}, batch)


def digits_case(sizes: tuple[int, ...], n_train: int, dtype: torch.dtype,
                log_wd: float = math.log(1e-2)) -> dict[str, Any]:
    """scikit-learn digits (pixels / 16), an MLP of ``sizes`` and a weight decay e^log_wd."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=dtype)
    y = torch.tensor(y_np, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, va = perm[:n_train], perm[n_train:]
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"W{i}"] = torch.randn(b, a, generator=g, dtype=dtype) / math.sqrt(a)
        params[f"b{i}"] = torch.zeros(b, dtype=dtype)
    return {"params": params, "hparams": {"log_wd": torch.tensor(log_wd, dtype=dtype)},
            "train": (x[tr], y[tr]), "val": (x[va], y[va])}


def digits_problem(case: dict) -> hg.Problem:
    return hg.Problem(bh.mlp_loss, mlp_outer, case["train"], case["val"],
                      optimizer=hg.SGD(lr=0.1), steps=0)


def ours_implicit_mlp(case: dict, iters: int, hvp: str = "auto") -> Callable[[], Any]:
    """``Implicit`` with CG for exactly ``iters`` iterations (tol 0) at the given params."""
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=0.0, maxiter=iters), hvp=hvp,
                      inner_steps=0, inner_tol=None, warm_start=False)
    problem = digits_problem(case)
    return lambda: est(problem, case["hparams"], case["params"])


def hand_implicit_mlp(case: dict, iters: int) -> Callable[[], torch.Tensor]:
    """Hand-written implicit hypergradient: ∇_w f with ``create_graph=True`` once, CG for
    ``iters`` iterations on its pullbacks, then −∂²_λw f · v (∇_λ F = 0 here)."""
    names = list(case["params"])

    def run() -> torch.Tensor:
        ws = [case["params"][k].detach().requires_grad_(True) for k in names]
        lam = case["hparams"]["log_wd"].detach().requires_grad_(True)
        loss = bh.mlp_loss(dict(zip(names, ws, strict=True)), {"log_wd": lam}, case["train"])
        gw = torch.autograd.grad(loss, ws, create_graph=True)
        outer = mlp_outer(dict(zip(names, ws, strict=True)), {}, case["val"])
        b = [t.detach() for t in torch.autograd.grad(outer, ws)]
        x = [torch.zeros_like(t) for t in b]
        res = [t.clone() for t in b]
        p = [t.clone() for t in b]
        rs = sum(torch.dot(t.reshape(-1), t.reshape(-1)) for t in res)
        for _ in range(iters):
            Ap = torch.autograd.grad(gw, ws, p, retain_graph=True)
            pAp = sum(torch.dot(a.reshape(-1), c.reshape(-1)) for a, c in zip(p, Ap, strict=True))
            alpha = rs / pAp
            for xi, ri, pi, ai in zip(x, res, p, Ap, strict=True):
                xi.add_(alpha * pi)
                ri.sub_(alpha * ai)
            rs_new = sum(torch.dot(t.reshape(-1), t.reshape(-1)) for t in res)
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(res, p, strict=True)]
            rs = rs_new
        (g_lam,) = torch.autograd.grad(gw, lam, x)
        return -g_lam

    return run


def torchopt_implicit_mlp(case: dict, iters: int) -> Callable[[], torch.Tensor]:
    """torchopt ``custom_root`` (optimality ∇_w f) + ``solve_cg`` for ``iters`` iterations."""
    import torchopt

    names = list(case["params"])

    def optimality(ws: tuple, lam: torch.Tensor) -> tuple:
        g = grad(bh.mlp_loss)(dict(zip(names, ws, strict=True)), {"log_wd": lam},
                              case["train"])
        return tuple(g[k] for k in names)

    solve = torchopt.linear_solve.solve_cg(rtol=0.0, atol=0.0, maxiter=iters)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(ws: tuple, lam: torch.Tensor) -> tuple:
        return tuple(w.detach().clone() for w in ws)

    def run() -> torch.Tensor:
        lam = case["hparams"]["log_wd"].detach().requires_grad_(True)
        ws = solver(tuple(case["params"][k] for k in names), lam)
        outer = mlp_outer(dict(zip(names, ws, strict=True)), {}, case["val"])
        (g,) = torch.autograd.grad(outer, lam)
        return g

    return run


# --------------------------------------------------------------------------- hvp_auto


def section_hvp_auto(cfg: dict, rounds: int) -> list[Row]:
    rows: list[Row] = []
    n, d, nv = cfg["ridge"]
    r = bh.make_ridge(n, d, nv, "cpu")
    tol = 1e-8
    # Implicit on the ridge: auto vs the fixed forms, same CG
    fns = {m: ours_ridge(r, tol, cfg["ridge_maxiter"], hvp=m) for m in ("auto", "linearized",
                                                                           "jvp")}
    rows.append(auto_row("ridge: Implicit(hvp='auto')", fns, rounds, torch.float64,
                         lambda out: out.grad["lam"], lambda out: out.state.get("hvp_mode"),
                         agree_tol=ridge_agree_tol(r, tol), tol=tol))
    # one product on the ridge
    p, h, batch = {"w": r.w_star}, {"lam": r.lam}, (r.X, r.y)
    v = {"w": torch.randn(r.w_star.shape, generator=torch.Generator().manual_seed(3),
                          dtype=r.w_star.dtype)}
    fns = {m: (lambda m=m: hg.hvp(bh.ridge_inner, p, h, batch, v, mode=m))
           for m in ("auto", "linearized", "jvp")}
    rows.append(auto_row("ridge: hvp(mode='auto')", fns, rounds, torch.float64,
                         lambda out: out, None))
    # one product on the MLP 784-…-10 (float32)
    sizes, bs = cfg["mlp"]
    p, h, batch = bh.make_mlp(sizes, bs, "cpu")
    g = torch.Generator().manual_seed(4)
    v = {k: torch.randn(x.shape, generator=g) for k, x in p.items()}
    fns = {m: (lambda m=m: hg.hvp(bh.mlp_loss, p, h, batch, v, mode=m))
           for m in ("auto", "linearized", "jvp")}
    rows.append(auto_row(f"MLP {'-'.join(map(str, sizes))}: hvp(mode='auto')", fns, rounds,
                         torch.float32, lambda out: out, None))
    # Implicit on the digits MLP (float32)
    case = digits_case(cfg["digits_mlp"], cfg["digits_train"], torch.float32)
    fns = {m: ours_implicit_mlp(case, cfg["auto_cg_iters"], hvp=m) for m in ("auto", "linearized",
                                                                         "jvp")}
    rows.append(auto_row(f"digits MLP {'-'.join(map(str, cfg['digits_mlp']))}: "
                         "Implicit(hvp='auto')", fns, rounds, torch.float32,
                         lambda out: out.grad, lambda out: out.state.get("hvp_mode")))
    return rows


def auto_row(name: str, fns: dict[str, Callable[[], Any]], rounds: int, dtype: torch.dtype,
             value_of: Callable[[Any], Any], mode_of: Callable[[Any], Any] | None,
             agree_tol: float | None = None, **extra: Any) -> Row:
    """``fns["auto"]`` against the faster of ``fns["linearized"]`` and ``fns["jvp"]``."""
    times = interleave(fns, rounds)
    best = min(("linearized", "jvp"), key=lambda m: statistics.median(times[m]))
    out = {m: fn() for m, fn in fns.items()}
    chosen = mode_of(out["auto"]) if mode_of else None
    tol = agree_tol if agree_tol is not None else EPS_AGREE[dtype]
    rel = rel_diff(value_of(out["auto"]), value_of(out[best]))
    r = row("hvp_auto", name, peer=f"best fixed form = {best}", target=1.05, agree=rel <= tol,
            rel=rel, agree_tol=tol, **paired(times, "auto", best), best_fixed=best,
            chosen=chosen, other_fixed_s=statistics.median(
                times["jvp" if best == "linearized" else "linearized"]), **extra)
    log(r)
    return r


# --------------------------------------------------------------------------- hvp_batched


def section_hvp_batched(cfg: dict, rounds: int) -> list[Row]:
    sizes, bs = cfg["mlp"]
    p, h, batch = bh.make_mlp(sizes, bs, "cpu")
    grad_w = lambda w: grad(bh.mlp_loss)(w, h, batch)  # noqa: E731
    lin = hg.Linearization(bh.mlp_loss, p, h, batch)
    _, pull = vjp(grad_w, p)
    one = lambda u: pull(u)[0]  # noqa: E731
    gen = torch.Generator().manual_seed(5)
    rows = []
    for k in cfg["ks"]:
        V = {n: torch.randn(k, *x.shape, generator=gen) for n, x in p.items()}

        def loop(V: dict = V, k: int = k) -> dict:
            outs = [one({n: x[i] for n, x in V.items()}) for i in range(k)]
            return {n: torch.stack([o[n] for o in outs]) for n in V}

        fns = {"ours": lambda V=V: lin.matvec(V, batched=True),
               "vmap": lambda V=V: vmap(one)(V), "loop": loop,
               "grad": lambda: grad_w(p)}
        times = interleave(fns, rounds)
        best = min(("vmap", "loop"), key=lambda m: statistics.median(times[m]))
        ref = loop()
        rel = rel_diff(fns["ours"](), ref)
        tol = EPS_AGREE[torch.float32]
        t_grad = statistics.median(times["grad"])
        per_vec = {m: statistics.median(times[m]) / (k * t_grad) for m in ("ours", "vmap", "loop")}
        r = row("hvp_batched", f"k={k} batched HVPs", peer=f"min(vmap, loop) = {best}",
                target=1.05, agree=rel <= tol, rel=rel, agree_tol=tol,
                **paired(times, "ours", best), k=k, grad_s=t_grad,
                ours_per_vector_over_grad=per_vec["ours"],
                vmap_per_vector_over_grad=per_vec["vmap"],
                loop_per_vector_over_grad=per_vec["loop"], mode=lin.mode,
                mlp="-".join(map(str, sizes)), batch=bs)
        rows.append(r)
        log(r)
    return rows


# --------------------------------------------------------------------------- implicit_memory


def proc_mib(key: str) -> float:
    """``VmHWM`` or ``VmRSS`` of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def reset_peak() -> bool:
    """Return freed heap to the OS and reset ``VmHWM`` to ``VmRSS``; False where impossible."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_child(spec: dict) -> dict:
    """In a fresh process: one implementation's peak resident increase in MiB."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    case = digits_case(tuple(spec["sizes"]), spec["n_train"], torch.float32)
    make = ours_implicit_mlp if spec["impl"] == "ours" else hand_implicit_mlp
    make(case, 2)()  # warm-up: first-call costs, the self-check (not measured)
    fn = make(case, spec["iters"])
    fn()
    reset_ok = reset_peak()
    before = proc_mib("VmRSS")
    out = fn()
    peak = proc_mib("VmHWM") - before
    value = out.grad["log_wd"] if spec["impl"] == "ours" else out
    return {"peak_mib": peak, "reset_ok": reset_ok, "value": float(value)}


def section_implicit_memory(cfg: dict, rounds: int) -> list[Row]:
    sizes, n_train, iters = cfg["digits_mlp"], cfg["digits_train"], cfg["cg_iters"]
    peaks: dict[str, list[float]] = {"ours": [], "hand": []}
    values: dict[str, float] = {}
    reset_ok = True
    for _ in range(cfg["memory_repeats"]):
        for impl in ("ours", "hand"):
            spec = {"impl": impl, "sizes": list(sizes), "n_train": n_train, "iters": iters}
            out = subprocess.run([sys.executable, __file__, "--json", "-", "--memory-child",
                                  json.dumps(spec)], capture_output=True, text=True,
                                 timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                   "PYTHONHASHSEED": "0"})
            if out.returncode != 0:
                tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"memory subprocess ({impl}) exited with "
                                   f"{out.returncode}: {tail[0]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[impl].append(res["peak_mib"])
            values[impl] = res["value"]
            reset_ok = reset_ok and res["reset_ok"]
    # agreement in float64, in this process
    case64 = digits_case(sizes, n_train, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g_ours = ours_implicit_mlp(case64, iters)().grad["log_wd"]
    g_hand = hand_implicit_mlp(case64, iters)()
    rel = rel_diff(g_ours, g_hand)
    tol = EPS_AGREE[torch.float64]
    ours_m, hand_m = statistics.median(peaks["ours"]), statistics.median(peaks["hand"])
    per = [a / b for a, b in zip(peaks["ours"], peaks["hand"], strict=True)]
    r = row("implicit_memory", f"peak MiB, MLP {'-'.join(map(str, sizes))}, CG {iters}",
            peer="hand-written CG (autograd, create_graph)", target=1.0, agree=rel <= tol,
            rel=rel, agree_tol=tol, metric="ratio", ours_mib=ours_m, peer_mib=hand_m,
            ratio=ours_m / hand_m if hand_m > 0 else math.inf, noise=spread(per),
            rounds=len(per), ours_mib_all=peaks["ours"], peer_mib_all=peaks["hand"],
            float32_rel_diff=abs(values["ours"] - values["hand"]) / abs(values["hand"]),
            peak_reset=reset_ok, agreement_dtype="float64", memory_dtype="float32")
    log(r)
    return [r]


# --------------------------------------------------------------------------- distill, lvhba


def import_optional(name: str) -> tuple[Any, str]:
    """benchmarks/<name>.py as a module, or (None, why)."""
    if not (HERE / f"{name}.py").exists():
        return None, f"benchmarks/{name}.py does not exist"
    try:
        return __import__(name), ""
    except Exception as e:  # noqa: BLE001 - recorded as the reason
        return None, f"import {name} failed: {type(e).__name__}: {e}"


def call_with(fn: Callable, **kw: Any) -> Any:
    """``fn`` with those of ``kw`` it accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kw)
    return fn(**{k: v for k, v in kw.items() if k in params})


def section_distill(cfg: dict, rounds: int, quick: bool) -> list[Row]:
    mod, why = import_optional("distill_step")
    if mod is None:
        return [unavailable("distill", why)]
    missing = [f for f in ("build_case", "library_step", "hand_step") if not hasattr(mod, f)]
    if missing:
        return [unavailable("distill", f"distill_step lacks {', '.join(missing)}")]
    inner_steps = 10 if quick else 30
    case = call_with(mod.build_case, quick=quick, inner_steps=inner_steps)
    fns = {"ours": lambda: mod.library_step(case), "hand": lambda: mod.hand_step(case)}
    generic = None  # the hand-written BPTT through functional_call (any network), if offered
    if hasattr(mod, "hand_side"):
        generic = mod.hand_side(case.distiller, explicit=False)
        fns["hand_functional_call"] = lambda: mod.hand_step(generic)
    times = interleave(fns, rounds)
    extra: dict[str, Any] = {"inner_steps": inner_steps}
    rel: float | None
    if hasattr(mod, "agreement"):  # the two hypergradients at one step, in float64
        rel = float(call_with(mod.agreement, inner_steps=inner_steps))
        tol: float | None = EPS_AGREE[torch.float64]
        extra["agreement"] = "hypergradients at outer step 0, float64 (distill_step.agreement)"
    else:  # the outer losses the two steps return
        rel = rel_diff(fns["ours"](), fns["hand"]())
        tol = EPS_AGREE[torch.float32]
        extra["agreement"] = "outer losses of one more step of each"
    with contextlib.suppress(Exception):  # after the same steps on both sides (float32)
        extra["trajectory_rel_diff"] = float(mod.relative_difference(case.distiller.hparams,
                                                                     case.hparams))
    r = row("distill", "distillation outer step", peer="hand-written BPTT (F.linear)",
            target=1.05, agree=rel <= tol, rel=rel, agree_tol=tol,
            **paired(times, "ours", "hand"), **extra)
    log(r)
    rows = [r]
    if generic is not None:
        r2 = row("distill", "distillation outer step vs functional_call BPTT",
                 peer="hand-written BPTT (torch.func.functional_call)", target=None,
                 agree=rel <= tol, rel=rel, agree_tol=tol,
                 **paired(times, "ours", "hand_functional_call"), **extra)
        log(r2)
        rows.append(r2)
    return rows


def section_lvhba(cfg: dict, rounds: int) -> list[Row]:
    mod, why = import_optional("lvhba")
    if mod is None:
        return [unavailable("lvhba", why)]
    missing = [f for f in ("run_ours", "run_numpy") if not hasattr(mod, f)]
    if missing:
        return [unavailable("lvhba", f"lvhba lacks {', '.join(missing)}")]
    iters = cfg["lvhba_iters"]
    rows = []
    first: dict[str, float] = {}
    for compiled in (False, True):
        start = time.process_time()
        try:
            mod.run_ours(iters, compiled)
        except Exception as e:  # noqa: BLE001 - e.g. no compiler for torch.compile
            rows.append(row("lvhba", f"compiled={compiled}", peer=None, target=None,
                            agree=None, error=f"{type(e).__name__}: {e}"))
            continue
        first[str(compiled)] = time.process_time() - start
    ok = {c for c in (False, True) if str(c) in first}
    fns: dict[str, Callable[[], Any]] = {f"ours_{c}": (lambda c=c: mod.run_ours(iters, c))
                                         for c in ok}
    fns["numpy"] = lambda: mod.run_numpy(iters)
    times = interleave(fns, rounds)
    ref = fns["numpy"]()
    for c in sorted(ok):
        out = fns[f"ours_{c}"]()
        try:
            rel: float | None = rel_diff(_solution(out), _solution(ref))
        except TypeError:
            rel = None
        tol = EPS_AGREE[torch.float64]  # the same float64 iteration on both sides
        ms = statistics.median(times[f"ours_{c}"]) / iters * 1e3
        p = paired(times, f"ours_{c}", "numpy")
        noise = spread([t / iters * 1e3 / ms for t in times[f"ours_{c}"]])
        label = "compiled" if c else "eager"
        rows.append(row("lvhba", f"{label} ms/iteration", peer="NumPy (hand)",
                        target=0.1 if c else 0.4, agree=None if rel is None else rel <= tol,
                        rel=rel, agree_tol=tol, metric="ms_per_iter", value=ms,
                        **{**p, "noise": noise}, iterations=iters,
                        numpy_ms_per_iter=p["peer_s"] / iters * 1e3,
                        first_call_s=first[str(c)]))
        log(rows[-1])
        if c:  # 20 000 iterations in one call (scaled from ``iters`` in a quick run)
            long = cfg["lvhba_long"]
            final = None
            if long:
                runs = []
                for _ in range(3):
                    start = time.process_time()
                    final = mod.run_ours(long, True)
                    runs.append(time.process_time() - start)
                total, noise = statistics.median(runs), spread(runs)
            else:
                total = statistics.median(times[f"ours_{c}"]) * 20000 / iters
            rows.append(row("lvhba", "compiled 20k iterations, s", peer=None, target=2.0,
                            agree=rows[-1]["agree"], rel=rel, agree_tol=tol,
                            metric="seconds", value=total, noise=noise,
                            measured_iterations=long or iters, extrapolated=not long))
            log(rows[-1])
            if isinstance(final, dict) and "rel_error_x" in final:
                rows.append(row("lvhba", f"rel. error in x after {long} iterations",
                                peer=None, target=3e-3, agree=rows[-1]["agree"],
                                metric="rel_error", value=float(final["rel_error_x"]),
                                noise=0.0))
                log(rows[-1])
    return rows


def _solution(out: Any) -> Any:
    """The x of an LV-HBA run's result (a dict with "x", a tuple starting with x, or x)."""
    if isinstance(out, dict) and "x" in out:
        return out["x"]
    if isinstance(out, tuple) and out:
        return out[0]
    return out


# --------------------------------------------------------------------------- maml


def section_maml(cfg: dict, rounds: int) -> list[Row]:
    mod, why = import_optional("maml")
    if mod is None:
        return [unavailable("maml", why)]
    ok, why = mod.ours_available()
    if not ok:
        return [unavailable("maml", why)]
    tasks = mod.make_tasks(cfg["maml_tasks"], "cpu", torch.float32)
    net0 = mod.make_net()
    lr, steps = mod.INNER_LR, mod.INNER_STEPS
    fns = {"ours": mod.impl_ours(copy.deepcopy(net0), tasks, lr, steps),
           "torchopt": mod.impl_torchopt(copy.deepcopy(net0), tasks, lr, steps),
           "higher": mod.impl_higher(copy.deepcopy(net0), tasks, lr, steps)}
    times = interleave(fns, rounds)
    ref_loss, ref_params = mod.torchfunc_meta_loss(copy.deepcopy(net0), tasks, lr, steps)
    ref = [g.detach() for g in torch.autograd.grad(ref_loss, ref_params)]
    tol = mod.TOL[torch.float32]
    rels = {k: rel_max(fn(), ref) for k, fn in fns.items()}
    rows = []
    for peer, target in (("torchopt", mod.TARGET_RATIO), ("higher", None)):
        agree = rels["ours"] <= tol and rels[peer] <= tol
        rows.append(row("maml", f"MAML meta-gradient, {cfg['maml_tasks']} tasks vs {peer}",
                        peer=peer, target=target, agree=agree, rel=rels["ours"],
                        agree_tol=tol, peer_rel_diff=rels[peer],
                        agreement="max abs difference / max abs entry, against the "
                                  "torch.func reference (benchmarks/maml.py)",
                        **paired(times, "ours", peer), tasks=cfg["maml_tasks"]))
        log(rows[-1])
    return rows


def rel_max(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max |got − ref| / max |ref| (the agreement measure of benchmarks/maml.py)."""
    scale = max(float(g.abs().max()) for g in ref)
    return max(float((a.detach() - b).abs().max()) for a, b in zip(got, ref, strict=True)) \
        / scale


# --------------------------------------------------------------------------- implicit_mlp


def section_implicit_mlp(cfg: dict, rounds: int) -> list[Row]:
    try:
        import torchopt  # noqa: F401
    except ImportError as e:
        return [unavailable("implicit_mlp", f"torchopt not importable: {e}")]
    case = digits_case(cfg["digits_mlp"], cfg["digits_train"], torch.float64)
    iters = cfg["cg_iters"]
    fns = {"ours": ours_implicit_mlp(case, iters), "torchopt": torchopt_implicit_mlp(case, iters),
           "hand": hand_implicit_mlp(case, iters)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ConvergenceWarning)
        times = interleave(fns, rounds)
        g_ours = fns["ours"]().grad["log_wd"]
    g_to, g_hand = fns["torchopt"](), fns["hand"]()
    tol = EPS_AGREE[torch.float64]
    rows = []
    for peer, label, g in (("torchopt", "torchopt custom_root + solve_cg", g_to),
                           ("hand", "hand-written CG (autograd)", g_hand)):
        rel = rel_diff(g_ours, g)
        rows.append(row("implicit_mlp", f"digits MLP {'-'.join(map(str, cfg['digits_mlp']))}, "
                                        f"CG {iters} vs {peer}", peer=label,
                        target=1.0 if peer == "torchopt" else None, agree=rel <= tol, rel=rel,
                        agree_tol=tol, **paired(times, "ours", peer), dtype="float64"))
        log(rows[-1])
    return rows


# --------------------------------------------------------------------------- report


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def print_table(results: list[Row]) -> None:
    print(f"\n{'section':16} {'comparison':44} {'ours':>10} {'peer':>10} {'value':>9} "
          f"{'target':>7} {'met':>5} {'agree':>5}")
    for r in results:
        if r.get("available") is False:
            print(f"{r['section']:16} {r['name']:44} not available ({r['why']})")
            continue
        ours = r.get("ours_s") if r.get("ours_s") is not None else r.get("ours_mib")
        peer = r.get("peer_s") if r.get("peer_s") is not None else r.get("peer_mib")
        print(f"{r['section']:16} {r['name'][:44]:44} {fmt(ours):>10} {fmt(peer):>10} "
              f"{fmt(r.get('value')):>9} {fmt(r.get('target')):>7} {fmt(r.get('met')):>5} "
              f"{fmt(r.get('agree')):>5}")


def markdown_table(results: list[Row]) -> str:
    """The rows as the Markdown table of docs/benchmarks.md (ms, or MiB for memory)."""
    lines = ["| comparison | ours | peer | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("available") is False:
            lines.append(f"| {r['section']}: not available ({r['why']}) | – | – | – | – | – |")
            continue
        metric = r.get("metric")
        if r.get("ours_mib") is not None:
            ours, peer = f"{r['ours_mib']:.1f} MiB", f"{r['peer_mib']:.1f} MiB"
        elif metric == "ms_per_iter":
            ours = f"{r['value']:.3g} ms/iter"
            peer = f"{r['numpy_ms_per_iter']:.3g} ms/iter" if "numpy_ms_per_iter" in r else "–"
        elif metric == "seconds":
            ours, peer = f"{r['value']:.3g} s", "–"
        elif metric == "rel_error":
            ours = f"{r['value']:.2e}"
            peer = f"{r['peer_rel_error']:.2e}" if r.get("peer_rel_error") else "–"
        else:
            ours = "–" if r.get("ours_s") is None else f"{1e3 * r['ours_s']:.3g} ms"
            peer = "–" if r.get("peer_s") is None else f"{1e3 * r['peer_s']:.3g} ms"
        target = "–" if r.get("target") is None else f"≤ {r['target']:g}"
        met = {True: "yes", False: "**no**", None: "–"}[r.get("met")]
        if r.get("agree") is False:
            met += " (results disagree)"
        name = f"{r['section']}: {r['name']}" + (f" ({r['peer']})" if r.get("peer") else "")
        lines.append(f"| {name} | {ours} | {peer} | {fmt(r.get('value'))} | {target} | {met} |")
    return "\n".join(lines)


RUNNERS: dict[str, Callable[[dict, int, argparse.Namespace], list[Row]]] = {
    "ridge": lambda c, n, a: section_ridge(c, n),
    "hvp_auto": lambda c, n, a: section_hvp_auto(c, n),
    "hvp_batched": lambda c, n, a: section_hvp_batched(c, n),
    "implicit_memory": lambda c, n, a: section_implicit_memory(c, n),
    "distill": lambda c, n, a: section_distill(c, n, a.quick),
    "lvhba": lambda c, n, a: section_lvhba(c, n),
    "maml": lambda c, n, a: section_maml(c, n),
    "implicit_mlp": lambda c, n, a: section_implicit_mlp(c, n),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="output file of the results")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per comparison (default 7, 3 with --quick)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # torchopt's use of functorch.vjp
    warnings.simplefilter("ignore", hg.ConvergenceWarning)  # fixed CG budgets on purpose
    cfg = QUICK if args.quick else FULL
    rounds = args.rounds or cfg["rounds"]
    meta = {"cpu_model": bh.cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torchopt": version("torchopt"),
            "higher": version("higher"), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
            "rounds": rounds, "sections": sections, "timer": "time.process_time",
            "noise_floor": NOISE_FLOOR}
    results: list[Row] = []
    start = time.perf_counter()
    for s in sections:
        t0 = time.perf_counter()
        print(f"# section {s}", flush=True)
        try:
            results += RUNNERS[s](cfg, rounds, args)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            results.append({**unavailable(s, f"failed: {type(e).__name__}: {e}"),
                            "error": True})
            log(results[-1])
        meta.setdefault("section_seconds", {})[s] = round(time.perf_counter() - t0, 1)
    meta["total_seconds"] = round(time.perf_counter() - start, 1)
    print_table(results)
    print("\n" + markdown_table(results))
    print(f"\ntotal {meta['total_seconds']:.0f} s")
    out = {"meta": meta, "results": results}
    if args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

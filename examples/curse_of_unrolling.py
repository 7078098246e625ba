"""The curse of unrolling (Scieur, Gidel, Bertrand, Pedregosa, NeurIPS 2022), measured.

On f(x, θ) = ½ xᵀ(H₀ + θI)x + bᵀx with the eigenvalues of H₀ spread over [μ, L] (both
ends included), run gradient descent with steps h ∈ {0.5/L, 1/L, 2/(L+μ), 1.99/L} and the
Chebyshev method from a fixed x₀, and follow against the iteration t

- the iterate error ‖x_t − x*‖ / ‖x₀ − x*‖, and
- the error of the unrolled Jacobian ‖∂x_t/∂θ − ∂x*/∂θ‖ / ‖∂x*/∂θ‖ at θ = 0,

both computed by the library: the iterates by ``problem.step`` (the inner steps that
``hg.Unrolled`` differentiates) and the Jacobians ∂x_t/∂θ for every t at once by one
forward-mode JVP through those steps; at a few t the projection of the Jacobian error on
its own direction is recomputed by ``hg.hypergradient(..., hg.Unrolled(mode="forward"))``
with the linear outer objective cᵀx and must agree. The closed forms of the paper,

    x_t − x* = P_t(H)(x₀ − x*),   ∂x_t − ∂x* = −P_t(H) ∂x* + P_t′(H)(x₀ − x*),

with ∂x* = −H⁻¹x* and P_t the method's residual polynomial, are overlaid (dashed). For
gradient descent the Jacobian error of the slowest mode behaves like t·h·ρ^{t−1}: it first
grows (burn-in), peaks near t ≈ 1/(1 − ρ), ρ = max_λ |1 − hλ|, then decays. Run from the
repository root:

    python examples/curse_of_unrolling.py [--steps 1000] [--dim 50] [--mu 1] [--L 100]
        [--out runs/curse_of_unrolling] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.func import jvp

import hypergrad as hg

DT = torch.float64
#: a relative error counted as "reached" in the table
TOLERANCE = 1e-6
Polynomials = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def make_quadratic(dim: int = 50, mu: float = 1.0, L: float = 100.0, seed: int = 0,
                   b_scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A random quadratic with eigenvalues ``linspace(mu, L, dim)`` (float64).

    x₀ has unit norm with equal weight on every eigen-direction (random signs); b is small
    (‖b‖ = ``b_scale``), so the start is far from the solution compared with its size:
    the regime where the P_t′ term, hence the burn-in, dominates the Jacobian error.

    Args:
        dim: the dimension d (≥ 2).
        mu, L: the smallest and largest eigenvalue, 0 < mu < L.
        seed: seed of the eigenvectors, of x₀'s signs and of b's direction.
        b_scale: ‖b‖ (> 0).

    Returns:
        ``{"eig": (d,), "Q": (d, d) orthogonal, "b": (d,), "x0": (d,)}``.

    Raises:
        ValueError: ``dim < 2``, ``not 0 < mu < L`` or ``b_scale <= 0``.
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (both ends of [mu, L] are eigenvalues), got {dim}")
    if not 0 < mu < L:
        raise ValueError(f"need 0 < mu < L, got mu={mu}, L={L}")
    if not b_scale > 0:
        raise ValueError(f"b_scale must be > 0, got {b_scale}")
    g = torch.Generator().manual_seed(seed)
    eig = torch.linspace(mu, L, dim, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    signs = torch.randint(0, 2, (dim,), generator=g).to(DT) * 2 - 1
    x0 = Q @ (signs / math.sqrt(dim))
    b = torch.randn(dim, generator=g, dtype=DT)
    return {"eig": eig, "Q": Q, "b": b_scale * b / b.norm(), "x0": x0}


def make_problem(quad: dict[str, torch.Tensor], optimizer: Any, steps: int,
                 c: torch.Tensor | None = None) -> hg.Problem:
    """The bilevel problem: inner f(x, θ) = ½ xᵀ(H₀ + θI)x + bᵀx, outer F(x) = cᵀx.

    Args:
        quad: from :func:`make_quadratic`.
        optimizer: the inner optimizer (``hg.SGD(lr=h)`` or ``hg.Chebyshev(mu, L)``).
        steps: inner steps T.
        c: the outer objective's vector, shape (d,); default zeros (only the inner
            steps are used).
    """
    H0 = quad["Q"] @ torch.diag(quad["eig"]) @ quad["Q"].T
    b = quad["b"]
    c = torch.zeros_like(b) if c is None else c

    def inner(p: dict, h: dict, _: Any) -> torch.Tensor:
        x = p["x"]
        return 0.5 * x @ (H0 @ x) + 0.5 * h["theta"] * (x @ x) + b @ x

    def outer(p: dict, h: dict, _: Any) -> torch.Tensor:
        return c @ p["x"]

    return hg.Problem(inner, outer, optimizer=optimizer, steps=steps)


def library_curves(problem: hg.Problem, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and ∂x_t/∂θ (at θ = 0) for t = 0..T through the library's inner steps.

    One forward-mode JVP (``torch.func.jvp``) through ``problem.step``, the steps that
    ``hg.Unrolled`` differentiates, gives the Jacobian of every iterate at once.

    Returns:
        ``(xs, jacs)``, both of shape (T + 1, d).
    """
    def iterates(theta: torch.Tensor) -> torch.Tensor:
        hp, p = {"theta": theta}, {"x": x0}
        state = problem.optimizer.init(p)
        xs = [x0]
        for t in range(problem.steps):
            p, state = problem.step(p, state, hp, t)
            xs.append(p["x"])
        return torch.stack(xs)

    zero = torch.zeros((), dtype=DT)
    xs, jacs = jvp(iterates, (zero,), (torch.ones((), dtype=DT),))
    return xs.detach(), jacs.detach()


def gd_polynomials(h: float) -> Polynomials:
    """P_t(λ) = (1 − hλ)^t and P_t′(λ) = −t h (1 − hλ)^(t−1) of gradient descent."""
    def P(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return (1 - h * lam) ** t

    def dP(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return -t * h * (1 - h * lam) ** (t - 1).clamp_min(0)

    return P, dP


def chebyshev_polynomials(mu: float, L: float) -> Polynomials:
    """The shifted Chebyshev residual polynomial P_t(λ) = T_t(σ(λ)) / T_t(σ(0)) and P_t′.

    σ(λ) = (L + μ − 2λ)/(L − μ) maps [μ, L] onto [−1, 1]; T_t′ = t·U_{t−1}, so
    P_t′(λ) = −2t U_{t−1}(σ(λ)) / ((L − μ) T_t(σ(0))). T_t and U_{t−1} come from their
    three-term recurrences (bounded by 1 and t on [−1, 1]); 1/T_t(σ(0)) = 1/cosh(tφ),
    φ = arccosh σ(0), is written with e^{−tφ} so that it never overflows.
    """
    phi = math.acosh((L + mu) / (L - mu))

    def tu(t: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T_n(σ) and U_{n−1}(σ) for n = 0..max(t), indexed by t (shape t × lam)."""
        x = (L + mu - 2 * lam) / (L - mu)
        n_max = int(t.max())
        Ts, Us = [torch.ones_like(x)], [torch.zeros_like(x)]  # T_0, U_{−1}
        T_prev, T_cur = torch.ones_like(x), x                    # T_0, T_1
        U_prev, U_cur = torch.zeros_like(x), torch.ones_like(x)  # U_{−1}, U_0
        for _ in range(n_max):
            Ts.append(T_cur)
            Us.append(U_cur)
            T_prev, T_cur = T_cur, 2 * x * T_cur - T_prev
            U_prev, U_cur = U_cur, 2 * x * U_cur - U_prev
        idx = t.long().reshape(-1)
        shape = torch.broadcast_shapes(t.shape, lam.shape)
        return (torch.stack(Ts)[idx].expand(shape), torch.stack(Us)[idx].expand(shape))

    def inv_T0(t: torch.Tensor) -> torch.Tensor:
        e = torch.exp(-t * phi)
        return 2 * e / (1 + e * e)

    def P(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return tu(t, lam)[0] * inv_T0(t)

    def dP(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return -2 * t * tu(t, lam)[1] * inv_T0(t) / (L - mu)

    return P, dP


def closed_form_curves(quad: dict[str, torch.Tensor], polys: Polynomials,
                       steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t and ∂x_t/∂θ for t = 0..T from the residual polynomial, at θ = 0.

    x_t = x* + P_t(H)(x₀ − x*) and ∂x_t = ∂x* − P_t(H)∂x* + P_t′(H)(x₀ − x*), evaluated
    on the eigenvalues. Returns ``(xs, jacs, x_star, dx_star)``: (T + 1, d), (T + 1, d),
    (d,), (d,), in the original basis.
    """
    eig, Q = quad["eig"], quad["Q"]
    P, dP = polys
    x_star = -(Q.T @ quad["b"]) / eig  # eigenbasis
    dx_star = -x_star / eig            # ∂x*/∂θ = −(H₀ + θI)⁻¹ x*
    c0 = Q.T @ quad["x0"] - x_star
    ts = torch.arange(steps + 1, dtype=DT)[:, None]
    Pt, dPt = P(ts, eig), dP(ts, eig)
    xs = x_star + Pt * c0
    jacs = dx_star - Pt * dx_star + dPt * c0
    return xs @ Q.T, jacs @ Q.T, Q @ x_star, Q @ dx_star


def methods(mu: float, L: float) -> dict[str, tuple[Any, Polynomials, float, float]]:
    """name → (inner optimizer, residual polynomials, rate, predicted Jacobian peak t).

    Gradient descent with step h: rate ρ = max(|1 − hμ|, |1 − hL|); the slowest mode's
    Jacobian error ∝ t ρ^{t−1} peaks at t = −1/ln ρ ≈ 1/(1 − ρ). Chebyshev: rate
    ξ = (√L − √μ)/(√L + √μ); its P_t′ ∝ t² ξ^t peaks at t = −2/ln ξ ≈ 2/(1 − ξ).
    """
    out = {}
    for label, h in (("GD h=0.5/L", 0.5 / L), ("GD h=1/L", 1 / L),
                     ("GD h=2/(L+μ)", 2 / (L + mu)), ("GD h=1.99/L", 1.99 / L)):
        rho = max(abs(1 - h * mu), abs(1 - h * L))
        out[label] = (hg.SGD(lr=h), gd_polynomials(h), rho, -1 / math.log(rho))
    xi = (math.sqrt(L) - math.sqrt(mu)) / (math.sqrt(L) + math.sqrt(mu))
    out["Chebyshev"] = (hg.Chebyshev(mu=mu, L=L), chebyshev_polynomials(mu, L), xi,
                        -2 / math.log(xi))
    return out


def first_below(errors: torch.Tensor, tol: float = TOLERANCE) -> int | None:
    """The first t from which ``errors[t:] <= tol`` holds; None if never."""
    above = (errors > tol).nonzero()
    t = 0 if len(above) == 0 else int(above[-1]) + 1
    return t if t < len(errors) else None


def unrolled_check(quad: dict[str, torch.Tensor], optimizer: Any, t: int,
                   jac_t: torch.Tensor, dx_star: torch.Tensor) -> float:
    """‖∂x_t − ∂x*‖ projected on its own direction, by ``hg.Unrolled(mode="forward")``.

    With c the unit vector along ``jac_t − dx_star`` (the JVP route's Jacobian error),
    the hypergradient of F(x) = cᵀx through t steps is cᵀ∂x_t; minus cᵀ∂x* it equals
    ‖jac_t − dx_star‖ exactly when the two routes agree.
    """
    err = jac_t - dx_star
    c = err / err.norm() if err.norm() > 0 else torch.zeros_like(err)
    problem = make_problem(quad, optimizer, t, c)
    out = hg.hypergradient(problem, {"theta": torch.zeros((), dtype=DT)},
                           {"x": quad["x0"].clone()}, hg.Unrolled(mode="forward"))
    return float(out.grad["theta"] - c @ dx_star)


def run(steps: int = 1000, dim: int = 50, mu: float = 1.0, L: float = 100.0, seed: int = 0,
        names: list[str] | None = None) -> dict[str, Any]:
    """All curves, peaks and thresholds of the experiment (float64, CPU).

    Args:
        steps: inner steps T (≥ 2).
        dim, mu, L, seed: the quadratic (see :func:`make_quadratic`).
        names: the methods to run (keys of :func:`methods`); default all.

    Returns:
        A JSON-ready dict: the settings and, under ``"methods"``, per method its rate,
        predicted and observed Jacobian peak, the iterations to reach 1e-6, the
        ``hg.Unrolled(mode="forward")`` checks at t = peak/2, peak, 2·peak and the four
        curves (t = 0..T; relative errors, library and closed form).

    Raises:
        ValueError: ``steps < 2``, an unknown name in ``names`` or a bad quadratic (see
            :func:`make_quadratic`).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    quad = make_quadratic(dim, mu, L, seed)
    table_ = methods(mu, L)
    unknown = set(names or ()) - set(table_)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; expected some of {list(table_)}")
    result: dict[str, Any] = {"steps": steps, "dim": dim, "mu": mu, "L": L, "seed": seed,
                              "tolerance": TOLERANCE, "methods": {}}
    for name, (opt, polys, rate, predicted) in table_.items():
        if names is not None and name not in names:
            continue
        xs, jacs = library_curves(make_problem(quad, opt, steps), quad["x0"])
        xs_cf, jacs_cf, x_star, dx_star = closed_form_curves(quad, polys, steps)
        it = (xs - x_star).norm(dim=1) / (quad["x0"] - x_star).norm()
        jac = (jacs - dx_star).norm(dim=1) / dx_star.norm()
        it_cf = (xs_cf - x_star).norm(dim=1) / (quad["x0"] - x_star).norm()
        jac_cf = (jacs_cf - dx_star).norm(dim=1) / dx_star.norm()
        peak = int(jac.argmax())
        check_ts = sorted({max(1, peak // 2), max(1, peak), min(steps, 2 * peak)})
        unrolled = [{"t": t, "unrolled": unrolled_check(quad, opt, t, jacs[t], dx_star)
                     / float(dx_star.norm()), "jvp": float(jac[t])} for t in check_ts]
        result["methods"][name] = {
            "rate": rate, "peak_predicted": predicted, "peak_observed": peak,
            "peak_height": float(jac.max()),
            "t_iterate": first_below(it), "t_jacobian": first_below(jac),
            "max_dev_closed_form_x": float((xs - xs_cf).norm(dim=1).max()
                                           / (quad["x0"] - x_star).norm()),
            "max_dev_closed_form_jac": float((jacs - jacs_cf).norm(dim=1).max()
                                             / dx_star.norm()),
            "unrolled_checks": unrolled,
            "iterate_error": it.tolist(), "iterate_error_closed_form": it_cf.tolist(),
            "jacobian_error": jac.tolist(), "jacobian_error_closed_form": jac_cf.tolist()}
    return result


COLORS = {"GD h=0.5/L": "tab:blue", "GD h=1/L": "tab:orange", "GD h=2/(L+μ)": "tab:green",
          "GD h=1.99/L": "tab:red", "Chebyshev": "tab:purple"}


def plot(result: dict[str, Any], path: Path, dpi: int = 100) -> None:
    """Three panels against t (log y): iterate error, Jacobian error, and the Jacobian's
    burn-in enlarged with the predicted and observed peaks; a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax_x, ax_j, ax_b) = plt.subplots(1, 3, figsize=(17, 5.4),
                                           gridspec_kw={"width_ratios": [1, 1, 0.9]})
    floor = 1e-16
    zoom = min(result["steps"], int(2.2 * max(m["peak_predicted"]
                                             for m in result["methods"].values())))
    for name, m in result["methods"].items():
        col, ts = COLORS.get(name, None), range(len(m["iterate_error"]))
        label = f"{name}  (rate {m['rate']:.4f})"
        for ax, key, n in ((ax_x, "iterate_error", None), (ax_j, "jacobian_error", None),
                           (ax_b, "jacobian_error", zoom + 1)):
            ax.plot(ts[:n], [max(v, floor) for v in m[key][:n]], color=col, lw=3.5,
                    alpha=0.35, label=label if ax is ax_x else None)
            ax.plot(ts[:n], [max(v, floor) for v in m[key + "_closed_form"][:n]], color=col,
                    lw=1.1, ls=(0, (4, 3)))
        ax_b.axvline(m["peak_predicted"], color=col, ls=":", lw=1.5)
        ax_b.plot([m["peak_observed"]], [m["peak_height"]], "o", color=col, ms=8, mec="k")
        for c in m["unrolled_checks"]:
            ax_b.plot([c["t"]], [c["unrolled"]], "x", color="k", ms=6, mew=1.3)
    for ax in (ax_x, ax_j, ax_b):
        ax.set_yscale("log")
        ax.set_xlabel("iteration t")
        ax.grid(True, which="major", alpha=0.3)
    for ax in (ax_x, ax_j):
        ax.axhline(result["tolerance"], color="grey", lw=0.8, alpha=0.7)
        ax.set_ylim(3e-16, None)
        ax.set_xlim(0, result["steps"])
    ax_b.set_xscale("log")
    ax_b.set_xlim(1, zoom)
    ax_b.set_ylim(0.3, None)
    ax_x.set_ylabel("‖xₜ − x*‖ / ‖x₀ − x*‖")
    ax_j.set_ylabel("‖∂xₜ/∂θ − ∂x*/∂θ‖ / ‖∂x*/∂θ‖")
    ax_b.set_ylabel("‖∂xₜ/∂θ − ∂x*/∂θ‖ / ‖∂x*/∂θ‖")
    ax_x.set_title("Iterate error: faster with larger steps up to 2/(L+μ)")
    ax_j.set_title("Jacobian error of unrolling: burn-in, then decay")
    ax_b.set_title(f"Burn-in enlarged (log t, t ≤ {zoom})")
    ax_x.legend(loc="lower left", fontsize=9, title="method (rate ρ or ξ)", title_fontsize=9)
    styles = [Line2D([], [], color="grey", lw=3.5, alpha=0.35,
                     label="library: JVP through problem.step"),
              Line2D([], [], color="grey", lw=1.1, ls=(0, (4, 3)),
                     label="closed form from Pₜ, Pₜ′"),
              Line2D([], [], color="grey", ls=":", lw=1.5,
                     label="predicted peak (GD 1/(1−ρ), Cheb. 2/(1−ξ))"),
              Line2D([], [], ls="", marker="o", color="grey", mec="k", label="observed peak"),
              Line2D([], [], ls="", marker="x", color="k", mew=1.3,
                     label="hg.Unrolled(mode='forward')")]
    ax_j.legend(handles=styles, loc="lower left", fontsize=9)
    fig.suptitle(f"The curse of unrolling on f(x, θ) = ½xᵀ(H₀ + θI)x + bᵀx: d = {result['dim']}, "
                 f"eigenvalues evenly spread on [μ, L] = [{result['mu']:g}, {result['L']:g}]; "
                 f"grey line: {result['tolerance']:g}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """The summary table: per method, iterations to 1e-6 and the Jacobian peak."""
    def fmt(t: int | None) -> str:
        return f"{t:d}" if t is not None else f">{result['steps']}"

    lines = [f"{'method':<14} {'rate':>7} {'t(x) 1e-6':>10} {'t(∂x) 1e-6':>11} "
             f"{'peak t obs':>10} {'pred':>7} {'peak height':>11} {'Unrolled dev':>12}"]
    for name, m in result["methods"].items():
        dev = max(abs(c["unrolled"] - c["jvp"]) / c["jvp"] for c in m["unrolled_checks"])
        lines.append(f"{name:<14} {m['rate']:7.4f} {fmt(m['t_iterate']):>10} "
                     f"{fmt(m['t_jacobian']):>11} {m['peak_observed']:10d} "
                     f"{m['peak_predicted']:7.1f} {m['peak_height']:11.3g} {dev:12.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run, print the table, write the PNG and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="inner steps T")
    parser.add_argument("--dim", type=int, default=50, help="dimension d")
    parser.add_argument("--mu", type=float, default=1.0, help="smallest eigenvalue μ")
    parser.add_argument("--L", type=float, default=100.0, help="largest eigenvalue L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/curse_of_unrolling"),
                        help="folder for curse_of_unrolling.png and curves.json")
    parser.add_argument("--json", type=Path,
                        help="write the curves here instead of OUT/curves.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run(args.steps, args.dim, args.mu, args.L, args.seed)
    result["seconds"] = time.perf_counter() - start
    print(table(result))
    png = args.out / "curse_of_unrolling.png"
    plot(result, png)
    out_json = args.json or args.out / "curves.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result))
    print(f"wrote {png} and {out_json} ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()

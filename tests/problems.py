"""Bilevel test problems with closed-form solutions (float64)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import hypergrad as hg
from hypergrad.finite_difference import CentralDifference, central_differences

DT = torch.float64

# --- tolerances derived from the error they measure ------------------------------------
#
# EPS is float64's machine epsilon (2⁻⁵², the unit roundoff u is EPS/2). Two computations
# that are equal in exact arithmetic but take different floating-point paths (forward vs
# reverse mode, vmap vs a loop, another BLAS kernel) differ by their rounding errors. The
# standard a-priori bound (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd
# ed., §3.1) for a sum or dot product of n terms is γ_n = n·u/(1 − n·u) ≈ n·EPS/2 relative
# to Σ|terms|; a chain of such operations adds them, and a solve multiplies by the
# condition number. ``rounding(ops, cond)`` is that bound, 2·ops·cond·EPS (both paths'
# errors, each at most ops·EPS/2 per unit of conditioning, and a factor 2 for the
# cancellation Σ|terms| / |Σ terms| of well-scaled sums). Tests compare with a stated
# multiple of it; the observed differences are far smaller (errors add like a random walk,
# √ops rather than ops), so the bound holds on any CPU and BLAS while a real error (a wrong
# sign, a missing term, a dropped step: relative size ≥ 1e-6 in these problems) is caught.
EPS = torch.finfo(DT).eps


def rounding(ops: int, cond: float = 1.0) -> float:
    """Relative rounding bound 2·ops·cond·EPS of two paths through ``ops`` accumulated
    floating-point operations with condition number ``cond`` (see above)."""
    return 2.0 * ops * cond * EPS


# --- finite differences with error bars ---------------------------------------------------
#
# A central difference has a truncation error (Taylor remainder ∝ s²) and a rounding
# error (noise of the function / s). hypergrad.finite_difference estimates both per
# difference; the helpers below judge an estimate against that error bar through a
# hg.GradientCheck (``agrees``, ``verdict``, ``resolution``) instead of a bare relative
# error with a hard-coded tolerance.


def fd_check(estimate: torch.Tensor, fd: CentralDifference,
             coords: Sequence[int] | None = None) -> hg.GradientCheck:
    """``estimate`` (one entry per difference of ``fd``) judged against ``fd``'s error bars."""
    return hg.GradientCheck.of(estimate, fd, coords)


def with_estimate(check: hg.GradientCheck, estimate: torch.Tensor) -> hg.GradientCheck:
    """The same finite differences judging another estimate of the same coordinates."""
    g = estimate.detach().reshape(-1).cpu().to(DT)
    rel_error = float((g - check.finite_difference).norm() / check.finite_difference.norm())
    return dataclasses.replace(check, estimate=g, rel_error=rel_error)


def fd_directional(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   v: torch.Tensor, step: float) -> CentralDifference:
    """Central differences (fn(x + s v) − fn(x − s v)) / 2s of a vector-valued ``fn``, each
    component with its own error bar: one :func:`central_differences` per component on
    the same points, so ``fn`` is evaluated 11 times in all (cached)."""
    cache: dict[bytes, torch.Tensor] = {}

    def at(point: torch.Tensor) -> torch.Tensor:
        key = point.detach().cpu().numpy().tobytes()
        if key not in cache:
            cache[key] = fn(point).detach().reshape(-1).cpu().to(DT)
        return cache[key]

    parts = [central_differences(lambda p, i=i: float(at(p)[i]), x, [v], step)
             for i in range(at(x).numel())]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return CentralDifference(cat("value"), cat("error"), cat("truncation"), cat("rounding"),
                             cat("asymptotic"), max(p.noise for p in parts), step)


def normwise_resolution(check: hg.GradientCheck) -> float:
    """‖fd_error‖ / ‖fd‖: the smallest relative error, in norm, the differences can see
    (for vectors with near-zero entries, whose per-entry resolution says little)."""
    return float(check.fd_error.norm() / check.finite_difference.norm())


@dataclass
class Ridge:
    """Ridge regression with one log-regulariser per feature.

    f(w, λ) = ½‖X w − y‖²/n + ½ Σ_j e^{λ_j} w_j²,   F(w) = ½‖X_v w − y_v‖²/n_v.
    w*(λ) = A⁻¹ Xᵀy/n with A = XᵀX/n + diag(e^λ), and the hypergradient is
    ∇h = −e^λ ⊙ w* ⊙ A⁻¹ ∇_w F.
    """

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor

    @classmethod
    def make(cls, n: int = 60, d: int = 8, nv: int = 40, seed: int = 0,
             device: str = "cpu") -> Ridge:
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, d, generator=g, dtype=DT)
        w_true = torch.randn(d, generator=g, dtype=DT)
        y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
        Xv = torch.randn(nv, d, generator=g, dtype=DT)
        yv = Xv @ w_true + 0.5 * torch.randn(nv, generator=g, dtype=DT)
        lam = torch.linspace(-2.0, 0.5, d, dtype=DT)
        return cls(*(t.to(device) for t in (X, y, Xv, yv, lam)))

    @staticmethod
    def inner_loss(p, h, batch):
        X, y = batch
        r = X @ p["w"] - y
        return 0.5 * (r @ r) / X.shape[0] + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()

    @staticmethod
    def outer_loss(p, h, batch):
        X, y = batch
        r = X @ p["w"] - y
        return 0.5 * (r @ r) / X.shape[0]

    def hparams(self) -> dict:
        return {"lam": self.lam.clone()}

    def A(self) -> torch.Tensor:
        return self.X.T @ self.X / self.X.shape[0] + torch.diag(self.lam.exp())

    def w_star(self) -> torch.Tensor:
        return torch.linalg.solve(self.A(), self.X.T @ self.y / self.X.shape[0])

    def hypergrad(self) -> torch.Tensor:
        w = self.w_star()
        gF = self.Xv.T @ (self.Xv @ w - self.yv) / self.Xv.shape[0]
        return -self.lam.exp() * w * torch.linalg.solve(self.A(), gF)

    def eigs(self) -> tuple[float, float]:
        e = torch.linalg.eigvalsh(self.A())
        return float(e[0]), float(e[-1])

    def problem(self, optimizer=None, steps: int = 100) -> hg.Problem:
        mu, L = self.eigs()
        return hg.Problem(self.inner_loss, self.outer_loss, (self.X, self.y), (self.Xv, self.yv),
                          optimizer=optimizer or hg.SGD(lr=1.0 / L), steps=steps)

    def params0(self) -> dict:
        return {"w": torch.zeros(self.X.shape[1], dtype=DT, device=self.X.device)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logistic_problem(steps: int = 1500, seed: int = 0, optimizer=None):
    """L2-regularised logistic regression on breast_cancer, one log-λ per feature."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=DT)
    y = torch.tensor(y, dtype=DT)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:300], perm[300:450]
    X = (X - X[tr].mean(0)) / X[tr].std(0)

    def inner(p, h, batch):
        Xb, yb = batch
        z = Xb @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, yb) + \
            0.5 * (h["lam"].exp() * p["w"] ** 2).sum()

    def outer(p, h, batch):
        Xb, yb = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(Xb @ p["w"] + p["b"], yb)

    d = X.shape[1]
    hparams = {"lam": torch.full((d,), -2.0, dtype=DT) + 0.05 * torch.arange(d, dtype=DT)}
    params = {"w": torch.zeros(d, dtype=DT), "b": torch.zeros((), dtype=DT)}
    problem = hg.Problem(inner, outer, (X[tr], y[tr]), (X[va], y[va]),
                         optimizer=optimizer or hg.SGD(lr=0.5), steps=steps)
    return problem, hparams, params

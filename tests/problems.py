"""Bilevel test problems with closed-form solutions (float64)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import hypergrad as hg

DT = torch.float64


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

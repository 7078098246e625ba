"""Learning a graph from smooth signals, and an unrolled primal-dual solver that learns to.

The model of Kalofolias (2016): given n nodes with signals X ∈ R^{s×n} (s signals), learn the
edge weights w ∈ R^m_{≥0}, one per node pair (m = n(n−1)/2, upper triangle in row-major order,
the order of ``torch.triu_indices(n, n, 1)``), by the convex problem

    min_{w ≥ 0}  2 wᵀz − α 1ᵀ log(Dw) + β ‖w‖²,

with z_ij = (1/s) Σ_t (x_ti − x_tj)² the mean squared distance of the signals of nodes i and j
and D ∈ R^{n×m} the degree operator (Dw = W1 are the node degrees, Dᵀy has entry y_i + y_j
on the edge (i, j)). The log barrier keeps every node connected; β controls sparsity.

Its primal-dual splitting solver (PDS: the forward-backward-forward scheme of Komodakis and
Pesquet as Kalofolias uses it; Algorithm 1 of Pu et al. 2021) with a dual variable v ∈ R^n for
the degrees reads, with step size γ,

    y  = w − γ (2β w + 2z + Dᵀv)        ȳ = v + γ D w
    p  = max(0, y)                      p̄ = (ȳ − √(ȳ² + 4αγ)) / 2      (prox of (−α log)*)
    q  = p − γ (2β p + 2z + Dᵀp̄)        q̄ = p̄ + γ D p
    w ← w − y + q                       v ← v − ȳ + q̄

and converges for γ < 1/μ, μ = 2β + ‖D‖ (‖D‖ = √(2(n−1))). :func:`solve_pds` runs it with α
and β fixed (the classic method); :class:`UnrolledPDS` unrolls K of these iterations into a
network whose step sizes γ_k and weights α_k, β_k (one per layer, as in the paper's code, or
shared) are learned by plain autograd through the K layers, trained against the normalised
error GMSE = ‖w_K − w*‖² / ‖w*‖² on pairs (signals, true graph) (:func:`train_unrolled`).

Data (:func:`make_graphs`): Barabási–Albert graphs (networkx; ``edges_per_node`` edges attach
each new node), edge weights lognormal(0, σ) symmetrised, then scaled so that the weighted
adjacency sums to n (1ᵀw = n/2), smooth signals x ~ N(0, (L + 10⁻⁴ I)⁻¹) with L the weighted
Laplacian; z as above (mean over signals), then divided by its mean over the pairs of the
graph (``normalize_z``). The weights follow the paper's code (``weight_scale=True``,
lognormal σ = 0.1); its z is the mean over signals without the division, which here lowers
the test GMSE of the grid-searched classic PDS from 0.220 to 0.191 (300 signals). Every
method here is scored on the same w* and z.

References:
    V. Kalofolias, "How to learn a graph from smooth signals", AISTATS 2016.
    X. Pu, T. Cao, X. Zhang, X. Dong, S. Chen, "Learning to Learn Graph Topologies",
    NeurIPS 2021.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hypergrad.errors import BilevelInputError

__all__ = [
    "GraphData", "UnrolledPDS", "degree_operator", "evaluate", "gmse", "grid_search_pds",
    "kkt_residual", "make_graphs", "num_pairs", "objective", "pds_step", "rescaled_gmse",
    "solve_pds", "to_matrix", "train_unrolled",
]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BilevelInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
            raise BilevelInputError(f"{name} must be finite and > 0, got {value}")
        return value  # type: ignore[return-value]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BilevelInputError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def num_pairs(n: int) -> int:
    """m = n(n−1)/2, the number of node pairs (edge weights) of a graph with ``n`` nodes."""
    return n * (n - 1) // 2


def _nodes_of(m: int) -> int:
    n = int(round((1 + math.sqrt(1 + 8 * m)) / 2))
    if num_pairs(n) != m:
        raise BilevelInputError(f"the last dimension ({m}) is not n(n-1)/2 for any node count n")
    return n


def degree_operator(n: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The degree operator D ∈ {0, 1}^{n×m}: (Dw)_i = Σ_j W_ij, the degree of node i.

    Column e of D (the pair (i, j), i < j, in ``triu_indices`` order) has ones in rows i and j,
    so (Dᵀy)_e = y_i + y_j. ‖D‖₂ = √(2(n−1)) (DDᵀ = (n−2) I + 11ᵀ).

    Raises:
        BilevelInputError: ``n`` is not an integer >= 2.
    """
    n = _check_int(n, "n (nodes)", 2)
    i, j = torch.triu_indices(n, n, 1, device=device)
    d = torch.zeros(n, num_pairs(n), dtype=dtype, device=device)
    cols = torch.arange(num_pairs(n), device=device)
    d[i, cols] = 1
    d[j, cols] = 1
    return d


def to_matrix(w: torch.Tensor) -> torch.Tensor:
    """The symmetric weighted adjacency (..., n, n) of edge weights w (..., m), zero diagonal."""
    n = _nodes_of(w.shape[-1])
    i, j = torch.triu_indices(n, n, 1, device=w.device)
    a = w.new_zeros(*w.shape[:-1], n, n)
    a[..., i, j] = w
    return a + a.transpose(-1, -2)


@dataclass(frozen=True)
class GraphData:
    """A set of graphs: ``z`` (G, m) mean squared signal distances, ``w`` (G, m) true weights."""

    z: torch.Tensor
    w: torch.Tensor

    @property
    def nodes(self) -> int:
        return _nodes_of(self.z.shape[-1])

    def __len__(self) -> int:
        return self.z.shape[0]

    def subset(self, index: slice | torch.Tensor) -> GraphData:
        return GraphData(self.z[index], self.w[index])


def make_graphs(num_graphs: int, nodes: int = 20, signals: int = 300, *, edges_per_node: int = 3,
                weight_sigma: float = 0.1, normalize_z: bool = True, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> GraphData:
    """Barabási–Albert graphs with lognormal weights and smooth signals drawn on them.

    For each graph: ``networkx.barabasi_albert_graph(nodes, edges_per_node)``; weights
    W_ij = A_ij (E_ij + E_ji)/2, E ~ lognormal(0, ``weight_sigma``); W scaled so that
    Σ_ij W_ij = n; ``signals`` draws x ~ N(0, (L + 10⁻⁴ I)⁻¹), L = diag(W1) − W; z_ij the
    mean over the draws of (x_i − x_j)², divided by its mean over the pairs when
    ``normalize_z`` (so that one (α, β) fits graphs whose signals differ in energy; the
    paper's code does not, see the module docstring). Deterministic given ``seed``.

    Returns:
        GraphData with z, w of shape (num_graphs, m), m = nodes(nodes−1)/2.

    Raises:
        BilevelInputError: a count is not a positive integer, ``nodes <= edges_per_node``,
            ``weight_sigma < 0``.
        ImportError: networkx is not installed.
    """
    num_graphs = _check_int(num_graphs, "num_graphs", 1)
    nodes = _check_int(nodes, "nodes", 2)
    signals = _check_int(signals, "signals", 1)
    edges_per_node = _check_int(edges_per_node, "edges_per_node", 1)
    if edges_per_node >= nodes:
        raise BilevelInputError(f"edges_per_node ({edges_per_node}) must be < nodes ({nodes}) "
                                "for a Barabási–Albert graph")
    if not isinstance(weight_sigma, (int, float)) or not weight_sigma >= 0:
        raise BilevelInputError(f"weight_sigma must be a number >= 0, got {weight_sigma!r}")
    try:
        import networkx as nx
    except ImportError as exc:  # pragma: no cover - the `graphs` extra
        raise ImportError("bilevel.graphs.make_graphs needs networkx: pip install "
                          "'bilevel[graphs]' (or pip install networkx)") from exc
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(nodes, 1)
    zs, ws = [], []
    for _ in range(num_graphs):
        g = nx.barabasi_albert_graph(nodes, edges_per_node, seed=int(rng.integers(2**31)))
        a = nx.to_numpy_array(g, nodelist=range(nodes))
        e = rng.lognormal(0.0, weight_sigma, size=(nodes, nodes))
        w = a * (e + e.T) / 2
        w *= nodes / w.sum()
        lap = np.diag(w.sum(1)) - w
        lam, vec = np.linalg.eigh(lap + 1e-4 * np.eye(nodes))
        x = rng.standard_normal((signals, nodes)) @ (vec / np.sqrt(lam)).T  # cov (L + 1e-4 I)⁻¹
        diff = x[:, iu[0]] - x[:, iu[1]]
        z = (diff**2).mean(0)
        zs.append(z / z.mean() if normalize_z else z)
        ws.append(w[iu])
    return GraphData(torch.as_tensor(np.stack(zs), dtype=dtype),
                     torch.as_tensor(np.stack(ws), dtype=dtype))


def objective(w: torch.Tensor, z: torch.Tensor, alpha: float, beta: float,
              d: torch.Tensor | None = None) -> torch.Tensor:
    """2wᵀz − α 1ᵀlog(Dw) + β‖w‖² per graph: w, z (..., m) → (...,). +inf where a degree is 0."""
    d = degree_operator(_nodes_of(w.shape[-1]), w.dtype, w.device) if d is None else d
    deg = w @ d.T
    logdeg = torch.where(deg > 0, torch.log(deg.clamp_min(1e-300)), -torch.inf)
    return 2 * (w * z).sum(-1) - alpha * logdeg.sum(-1) + beta * (w * w).sum(-1)


def kkt_residual(w: torch.Tensor, z: torch.Tensor, alpha: float, beta: float,
                 d: torch.Tensor | None = None) -> torch.Tensor:
    """The largest violation of the optimality conditions of the problem at w ≥ 0, per graph.

    With g = 2z − α Dᵀ(1/Dw) + 2βw the gradient of the smooth part, w is optimal iff g_e = 0
    where w_e > 0 and g_e ≥ 0 where w_e = 0; this returns max_e |min(w_e, g_e)| (the natural
    residual ‖w − max(0, w − g)‖_∞), 0 exactly at the solution.
    """
    d = degree_operator(_nodes_of(w.shape[-1]), w.dtype, w.device) if d is None else d
    g = 2 * z - alpha * (1 / (w @ d.T)) @ d + 2 * beta * w
    return torch.minimum(w, g).abs().amax(-1)


def _prox_neg_log_conj(y: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """prox of γ g*, g(d) = −α Σ log d: the negative root of v² − yv − αγ = 0."""
    return (y - torch.sqrt(y * y + 4 * alpha * gamma)) / 2


def pds_step(w: torch.Tensor, v: torch.Tensor, z: torch.Tensor, d: torch.Tensor,
             gamma: torch.Tensor | float, alpha: torch.Tensor | float,
             beta: torch.Tensor | float,
             prox: Callable[[torch.Tensor], torch.Tensor] | None = None,
             tau: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One primal-dual (forward-backward-forward) iteration, batched over graphs.

    Args:
        w: (B, m) primal edge weights; v: (B, n) dual variable of the degrees;
        z: (B, m) squared distances; d: (n, m) :func:`degree_operator`;
        gamma, alpha, beta: step size and model weights (floats or tensors broadcasting
            against (B, 1)).
        prox: the primal proximal step y ↦ p; default max(0, y), the projection on w ≥ 0
            (a learned module here is the paper's topological refinement).
        tau: the dual step (γ in ȳ, p̄ and q̄); default γ, the classic scheme. A learned
            network may use its own.

    Returns:
        (w, v) after one iteration (the update in this module's docstring). Pure: no
        in-place changes, differentiable in every argument.
    """
    tau = gamma if tau is None else tau
    y = w - gamma * (2 * beta * w + 2 * z + v @ d)
    yb = v + tau * (w @ d.T)
    p = torch.relu(y) if prox is None else prox(y)
    pb = _prox_neg_log_conj(yb, torch.as_tensor(tau), torch.as_tensor(alpha))
    q = p - gamma * (2 * beta * p + 2 * z + pb @ d)
    qb = pb + tau * (p @ d.T)
    return w - y + q, v - yb + qb


def _check_z(z: torch.Tensor, name: str = "z") -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise BilevelInputError(f"{name} must be a floating (graphs, m) tensor, got "
                                f"{type(z).__name__} {tuple(getattr(z, 'shape', ()))}")
    _nodes_of(z.shape[-1])
    if not bool(torch.isfinite(z).all()) or bool((z < 0).any()):
        raise BilevelInputError(f"{name} must be finite and >= 0 (squared distances)")
    return z


def solve_pds(z: torch.Tensor, alpha: float, beta: float, *, iterations: int = 500,
              gamma: float | None = None) -> torch.Tensor:
    """The classic method: ``iterations`` PDS steps from w = 0, v = 0 with α, β fixed.

    Args:
        z: (B, m) squared distances. alpha, beta: > 0.
        gamma: step size; default 0.9/μ, μ = 2β + √(2(n−1)) (the convergent range γ < 1/μ).

    Returns:
        (B, m) edge weights (≥ 0 up to the last forward step; clamped at 0).

    Raises:
        BilevelInputError: bad z, α, β, γ or iterations.
    """
    z = _check_z(z)
    alpha, beta = _check_positive(alpha, "alpha"), _check_positive(beta, "beta")
    iterations = _check_int(iterations, "iterations", 1)
    n = _nodes_of(z.shape[-1])
    gamma = 0.9 / (2 * beta + math.sqrt(2 * (n - 1))) if gamma is None else \
        _check_positive(gamma, "gamma")
    d = degree_operator(n, z.dtype, z.device)
    w, v = torch.zeros_like(z), z.new_zeros(z.shape[0], n)
    with torch.no_grad():
        for _ in range(iterations):
            w, v = pds_step(w, v, z, d, gamma, alpha, beta)
    return w.clamp_min(0)


def gmse(w: torch.Tensor, w_true: torch.Tensor) -> torch.Tensor:
    """Normalised error ‖w − w*‖² / ‖w*‖² per graph: (B, m), (B, m) → (B,).

    Raises:
        BilevelInputError: shapes that differ, or a true graph without edges (‖w*‖ = 0,
            for which the normalised error is undefined).
    """
    _check_pair(w, w_true)
    norm = (w_true**2).sum(-1)
    if not bool((norm > 0).all()):
        raise BilevelInputError("gmse: a true graph has no edges (‖w*‖ = 0): its normalised "
                                "error is undefined")
    return ((w - w_true) ** 2).sum(-1) / norm


def _check_pair(w: torch.Tensor, w_true: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or not isinstance(w_true, torch.Tensor):
        raise BilevelInputError("gmse: w and w_true must be tensors")
    if w.shape != w_true.shape:
        raise BilevelInputError(f"gmse: w has shape {tuple(w.shape)}, w_true "
                                f"{tuple(w_true.shape)}: they must match (B, m)")


def rescaled_gmse(w: torch.Tensor, w_true: torch.Tensor) -> torch.Tensor:
    """GMSE after the best scalar rescaling of each graph's w (an oracle: uses w*).

    min_c ‖cw − w*‖²/‖w*‖² = 1 − ⟨w, w*⟩² / (‖w‖² ‖w*‖²): the part of the error that a
    change of scale cannot remove (GMSE is scale-sensitive; this is the fairer comparison
    of shapes).
    """
    _check_pair(w, w_true)
    cos2 = (w * w_true).sum(-1) ** 2 / ((w * w).sum(-1) * (w_true**2).sum(-1)).clamp_min(1e-300)
    return 1 - cos2


def grid_search_pds(data: GraphData, alphas: Sequence[float], betas: Sequence[float], *,
                    iterations: int = 500) -> dict:
    """Choose (α, β) of the classic solver by mean GMSE on ``data`` (validation graphs).

    Returns:
        dict with ``alpha``, ``beta``, ``gmse`` (best mean) and ``grid`` (list of
        {alpha, beta, gmse}).
    """
    grid = []
    for a in alphas:
        for b in betas:
            err = gmse(solve_pds(data.z, a, b, iterations=iterations), data.w).mean().item()
            grid.append({"alpha": float(a), "beta": float(b), "gmse": err})
    best = min(grid, key=lambda r: r["gmse"] if math.isfinite(r["gmse"]) else math.inf)
    return {**best, "grid": grid}


class UnrolledPDS(nn.Module):
    """K PDS iterations as a network with learned step sizes γ_k and weights α, β.

    Layer k applies :func:`pds_step` with γ_k = exp(ρ_k), α_k = exp(a_k), β_k = exp(b_k)
    (positive by construction); with ``per_layer=False`` one α and one β are shared by all
    layers (the model's weights), with ``per_layer=True`` each layer has its own (as in the
    paper's code). Start: w = 0, v = 0. Gradients flow by plain autograd through the K
    layers (reverse mode through the unrolled loop; no implicit differentiation, the output
    is w_K, not a fixed point).

    Args:
        layers: K >= 1. nodes: n >= 2.
        alpha, beta: initial α, β (> 0). gamma: initial γ_k (> 0); default 0.9/μ, the
            classic convergent step, so that the untrained network is K steps of the
            classic solver with these (α, β).
        per_layer: one (α, β) per layer instead of a shared pair.
        refine: 0, or the hidden width of a learned topological refinement that replaces
            the last layer's primal projection max(0, y) by max(0, y + MLP(y)) (MLP
            m → refine → m, tanh; its output layer starts at zero, so the untrained network
            is unchanged). A deterministic stand-in for the paper's VAE refinement (L2G);
            not permutation-invariant: it can learn where Barabási–Albert hubs sit.
        dual_steps: learn a dual step τ_k per layer apart from the primal γ_k (τ_k replaces
            γ_k in the dual half of the iteration, as in primal-dual methods with two steps;
            starts equal to γ_k).
        init_noise: standard deviation of a Gaussian jitter added to log γ_k, log α_k,
            log β_k at the start (drawn from ``seed``). Identical layers start at a
            symmetric point from which training often stalls near the classic solver's
            error; a jitter of 0.2 broke that in every seed we tried (docs/graph_learning.md).
        seed: seed of the jitter.
    """

    def __init__(self, layers: int = 20, nodes: int = 20, *, alpha: float = 1.0,
                 beta: float = 1.0, gamma: float | None = None, per_layer: bool = False,
                 refine: int = 0, dual_steps: bool = False, init_noise: float = 0.0,
                 seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        layers = _check_int(layers, "layers", 1)
        nodes = _check_int(nodes, "nodes", 2)
        alpha, beta = _check_positive(alpha, "alpha"), _check_positive(beta, "beta")
        gamma = 0.9 / (2 * beta + math.sqrt(2 * (nodes - 1))) if gamma is None else \
            _check_positive(gamma, "gamma")
        k = layers if per_layer else 1
        self.layers, self.nodes = layers, nodes
        self.log_gamma = nn.Parameter(torch.full((layers,), math.log(gamma), dtype=dtype))
        self.log_alpha = nn.Parameter(torch.full((k,), math.log(alpha), dtype=dtype))
        self.log_beta = nn.Parameter(torch.full((k,), math.log(beta), dtype=dtype))
        self.log_tau = nn.Parameter(self.log_gamma.detach().clone()) if dual_steps else None
        if not isinstance(init_noise, (int, float)) or not init_noise >= 0:
            raise BilevelInputError(f"init_noise must be a number >= 0, got {init_noise!r}")
        if init_noise > 0:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in (self.log_gamma, self.log_alpha, self.log_beta, self.log_tau):
                    if p is not None:
                        p.add_(init_noise * torch.randn(p.shape, generator=gen, dtype=dtype))
        self.register_buffer("d", degree_operator(nodes, dtype), persistent=False)
        self.refine: nn.Module | None = None
        if _check_int(refine, "refine", 0):
            m = num_pairs(nodes)
            self.refine = nn.Sequential(nn.Linear(m, refine, dtype=dtype), nn.Tanh(),
                                        nn.Linear(refine, m, dtype=dtype))
            nn.init.zeros_(self.refine[2].weight)
            nn.init.zeros_(self.refine[2].bias)

    def hyperparameters(self) -> dict[str, list[float]]:
        """The current γ_k, α, β as plain lists (for logs and JSON)."""
        out = {"gamma": self.log_gamma.exp().tolist(), "alpha": self.log_alpha.exp().tolist(),
               "beta": self.log_beta.exp().tolist()}
        if self.log_tau is not None:
            out["tau"] = self.log_tau.exp().tolist()
        return out

    def forward(self, z: torch.Tensor, *, all_layers: bool = False) -> torch.Tensor:
        """Edge weights w_K (B, m) for squared distances z (B, m); with ``all_layers`` the
        stack (K, B, m) of every layer's output."""
        if z.shape[-1] != num_pairs(self.nodes):
            raise BilevelInputError(f"z has {z.shape[-1]} pairs; this network has "
                                    f"{self.nodes} nodes ({num_pairs(self.nodes)} pairs)")
        if z.dtype != self.log_gamma.dtype:
            raise BilevelInputError(f"z is {z.dtype}, the network's parameters "
                                    f"{self.log_gamma.dtype}: convert one (e.g. z.to("
                                    f"{self.log_gamma.dtype}) or net.to(z.dtype))")
        gamma, alpha, beta = self.log_gamma.exp(), self.log_alpha.exp(), self.log_beta.exp()
        tau = None if self.log_tau is None else self.log_tau.exp()
        shared = alpha.numel() == 1
        w, v = torch.zeros_like(z), z.new_zeros(z.shape[0], self.nodes)
        out = []
        for k in range(self.layers):
            a, b = (alpha[0], beta[0]) if shared else (alpha[k], beta[k])
            prox = None
            if self.refine is not None and k == self.layers - 1:
                def prox(y: torch.Tensor) -> torch.Tensor:
                    return torch.relu(y + self.refine(y))
            w, v = pds_step(w, v, z, self.d, gamma[k], a, b, prox,
                            None if tau is None else tau[k])
            out.append(w)
        return torch.stack(out) if all_layers else w


def evaluate(model: UnrolledPDS, data: GraphData) -> torch.Tensor:
    """Per-graph GMSE (G,) of the network's w_K (clamped at 0) on ``data``."""
    with torch.no_grad():
        return gmse(model(data.z).clamp_min(0), data.w)


def train_unrolled(model: UnrolledPDS, train: GraphData, val: GraphData | None = None, *,
                   epochs: int = 30, batch_size: int = 32, lr: float = 0.02,
                   discount: float | None = None, cosine: bool = False, clamp: bool = False,
                   lr_refine: float = 1e-3, seed: int = 0, progress: bool = True) -> dict:
    """Adam on the mean GMSE of w_K over minibatches of training graphs.

    Args:
        model: the network (trained in place). train, val: graphs; val, if given, is
            scored after each epoch and the parameters of the best epoch are kept.
        epochs, batch_size, lr: Adam on the log-parameters (log γ_k, log τ_k, log α, log β),
            minibatches reshuffled each epoch (``seed``).
        lr_refine: Adam's rate for the refinement MLP's weights, if the model has one.
        discount: None trains on the GMSE of the last layer; a number δ in (0, 1] trains on
            Σ_k δ^{K−k} GMSE(w_k), every layer's error (the paper's cumulative loss, δ = 0.9).
        cosine: anneal the learning rate to 0 over the epochs (cosine schedule).
        clamp: train on max(w_K, 0), the output that :func:`evaluate` scores.
        progress: a tqdm bar on stderr.

    Returns:
        dict: ``train_gmse`` and ``val_gmse`` per epoch (``val_gmse[0]`` is the untrained
        network), ``best_epoch``, ``seconds``.
    """
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    _check_positive(lr, "lr")
    _check_z(train.z, "train.z")
    if discount is not None and not 0 < discount <= 1:
        raise BilevelInputError(f"discount must be None or in (0, 1], got {discount!r}")
    weights = None if discount is None else \
        discount ** torch.arange(model.layers - 1, -1, -1, dtype=train.z.dtype)
    gen = torch.Generator().manual_seed(seed)
    solver = [p for name, p in model.named_parameters() if not name.startswith("refine.")]
    groups = [{"params": solver, "lr": lr}]
    if model.refine is not None:
        groups.append({"params": list(model.refine.parameters()), "lr": lr_refine})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if cosine else None
    hist: dict = {"train_gmse": [], "val_gmse": []}
    best, best_state = math.inf, None
    if val is not None:
        best = evaluate(model, val).mean().item()
        hist["val_gmse"].append(best)
        best_state, hist["best_epoch"] = {k: t.clone() for k, t in model.state_dict().items()}, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="train unrolled PDS", unit="epoch", dynamic_ncols=True)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(train), generator=gen)
        losses = []
        for i in range(0, len(train), batch_size):
            batch = train.subset(perm[i:i + batch_size])
            if discount is None:
                w = model(batch.z)
                loss = gmse(w.clamp_min(0) if clamp else w, batch.w).mean()
            else:
                errs = gmse(model(batch.z, all_layers=True), batch.w).mean(-1)  # (K,)
                loss = (weights * errs).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if sched is not None:
            sched.step()
        hist["train_gmse"].append(float(np.mean(losses)))
        if val is not None:
            err = evaluate(model, val).mean().item()
            hist["val_gmse"].append(err)
            if err < best:
                best, hist["best_epoch"] = err, epoch
                best_state = {k: t.clone() for k, t in model.state_dict().items()}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{hist['train_gmse'][-1]:.4f}",
                            val=f"{hist['val_gmse'][-1]:.4f}" if val is not None else "-")
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    hist["seconds"] = time.perf_counter() - start
    return hist

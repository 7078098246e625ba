"""Graph learning from smooth signals (Kalofolias 2016) and its unrolled PDS (Pu et al. 2021)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("networkx")

from bilevel import graphs as gl  # noqa: E402
from hypergrad.errors import BilevelInputError  # noqa: E402
from hypergrad.finite_difference import central_differences  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return gl.make_graphs(8, nodes=8, signals=200, edges_per_node=2, seed=3)


def test_data_conventions(small):
    assert small.z.shape == small.w.shape == (8, 28) and small.nodes == 8
    # w* scaled so that the weighted adjacency sums to n: 1ᵀw = n/2
    torch.testing.assert_close(small.w.sum(1), torch.full((8,), 4.0, dtype=torch.float64))
    # a Barabási–Albert graph with 2 edges per new node has 2(n − 2) edges
    assert ((small.w > 0).sum(1) == 12).all()
    assert (small.z >= 0).all()
    torch.testing.assert_close(small.z.mean(1), torch.ones(8, dtype=torch.float64))  # z / mean z
    # signals are smooth on the graph: connected pairs are closer than the others
    assert small.z[small.w > 0].mean() < 0.7 * small.z[small.w == 0].mean()
    again = gl.make_graphs(8, nodes=8, signals=200, edges_per_node=2, seed=3)
    assert torch.equal(again.z, small.z) and torch.equal(again.w, small.w)


def test_degree_operator_and_adjoint():
    n = 7
    d = gl.degree_operator(n)
    g = torch.Generator().manual_seed(0)
    w = torch.rand(gl.num_pairs(n), generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(d @ w, gl.to_matrix(w).sum(1))  # Dw = degrees
    torch.testing.assert_close((d @ w) @ y, w @ (d.T @ y))  # ⟨Dw, y⟩ = ⟨w, Dᵀy⟩
    i, j = torch.triu_indices(n, n, 1)
    torch.testing.assert_close(d.T @ y, y[i] + y[j])
    assert torch.linalg.matrix_norm(d, 2).item() == pytest.approx(math.sqrt(2 * (n - 1)))


def test_one_layer_equals_closed_form():
    # From w = 0, v = 0: y = −2γz, p = 0, p̄ = −√(αγ) 1, so w₁ = 2γ√(αγ)·1 (Dᵀ1 = 2) and
    # v₁ = −√(αγ) 1.
    n, gamma, alpha, beta = 6, 0.07, 1.3, 0.4
    z = torch.rand(1, gl.num_pairs(n), dtype=torch.float64)
    w1, v1 = gl.pds_step(torch.zeros_like(z), torch.zeros(1, n, dtype=torch.float64), z,
                         gl.degree_operator(n), gamma, alpha, beta)
    torch.testing.assert_close(w1, torch.full_like(z, 2 * gamma * math.sqrt(alpha * gamma)))
    torch.testing.assert_close(v1, torch.full((1, n), -math.sqrt(alpha * gamma),
                                              dtype=torch.float64))
    net = gl.UnrolledPDS(1, n, alpha=alpha, beta=beta, gamma=gamma)
    torch.testing.assert_close(net(z), w1)


def test_classic_pds_reaches_kkt_point(small):
    alpha, beta = 1.0, 0.5
    z = small.z[:3]
    w = gl.solve_pds(z, alpha, beta, iterations=3000)
    # optimality: gradient 0 on the support, >= 0 off it
    assert gl.kkt_residual(w, z, alpha, beta).max() < 1e-6
    assert (w == 0).any() and (w > 0).any()  # the solution is sparse, with active bounds
    # and a few iterations are worse than the solution, by the objective and by the residual
    few = gl.solve_pds(z, alpha, beta, iterations=5)
    assert (gl.objective(few, z, alpha, beta) > gl.objective(w, z, alpha, beta) + 1e-3).all()
    assert gl.kkt_residual(few, z, alpha, beta).min() > 1e-2
    # no feasible perturbation improves the objective
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        other = (w + 1e-3 * torch.randn(w.shape, generator=g, dtype=w.dtype)).clamp_min(0)
        assert (gl.objective(other, z, alpha, beta) >= gl.objective(w, z, alpha, beta)).all()


def test_scale_equivariance_of_the_model(small):
    # w*(α, β) = α w*(1, αβ): the shape depends on αβ, the scale on α.
    z = small.z[:2]
    a = gl.solve_pds(z, 2.0, 0.25, iterations=3000)
    b = gl.solve_pds(z, 1.0, 0.5, iterations=3000)
    torch.testing.assert_close(a, 2 * b, atol=1e-6, rtol=1e-6)


def test_unrolled_gradients_match_finite_differences(small):
    net = gl.UnrolledPDS(4, 8, alpha=0.8, beta=0.6, gamma=0.08, per_layer=True,
                         dual_steps=True, init_noise=0.1)
    z, w_true = small.z[:2], small.w[:2]
    params = list(net.parameters())

    def loss() -> torch.Tensor:
        return gl.gmse(net(z), w_true).mean()

    grads = torch.autograd.grad(loss(), params)
    flat = torch.cat([p.detach().flatten() for p in params])
    grad = torch.cat([g.flatten() for g in grads])

    def at(x: torch.Tensor) -> float:  # the loss with the parameters set to x
        with torch.no_grad():
            saved = [p.clone() for p in params]
            torch.nn.utils.vector_to_parameters(x, params)
            value = loss().item()
            for p, old in zip(params, saved, strict=True):
                p.copy_(old)
        return value

    gen = torch.Generator().manual_seed(0)
    dirs = [d / d.norm() for d in torch.randn(4, flat.numel(), generator=gen,
                                               dtype=flat.dtype)]
    fd = central_differences(at, flat, dirs, 1e-4)  # error bars from the differences
    est = torch.stack([grad @ d for d in dirs])
    assert bool(fd.asymptotic.all()) and bool((fd.error <= 1e-2 * fd.value.abs()).all()), fd
    assert bool(((est - fd.value).abs() <= fd.error).all()), (est, fd.value, fd.error)


def test_short_training_beats_the_untrained_network():
    train = gl.make_graphs(64, nodes=10, signals=100, edges_per_node=2, seed=0)
    test = gl.make_graphs(32, nodes=10, signals=100, edges_per_node=2, seed=1)
    net = gl.UnrolledPDS(8, 10, alpha=1.0, beta=1.0)
    before = gl.evaluate(net, test).mean().item()
    hist = gl.train_unrolled(net, train, epochs=15, batch_size=16, lr=0.05, progress=False)
    after = gl.evaluate(net, test).mean().item()
    assert after < 0.8 * before, (before, after)
    assert hist["train_gmse"][-1] < hist["train_gmse"][0]


def test_refinement_starts_as_the_plain_network_and_is_trained(small):
    plain = gl.UnrolledPDS(5, 8, alpha=0.8, beta=0.6, per_layer=True)
    refined = gl.UnrolledPDS(5, 8, alpha=0.8, beta=0.6, per_layer=True, refine=16)
    torch.testing.assert_close(refined(small.z), plain(small.z))  # zero-initialised output
    loss = gl.gmse(refined(small.z), small.w).mean()
    grads = torch.autograd.grad(loss, [refined.refine[2].weight, refined.log_gamma])
    assert all(g.abs().sum() > 0 for g in grads)  # the MLP and the steps both learn


def test_dual_steps_and_jitter(small):
    base = gl.UnrolledPDS(5, 8, alpha=0.8, beta=0.6, per_layer=True)
    dual = gl.UnrolledPDS(5, 8, alpha=0.8, beta=0.6, per_layer=True, dual_steps=True)
    torch.testing.assert_close(dual(small.z), base(small.z))  # τ_k starts at γ_k
    with torch.no_grad():
        dual.log_tau.add_(0.3)
    assert not torch.allclose(dual(small.z), base(small.z))  # and is used
    a = gl.UnrolledPDS(5, 8, per_layer=True, init_noise=0.2, seed=4)
    b = gl.UnrolledPDS(5, 8, per_layer=True, init_noise=0.2, seed=4)
    assert torch.equal(a.log_gamma, b.log_gamma) and a.log_gamma.std() > 0.05
    assert (base.log_gamma == base.log_gamma[0]).all()  # no jitter: identical layers


def test_gmse_and_rescaling():
    w_true = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    assert gl.gmse(w_true, w_true).item() == 0
    assert gl.gmse(torch.zeros_like(w_true), w_true).item() == pytest.approx(1.0)
    # a rescaled copy has GMSE > 0 but rescaled GMSE 0
    assert gl.gmse(3 * w_true, w_true).item() == pytest.approx(4.0)
    assert gl.rescaled_gmse(3 * w_true, w_true).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: gl.make_graphs(2, nodes=1), "nodes"),
    (lambda: gl.make_graphs(2, nodes=5, signals=-3), "signals"),
    (lambda: gl.make_graphs(0), "num_graphs"),
    (lambda: gl.make_graphs(2, nodes=3, edges_per_node=3), "edges_per_node"),
    (lambda: gl.make_graphs(2, weight_sigma=-1.0), "weight_sigma"),
    (lambda: gl.degree_operator(1), "nodes"),
    (lambda: gl.solve_pds(torch.ones(2, 5), 1.0, 1.0), r"n\(n-1\)/2"),
    (lambda: gl.solve_pds(-torch.ones(2, 6), 1.0, 1.0), ">= 0"),
    (lambda: gl.solve_pds(torch.ones(2, 6), 0.0, 1.0), "alpha"),
    (lambda: gl.solve_pds(torch.ones(2, 6), 1.0, 1.0, iterations=0), "iterations"),
    (lambda: gl.UnrolledPDS(0, 5), "layers"),
    (lambda: gl.UnrolledPDS(3, 5, beta=-1.0), "beta"),
    (lambda: gl.UnrolledPDS(3, 5)(torch.ones(2, 6)), "5 nodes"),
    (lambda: gl.UnrolledPDS(3, 5, init_noise=-0.1), "init_noise"),
    (lambda: gl.UnrolledPDS(3, 5)(torch.ones(2, 10, dtype=torch.float32)), "float32"),
    (lambda: gl.gmse(torch.ones(2, 6), torch.ones(2, 5)), "must match"),
    (lambda: gl.gmse(torch.ones(2, 6), torch.zeros(2, 6)), "no edges"),
    (lambda: gl.rescaled_gmse(torch.ones(2, 6), torch.ones(3, 6)), "must match"),
    (lambda: gl.train_unrolled(gl.UnrolledPDS(2, 4), gl.GraphData(torch.ones(2, 6),
                                                                   torch.ones(2, 6)),
                               epochs=0), "epochs"),
])
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises(BilevelInputError, match=match):
        call()


def test_example_runs_and_reports(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "graph_learning.py"), "--train-graphs", "48",
         "--val-graphs", "16", "--test-graphs", "16", "--nodes", "10", "--edges-per-node", "2",
         "--signals", "100", "--layers", "6", "--epochs", "8", "--grid", "3",
         "--pds-iterations", "100", "--variants", "plain", "--no-progress",
         "--out", str(tmp_path)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "graph_learning.png").stat().st_size > 0
    r = s["results"]
    learned, untrained = r["unrolled PDS (γ_k, α_k, β_k)"], r["classic PDS (same α, β; 6 it)"]
    # six layers at the classic step are far from converged; training fixes much of that
    assert learned["gmse_mean"] < 0.8 * untrained["gmse_mean"], r
    assert len(s["history"]["plain"]["val_gmse"]) == 9  # untrained + 8 epochs
    assert len(s["classic_grid"]["grid"]) == 9
    assert "target (learned unrolled PDS GMSE ≤ 0.10), plain" in proc.stdout
    assert "L2G (paper)" in proc.stdout

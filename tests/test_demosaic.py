"""Demosaicking by unrolled GLR layers (bilevel.demosaic): masks, baselines, the GLR solve,
its unrolled and implicit gradients, training."""

import math

import pytest
import torch

from bilevel import demosaic as dm
from hypergrad.errors import BilevelInputError

D = torch.float64


def _problem(h=6, w=6, batch=2, window=3, seed=0):
    """A random graph (from random features), observations and masks, float64."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, 2, h, w, generator=gen, dtype=D)
    x = torch.rand(batch, 3, h, w, generator=gen, dtype=D)
    y, m = dm.mosaic(x)
    return feats, y, m, window


def _dense_laplacian(wts):
    """The dense L of one image's graph, by applying laplacian_apply to the basis."""
    h, w = wts.shape[-2:]
    eye = torch.eye(h * w, dtype=wts.dtype).reshape(h * w, 1, h, w)
    cols = dm.laplacian_apply(wts[:1].expand(h * w, -1, -1, -1), eye)
    return cols.reshape(h * w, h * w).T


def test_bayer_masks_rggb():
    m = dm.bayer_masks(4, 6)
    assert m.shape == (1, 3, 4, 6)
    assert torch.equal(m.sum(1), torch.ones(1, 4, 6))
    assert m[0, 0, 0, 0] == 1 and m[0, 1, 0, 1] == 1 and m[0, 1, 1, 0] == 1 and m[0, 2, 1, 1] == 1
    assert m[0, 0].sum() == 6 and m[0, 1].sum() == 12 and m[0, 2].sum() == 6
    x = torch.rand(2, 3, 4, 6)
    y, m2 = dm.mosaic(x)
    assert torch.equal(m2, m)
    assert torch.equal(y, m * x)  # observed kept, the rest zero
    yn, _ = dm.mosaic(x, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(yn * (1 - m), torch.zeros_like(yn))
    assert 0.05 < float((yn - y)[m.expand_as(y) > 0].std()) < 0.15


def test_bad_inputs_raise():
    with pytest.raises(BilevelInputError, match="height"):
        dm.bayer_masks(1, 4)
    with pytest.raises(BilevelInputError, match=r"\(B, 3, H, W\)"):
        dm.mosaic(torch.rand(3, 4, 4))
    with pytest.raises(BilevelInputError, match="sigma"):
        dm.mosaic(torch.rand(1, 3, 4, 4), -1.0)
    with pytest.raises(BilevelInputError, match="odd"):
        dm.window_offsets(4)
    with pytest.raises(BilevelInputError, match="backward"):
        dm.glr_interpolate(torch.rand(1, 8, 4, 4), torch.rand(1, 3, 4, 4),
                           torch.ones(1, 3, 4, 4), backward="adjoint")
    with pytest.raises(BilevelInputError, match="differs"):
        dm.psnr(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))


def test_mosaic_refuses_values_outside_unit_range():
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x255 = torch.round(x * 255)
    x255[0, 0, 0, 0], x255[0, 0, 0, 1] = 0.0, 255.0  # an 8-bit image not divided by 255
    with pytest.raises(BilevelInputError, match=r"\[0, 1\].*found \[0, 255\].*divide by 255"):
        dm.mosaic(x255)
    shifted = x.clone()
    shifted[0, 1, 2, 3] = -0.5
    with pytest.raises(BilevelInputError, match=r"found \[-0.5, "):
        dm.mosaic(shifted)
    with pytest.raises(BilevelInputError, match="nan"):
        dm.mosaic(torch.where(x > 0.5, float("nan"), x))
    y, m = dm.mosaic(torch.cat([x, torch.zeros_like(x), torch.ones_like(x)]))  # edges accepted
    assert torch.equal(y, m * torch.cat([x, torch.zeros_like(x), torch.ones_like(x)]))


def test_glr_window_checked_at_construction():
    for window in (4, 1, 2.0, True):
        with pytest.raises(BilevelInputError, match=f"window must be an odd int >= 3, got "
                                                    f"{window!r}"):
            dm.UnrolledGLRNet(2, window=window)
    assert dm.UnrolledGLRNet(1, window=5).layers[0].window == 5


def test_networks_refuse_a_mask_that_is_not_0_1():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y, m = dm.mosaic(x)
    torch.manual_seed(0)
    nets = [dm.UnrolledGLRNet(1, window=3), dm.GLRLayer(window=3), dm.PlainCNN(2, 4)]
    for bad in (0.5 * m, 255 * m, m + 0.1):
        for net in nets:
            args = (dm.bilinear_demosaic(y, m), y, bad) if isinstance(net, dm.GLRLayer) else (
                y, bad)
            with pytest.raises(BilevelInputError, match="0/1 mask"):
                net(*args)
    with torch.no_grad():  # the 0/1 mask (and a bool-valued float mask) is accepted
        out = nets[0](y, m)
    assert out.shape == x.shape and torch.allclose(out[m.expand_as(out) > 0], y[m.expand_as(y) > 0])


def test_bilinear_exact_on_linear_images_in_the_interior():
    ii, jj = torch.meshgrid(torch.arange(10, dtype=D), torch.arange(12, dtype=D), indexing="ij")
    x = torch.stack([0.1 + 0.02 * ii + 0.03 * jj, 0.5 - 0.01 * ii + 0.02 * jj,
                     0.3 + 0.04 * ii - 0.01 * jj])[None]
    y, m = dm.mosaic(x)
    est = dm.bilinear_demosaic(y, m)
    assert torch.allclose(est[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1], atol=1e-12)
    assert not torch.allclose(est, x, atol=1e-3)  # the border is not exact for a ramp
    const = torch.full((1, 3, 7, 9), 0.4, dtype=D)
    assert torch.allclose(dm.bilinear_demosaic(*dm.mosaic(const)), const, atol=1e-12)


def test_classical_wrappers_match_our_pattern():
    pytest.importorskip("colour_demosaicing")
    pytest.importorskip("skimage")
    x = dm.load_images(["chelsea"], D)[0][None, :, 100:164, 200:264]
    y, m = dm.mosaic(x)
    ours = dm.bilinear_demosaic(y, m)
    theirs = dm.classical_demosaic(y, "bilinear")
    # same RGGB convention: the package's bilinear equals ours away from the border
    assert torch.allclose(ours[..., 2:-2, 2:-2], theirs[..., 2:-2, 2:-2], atol=1e-6)
    p_bil = dm.psnr(ours, x, 4)
    assert dm.psnr(dm.classical_demosaic(y, "malvar"), x, 4) > p_bil + 1
    assert dm.psnr(dm.classical_demosaic(y, "menon"), x, 4) > p_bil + 1
    with pytest.raises(BilevelInputError, match="method"):
        dm.classical_demosaic(y, "ahd")


def test_psnr_known_values():
    t = torch.zeros(1, 3, 8, 8)
    assert dm.psnr(t + 0.1, t) == pytest.approx(20.0)
    assert dm.psnr(t, t) == math.inf
    e = t.clone()
    e[..., 0, :] = 1.0  # error on the border only
    assert dm.psnr(e, t, border=1) == math.inf
    assert dm.psnr(e, t) == pytest.approx(10 * math.log10(8.0))


def test_graph_is_symmetric_row_normalised_laplacian():
    feats, _, _, _ = _problem(5, 6, batch=1, window=5)
    w = dm.graph_weights(feats, 5)
    assert w.shape == (1, 24, 5, 6) and bool((w >= 0).all())
    L = _dense_laplacian(w)
    assert torch.allclose(L, L.T, atol=1e-14)
    assert torch.allclose(L.sum(1), torch.zeros(30, dtype=D), atol=1e-12)
    assert float(torch.linalg.eigvalsh(L).min()) > -1e-12
    # the un-symmetrised softmax rows sum to 1, so the degrees average to 1
    assert float(w.sum(1).mean()) == pytest.approx(1.0, abs=1e-12)
    # edges only inside the 5x5 window
    i, j = divmod(0, 6), divmod(29, 6)
    assert L[0, 29] == 0 and max(abs(i[0] - j[0]), abs(i[1] - j[1])) > 2


@pytest.mark.parametrize("backward", ["unrolled", "implicit"])
def test_glr_solve_optimality_and_observed_pixels(backward):
    feats, y, m, win = _problem(8, 8, window=3)
    w = dm.graph_weights(feats, win)
    x = dm.glr_interpolate(w, y, 1 - m, steps=200, backward=backward, tol=1e-13)
    free = (1 - m).expand_as(y)
    assert torch.equal(x * m, y)  # observed pixels kept exactly
    residual = free * dm.laplacian_apply(w, x)  # L_uu x_u + L_uo y_o
    assert float(residual.abs().max()) < 1e-10
    # against the dense solve for one image and channel
    L = _dense_laplacian(w)
    u = free[0, 0].flatten() > 0
    xu = torch.linalg.solve(L[u][:, u], -L[u][:, ~u] @ y[0, 0].flatten()[~u])
    assert torch.allclose(x[0, 0].flatten()[u], xu, atol=1e-10)
    # few CG steps from the bilinear start are not converged yet
    x3 = dm.glr_interpolate(w, y, 1 - m, steps=2, init=dm.bilinear_demosaic(y, m))
    assert float((free * dm.laplacian_apply(w, x3)).abs().max()) > 1e-6


def test_soft_glr_is_the_regularised_least_squares():
    feats, y, m, win = _problem(6, 6, batch=1, window=3)
    w = dm.graph_weights(feats, win)
    mu = 0.3
    x = dm.glr_interpolate(w, y, torch.ones_like(m), m, mu, steps=300, tol=1e-14)
    L = _dense_laplacian(w)
    A = torch.diag(m[0, 1].flatten()) + mu * L
    assert torch.allclose(x[0, 1].flatten(), torch.linalg.solve(A, y[0, 1].flatten()),
                          atol=1e-10)


def _grads(backward, steps, feats, y, m, win, c):
    feats = feats.clone().requires_grad_()
    y = y.clone().requires_grad_()
    w = dm.graph_weights(feats, win)
    x = dm.glr_interpolate(w, y, 1 - m, steps=steps, backward=backward)
    (x * c).sum().backward()
    return torch.cat([feats.grad.flatten(), y.grad.flatten()])


def test_unrolled_gradient_converges_to_the_implicit_one():
    feats, y, m, win = _problem(6, 6, window=3)
    c = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    g_imp = _grads("implicit", 1, feats, y, m, win, c)
    errs = [float((_grads("unrolled", k, feats, y, m, win, c) - g_imp).norm() / g_imp.norm())
            for k in (2, 5, 10, 20, 30, 60)]
    # far from convergence: a different gradient (and not monotonically closer: the
    # derivative of CG's iterates oscillates before it settles, cf. the curse of unrolling)
    assert min(errs[:3]) > 1e-2, errs
    assert errs[3] < errs[0]
    assert max(errs[4:]) < 1e-6, errs  # converged forward: the implicit gradient


@pytest.mark.parametrize("backward", ["unrolled", "implicit"])
def test_glr_layer_gradient_matches_finite_differences(backward):
    torch.manual_seed(0)
    layer = dm.GLRLayer(features=4, rank=2, window=3, steps=4).double()
    x = torch.rand(1, 3, 6, 6, dtype=D, generator=torch.Generator().manual_seed(2))
    y, m = dm.mosaic(x)
    xhat = dm.bilinear_demosaic(y, m)
    c = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=D)
    params = dict(layer.named_parameters())
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(4), dtype=D)
         for k, p in params.items()}

    def f(ps):
        out = torch.func.functional_call(layer, ps, (xhat, y, m, backward))
        return (out * c).sum()

    loss = f(params)
    grads = torch.autograd.grad(loss, list(params.values()))
    directional = sum(float((g * v[k]).sum()) for g, k in zip(grads, params, strict=True))
    eps = 1e-6
    with torch.no_grad():
        plus = f({k: p + eps * v[k] for k, p in params.items()})
        minus = f({k: p - eps * v[k] for k, p in params.items()})
    fd = float(plus - minus) / (2 * eps)
    # the implicit backward is the gradient of the exact solve (what its forward computes)
    assert directional == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_training_beats_the_untrained_network_on_held_out_patches():
    torch.manual_seed(0)
    ii, jj = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    # a colour texture near the Bayer frequencies, where bilinear interpolation errs
    def texture(phase: float) -> torch.Tensor:
        return torch.stack([0.5 + 0.4 * torch.sin(1.1 * ii + 0.6 * jj + phase),
                            0.5 + 0.4 * torch.sin(0.7 * ii - 1.2 * jj + 2 * phase),
                            0.5 + 0.3 * torch.cos(0.9 * ii + 0.9 * jj - phase)])

    images = [texture(0.0)]
    # held out: patches of another image of the family (shifted phases), never trained on
    x = dm.random_patches([texture(1.3)], 4, 16, torch.Generator().manual_seed(6))
    y, m = dm.mosaic(x)
    for model, lr in ((dm.UnrolledGLRNet(1, features=4, rank=2, window=3, steps=3), 3e-2),
                      (dm.PlainCNN(3, 8), 1e-2)):
        with torch.no_grad():
            before = float(((model(y, m) - x) ** 2).mean())
        res = dm.train(model, images, steps=30, batch=4, size=16, lr=lr, border=2)
        with torch.no_grad():
            after = float(((model(y, m) - x) ** 2).mean())
        assert len(res.losses) == 30 and res.seconds > 0
        assert after < 0.9 * before, (type(model).__name__, before, after)


def test_parameter_counts():
    assert dm.count_parameters(dm.PlainCNN(5, 32)) == 896 + 3 * 9248 + 867
    layer = dm.GLRLayer(features=12, rank=6, window=5)
    # conv 3x3, 1x1 mixing, metric Q (6x12), guide filter 3->3 5x5
    assert dm.count_parameters(layer) == 3 * 12 * 9 + 12 + 12 * 12 + 12 + 12 * 6 + 9 * 25
    assert dm.count_parameters(dm.GLRLayer(soft=True)) == dm.count_parameters(layer) + 1


def test_example_runs_and_writes_its_results(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("colour_demosaicing")
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demosaic.json"
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "demosaic.py"), "--steps", "3",
         "--test-crop", "64", "--cnn-widths", "4", "--layers", "1", "--no-progress",
         "--json", str(out), "--png", str(tmp_path / "demosaic.png")],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # settings that cannot work are refused before any training
    bad = subprocess.run([sys.executable, str(root / "examples" / "demosaic.py"), "--steps",
                          "0"], cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps must be >= 1, got 0" in bad.stderr
    res = json.loads(out.read_text())
    assert set(res["psnr_db"]) == {"bilinear", "Malvar 2004", "Menon 2007", "CNN-5x4",
                                   "GLR-unrolled"}
    assert all(len(v) == 3 for v in res["psnr_db"].values())  # three test noise levels
    # noise lowers the bilinear PSNR; parameters counted
    bil = res["psnr_db"]["bilinear"]
    assert bil["sigma=0.0000"] > bil["sigma=0.0196"] > bil["sigma=0.0392"]
    assert res["params"]["CNN-5x4"] == dm.count_parameters(dm.PlainCNN(5, 4))
    assert res["backward_comparison"]["rel_grad_diff_unrolled200_vs_implicit_float64"] < 1e-6
    assert (tmp_path / "demosaic.png").stat().st_size > 1000


def test_per_channel_graphs_equal_separate_solves():
    feats, y, m, win = _problem(6, 6, batch=1, window=3)
    gen = torch.Generator().manual_seed(7)
    ws = [dm.graph_weights(torch.randn(1, 2, 6, 6, generator=gen, dtype=D), win)
          for _ in range(3)]
    x = dm.glr_interpolate(torch.stack(ws, 1), y, 1 - m, steps=100, tol=1e-13)
    for c in range(3):
        xc = dm.glr_interpolate(ws[c], y, 1 - m, steps=100, tol=1e-13)
        assert torch.allclose(x[:, c], xc[:, c], atol=1e-10)
    layer = dm.GLRLayer(features=4, rank=2, window=3, shared=False).double()
    assert layer.weights(dm.bilinear_demosaic(y, m)).shape == (1, 3, 8, 6, 6)


def test_soft_layer_learns_mu_and_smooths_observed_pixels():
    torch.manual_seed(0)
    layer = dm.GLRLayer(features=4, rank=2, window=3, steps=5, soft=True).double()
    x = torch.rand(1, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(8))
    y, m = dm.mosaic(x)
    out = layer(dm.bilinear_demosaic(y, m), y, m)
    assert not torch.allclose(out * m, y)  # soft: the observed pixels move
    ((out - x) ** 2).sum().backward()
    assert layer.log_mu.grad is not None and float(layer.log_mu.grad.abs()) > 0
    hard = dm.GLRLayer(features=4, rank=2, window=3, steps=5).double()
    assert torch.allclose(hard(dm.bilinear_demosaic(y, m), y, m) * m, y, atol=1e-12, rtol=0)


def test_unrolled_cg_reaches_the_exact_glr_solve_in_as_many_steps_as_unknowns():
    """CG is exact after (at most) as many steps as unknowns: K = n_u unrolled steps give
    the dense solve L_uu x_u = −L_uo y_o to 1e-8, fewer do not."""
    feats, y, m, win = _problem(5, 5, batch=1, window=3)
    w = dm.graph_weights(feats, win)
    L = _dense_laplacian(w)
    free = (1 - m).expand_as(y)
    n_u = int(free[0].flatten(1).sum(1).max())  # the channel with most unknowns (blue: 21)
    exact = []
    for c in range(3):
        u = free[0, c].flatten() > 0
        exact.append(torch.linalg.solve(L[u][:, u], -L[u][:, ~u] @ y[0, c].flatten()[~u]))

    def error(steps: int) -> float:
        x = dm.glr_interpolate(w, y, 1 - m, steps=steps, backward="unrolled", tol=0.0)
        return max(float((x[0, c].flatten()[free[0, c].flatten() > 0] - e).norm() / e.norm())
                   for c, e in enumerate(exact))

    assert error(n_u) < 1e-8
    assert error(n_u // 4) > 1e-6

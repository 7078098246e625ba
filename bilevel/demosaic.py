"""Demosaicking by unrolled graph-smoothness priors (a lightweight "graph transformer").

A Bayer RGGB sensor observes one colour per pixel: R at (even row, even column), B at
(odd, odd), G at the two other sites. With x ∈ R^{3×H×W} the image and m ∈ {0,1}^{3×H×W}
the colour-filter masks (:func:`bayer_masks`), the observation is y = m ⊙ x (+ noise), and
demosaicking recovers the 2/3 of the values that are missing.

Graph Laplacian regulariser (GLR; Pang & Cheung 2017). Given a graph on the pixels with
symmetric non-negative edge weights w_ij, L = D − W and

    xᵀ L x = ½ Σ_i Σ_{j ∈ N(i)} w_ij (x_i − x_j)²

is small for signals that are smooth on the graph. Interpolation keeps the observed pixels o
and fills the unobserved ones u by min_x xᵀLx subject to x_o = y_o, i.e. the linear system

    L_uu x_u = −L_uo y_o                                                     (hard GLR)

(positive definite when every connected part of u is linked to o), or the soft version
min_x ‖m ⊙ (x − y)‖² + μ xᵀLx, i.e. (diag(m) + μL) x = m ⊙ y, which also smooths the
observed pixels (noise). Both are written here as A z = b on the free pixels (``free`` = 1 − m
and ``data`` = 0 for the hard version, ``free`` = 1 and ``data`` = m for the soft one):

    A z = free ⊙ (μ L (free ⊙ z) + data ⊙ z),   b = free ⊙ (data ⊙ y − μ L((1 − free) ⊙ y)),
    x = (1 − free) ⊙ y + free ⊙ z.

L is never formed: the graph links each pixel to the other pixels of a k×k window (offsets
o ∈ O, |O| = k² − 1), the weights are stored per pixel and offset, w ∈ R^{|O|×H×W}, and
(Lx)_i = Σ_o w_o(i) (x_i − x_{i+o}) is applied with shifts (:func:`laplacian_apply`). A few
steps of (Jacobi-preconditioned) conjugate gradient solve the system (:func:`glr_interpolate`).

Learned graphs: self-attention (Do et al. 2024). A layer computes shallow convolutional
features f_i of its current estimate, maps them by a low-rank Q (the Mahalanobis metric
M = QᵀQ) and sets, over the window of pixel i,

    a_ij = exp(−(f_i − f_j)ᵀ M (f_i − f_j)) / Σ_{l ∈ N(i)} exp(−(f_i − f_l)ᵀ M (f_i − f_l)),

a softmax over the window of negative Mahalanobis distances: a row of an attention matrix
whose keys and queries are the same features (‖Qf_i‖² − 2⟨Qf_i, Qf_j⟩ + ‖Qf_j‖²: dot-product
attention with a key-norm bias, restricted to a local window). Symmetrised,
w_ij = (a_ij + a_ji)/2 are the edge weights of L (:func:`graph_weights`). The "value"
aggregation of a transformer is replaced by the GLR solve, a few CG steps, so a layer has
only the parameters of its feature map and metric (a few hundred): an interpretable
lightweight transformer. Here the three channels share one graph, and each layer
interpolates colour differences: channel c interpolates y_c − s_c with the guide
s = Γ * x̂ (x̂ the previous estimate, Γ a learned linear filter from 3 to 3 channels; its
centre taps Γ_R,G = Γ_B,G = 1 at initialisation are the classic "interpolate R − G and
B − G" of demosaicking, its other taps can learn Malvar-like gradient corrections), then
adds s_c back; the observed pixels stay exact (:class:`GLRLayer`, :class:`UnrolledGLRNet`).

Backward. :func:`glr_interpolate` differentiates either by autograd through its K CG steps
(``backward="unrolled"``: memory O(K), the exact gradient of the K-step map) or by the
implicit function theorem applied to the exact solve (``backward="implicit"``,
:func:`hypergrad.custom_root` with optimality A z − b = 0, symmetric so CG in the backward);
both agree when the forward has converged.

Baselines: bilinear interpolation (:func:`bilinear_demosaic`, a normalised convolution),
Malvar, He & Cutler 2004 and Menon, Andriani & Calvagno 2007 (from the ``colour-demosaicing``
package, :func:`classical_demosaic`), and a plain residual CNN (:class:`PlainCNN`).

Data: the colour images scikit-image ships (:func:`load_images`); training samples random
patches (:func:`random_patches`), :func:`train` runs Adam on the mean squared error and
:func:`evaluate` reports PSNR (:func:`psnr`) on full images.

References:
    T. Do, P. Eftekhar, S. A. Hosseini, G. Cheung, P. Chou, "Interpretable Lightweight
    Transformer via Unrolling of Learned Graph Smoothness Priors", NeurIPS 2024.
    J. Pang, G. Cheung, "Graph Laplacian Regularization for Image Denoising: Analysis in
    the Continuous Domain", IEEE TIP 2017.
    H. S. Malvar, L.-W. He, R. Cutler, "High-quality linear interpolation for demosaicing
    of Bayer-patterned color images", ICASSP 2004.
    D. Menon, S. Andriani, G. Calvagno, "Demosaicing With Directional Filtering and a
    posteriori Decision", IEEE TIP 2007.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hypergrad.errors import BilevelInputError

#: the colour images scikit-image ships without a download (``skimage.data`` names)
COLOUR_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                 "colorwheel", "stereo_motorcycle", "hubble_deep_field", "retina")
TRAIN_IMAGES = ("astronaut", "rocket", "stereo_motorcycle")
TEST_IMAGES = ("chelsea", "coffee", "immunohistochemistry")
#: the validation images of the configuration choice (:func:`load_validation_images`):
#: neither a training nor a test image
VALIDATION_IMAGES = ("stereo_motorcycle right view", "retina centre 512x512")


# --- Bayer pattern, baselines, PSNR --------------------------------------------------------


def _check_image(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise BilevelInputError(f"{name} must be a tensor of shape (B, 3, H, W), got {shape}")
    if not x.dtype.is_floating_point:
        raise BilevelInputError(f"{name} must be floating point, got {x.dtype}")


def _check_mask(m: torch.Tensor, name: str = "m") -> None:
    """Refuse masks that are not 0/1 (a fractional or 0..255 mask would silently weight the
    observations)."""
    if not isinstance(m, torch.Tensor):
        raise BilevelInputError(f"{name} must be a 0/1 mask tensor, got {type(m).__name__}")
    bad = (m != 0) & (m != 1)
    if bool(bad.any()):
        raise BilevelInputError(f"{name} must be a 0/1 mask (as from bayer_masks / mosaic), "
                                f"found the value {float(m[bad][0])!r}")


def bayer_masks(height: int, width: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The RGGB colour-filter masks.

    Args:
        height, width: image size in pixels (≥ 2 each).

    Returns:
        m of shape (1, 3, H, W), 0/1: m[0, 0] is 1 at (even row, even column) (R),
        m[0, 2] at (odd, odd) (B), m[0, 1] at the other two sites (G); Σ_c m[0, c] = 1.

    Raises:
        BilevelInputError: ``height`` or ``width`` not an int ≥ 2.
    """
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise BilevelInputError(f"bayer_masks: {name} must be an int >= 2, got {v!r}")
    rows = torch.arange(height, device=device)[:, None] % 2
    cols = torch.arange(width, device=device)[None, :] % 2
    r = (rows == 0) & (cols == 0)
    b = (rows == 1) & (cols == 1)
    g = ~(r | b)
    return torch.stack([r, g, b]).to(dtype)[None]


def mosaic(x: torch.Tensor, sigma: float = 0.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bayer (RGGB) observation of RGB images, optionally with Gaussian noise.

    Args:
        x: images (B, 3, H, W), values in [0, 1] (not 0..255).
        sigma: standard deviation of the additive Gaussian noise on the observed values
            (same units as x; e.g. 5/255), ≥ 0.
        generator: random generator of the noise.

    Returns:
        ``(y, m)``: y = m ⊙ (x + σ ε) of shape (B, 3, H, W) (zero where unobserved) and the
        masks m (1, 3, H, W) of :func:`bayer_masks`. The single-channel mosaic is y.sum(1).

    Raises:
        BilevelInputError: ``x`` not (B, 3, H, W) floating point, values outside [0, 1]
            (the range found is named), ``sigma`` negative.
    """
    _check_image(x)
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also refuses NaN
        raise BilevelInputError(f"mosaic: x must have values in [0, 1], found [{lo:g}, {hi:g}]"
                                + (" (0..255 images: divide by 255)" if hi > 1.5 else ""))
    if not sigma >= 0:
        raise BilevelInputError(f"mosaic: sigma must be >= 0, got {sigma!r}")
    m = bayer_masks(x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return m * x, m


_K_RB = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 4
_K_G = torch.tensor([[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]]) / 4


def bilinear_demosaic(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bilinear demosaicking as a normalised convolution.

    x_c = (k_c * (m_c ⊙ y_c)) / (k_c * m_c) with k_G = [[0,1,0],[1,4,1],[0,1,0]]/4 and
    k_R = k_B = [[1,2,1],[2,4,2],[1,2,1]]/4. In the interior the denominator is 1 and this
    is the classic bilinear method (observed values kept, a missing value the mean of its
    2 or 4 nearest same-colour neighbours), exact for images linear in the coordinates;
    at the border the normalisation averages the neighbours that exist.

    Args:
        y: observations (B, 3, H, W) as from :func:`mosaic`.
        m: masks (1 or B, 3, H, W).

    Returns:
        The estimate (B, 3, H, W).
    """
    _check_image(y, "y")
    k = torch.stack([_K_RB, _K_G, _K_RB])[:, None].to(y)
    num = F.conv2d(F.pad(m * y, (1, 1, 1, 1)), k, groups=3)
    den = F.conv2d(F.pad(m.expand_as(y), (1, 1, 1, 1)), k, groups=3)
    return num / den


def classical_demosaic(y: torch.Tensor, method: str) -> torch.Tensor:
    """Malvar 2004, Menon 2007 (or the package's bilinear) from ``colour-demosaicing``.

    Args:
        y: observations (B, 3, H, W) as from :func:`mosaic` (the mosaic is y.sum(1)).
        method: ``"malvar"``, ``"menon"`` or ``"bilinear"``.

    Returns:
        Estimates (B, 3, H, W) in the dtype of y, clipped to [0, 1].

    Raises:
        BilevelInputError: unknown ``method``.
        ModuleNotFoundError: ``colour-demosaicing`` not installed (extra ``demosaic``).
    """
    import colour_demosaicing as cd

    fns = {"malvar": cd.demosaicing_CFA_Bayer_Malvar2004,
           "menon": cd.demosaicing_CFA_Bayer_Menon2007,
           "bilinear": cd.demosaicing_CFA_Bayer_bilinear}
    if method not in fns:
        raise BilevelInputError(f"classical_demosaic: method must be one of {sorted(fns)}, "
                                f"got {method!r}")
    _check_image(y, "y")
    cfa = y.sum(1).detach().cpu().double().numpy()
    out = [np.clip(fns[method](c, "RGGB"), 0.0, 1.0).transpose(2, 0, 1) for c in cfa]
    return torch.as_tensor(np.stack(out)).to(y)


def psnr(estimate: torch.Tensor, target: torch.Tensor, border: int = 0) -> float:
    """Peak signal-to-noise ratio for images in [0, 1]: 10 log10(1 / MSE) (dB).

    Args:
        estimate, target: tensors of the same shape (…, H, W).
        border: pixels dropped on each side before the MSE (≥ 0).

    Returns:
        The PSNR in dB (``inf`` when equal).

    Raises:
        BilevelInputError: shapes differ, or ``border`` too large for the image.
    """
    if estimate.shape != target.shape:
        raise BilevelInputError(f"psnr: estimate shape {tuple(estimate.shape)} differs from "
                                f"target shape {tuple(target.shape)}")
    if border < 0 or 2 * border >= min(target.shape[-2:]):
        raise BilevelInputError(f"psnr: border must be in [0, min(H, W)/2), got {border}")
    if border:
        estimate = estimate[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    mse = float(((estimate.double() - target.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


# --- the sparse graph, applied matrix-free -------------------------------------------------


def window_offsets(window: int) -> list[tuple[int, int]]:
    """The offsets (dy, dx) of a window × window neighbourhood, centre excluded, in
    row-major order (so offset ``len - 1 - i`` is the negative of offset ``i``).

    Raises:
        BilevelInputError: ``window`` not an odd int ≥ 3.
    """
    if not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise BilevelInputError(f"window must be an odd int >= 3, got {window!r}")
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]


def shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """u[..., i, j] = t[..., i + dy, j + dx], zero where (i + dy, j + dx) is outside."""
    h, w = t.shape[-2:]
    p = max(abs(dy), abs(dx))
    tp = F.pad(t, (p, p, p, p))
    return tp[..., p + dy:p + dy + h, p + dx:p + dx + w]


def graph_weights(features: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Symmetrised softmax attention over a window: the edge weights of the learned graph.

    With g = ``features`` (already mapped by the metric's factor Q, so that
    ‖g_i − g_j‖² = (f_i − f_j)ᵀ QᵀQ (f_i − f_j)), a_o(i) = softmax_o(−‖g_i − g_{i+o}‖²)
    over the offsets o of the window whose neighbour is inside the image, and
    w_o(i) = (a_o(i) + a_{−o}(i + o)) / 2, so that w_o(i) = w_{−o}(i + o) (L symmetric).

    Args:
        features: (B, r, H, W).
        window: odd window size k (k² − 1 neighbours).

    Returns:
        w of shape (B, k² − 1, H, W), ≥ 0, zero for neighbours outside the image,
        offsets in the order of :func:`window_offsets`.
    """
    offs = window_offsets(window)
    d = torch.stack([((features - shift(features, dy, dx)) ** 2).sum(1) for dy, dx in offs], 1)
    ones = torch.ones_like(features[:, :1])
    inside = torch.cat([shift(ones, dy, dx) for dy, dx in offs], 1) > 0
    a = torch.softmax(torch.where(inside, -d, torch.full_like(d, -math.inf)), dim=1)
    n = len(offs)
    back = torch.cat([shift(a[:, n - 1 - i:n - i], dy, dx) for i, (dy, dx) in enumerate(offs)], 1)
    return 0.5 * (a + back)


def laplacian_apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(L x)_i = Σ_o w_o(i) (x_i − x_{i+o}) for every channel of x.

    Args:
        w: weights (B, k² − 1, H, W) of :func:`graph_weights` (symmetric as stored there),
            one graph shared by the channels, or (B, C, k² − 1, H, W), one per channel.
        x: signals (B, C, H, W).

    Returns:
        L x, shape (B, C, H, W).
    """
    if w.dim() == 4:
        w = w[:, None]
    window = int(round(math.sqrt(w.shape[2] + 1)))
    r = window // 2
    h, wd = x.shape[-2:]
    xp = F.pad(x, (r, r, r, r))
    neigh = torch.stack([xp[..., r + dy:r + dy + h, r + dx:r + dx + wd]
                         for dy, dx in window_offsets(window)], 2)
    return x * w.sum(2) - (w * neigh).sum(2)


# --- the GLR solve, unrolled or implicit ---------------------------------------------------


def _glr_matvec(z: torch.Tensor, w: torch.Tensor, free: torch.Tensor, data: torch.Tensor,
                mu: torch.Tensor) -> torch.Tensor:
    return free * (mu * laplacian_apply(w, free * z) + data * z)


def _glr_rhs(w: torch.Tensor, y: torch.Tensor, free: torch.Tensor, data: torch.Tensor,
             mu: torch.Tensor) -> torch.Tensor:
    return free * (data * y - mu * laplacian_apply(w, (1 - free) * y))


def _glr_diag(w: torch.Tensor, free: torch.Tensor, data: torch.Tensor,
              mu: torch.Tensor) -> torch.Tensor:
    """The diagonal of A (the Jacobi preconditioner), 1 off the free pixels."""
    deg = w.sum(1, keepdim=True) if w.dim() == 4 else w.sum(2)
    dg = free * (mu * deg + data)
    return torch.where(free > 0, dg, torch.ones_like(dg))


def _pcg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, z: torch.Tensor,
         diag: torch.Tensor, steps: int, tol: float = 0.0) -> tuple[torch.Tensor, int]:
    """Jacobi-preconditioned CG, batched: one system per (image, channel), dot products over
    (H, W). Stops a system (α = β = 0 from then on) once ‖r‖ ≤ tol ‖b‖; all of it plain
    autograd-able torch. Returns (z, steps run)."""
    tiny = torch.finfo(b.dtype).tiny

    def dot(u, v):
        return (u * v).sum((-2, -1), keepdim=True)

    bb = dot(b, b)
    r = b - matvec(z)
    s = r / diag
    p = s
    rs = dot(r, s)
    k = 0
    for k in range(1, steps + 1):
        active = dot(r, r) > (tol * tol) * bb
        if tol > 0 and not bool(active.any()):
            return z, k - 1
        ap = matvec(p)
        alpha = torch.where(active, rs / dot(p, ap).clamp_min(tiny), torch.zeros_like(rs))
        z = z + alpha * p
        r = r - alpha * ap
        s = r / diag
        rs_new = dot(r, s)
        beta = torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = s + beta * p
        rs = rs_new
    return z, k


def _implicit_solver():
    from hypergrad.layers import custom_root

    def optimality(z, w, y, free, data, mu):
        return _glr_matvec(z, w, free, data, mu) - _glr_rhs(w, y, free, data, mu)

    @custom_root(optimality, symmetric=True)
    def solve(init, w, y, free, data, mu):
        b = _glr_rhs(w, y, free, data, mu)
        z, _ = _pcg(lambda v: _glr_matvec(v, w, free, data, mu), b, init,
                    _glr_diag(w, free, data, mu), 10_000,
                    tol=1e-12 if b.dtype == torch.float64 else 1e-6)
        return z

    return solve


_IMPLICIT = None


def glr_interpolate(w: torch.Tensor, y: torch.Tensor, free: torch.Tensor,
                    data: torch.Tensor | None = None, mu: torch.Tensor | float = 1.0, *,
                    steps: int = 10, init: torch.Tensor | None = None,
                    backward: str = "unrolled", tol: float = 0.0) -> torch.Tensor:
    """Interpolate by the graph Laplacian regulariser (see the module docstring).

    Solves A z = b (hard GLR: ``free`` = 1 − m, ``data`` = None; soft GLR: ``free`` = 1,
    ``data`` = m) by Jacobi-preconditioned CG and returns x = (1 − free) ⊙ y + free ⊙ z.

    Args:
        w: graph weights (B, k² − 1, H, W) (:func:`graph_weights`), shared by the channels,
            or (B, C, k² − 1, H, W), one graph per channel.
        y: values (B, C, H, W); on the non-free pixels they are kept.
        free: (1 or B, C, H, W) 0/1, the pixels solved for.
        data: (1 or B, C, H, W) weights of the data term ‖√data ⊙ (x − y)‖², or None (0).
        mu: weight of xᵀLx (> 0), a float or a tensor broadcastable to (B, C, 1, 1).
        steps: CG steps for ``backward="unrolled"`` (the forward of ``"implicit"`` runs CG
            to a relative residual of 1e-12 in float64, 1e-6 otherwise).
        init: starting point of z (B, C, H, W) (default: y); differentiated through when
            unrolled, not when implicit.
        backward: ``"unrolled"`` (autograd through the ``steps`` CG steps) or
            ``"implicit"`` (:func:`hypergrad.custom_root`: the implicit function theorem on
            A z − b = 0, CG in the backward).
        tol: for ``"unrolled"``, freeze a system once ‖r‖ ≤ tol ‖b‖ (0: run all steps).

    Returns:
        x of shape (B, C, H, W).

    Raises:
        BilevelInputError: unknown ``backward``, ``steps`` < 1, mismatched shapes.
    """
    global _IMPLICIT
    if backward not in ("unrolled", "implicit"):
        raise BilevelInputError(f"glr_interpolate: backward must be 'unrolled' or 'implicit', "
                                f"got {backward!r}")
    if not isinstance(steps, int) or steps < 1:
        raise BilevelInputError(f"glr_interpolate: steps must be an int >= 1, got {steps!r}")
    if (w.dim() not in (4, 5) or y.dim() != 4 or w.shape[0] != y.shape[0]
            or w.shape[-2:] != y.shape[2:] or (w.dim() == 5 and w.shape[1] != y.shape[1])):
        raise BilevelInputError(f"glr_interpolate: w (B, K, H, W) or (B, C, K, H, W) and y "
                                f"(B, C, H, W) must agree, got {tuple(w.shape)} and "
                                f"{tuple(y.shape)}")
    free = free.to(y).expand_as(y)
    data = torch.zeros_like(y) if data is None else data.to(y).expand_as(y)
    mu_t = torch.as_tensor(mu, dtype=y.dtype, device=y.device)
    z0 = (y if init is None else init) * free
    if backward == "unrolled":
        b = _glr_rhs(w, y, free, data, mu_t)
        z, _ = _pcg(lambda v: _glr_matvec(v, w, free, data, mu_t), b, z0,
                    _glr_diag(w, free, data, mu_t), steps, tol)
    else:
        if _IMPLICIT is None:
            _IMPLICIT = _implicit_solver()
        z = _IMPLICIT(z0.detach(), w, y, free, data, mu_t)
    return (1 - free) * y + free * z


# --- networks ------------------------------------------------------------------------------


class GLRLayer(nn.Module):
    """One layer: learn a graph from the current estimate, interpolate on it by GLR.

    features f = conv1×1(ReLU(conv3×3(x̂))) (``features`` channels), metric factor
    Q (``rank`` × ``features``, M = QᵀQ), weights w = :func:`graph_weights` (Qf),
    guide s = Γ * x̂ (a learned linear filter, 3 → 3 channels, ``guide`` × ``guide``
    taps; at initialisation only the centre taps Γ_R,G = Γ_B,G = 1: colour differences
    R − G and B − G; with ``guide`` = 1 and the diagonal fixed at 0 it is the 3×3 matrix Γ
    of the module docstring, larger filters generalise Malvar's gradient correction and
    Γ_c,c blends in the previous estimate), then per channel
    x_c = s_c + GLR-interpolation of (y_c − s_c) from the observed pixels
    (:func:`glr_interpolate`, hard, or soft with learned μ when ``soft``), starting CG at
    x̂ − s.

    Args:
        features: feature channels of the shallow conv.
        rank: rank of the Mahalanobis metric.
        window: odd window size of the graph.
        steps: CG steps.
        soft: soft GLR (also denoises the observed pixels) with learned μ, else hard.
        guide: odd size of the guide filter Γ.
        shared: one graph for the three channels, else one per channel (a metric of rank
            ``rank`` each).

    Raises:
        BilevelInputError: ``window`` not an odd int ≥ 3, ``guide`` not an odd int ≥ 1.
    """

    def __init__(self, features: int = 12, rank: int = 6, window: int = 5, steps: int = 8,
                 soft: bool = False, guide: int = 5, shared: bool = True) -> None:
        super().__init__()
        if not isinstance(window, int) or isinstance(window, bool) or window < 3 or window % 2 == 0:
            raise BilevelInputError(f"GLRLayer: window must be an odd int >= 3, got {window!r}")
        if not isinstance(guide, int) or guide < 1 or guide % 2 == 0:
            raise BilevelInputError(f"GLRLayer: guide must be an odd int >= 1, got {guide!r}")
        self.conv = nn.Conv2d(3, features, 3, padding=1, padding_mode="replicate")
        self.mix = nn.Conv2d(features, features, 1)
        self.shared = shared
        self.metric = nn.Conv2d(features, rank * (1 if shared else 3), 1, bias=False)
        self.guide = nn.Conv2d(3, 3, guide, padding=guide // 2, padding_mode="replicate",
                               bias=False)
        with torch.no_grad():
            self.guide.weight.zero_()
            self.guide.weight[0, 1, guide // 2, guide // 2] = 1.0
            self.guide.weight[2, 1, guide // 2, guide // 2] = 1.0
        self.log_mu = nn.Parameter(torch.tensor(-2.0)) if soft else None
        self.window, self.steps, self.soft = window, steps, soft

    def weights(self, xhat: torch.Tensor) -> torch.Tensor:
        """The graph weights learned from the estimate ``xhat``: (B, k² − 1, H, W) for a
        shared graph, (B, 3, k² − 1, H, W) for one graph per channel."""
        g = self.metric(self.mix(F.relu(self.conv(xhat))))
        if self.shared:
            return graph_weights(g, self.window)
        b, _, h, w = g.shape
        wts = graph_weights(g.reshape(b * 3, -1, h, w), self.window)
        return wts.reshape(b, 3, -1, h, w)

    def forward(self, xhat: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                backward: str = "unrolled") -> torch.Tensor:
        """The next estimate (B, 3, H, W) from the estimate ``xhat``, observations ``y``
        and masks ``m`` (as from :func:`mosaic`).

        Raises:
            BilevelInputError: ``m`` not a 0/1 mask.
        """
        _check_mask(m)
        w = self.weights(xhat)
        s = self.guide(xhat)
        if self.soft:
            free, data, mu = torch.ones_like(m), m, self.log_mu.exp()
        else:
            free, data, mu = 1 - m, None, 1.0
        d = glr_interpolate(w, y - m * s, free, data, mu, steps=self.steps, init=xhat - s,
                            backward=backward)
        return d + s


class UnrolledGLRNet(nn.Module):
    """A stack of :class:`GLRLayer`: x₀ = bilinear(y), x_l = layer_l(x_{l−1}), output x_L.

    Args:
        layers: number of layers.
        **layer_kw: passed to each :class:`GLRLayer`.
    """

    def __init__(self, layers: int = 3, **layer_kw: int | bool) -> None:
        super().__init__()
        if not isinstance(layers, int) or layers < 1:
            raise BilevelInputError(f"UnrolledGLRNet: layers must be an int >= 1, got {layers!r}")
        self.layers = nn.ModuleList([GLRLayer(**layer_kw) for _ in range(layers)])

    def forward(self, y: torch.Tensor, m: torch.Tensor, backward: str = "unrolled"
                ) -> torch.Tensor:
        """RGB estimate (B, 3, H, W) from observations y and masks m (:func:`mosaic`).

        Raises:
            BilevelInputError: ``m`` not a 0/1 mask.
        """
        _check_mask(m)
        x = bilinear_demosaic(y, m)
        for layer in self.layers:
            x = layer(x, y, m, backward)
        return x


class PlainCNN(nn.Module):
    """A plain residual CNN: x = bilinear(y) + CNN(bilinear(y)), ``depth`` 3×3 conv layers
    of ``width`` channels with ReLU between them."""

    def __init__(self, depth: int = 5, width: int = 32) -> None:
        super().__init__()
        if depth < 2:
            raise BilevelInputError(f"PlainCNN: depth must be >= 2, got {depth}")
        chans = [3] + [width] * (depth - 1) + [3]
        mods: list[nn.Module] = []
        for i in range(depth):
            mods.append(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, padding_mode="replicate"))
            if i < depth - 1:
                mods.append(nn.ReLU())
        self.net = nn.Sequential(*mods)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, y: torch.Tensor, m: torch.Tensor, backward: str = "unrolled"
                ) -> torch.Tensor:
        """RGB estimate (B, 3, H, W) from observations y and masks m (``backward`` unused).

        Raises:
            BilevelInputError: ``m`` not a 0/1 mask.
        """
        _check_mask(m)
        x = bilinear_demosaic(y, m)
        return x + self.net(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- data, training, evaluation ------------------------------------------------------------


def load_images(names: Sequence[str], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """scikit-image's colour images as tensors (3, H, W) in [0, 1] (the left view of
    ``stereo_motorcycle``; alpha channels dropped).

    Raises:
        BilevelInputError: a name not in :data:`COLOUR_IMAGES`.
        ModuleNotFoundError: scikit-image not installed (extra ``demosaic``).
    """
    import skimage.data

    out = []
    for name in names:
        if name not in COLOUR_IMAGES:
            raise BilevelInputError(f"load_images: unknown image {name!r}; expected one of "
                                    f"{COLOUR_IMAGES}")
        im = getattr(skimage.data, name)()
        if isinstance(im, tuple):
            im = im[0]
        im = np.asarray(im)[..., :3].astype(np.float64) / 255.0
        out.append(torch.as_tensor(im.transpose(2, 0, 1).copy(), dtype=dtype))
    return out


def load_validation_images(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The validation images (3, H, W) in [0, 1] of :data:`VALIDATION_IMAGES`: the right view
    of ``stereo_motorcycle`` (500 × 741; training uses the left view) and the centre
    512 × 512 of ``retina`` (rows and columns 450:962). Used only to choose the network
    configuration, so that the test images stay unseen.

    Raises:
        ModuleNotFoundError: scikit-image not installed (extra ``demosaic``).
    """
    import skimage.data

    right = np.asarray(skimage.data.stereo_motorcycle()[1])[..., :3]
    retina = np.asarray(skimage.data.retina())[450:962, 450:962, :3]
    return [torch.as_tensor((im.astype(np.float64) / 255.0).transpose(2, 0, 1).copy(),
                            dtype=dtype) for im in (right, retina)]


def random_patches(images: Sequence[torch.Tensor], n: int, size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random ``size`` × ``size`` crops (n, 3, size, size), images chosen uniformly.

    Raises:
        BilevelInputError: ``size`` larger than an image, or not ≥ 4 and even.
    """
    if size < 4 or size % 2:
        raise BilevelInputError(f"random_patches: size must be even and >= 4, got {size}")
    out = []
    for _ in range(n):
        im = images[int(torch.randint(len(images), (1,), generator=generator))]
        h, w = im.shape[-2:]
        if size > min(h, w):
            raise BilevelInputError(f"random_patches: size {size} exceeds image {h}x{w}")
        i = int(torch.randint(h - size + 1, (1,), generator=generator))
        j = int(torch.randint(w - size + 1, (1,), generator=generator))
        out.append(im[:, i:i + size, j:j + size])
    return torch.stack(out)


@dataclass
class TrainResult:
    """What :func:`train` did: the loss per step, the seconds it took."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model: nn.Module, images: Sequence[torch.Tensor], *, steps: int = 300,
          batch: int = 16, size: int = 48, lr: float = 3e-3, sigma: float = 0.0,
          border: int = 4, seed: int = 0, progress: bool = False) -> TrainResult:
    """Adam on the mean squared error over random patches (border pixels excluded), lr
    decayed by a cosine to 0; fresh patches and noise every step.

    Args:
        model: a module ``model(y, m) -> x`` (:class:`UnrolledGLRNet`, :class:`PlainCNN`).
        images: training images (3, H, W) in [0, 1].
        steps, batch, size, lr: the Adam steps, patches per step, patch side, step size.
        sigma: noise level of the training observations.
        border: pixels left out of the loss on each side.
        seed: seed of the patches and noise.
        progress: show a tqdm bar.

    Returns:
        A :class:`TrainResult`.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    res = TrainResult()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"train {type(model).__name__}", dynamic_ncols=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = random_patches(images, batch, size, gen)
        y, m = mosaic(x, sigma, gen)
        out = model(y, m)
        b = border
        loss = ((out - x)[..., b:-b, b:-b] ** 2).mean() if b else ((out - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        res.losses.append(float(loss.detach()))
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{res.losses[-1]:.2e}")
    if bar is not None:
        bar.close()
    res.seconds = time.perf_counter() - t0
    return res


def evaluate(methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
             images: Sequence[torch.Tensor], sigmas: Sequence[float] = (0.0,), *,
             border: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """PSNR (dB, border pixels excluded) of each method on each full image and noise level.

    Args:
        methods: name → ``f(y, m) -> x`` (run under ``torch.no_grad``; outputs clipped to
            [0, 1]).
        images: test images (3, H, W).
        sigmas: noise levels of the observations.

    Returns:
        ``{method: {f"sigma={σ:.4f}": mean PSNR over images, ...}}`` with also the
        per-image values under ``f"sigma={σ:.4f}/{i}"``.
    """
    out: dict[str, dict[str, float]] = {name: {} for name in methods}
    with torch.no_grad():
        for sigma in sigmas:
            key = f"sigma={sigma:.4f}"
            per: dict[str, list[float]] = {name: [] for name in methods}
            for i, im in enumerate(images):
                gen = torch.Generator().manual_seed(seed + i)
                y, m = mosaic(im[None], sigma, gen)
                for name, f in methods.items():
                    p = psnr(f(y, m).clamp(0, 1), im[None], border)
                    per[name].append(p)
                    out[name][f"{key}/{i}"] = p
            for name in methods:
                out[name][key] = float(np.mean(per[name]))
    return out

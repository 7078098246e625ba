"""Central differences with an error bar: how far a finite difference can be trusted.

A central difference of a function h along a direction d with step s,

    D(s) = (h(x + s d) − h(x − s d)) / (2 s) = h'(x; d) + c s² + O(s⁴) + (n₊ − n₋) / (2 s),

has two errors: truncation (c s², from the Taylor remainder) and rounding (the
computational noise n± of the two evaluations, amplified by 1/s). Neither can be read
off one difference, and both depend on the machine: a different BLAS kernel moves the
noise. This module estimates both:

- **noise** σ of h, by the difference table of Moré & Wild, "Estimating computational
  noise", SIAM J. Sci. Comput. 33(3), 2011 (ECnoise): h is evaluated at m + 1 points
  x + j·δ·d spaced far more finely than s; the k-th differences of the smooth part are
  O(δ^k) and vanish, those of the noise do not, and σ_k = √(γ_k · mean((Δ^k h)²)) with
  γ_k = (k!)² / (2k)! estimates σ. The first k at which three consecutive σ_k agree
  within a factor of 4 and Δ^k h changes sign is taken (their rule), floored at the
  rounding of h itself (ε_mach · |h|).
- **truncation**, by comparing two steps (Richardson's error estimate): D(2s) − D(s) =
  3 c s², so c s² ≈ |D(2s) − D(s)| / 3 (Press et al., *Numerical Recipes*, 3rd ed.,
  §5.7). The estimate is asymptotic (exact while the s² term dominates the s⁴ term),
  so the error bar takes twice it.
- **rounding**: the noise of D(s) has standard deviation σ / (√2 s) for independent
  noise of size σ in each evaluation; three standard deviations are taken.
- **the regime**: Richardson's estimate holds only where the truncation error shrinks
  like s². A third step tells: |D(4s) − D(2s)| should be about 4 |D(2s) − D(s)| (16 in
  a quartic regime). Where it is outside [2, 32] while above twice the rounding bar (a
  step too large for the function, a kink inside the step), the direction is marked not
  ``asymptotic`` and its error bar cannot be trusted.

The error bar of D(s) is 2 × truncation + rounding. An estimate that differs from D(s) by
more than the error bar disagrees with the finite difference; one within it agrees as
far as finite differences can tell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: points of the noise difference table (m + 1 = 7 evaluations, m = 6 differences)
NOISE_POINTS = 6
#: the noise table's spacing as a fraction of the finite-difference step
NOISE_SPACING = 1e-2
#: standard deviations of rounding noise covered by the error bar
ROUNDING_SIGMAS = 3.0
#: safety factor on the (asymptotic) Richardson estimate of the truncation error
TRUNCATION_SAFETY = 2.0


@dataclass(frozen=True)
class CentralDifference:
    """Central differences along several directions, each with its error bar.

    Attributes (tensors have one entry per direction, float64 on the CPU):
        value: D(s), the central difference with the requested step s.
        error: the error bar of ``value``: ``2 · truncation + rounding``.
        truncation: |D(2s) − D(s)| / 3, the estimated Taylor remainder of D(s).
        rounding: 3 σ / (√2 s), three standard deviations of the noise in D(s).
        asymptotic: whether D(s), D(2s), D(4s) shrink like s² (bool; where not, the
            error bar is not reliable: use a smaller step).
        noise: σ, the estimated computational noise of one evaluation of h.
        step: s.
    """

    value: torch.Tensor
    error: torch.Tensor
    truncation: torch.Tensor
    rounding: torch.Tensor
    asymptotic: torch.Tensor
    noise: float
    step: float


def estimate_noise(values: Sequence[float], floor: float = 0.0) -> float:
    """The noise level σ of function values taken at equally spaced, closely packed points.

    ``values`` are h(x + j δ d), j = 0..m. Returns σ by the ECnoise difference table
    (Moré & Wild 2011; see the module docstring), at least ``floor``. When no order of
    differences shows noise (the points are too far apart for the smooth part to
    vanish), the largest σ_k of order k ≥ 2 is returned: an overestimate, so that the
    error bar stays on the safe side.

    Args:
        values: m + 1 ≥ 4 function values (floats) at equally spaced points.
        floor: the smallest σ returned (e.g. ε_mach · |h|), in the units of h.

    Returns:
        σ, in the units of h (a float ≥ ``floor``).

    Raises:
        ValueError: fewer than 4 values, a value that is not a finite number, or a
            negative or non-finite ``floor``.

    References:
        Moré & Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33(3), 2011.
    """
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool)
            and math.isfinite(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
    try:
        f = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"estimate_noise needs a sequence of numbers, got {values!r}") from exc
    if f.numel() < 4:
        raise ValueError(f"estimate_noise needs at least 4 values, got {f.numel()}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"estimate_noise: the function values are not finite: {f.tolist()}")
    m = f.numel() - 1
    levels, changes = [], []
    diff = f
    for k in range(1, m + 1):
        diff = diff[1:] - diff[:-1]
        gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
        levels.append(math.sqrt(gamma * float((diff ** 2).mean())))
        changes.append(bool((diff.max() > 0) and (diff.min() < 0)))
    if max(levels) == 0.0:  # every value equal: the noise is below what h resolves
        return floor
    for k in range(m - 2):
        window = levels[k:k + 3]
        if changes[k] and max(window) <= 4 * min(window):
            return max(levels[k], floor)
    return max(max(levels[1:]), floor)


def _noise_direction(directions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ dᵢ/‖dᵢ‖ (scaled to the first direction's length): one line that moves every input
    any direction moves, so its noise is that of the noisiest direction or more."""
    units = [d / n for d in directions if (n := float(torch.linalg.vector_norm(d))) > 0]
    if not units:
        return directions[0]
    total = torch.stack(units).sum(0)
    norm = float(torch.linalg.vector_norm(total))
    if norm == 0:
        return directions[0]
    return total * (float(torch.linalg.vector_norm(directions[0])) / norm)


def central_differences(h: Callable[[torch.Tensor], float], x: torch.Tensor,
                        directions: Sequence[torch.Tensor], step: float) -> CentralDifference:
    """D(s) of the scalar function ``h`` at ``x`` along each of ``directions``, with error bars.

    ``x`` and every direction are flat tensors of one shape; ``h`` maps such a tensor to
    a float. Costs 6 evaluations per direction plus 7 for the noise, measured along the
    sum of the (normalised) directions, which moves every input any of them moves. See
    the module docstring for the estimates and their sources.

    Args:
        h: the function, a flat floating tensor shaped like ``x`` -> float.
        x: the point, a floating-point tensor.
        directions: k tensors shaped like ``x``.
        step: s, in the units of ``x`` (positive, finite).

    Returns:
        :class:`CentralDifference`, with tensors of shape ``(k,)`` (float64, CPU).

    Raises:
        ValueError: ``step`` not positive and finite, ``x`` not a floating tensor, no
            direction, a direction of another shape, ``h`` returning a non-scalar, or a
            non-finite value of h.

    References:
        Moré & Wild 2011 (noise); Press et al., *Numerical Recipes*, 3rd ed., §5.7
        (Richardson's error estimate).
    """
    if not (isinstance(step, (int, float)) and not isinstance(step, bool)
            and math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        raise ValueError(f"x must be a floating-point tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(directions, torch.Tensor) or not isinstance(directions, Sequence):
        raise ValueError("directions must be a list of tensors shaped like x (for a matrix "
                         "of directions, pass list(matrix))")
    if not directions:
        raise ValueError("central_differences needs at least one direction")
    for d in directions:
        if not isinstance(d, torch.Tensor) or d.shape != x.shape:
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"every direction must be a tensor of the shape of x "
                             f"{tuple(x.shape)}, got {shape}")

    def value(point: torch.Tensor) -> float:
        raw = h(point)
        if isinstance(raw, torch.Tensor) and raw.numel() != 1:
            raise ValueError(f"h must return a scalar, got a tensor of shape "
                             f"{tuple(raw.shape)}")
        out = float(raw)
        if not math.isfinite(out):
            raise ValueError(f"the function is {out} at a point {step:g} away from x; "
                             "use a smaller step")
        return out

    spacing = step * NOISE_SPACING
    d0 = _noise_direction(directions)
    table = [value(x + (j - NOISE_POINTS // 2) * spacing * d0) for j in range(NOISE_POINTS + 1)]
    eps = torch.finfo(x.dtype).eps if x.is_floating_point() else torch.finfo(torch.float64).eps
    sigma = estimate_noise(table, floor=eps * max(abs(v) for v in table))
    diffs = [[(value(x + k * step * d) - value(x - k * step * d)) / (2 * k * step)
              for k in (1, 2, 4)] for d in directions]
    v1, v2, v4 = torch.tensor(diffs, dtype=torch.float64).unbind(1)
    rounding = torch.full_like(v1, ROUNDING_SIGMAS * sigma / (math.sqrt(2) * step))
    near, far = (v2 - v1).abs(), (v4 - v2).abs()
    truncation = near / 3
    # far ≈ 4·near (s²) to 16·near (s⁴); both carry noise, allowed up to twice `rounding`
    # (noise estimated a little low must not make a clean difference look irregular)
    noise = 2 * rounding
    asymptotic = (far <= 32 * torch.maximum(near, noise)) & \
        ((near <= noise) | (far + noise >= 2 * near))
    error = TRUNCATION_SAFETY * truncation + rounding
    return CentralDifference(v1, error, truncation, rounding, asymptotic, sigma, step)

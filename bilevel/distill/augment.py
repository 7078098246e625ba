"""Differentiable data augmentation with explicit, replayable random draws.

A draw is an ``int64`` tensor of shape ``(n, 3)``: vertical shift, horizontal shift and a
flip flag per image. Keeping the draw outside the loss makes an augmented inner step a
pure function of its batch, so recomputing estimators and evaluation replay it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Random integer shifts of up to ``shift`` pixels (zero fill) and, with ``flip``,
    horizontal flips with probability 1/2. ``Augment()`` is the identity.

    The map is linear in the images, so gradients reach the distilled pixels exactly.
    """

    shift: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"Augment.shift must be a non-negative int, got {self.shift!r}")

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        """Random parameters for ``n`` images (shape ``(n, 3)``), or for ``steps`` steps
        (shape ``(steps, n, 3)``); drawn on the CPU from ``generator``."""
        shape = (n,) if steps is None else (steps, n)
        shifts = torch.randint(-self.shift, self.shift + 1, (*shape, 2), generator=generator)
        flips = torch.randint(0, 2, (*shape, 1), generator=generator) * int(self.flip)
        return torch.cat([shifts, flips], dim=-1)

    def __call__(self, x: torch.Tensor, draw: torch.Tensor | None) -> torch.Tensor:
        """Apply ``draw`` (shape ``(n, 3)``) to images ``x`` of shape ``(n, C, H, W)``."""
        if draw is None or not self.active:
            return x
        n, c, h, w = x.shape
        if draw.shape != (n, 3):
            raise ValueError(f"Augment: draw of shape {tuple(draw.shape)} does not match "
                             f"{n} images (expected ({n}, 3))")
        draw = draw.to(x.device)
        p = self.shift
        padded = F.pad(x, (p, p, p, p)) if p else x
        rows = torch.arange(h, device=x.device) + p - draw[:, :1]          # (n, H)
        cols = torch.arange(w, device=x.device) + p - draw[:, 1:2]         # (n, W)
        cols = torch.where(draw[:, 2:3].bool(), cols.flip(-1), cols)
        i = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[i, ch, rows[:, None, :, None], cols[:, None, None, :]]

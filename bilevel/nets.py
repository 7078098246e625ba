"""Small networks used by the applications: ConvNet-D and an MLP, both vmap-safe.

Neither network holds running statistics: ``ConvNet`` normalises each image on its own
(instance norm, written as ``GroupNorm(width, width)``), so a network behaves the same in
training and evaluation, under ``torch.func.vmap`` and inside differentiated inner loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NETS = ("convnet", "mlp")
NORMS = ("instance", "none")


class ConvNet(nn.Module):
    """ConvNet-D: ``depth`` × [conv 3×3 (``width`` channels), norm, ReLU, avg-pool 2×2], linear.

    The standard dataset-distillation network (depth 3, width 128, instance norm). The
    spatial size halves at every block, so images must be at least ``2**depth`` pixels on
    each side.

    Args:
        in_shape: ``(C, H, W)`` of one image.
        num_classes: the number of output logits.
        width: channels of every conv layer.
        depth: the number of blocks.
        norm: ``"instance"`` (``GroupNorm(width, width)``, no running statistics) or
            ``"none"``.

    Raises:
        ValueError: ``in_shape`` not three positive ints, ``depth`` or ``width`` < 1, an
            unknown ``norm``, or images smaller than ``2**depth`` pixels.

    References:
        Gidaris & Komodakis, "Dynamic few-shot visual learning without forgetting", CVPR
        2018 (ConvNet-D); the standard network of dataset-distillation benchmarks
        since Zhao, Mopuri, Bilen, "Dataset condensation with gradient matching", ICLR
        2021.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 128,
                 depth: int = 3, norm: str = "instance") -> None:
        super().__init__()
        c, h, w = _shape(in_shape)
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be positive, got depth={depth}, width={width}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if min(h, w) < 2 ** depth:
            raise ValueError(f"images of {h}x{w} are too small for depth {depth} "
                             f"(each block halves the size; need at least {2 ** depth} pixels)")
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            layers += [nn.ReLU(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``x`` of shape ``(N, C, H, W)``."""
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Flatten, then ``Linear``/``ReLU`` through ``hidden`` widths, then a linear classifier.

    Args:
        in_shape: ``(C, H, W)`` of one input.
        num_classes: the number of output logits.
        hidden: the widths of the hidden layers (``()``: softmax regression).

    Raises:
        ValueError: ``in_shape`` not three positive ints.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (128,)) -> None:
        super().__init__()
        c, h, w = _shape(in_shape)
        sizes = [c * h * w, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of inputs ``x`` of shape ``(N, C, H, W)``."""
        return self.net(x)

    def functional(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The logits at other parameters, ``functional_call(self, params, (x,))``, by
        ``F.linear`` and ``relu`` without the modules' dispatch (an inner loop calls the
        network tens of times per outer step). ``params`` maps every name of
        ``named_parameters()`` to a tensor of that parameter's shape.

        Raises:
            KeyError: a parameter name missing from ``params``.
        """
        h = x.flatten(1)
        last = len(self.net) - 1
        for i, layer in enumerate(self.net):
            if isinstance(layer, nn.Linear):
                h = F.linear(h, params[f"net.{i}.weight"], params[f"net.{i}.bias"])
                if i != last:
                    h = torch.relu(h)
        return h


def make_net(name: str, in_shape: Sequence[int], num_classes: int, *, width: int = 128,
             depth: int = 3, norm: str = "instance", hidden: Sequence[int] = (128,)) -> nn.Module:
    """Build ``"convnet"`` (``width``, ``depth``, ``norm``) or ``"mlp"`` (``hidden``).

    Args:
        name: ``"convnet"`` or ``"mlp"``.
        in_shape: ``(C, H, W)`` of one input.
        num_classes: the number of output logits.
        width, depth, norm: :class:`ConvNet` settings (ignored for ``"mlp"``).
        hidden: :class:`MLP` widths (ignored for ``"convnet"``).

    Returns:
        The network, mapping ``(N, C, H, W)`` to logits ``(N, num_classes)``.

    Raises:
        ValueError: an unknown ``name``, or a setting the network refuses.
    """
    if name == "convnet":
        return ConvNet(in_shape, num_classes, width=width, depth=depth, norm=norm)
    if name == "mlp":
        return MLP(in_shape, num_classes, hidden=hidden)
    raise ValueError(f"net must be one of {NETS}, got {name!r}")


def _shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width), got {tuple(in_shape)}")
    return shape  # type: ignore[return-value]

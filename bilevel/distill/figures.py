"""The pictures of a distillation run: the image grid, each image beside its start, and
the curves of the run (all PNGs written atomically)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import checkpoint as ckpt
from .core import DistilledSet

if TYPE_CHECKING:
    from .report import Report


def _names(distilled: DistilledSet, class_names: list[str] | tuple[str, ...] | None) -> list[str]:
    """One label per class: ``class_names``, else the set's own names, else numbers."""
    k = distilled.num_classes
    if class_names:
        if len(class_names) != k:
            raise ValueError(f"class_names has {len(class_names)} names for {k} classes")
        return [str(n) for n in class_names]
    return [distilled.class_name(c) for c in range(k)]


def _offsets(n: int, size: int, pad: int, group: int, gap: int) -> tuple[list[int], int]:
    """Start pixel of each of ``n`` cells of ``size`` pixels, ``pad`` apart, ``gap`` more
    after every ``group`` cells; and the total length."""
    starts, x = [], pad
    for j in range(n):
        starts.append(x)
        x += size + pad + (gap if group and (j + 1) % group == 0 and j + 1 < n else 0)
    return starts, x


def _mosaic(rows: list[list[np.ndarray]], pad: int = 1, col_group: int = 0,
            col_gap: int = 0, row_group: int = 0,
            row_gap: int = 0) -> tuple[np.ndarray, list[float], list[float]]:
    """Tile images ``(C, H, W)`` in ``[0, 1]`` into one picture, white between them:
    ``rows[r][j]`` at row ``r``, column ``j``; ``col_gap`` (``row_gap``) extra pixels
    after every ``col_group`` columns (``row_group`` rows). Returns the picture (``(H',
    W')`` for grey images, ``(H', W', 3)`` for colour ones) and the centre pixel of every
    row and column."""
    c, h, w = rows[0][0].shape
    ys, height = _offsets(len(rows), h, pad, row_group, row_gap)
    xs, width = _offsets(max(len(r) for r in rows), w, pad, col_group, col_gap)
    out = np.ones((c, height, width), dtype=np.float32)
    for r, row in enumerate(rows):
        for j, img in enumerate(row):
            out[:, ys[r]:ys[r] + h, xs[j]:xs[j] + w] = img
    picture = out[0] if c == 1 else out.transpose(1, 2, 0)
    return picture, [y + h / 2 - 0.5 for y in ys], [x + w / 2 - 0.5 for x in xs]


def _picture(tiled: tuple[np.ndarray, list[float], list[float]], row_labels: list[str],
             title: str, col_labels: list[str] | None = None) -> Any:
    """A figure showing a :func:`_mosaic` with a label per mosaic row (``""``: none) and
    optionally per column, sized so one image is 0.3-0.9 in wide whatever the number of
    columns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mosaic, ys, xs = tiled
    h, w = mosaic.shape[:2]
    cell = min(0.9, max(0.3, 12.0 / len(xs)))    # inches per image column
    inch = cell * len(xs) / w                     # inches per mosaic pixel
    fig = plt.figure(figsize=(max(w * inch, 2.5) + 1.6, h * inch + 0.9))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0, vmax=1,
              interpolation="nearest")
    shown = [(y, label) for y, label in zip(ys, row_labels, strict=True) if label]
    ax.set_yticks([y for y, _ in shown], [label for _, label in shown], fontsize=9)
    if col_labels:
        ax.set_xticks(xs, col_labels, fontsize=8)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10, pad=18 if col_labels else 6)
    return fig


#: at most this many images per line of the grid; a class with more takes several lines
GRID_COLUMNS = 25


def save_grid(distilled: DistilledSet, path: str | Path,
              class_names: list[str] | tuple[str, ...] | None = None) -> Path:
    """The distilled images as a PNG grid, one row per class labelled by its name
    (``class_names``, else the set's :attr:`~DistilledSet.class_names`, else the class
    number; a class with more than :data:`GRID_COLUMNS` images wraps onto several lines),
    readable from IPC 1 to 50 and more (written atomically).

    Raises:
        ValueError: ``class_names`` does not have one name per class.
    """
    names = _names(distilled, class_names)
    px = distilled.pixels().detach().cpu().float().numpy()
    k, ipc = distilled.num_classes, distilled.ipc
    lines = -(-ipc // GRID_COLUMNS)
    per_line = -(-ipc // lines)
    rows, labels = [], []
    for c in range(k):
        for line in range(lines):
            rows.append([px[c * ipc + j] for j in range(line * per_line,
                                                        min(ipc, (line + 1) * per_line))])
            labels.append(names[c] if line == 0 else "")
    where = distilled.meta.get("dataset")
    title = (f"{where + ': ' if where else ''}{ipc} distilled image{'s' * (ipc != 1)}"
             f"{chr(10) if ipc < 4 else ' '}per class")
    gap = max(2, rows[0][0].shape[-1] // 4) if lines > 1 else 0
    tiled = _mosaic(rows, row_group=lines if lines > 1 else 0, row_gap=gap)
    return _save(_picture(tiled, labels, title), path)


def save_init_vs_distilled(distilled: DistilledSet, path: str | Path,
                           class_names: list[str] | tuple[str, ...] | None = None,
                           max_per_class: int = 10) -> Path:
    """Each distilled image beside the image it started from (a real training image, or
    noise for ``init="noise"``), one row per class, up to ``max_per_class`` pairs per
    class; a PNG written atomically.

    Raises:
        ValueError: the set has no initial images (``distilled.initial is None``: a file
            from an earlier version), or ``class_names`` does not fit.
    """
    if distilled.initial is None:
        raise ValueError("save_init_vs_distilled: this DistilledSet has no initial images "
                         "(written by an earlier version); distil again to get them")
    names = _names(distilled, class_names)
    start = distilled.pixels(distilled.initial).detach().cpu().float().numpy()
    end = distilled.pixels().detach().cpu().float().numpy()
    k, ipc = distilled.num_classes, distilled.ipc
    shown = min(ipc, max(1, max_per_class))
    rows = [[img for j in range(shown) for img in (start[c * ipc + j], end[c * ipc + j])]
            for c in range(k)]
    init = distilled.config.get("init", "real")
    what = "a real training image" if init == "real" else "noise"
    more = f" (first {shown} of {ipc} per class)" if shown < ipc else ""
    title = f"start ({what}) → distilled{more}"
    labels = ["start", "distilled"] * shown if shown <= 5 else None
    if labels is None:
        title += "\nin each pair: left the start, right the distilled image"
    width = rows[0][0].shape[-1]
    tiled = _mosaic(rows, col_group=2, col_gap=max(2, width // 3))
    return _save(_picture(tiled, names, title, labels), path)


def plot_curves(history: list[dict[str, Any]], path: str | Path,
                report: Report | None = None, max_lr: float | None = None) -> Path:
    """The run's curves against the outer step, one panel per thing measured (no empty
    panels): the outer loss; the learned inner learning rate (when it changed; its cap
    ``max_lr`` as a dashed line); test accuracy, when the run evaluated (``eval_every``) or
    a ``report`` is given, with the protocol's distilled result and the random-subset and
    full-data references of ``report`` as horizontal lines. A PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in history]  # record k: after k + 1 outer steps
    lrs = [r.get("inner_lr") for r in history]
    show_lr = bool(history) and None not in lrs and max(lrs) > min(lrs)
    ev = [(r["step"] + 1, r["eval_acc_mean"], r.get("eval_acc_std") or 0.0) for r in history
          if r.get("eval_acc_mean") is not None]
    panels = ["loss"] * bool(history) + ["lr"] * show_lr + \
        ["acc"] * bool(ev or report is not None)
    if not panels:  # no step taken and nothing evaluated
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no outer steps taken", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    ax = dict(zip(panels, axes[0], strict=True))
    if "loss" in ax:
        losses = [r["outer_loss"] for r in history]
        finite = [v for v in losses if v is not None and math.isfinite(v) and v > 0]
        # log scale only where the loss spans a decade (else a log axis has no tick labels)
        wide = bool(finite) and max(finite) > 10 * min(finite)
        ax["loss"].plot(steps, losses, lw=1)
        ax["loss"].set(xlabel="outer step", ylabel="outer loss (real batch)",
                       yscale="log" if wide else "linear", title="outer loss")
    if "lr" in ax:
        near = max_lr is not None and max(lrs) >= 0.5 * max_lr
        far = f" (cap {max_lr:g}, not reached)" if max_lr is not None and not near else ""
        ax["lr"].plot(steps, lrs, lw=1.2, color="tab:purple", label=f"learned inner lr{far}")
        if near:  # drawn only when close: a far cap would flatten the curve
            ax["lr"].axhline(max_lr, ls="--", color="grey", lw=1, label=f"cap {max_lr:g}")
        ax["lr"].set(xlabel="outer step", ylabel="inner learning rate",
                     title="learned inner learning rate")
        ax["lr"].legend(fontsize=8)
    if "acc" in ax:
        a = ax["acc"]
        if ev:
            s, m, sd = (list(t) for t in zip(*ev, strict=True))
            a.errorbar(s, [100 * v for v in m], yerr=[100 * v for v in sd], marker="o",
                       ms=3, capsize=3, label="distilled, during the run")
        last = steps[-1] if steps else 0
        if report is not None:
            n = len(report.distilled.accuracies)
            a.errorbar([last], [100 * report.distilled.mean], yerr=[100 * report.distilled.std],
                       marker="*", ms=10, capsize=3, color="tab:red", ls="none",
                       label=f"distilled, protocol ({n} network{'' if n == 1 else 's'})")
            r = report.random
            a.axhline(100 * r.mean, ls="--", color="tab:green",
                      label=f"random real subset ({100 * r.mean:.1f} %)")
            if r.std > 0:
                a.axhspan(100 * (r.mean - r.std), 100 * (r.mean + r.std), color="tab:green",
                          alpha=0.12, lw=0)
            if report.full is not None:
                a.axhline(100 * report.full, ls=":", color="black",
                          label=f"full training set ({100 * report.full:.1f} %)")
        if not ev:  # only the final result: show it at the end of the run's steps
            a.set_xlim(0, max(1, last) * 1.06)
        a.set(xlabel="outer step", ylabel="test accuracy (%)",
              title="test accuracy of fresh networks")
        a.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a PNG atomically (the previous file stays until the new one is
    complete); nothing is clipped (``bbox_inches="tight"``)."""
    import matplotlib.pyplot as plt

    try:
        return ckpt.atomic_write(path, lambda f: fig.savefig(
            f, dpi=100, format="png", bbox_inches="tight", pad_inches=0.1))
    finally:
        plt.close(fig)


__all__ = ["GRID_COLUMNS", "plot_curves", "save_grid", "save_init_vs_distilled"]

"""Command-line interface: ``bilevel run CONFIG``, ``bilevel resume DIR`` and
``bilevel tune CONFIG --study NAME`` (:mod:`bilevel.tune.worker`).

A run tunes the inner learning rate and/or per-layer weight decay of an MLP or a ConvNet
on a scikit-learn dataset or an image dataset (Fashion-MNIST, a folder of IDX files or of
images, an ``.npz`` file) by hypergradients (:func:`bilevel.wrap` +
:class:`bilevel.OuterLoop`) and writes into its output folder: ``config.toml`` (a copy),
``metrics.jsonl`` / ``metrics.csv``, ``checkpoints/``, ``hparams.pt``, ``summary.json`` and
PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

from . import checkpoint as ckpt
from .arguments import non_negative_int, positive_int
from .config import (
    Config,
    ConfigError,
    ConvNetModelConfig,
    check_data_root,
    load_config,
    tomllib,
)
from .datasets import DataError, load_dataset, load_tabular
from .distill import app as distill_app
from .log import verbosity, verbosity_level
from .module import wrap
from .nets import ConvNet
from .outer import OuterLoop

CONFIG_NAME = "config.toml"

Split = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _limit(data: Split, limit: int | None, seed: int) -> Split:
    """Keep a seeded random subset of at most ``limit`` training examples."""
    x, y = data["train"]
    if limit is None or limit >= len(y):
        return data
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.randperm(len(y), generator=gen)[:limit].sort().values.to(y.device)
    return {**data, "train": (x[keep], y[keep])}


def _standardize(data: Split, dims: tuple[int, ...]) -> Split:
    """Standardise with the mean and std of the training inputs over ``dims``."""
    x = data["train"][0]
    mu, sd = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return {k: ((v[0] - mu) / sd, v[1]) for k, v in data.items()}


def load_data(cfg: Config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The seeded train/val/test split, standardised with training statistics.

    scikit-learn datasets are split by the fractions ``data.train``/``data.val``, stratified
    (:func:`bilevel.datasets.load_tabular`); datasets with their own test split keep it and
    hold out ``data.val`` of their training split (stratified). Inputs are
    ``(N, features)`` for an MLP and ``(N, C, H, W)`` for a ConvNet.
    """
    d = cfg.data
    kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
    images = isinstance(cfg.model, ConvNetModelConfig)
    if d.own_split:
        try:
            ds = load_dataset(d.dataset, root=d.root)
            val = ds.split_validation(d.val, seed=d.seed)
        except (DataError, ValueError) as exc:
            raise ConfigError(f"data.dataset: {exc}") from None
        data = {"train": (val.train_x, val.train_y), "val": (val.test_x, val.test_y),
                "test": (ds.test_x, ds.test_y)}
        data = {k: (x.to(**kw), y.to(cfg.device)) for k, (x, y) in data.items()}
        data = _limit(data, d.limit, d.seed)
        if d.standardize:
            data = _standardize(data, (0, 2, 3))
        if not images:
            data = {k: (x.flatten(1), y) for k, (x, y) in data.items()}
        return data
    try:
        splits = load_tabular(d.dataset, d.train, d.val, seed=d.seed)
    except DataError as exc:
        raise ConfigError(f"data.dataset: {exc}") from None
    data = {k: (x.to(**kw), y.to(cfg.device)) for k, (x, y) in splits.items()}
    data = _limit(data, d.limit, d.seed)
    if d.standardize:
        data = _standardize(data, (0,))
    elif images:
        data = {k: (x / 16, y) for k, (x, y) in data.items()}  # digits pixels are 0..16
    if images:  # digits: 64 features are 8x8 pixels
        data = {k: (x.reshape(-1, 1, 8, 8), y) for k, (x, y) in data.items()}
    return data


def make_mlp(sizes: list[int], seed: int, dtype: torch.dtype, device: str) -> nn.Sequential:
    """An MLP (ReLU between layers) initialised under ``seed``."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, dtype=dtype, device=device))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_convnet(in_shape: tuple[int, ...], num_classes: int, width: int, depth: int, norm: str,
                 seed: int, dtype: torch.dtype, device: str) -> nn.Module:
    """A :class:`bilevel.nets.ConvNet` initialised under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = ConvNet(in_shape, num_classes, width=width, depth=depth, norm=norm)
        except ValueError as exc:
            raise ConfigError(f"model.depth: {exc}") from None
    return net.to(dtype=dtype, device=device)


def predict(model: nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``model(x)`` without a graph, in chunks of ``chunk`` examples (bounded memory)."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def accuracy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Classification accuracy of ``model`` on ``(X, y)``."""
    return float((predict(model, batch[0]).argmax(1) == batch[1]).float().mean())


class Run:
    """Everything built from a config: data, model, problem, hyperparameters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data = load_data(cfg)
        n_out = int(torch.cat([d[1] for d in self.data.values()]).max()) + 1
        m = cfg.model
        if isinstance(m, ConvNetModelConfig):
            shape = tuple(self.data["train"][0].shape[1:])
            self.model = make_convnet(shape, n_out, m.width, m.depth, m.norm, cfg.seed,
                                      cfg.torch_dtype, cfg.device)
        else:
            self.sizes = [self.data["train"][0].shape[1], *m.sizes, n_out]
            self.model = make_mlp(self.sizes, cfg.seed, cfg.torch_dtype, cfg.device)
        # weight decay per layer: the weights of the conv and linear layers
        weights = [f"{name}.weight" for name, mod in self.model.named_modules()
                   if isinstance(mod, (nn.Linear, nn.Conv2d))]
        self.weights = weights
        h = cfg.hyperparameters
        kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
        n_layers = len(weights)
        self.initial = {"log_lr": torch.tensor(h.lr, **kw).log(),
                        "log_wd": torch.full((n_layers,), h.weight_decay, **kw).log()}
        self.tuned = list(h.tune)
        if "log_lr" in self.tuned and cfg.estimator.name in ("implicit", "fixed_point"):
            self.tuned.remove("log_lr")
            if not self.tuned:
                raise ConfigError(
                    f"hyperparameters.tune: nothing to tune: estimator.name = "
                    f"{cfg.estimator.name!r} differentiates the inner optimum w*, which does "
                    "not depend on the inner learning rate (log_lr); tune it with 'unrolled' "
                    "or 'truncated', or add log_wd")
            warnings.warn(
                f"hyperparameters.tune: log_lr stays at lr = {h.lr:g}: estimator.name = "
                f"{cfg.estimator.name!r} differentiates the inner optimum w*, which does not "
                "depend on the inner learning rate (its hypergradient is zero); tune it with "
                "'unrolled' or 'truncated'", UserWarning, stacklevel=2)
        fixed = {k: v for k, v in self.initial.items() if k not in self.tuned}

        def get(hp: dict[str, torch.Tensor], k: str) -> torch.Tensor:
            return hp[k] if k in hp else fixed[k]

        def lr(hp: dict[str, torch.Tensor]) -> torch.Tensor:
            return get(hp, "log_lr").exp()

        def penalty(p: dict[str, torch.Tensor], hp: dict[str, torch.Tensor]) -> torch.Tensor:
            wd = get(hp, "log_wd").exp()
            return 0.5 * sum(wd[i] * (p[w] ** 2).sum() for i, w in enumerate(weights))

        opt = hg.make_optimizer(cfg.inner.optimizer, lr=lr, momentum=cfg.inner.momentum)

        def loss(out: torch.Tensor, batch: Any, hp: Any) -> torch.Tensor:
            return F.cross_entropy(out, batch[1])

        self.mp = wrap(self.model, loss, loss, {k: self.initial[k] for k in self.tuned},
                       self.data["train"], self.data["val"], opt, cfg.inner.steps,
                       penalty=penalty, seed=cfg.seed)

    def reinit(self, step: int = 0) -> dict[str, torch.Tensor]:
        """The fixed initial network (same seed every outer step)."""
        return {k: v.clone() for k, v in self.mp.params.items()}

    def train(self, hparams: dict[str, torch.Tensor]) -> nn.Module:
        """Train the network from the fixed initialisation at ``hparams``."""
        params = self.mp.problem.solve_inner(self.reinit(), hparams, self.cfg.inner.steps)[0]
        return self.mp.export(params)

    def values(self, hparams: dict[str, torch.Tensor]) -> dict[str, float]:
        """The tuned hyperparameters as the network uses them (not their logs): metrics
        columns ``inner_lr`` and ``weight_decay.<layer weight>``, recorded every step."""
        out: dict[str, float] = {}
        if "log_lr" in hparams:
            out["inner_lr"] = float(hparams["log_lr"].detach().exp())
        if "log_wd" in hparams:
            for name, v in zip(self.weights, hparams["log_wd"].detach().exp().tolist(),
                               strict=True):
                out[f"weight_decay.{name}"] = float(v)
        return out

    def hyperparameters(self, tuned: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``summary.json``'s ``hyperparameters``: per hyperparameter, its initial and its
        tuned value (equal when it was held fixed), weight decay per layer weight."""
        final = {**self.initial, **tuned}
        h = self.cfg.hyperparameters
        lr0, wd0 = h.lr, [h.weight_decay] * len(self.weights)
        lr1, wd1 = float(final["log_lr"].detach().exp()), final["log_wd"].detach().exp().tolist()
        if "log_lr" not in tuned:
            lr1 = lr0
        if "log_wd" not in tuned:
            wd1 = wd0
        return {"inner_lr": {"initial": lr0, "tuned": lr1, "fixed": "log_lr" not in tuned},
                "weight_decay": {"layers": list(self.weights), "initial": wd0, "tuned": wd1,
                                 "fixed": "log_wd" not in tuned}}

    def evaluate(self, hparams: dict[str, torch.Tensor], params: Any) -> dict[str, float]:
        """Validation accuracy and loss of the inner solution ``params``."""
        model = self.mp.export(params)
        val_loss = float(F.cross_entropy(predict(model, self.data["val"][0]), self.data["val"][1]))
        return {"val_acc": accuracy(model, self.data["val"]), "val_loss": val_loss}

    def loop(self, out: Path, mode: str, document: dict[str, Any],
             outputs: tuple[str, ...] = (), callbacks: tuple[Any, ...] = (),
             progress: bool | None = None) -> OuterLoop:
        """The :class:`OuterLoop` running in the folder ``out`` (opened in ``mode``: see
        :class:`~bilevel.run_folder.RunFolder`), identified by the config ``document``, with
        extra ``callbacks`` (e.g. :class:`~bilevel.tune.OptunaPruning`) and a progress bar
        (``None``: when stderr is a terminal) showing the outer loss and the validation
        metrics."""
        o = self.cfg.outer
        opt_cls = getattr(torch.optim, o.optimizer)
        return OuterLoop(self.mp.problem, {k: self.initial[k] for k in self.tuned},
                         self.reinit(), hg.make_estimator(self.cfg.estimator.name,
                                                          **self.cfg.estimator.settings),
                         lambda ps: opt_cls(ps, lr=o.lr),
                         reinit=self.reinit if self.cfg.inner.reinit else None,
                         clip_norm=o.clip_norm, evaluate=self.evaluate, eval_every=o.eval_every,
                         callbacks=callbacks, metrics=self.values, run_dir=out,
                         run_mode=mode, kind="run",
                         config=document, growable=("config.outer.steps",),
                         outputs=outputs or OUTPUTS, checkpoint_every=o.checkpoint_every,
                         progress=progress, device=self.cfg.device,
                         dtype=self.cfg.torch_dtype,
                         progress_fields={"val loss": "outer_loss",
                                          "val acc": "eval_val_acc"})


#: result files of a `bilevel run` folder
OUTPUTS = (CONFIG_NAME, "hparams.pt", "summary.json", "outer_loss.png", "val_accuracy.png",
           "hyperparameters.png")


def _points(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]


#: the x axis of every plot: the point at k belongs to the hyperparameters after k updates
#: (metrics row k: the outer loss, the evaluation and the hyperparameters' values at them)
_X_LABEL = "outer step k (hyperparameters after k updates)"


def _plot(history: list[dict[str, Any]], out: Path, final: dict[str, float], steps: int,
          summary: dict[str, Any] | None = None) -> None:
    """``outer_loss.png``, ``val_accuracy.png`` (with the validation accuracy of a network
    trained at the initial and at the tuned hyperparameters, once the run is complete) and
    ``hyperparameters.png`` (each tuned hyperparameter over the outer steps, ending at its
    ``final`` value after ``steps`` updates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def save(fig: Any, name: str) -> None:
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        ckpt.atomic_write(out / name, lambda f: fig.savefig(f, dpi=100, format="png"))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if pts := _points(history, "outer_loss"):
        ax.plot(*zip(*pts, strict=True), marker=".")
    ax.set(xlabel=_X_LABEL, ylabel="outer (validation) loss")
    save(fig, "outer_loss.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if pts := _points(history, "eval_val_acc"):
        ax.plot(*zip(*pts, strict=True), marker=".", label="during tuning")
    if summary and summary.get("complete"):
        ax.axhline(summary["initial_val_acc"], color="grey", ls="--",
                   label=f"initial hyperparameters: {summary['initial_val_acc']:.3f}")
        ax.axhline(summary["tuned_val_acc"], color="C2", ls="-.",
                   label=f"tuned hyperparameters: {summary['tuned_val_acc']:.3f}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    ax.set(xlabel=_X_LABEL, ylabel="validation accuracy")
    save(fig, "val_accuracy.png")

    lr = _points(history, "inner_lr")
    wd = sorted({k for r in history for k in r if k.startswith("weight_decay.")})
    panels = [p for p in (("inner learning rate", ["inner_lr"] if lr else []),
                          ("weight decay", wd)) if p[1]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.5),
                             squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels, strict=False):
        for key in keys:
            if pts := _points(history, key) + ([(steps, final[key])] if key in final else []):
                ax.plot(*zip(*pts, strict=True), marker=".",
                        label=key.removeprefix("weight_decay.") if len(keys) > 1 else None)
        ax.set(xlabel=_X_LABEL, ylabel=label, yscale="log")
        if len(keys) > 1:
            ax.legend(fontsize=8, title="layer", title_fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no hyperparameter was tuned", ha="center", va="center")
        axes[0][0].set_axis_off()
    save(fig, "hyperparameters.png")


def _document(path: Path) -> dict[str, Any]:
    """The config file's TOML document: what identifies a run in its folder."""
    with open(path, "rb") as f:
        return tomllib.load(f)


#: how a run's outer loop is driven: ``(loop, outer steps in total) -> history``
Runner = Callable[[OuterLoop, int], list[dict[str, Any]]]


def _execute(cfg: Config, loop: OuterLoop, run: Run, stop_after: int | None,
             start: float, runner: Runner | None = None) -> dict[str, Any]:
    out = loop.folder.path
    target = cfg.outer.steps if stop_after is None else min(stop_after, cfg.outer.steps)
    history = (runner or OuterLoop.run)(loop, target)
    hp = loop.current_hparams()
    loop.folder.save_torch("hparams.pt", hp)
    final = run.values(hp)
    if loop.global_step < cfg.outer.steps:
        _plot(history, out, final, loop.global_step)
        print(f"stopped at outer step {loop.global_step}/{cfg.outer.steps}; continue with "
              f"`bilevel resume {out}`", file=sys.stderr)
        return {"steps": loop.global_step, "complete": False}
    base, tuned = run.train({k: run.initial[k] for k in run.tuned}), run.train(hp)

    def val_loss(model: nn.Module) -> float:
        return float(F.cross_entropy(predict(model, run.data["val"][0]), run.data["val"][1]))

    summary = {
        "steps": loop.global_step, "complete": True,
        "tuned_val_acc": accuracy(tuned, run.data["val"]),
        "tuned_test_acc": accuracy(tuned, run.data["test"]),
        "tuned_val_loss": val_loss(tuned),
        "initial_val_acc": accuracy(base, run.data["val"]),
        "initial_test_acc": accuracy(base, run.data["test"]),
        "initial_val_loss": val_loss(base),
        "hyperparameters": run.hyperparameters(hp),
        "seconds": time.perf_counter() - start,
        "train_seconds": sum(r.get("step_seconds", 0.0) for r in history),
    }
    _plot(history, out, final, loop.global_step, summary)
    loop.folder.write_json("summary.json", summary)
    return summary


#: how ``summary.json``'s hyperparameters are printed
_HPARAM_NAMES = {"inner_lr": "inner learning rate", "weight_decay": "weight decay"}


def _print_summary(s: dict[str, Any]) -> None:
    if not s.get("complete"):
        return
    print(f"{'':<10} {'val acc':>8} {'test acc':>9} {'val loss':>9}")
    print(f"{'initial':<10} {s['initial_val_acc']:8.3f} {s['initial_test_acc']:9.3f} "
          f"{s['initial_val_loss']:9.4f}")
    print(f"{'tuned':<10} {s['tuned_val_acc']:8.3f} {s['tuned_test_acc']:9.3f} "
          f"{s['tuned_val_loss']:9.4f}")
    print(f"{s['steps']} outer steps: {s['train_seconds']:.1f} s of outer steps, "
          f"{s['seconds']:.1f} s for this command")
    for name, h in s.get("hyperparameters", {}).items():
        if h.get("fixed"):
            continue
        if "layers" in h:
            for layer, a, b in zip(h["layers"], h["initial"], h["tuned"], strict=True):
                print(f"{_HPARAM_NAMES.get(name, name)} of {layer}: {a:.4g} -> {b:.4g}")
        else:
            print(f"{_HPARAM_NAMES.get(name, name)}: {h['initial']:.4g} -> {h['tuned']:.4g}")
    if s.get("dir"):
        print(f"outputs in {s['dir']}: hparams.pt (the log-hyperparameters), summary.json, "
              "metrics.jsonl/.csv, outer_loss.png, val_accuracy.png, hyperparameters.png")


def _config_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        hint = " (a run folder: continue it with `bilevel resume " + path + "`)" \
            if (p / CONFIG_NAME).is_file() else ""
        raise ConfigError(f"{path} is a directory, not a TOML config file{hint}")
    return p


def run_config(cfg: Config, text: str, document: dict[str, Any], out: Path, mode: str, *,
               outputs: tuple[str, ...] = OUTPUTS, stop_after: int | None = None,
               callbacks: tuple[Any, ...] = (), runner: Runner | None = None,
               start: float | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Build the run of ``cfg`` (data, model, problem) and its :class:`OuterLoop` in the
    folder ``out`` (opened in ``mode``, identified by ``document``), write ``text`` there as
    ``config.toml``, run it (``runner(loop, steps)``; default ``loop.run``) and write the
    results; returns the summary. Used by ``bilevel run`` and by each ``bilevel tune``
    trial. Data and model problems surface before the folder is touched."""
    start = time.perf_counter() if start is None else start
    run = Run(cfg)
    with run.loop(out, mode, document, outputs, callbacks, progress) as loop:
        loop.folder.write_text(CONFIG_NAME, text)
        return _execute(cfg, loop, run, stop_after, start, runner)


def _data_root(cfg: Config, document: dict[str, Any], root: str) -> None:
    """Apply ``--data-root``: to the config, and to the run's identity (``document``), so
    that the run resumes only on the same data (``bilevel resume --data-root`` again)."""
    check_data_root(cfg.data, root, "--data-root")
    document.setdefault("data", {})["root"] = str(Path(root).resolve())


def cmd_run(args: argparse.Namespace) -> int:
    """``bilevel run CONFIG``: a new run in its output folder; a folder holding another
    run is refused unless ``--overwrite``. A ``[search]`` table (``bilevel tune``) is
    ignored."""
    start = time.perf_counter()
    path = _config_file(args.config)
    cfg = load_config(path)
    text, document = path.read_text(), _document(path)  # read before the folder is touched
    if args.data_root is not None:
        _data_root(cfg, document, args.data_root)
    out = Path(args.output or cfg.output.dir)
    outputs = OUTPUTS
    if path.resolve() == (out / CONFIG_NAME).resolve():  # the config lives in the folder
        outputs = tuple(n for n in OUTPUTS if n != CONFIG_NAME)
    summary = run_config(cfg, text, document, out, "overwrite" if args.overwrite else "new",
                         outputs=outputs, stop_after=args.stop_after, start=start)
    _print_summary({**summary, "dir": str(out)})
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """``bilevel resume DIR``: continue the run in DIR (its config.toml must be the one it
    started with; ``outer.steps`` may grow)."""
    start = time.perf_counter()
    out = Path(args.dir)
    if not (out / CONFIG_NAME).is_file():
        if (out / "run.json").is_file():
            raise ConfigError(f"{out}: the run was stopped before its {CONFIG_NAME} was "
                              "written, so it cannot be resumed; start it again with "
                              f"`bilevel run CONFIG -o {out} --overwrite`")
        raise ConfigError(f"{out}: no {CONFIG_NAME} here (not a `bilevel run` folder)")
    cfg = load_config(out / CONFIG_NAME)
    document = _document(out / CONFIG_NAME)
    if args.data_root is not None:
        _data_root(cfg, document, args.data_root)
    run = Run(cfg)
    with run.loop(out, "resume", document) as loop:
        step = loop.resume()
        print(f"resumed {out} at outer step {step}", file=sys.stderr)
        summary = _execute(cfg, loop, run, args.stop_after, start)
    _print_summary({**summary, "dir": str(out)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bilevel`` command."""
    p = argparse.ArgumentParser(
        prog="bilevel", description="Hyperparameter optimisation by hypergradients from a "
        "TOML config (see bilevel.config for the schema).")
    p.add_argument("--version", action="version", version=f"bilevel {_version()}")
    _verbosity(p, 0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a config into its output folder",
                       description="Validate CONFIG, tune its hyperparameters with OuterLoop and "
                       "write config.toml, metrics.jsonl/csv, checkpoints/, hparams.pt, "
                       "summary.json and PNG plots into the output folder.")
    r.add_argument("config", metavar="CONFIG", help="TOML config file")
    r.add_argument("-o", "--output", metavar="DIR", help="output folder (default: output.dir)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the logs and checkpoints of an existing run in the folder")
    r.add_argument("--stop-after", type=non_negative_int, metavar="N",
                   help="stop after N outer steps in total (continue later with resume)")
    r.add_argument("--data-root", metavar="DIR", help="folder holding the named dataset's "
                   "files, e.g. fashion_mnist's IDX files (overrides data.root)")
    _threads(r)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("resume", help="continue a stopped or killed run",
                       description="Continue the run in DIR from its newest good checkpoint "
                       "(reading DIR/config.toml) up to outer.steps, then write the results.")
    s.add_argument("dir", metavar="DIR", help="output folder of an earlier `bilevel run`")
    s.add_argument("--stop-after", type=non_negative_int, metavar="N",
                   help="stop after N outer steps in total")
    s.add_argument("--data-root", metavar="DIR", help="folder holding the named dataset's "
                   "files (as given to `bilevel run --data-root`)")
    _threads(s)
    s.set_defaults(func=cmd_resume)
    d = sub.add_parser("distill", help="distil an image dataset into a few images per class",
                       description="Dataset distillation: learn IPC synthetic images per class "
                       "(and soft labels, inner learning rate) by hypergradients, evaluate "
                       "them against a random real subset and the full data, and write "
                       "images.png, curves.png, distilled.pt, metrics.jsonl and summary.json.")
    distill_app.add_arguments(d)
    d.set_defaults(func=distill_app.run)
    from .tune import worker as tune_worker  # here: bilevel.tune imports bilevel.cli

    t = sub.add_parser("tune", help="one Optuna worker over the config's [search] table",
                       description=tune_worker.DESCRIPTION)
    tune_worker.add_arguments(t)
    _threads(t, " (with several workers on one machine: its cores / the workers)")
    t.set_defaults(func=tune_worker.cmd_tune)
    for command in sub.choices.values():  # -v/-q also after the command's name
        _verbosity(command, argparse.SUPPRESS)
    return p


def _verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more library messages on stderr (-v: debug)")
    p.add_argument("-q", "--quiet", action="count", default=default,
                   help="fewer library messages on stderr (-q: warnings and errors only)")


def _version() -> str:
    """The installed distribution's version (the package's own when run from a checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("bilevel")
    except PackageNotFoundError:  # pragma: no cover
        from . import __version__

        return __version__


def _threads(p: argparse.ArgumentParser, hint: str = "") -> None:
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help=f"torch CPU threads (default: torch's, one per core){hint}")


@contextlib.contextmanager
def _warnings_shown(level: int) -> Iterator[None]:
    """Python warnings as the command shows them: one line ``bilevel: warning: Category:
    message`` (the source line of a library call means nothing to a command-line user),
    none at all with ``-qq`` (errors only), and every one, repeats included, with
    ``BILEVEL_WARNINGS=all``."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        print(f"bilevel: warning: {category.__name__}: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        if level > logging.WARNING:
            warnings.simplefilter("ignore")
        elif os.environ.get("BILEVEL_WARNINGS", "").strip().lower() == "all":
            warnings.simplefilter("always")
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for configuration errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    level = verbosity_level(args.verbose, args.quiet)
    with verbosity(level), _warnings_shown(level):  # library messages on stderr
        try:
            return args.func(args)
        except (ConfigError, hg.BilevelInputError) as exc:
            print(f"bilevel: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

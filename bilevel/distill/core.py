"""Dataset distillation by hypergradients.

Outer variables λ: synthetic images X (IPC per class), optionally soft-label logits L and
the log inner learning rate. Inner problem: train a freshly initialised network on
(aug(X), softmax(L)) for T steps of a differentiable optimizer; outer loss: cross-entropy
of the trained network on a batch of real training images::

    min_λ CE(net(w_T(λ); x_real), y_real)
    w_{t+1} = w_t − η ∇_w CE(net(w_t; aug_t(X)), softmax(L))

with w_0 drawn afresh every outer step. Any :mod:`hypergrad` estimator differentiates the
inner training (unrolled, recompute, truncated, random-window, implicit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad.problem import once_per_run

from .. import checkpoint as ckpt
from ..callbacks import Callback
from ..data import ImageDataset
from ..nets import MLP, NETS, ConvNet, make_net
from ..outer import OuterLoop
from .augment import Augment
from .evaluate import EvalResult, Recipe, evaluate, init_networks, random_subset, soft_cross_entropy

#: estimator names accepted by :class:`DistillConfig` (keys of ``hypergrad.ESTIMATORS``)
DISTILL_ESTIMATORS = ("unrolled", "recompute", "truncated", "random_window", "implicit")
#: inner optimizer names (hypergrad's registry)
INNER_OPTIMIZERS = tuple(hg.OPTIMIZERS)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of a distillation run (defaults: a quick digits run on CPU).

    Args:
        ipc: synthetic images per class.
        net / width / depth / norm / hidden: the network (:func:`bilevel.nets.make_net`);
            ``depth=None`` picks 3 blocks for images of 28 pixels or more, fewer for
            smaller ones (2 for 8×8 digits) so the last block still sees 2×2 maps.
        init: ``"real"`` (random real images of each class) or ``"noise"`` (N(0, 1) in
            normalised pixel space).
        learn_labels: learn soft labels (logits, initialised to ``label_scale``·one-hot).
        learn_lr: learn the inner learning rate (as its logarithm); default: yes, except
            with ``estimator="implicit"``, whose hypergradient in the rate is zero (the
            rate does not move the inner optimum), where asking for it is an error.
        inner_lr / inner_optimizer / inner_momentum / inner_steps: the inner training
            recipe, also used to evaluate the distilled set.
        estimator / estimator_settings: a name of :data:`DISTILL_ESTIMATORS` and keyword
            settings (e.g. ``{"window": 10}``; default windows: T/2 for ``truncated``,
            ⌈3T/4⌉ for ``random_window``).
        outer_steps / outer_batch: outer iterations; real images per outer loss.
        image_lr / label_lr / lr_lr: Adam step sizes of images, label logits, log-lr.
        max_lr: upper bound on the learned inner learning rate (a projection after each
            step; without it the rate tends to grow until the inner run diverges).
        clip_norm: clip each hypergradient to this 2-norm (``None``: no clipping).
        augment: differentiable augmentation used in inner training and evaluation.
        eval_every / eval_nets: evaluate every k outer steps (0: never during the run) with
            this many fresh networks.
        seed: seeds the initial images, every network initialisation, every outer batch
            and augmentation draw.
        device / dtype: where and in which precision everything runs.
    """

    ipc: int = 10
    net: str = "mlp"
    width: int = 128
    depth: int | None = None
    norm: str = "instance"
    hidden: tuple[int, ...] = (128,)
    init: str = "real"
    learn_labels: bool = True
    learn_lr: bool | None = None
    label_scale: float = 3.0
    inner_lr: float = 0.1
    inner_optimizer: str = "sgd"
    inner_momentum: float = 0.9
    inner_steps: int = 30
    estimator: str = "unrolled"
    estimator_settings: dict[str, Any] = field(default_factory=dict)
    outer_steps: int = 400
    outer_batch: int = 256
    image_lr: float = 0.05
    label_lr: float = 0.05
    lr_lr: float = 0.03
    max_lr: float | None = 1.0
    clip_norm: float | None = None
    augment: Augment = field(default_factory=Augment)
    eval_every: int = 0
    eval_nets: int = 5
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"DistillConfig.{what}")

        need(isinstance(self.ipc, int) and self.ipc >= 1,
             f"ipc must be an int >= 1, got {self.ipc!r}")
        need(self.net in NETS, f"net must be one of {NETS}, got {self.net!r}")
        need(self.init in ("real", "noise"), f"init must be 'real' or 'noise', got {self.init!r}")
        need(self.inner_optimizer in INNER_OPTIMIZERS,
             f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {self.inner_optimizer!r}")
        need(self.estimator in DISTILL_ESTIMATORS,
             f"estimator must be one of {DISTILL_ESTIMATORS}, got {self.estimator!r}")
        need(isinstance(self.inner_steps, int) and self.inner_steps >= 1,
             f"inner_steps must be an int >= 1, got {self.inner_steps!r}")
        need(isinstance(self.outer_steps, int) and self.outer_steps >= 0,
             f"outer_steps must be an int >= 0, got {self.outer_steps!r}")
        need(isinstance(self.outer_batch, int) and self.outer_batch >= 1,
             f"outer_batch must be an int >= 1, got {self.outer_batch!r}")
        for name in ("inner_lr", "image_lr", "label_lr", "lr_lr", "label_scale"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                 f"{name} must be a positive finite number, got {v!r}")
        need(self.max_lr is None or (math.isfinite(self.max_lr) and self.max_lr > 0),
             f"max_lr must be positive or None, got {self.max_lr!r}")
        need(self.clip_norm is None or self.clip_norm > 0,
             f"clip_norm must be positive or None, got {self.clip_norm!r}")
        need(self.eval_every >= 0 and self.eval_nets >= 1,
             f"eval_every must be >= 0 and eval_nets >= 1, got {self.eval_every}, {self.eval_nets}")
        need(self.dtype in ("float32", "float64"), f"dtype must be 'float32' or 'float64', "
                                                   f"got {self.dtype!r}")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool)
             and 0 <= self.seed < 2 ** 63, f"seed must be an int in [0, 2**63), got "
                                           f"{self.seed!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            device = None
        need(device is not None and device.type in ("cpu", "cuda"),
             f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        need(isinstance(self.augment, Augment), f"augment must be an Augment, got "
                                                f"{type(self.augment).__name__}")
        hg.make_estimator(self.estimator, **self.estimator_settings)  # checks the settings
        if self.learn_lr is None:
            object.__setattr__(self, "learn_lr", self.estimator != "implicit")
        need(not (self.learn_lr and self.estimator == "implicit"),
             "learn_lr=True does nothing with the implicit estimator (the inner learning "
             "rate does not change the inner optimum, so its hypergradient is zero): set "
             "learn_lr=False or use an unrolled/truncated estimator")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["augment"] = {"shift": self.augment.shift, "flip": self.augment.flip}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DistillConfig: unknown settings {unknown}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        if isinstance(d.get("augment"), dict):
            d["augment"] = Augment(**d["augment"])
        return cls(**d)

    def net_settings(self, in_shape: tuple[int, int, int]) -> dict[str, Any]:
        """The keyword settings of :func:`~bilevel.nets.make_net` for images of shape
        ``in_shape`` ``(C, H, W)``, with the depth resolved (``depth=None``: 3 blocks, fewer
        on small images)."""
        depth = self.depth or max(1, min(3, int(math.log2(min(in_shape[1:]))) - 1))
        return {"width": self.width, "depth": depth, "norm": self.norm,
                "hidden": tuple(self.hidden)}

    def net_factory(self, in_shape: tuple[int, int, int],
                    num_classes: int) -> Callable[[], nn.Module]:
        """A function building one (randomly initialised) network of this config."""
        settings = self.net_settings(in_shape)

        def build() -> nn.Module:
            return make_net(self.net, in_shape, num_classes, **settings)
        return build

    def eval_recipe(self, lr: float) -> Recipe:
        """The inner training recipe (full batch) at learning rate ``lr``."""
        return Recipe(steps=self.inner_steps, lr=lr, optimizer=self.inner_optimizer,
                      momentum=self.inner_momentum, augment=self.augment)


@dataclass
class DistilledSet:
    """A distilled training set.

    ``images`` live in normalised pixel space ((x − mean)/std of the real training set),
    shape ``(K·IPC, C, H, W)`` ordered by class; ``labels`` are probability rows
    (``(K·IPC, K)``); ``lr`` is the (learned) inner learning rate; ``config`` the
    :class:`DistillConfig` as a dict; ``meta`` free-form facts (dataset name, outer steps
    done, ...); ``initial`` the images the distillation started from (real images or
    noise, same space and shape as ``images``; ``None`` in files written before it was
    kept); ``class_names`` one name per class (empty: the class numbers).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    initial: torch.Tensor | None = None
    class_names: tuple[str, ...] = ()

    @property
    def ipc(self) -> int:
        return self.images.shape[0] // self.num_classes

    def __repr__(self) -> str:
        """One line: size, image shape, labels, learning rate and dataset, no tensors."""
        soft = "hard" if bool(((self.labels == 0) | (self.labels == 1)).all()) else "soft"
        where = self.meta.get("dataset")
        return (f"DistilledSet({self.images.shape[0]} images = {self.ipc} per class x "
                f"{self.num_classes} classes, {tuple(self.images.shape[1:])} "
                f"{str(self.images.dtype).replace('torch.', '')}, {soft} labels, "
                f"lr={self.lr:.4g}{f', dataset={where!r}' if where else ''})")

    @property
    def hard_labels(self) -> torch.Tensor:
        return self.labels.argmax(-1)

    def class_name(self, label: int) -> str:
        """The name of class ``label`` (its number when the set names no classes)."""
        return self.class_names[label] if self.class_names else str(label)

    def pixels(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (default: the distilled ones; e.g. :attr:`initial`) back in
        ``[0, 1]`` pixel space (clipped), for viewing."""
        images = self.images if images is None else images
        m = self.mean.view(1, -1, 1, 1).to(images)
        s = self.std.view(1, -1, 1, 1).to(images)
        return (images * s + m).clamp(0, 1)

    def blob(self) -> dict[str, Any]:
        """The tensors (and config/meta/class names as JSON) that :meth:`save` writes."""
        blob = {"images": self.images.detach().cpu(), "labels": self.labels.detach().cpu(),
                "lr": torch.tensor(float(self.lr), dtype=torch.float64),
                "mean": self.mean.detach().cpu(), "std": self.std.detach().cpu(),
                "num_classes": torch.tensor(self.num_classes),
                "json": json.dumps({"config": self.config, "meta": self.meta,
                                    "class_names": list(self.class_names)})}
        if self.initial is not None:
            blob["initial"] = self.initial.detach().cpu()
        return blob

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (a ``.pt`` file, written atomically); :meth:`load` reads it."""
        return ckpt.atomic_save(self.blob(), path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DistilledSet:
        """Read a set written by :meth:`save` (tensors only; no code is unpickled). Files
        of earlier versions, without initial images or class names, load with
        ``initial=None`` and no names."""
        blob = torch.load(Path(path), map_location=device, weights_only=True)
        extra = json.loads(blob["json"])
        return cls(images=blob["images"], labels=blob["labels"], lr=float(blob["lr"]),
                   mean=blob["mean"], std=blob["std"], num_classes=int(blob["num_classes"]),
                   config=extra["config"], meta=extra["meta"], initial=blob.get("initial"),
                   class_names=tuple(extra.get("class_names", ())))


def make_estimator(cfg: DistillConfig) -> hg.Estimator:
    """The hypergradient estimator of ``cfg`` with the settings distillation needs."""
    settings = dict(cfg.estimator_settings)
    if cfg.estimator == "implicit":
        # every outer step trains a new network: nothing to warm-start from, and a
        # T-step inner run is not a converged solution, so do not warn about it
        settings.setdefault("warm_start", False)
        settings.setdefault("inner_tol", None)
        settings.setdefault("solver", hg.ConjugateGradient(maxiter=20, tol=1e-3,
                                                           damping=1e-3))
    if cfg.estimator == "truncated":
        settings.setdefault("window", max(1, cfg.inner_steps // 2))
    if cfg.estimator == "random_window":
        # a window ending early measures an undertrained network; with short windows
        # those draws dominate and the run stalls (window T/2: 59 % vs 3T/4: 93 % on
        # digits IPC 1, 120 outer steps)
        settings.setdefault("window", max(1, (3 * cfg.inner_steps + 3) // 4))
    if cfg.estimator in ("truncated", "random_window"):
        settings.setdefault("seed", cfg.seed)
    if cfg.estimator != "implicit":
        # nothing here reads ‖∇_w f‖ of the network trained from scratch (NaN in the
        # records): skip its extra gradient evaluation
        settings.setdefault("grad_norm", False)
    return hg.make_estimator(cfg.estimator, **settings)


class Distiller:
    """Distil ``data.train_*`` into ``config.ipc`` images per class.

    An application on :class:`~bilevel.outer.OuterLoop`: this class holds the config, the
    hyperparameters (images, label logits, log inner lr) with their Adam optimizer, the
    problem factory (:meth:`problem`: a fresh network and outer batch every outer step)
    and the evaluation; the loop steps, clips, projects the learned lr onto ``max_lr``,
    evaluates every ``eval_every`` steps, logs, checkpoints and resumes.

    Call :meth:`step` for one outer step or :meth:`run` for ``config.outer_steps``; the
    result is :attr:`distilled`. With ``run(run_dir=...)`` (or :meth:`resume`) the run
    lives in a :class:`~bilevel.run_folder.RunFolder`: locked while this object holds
    it (until :meth:`close`), with ``metrics.jsonl`` written as it goes and checkpoints
    that resume bit-identically. ``data.test_*`` gives the accuracy curve when
    ``config.eval_every > 0``.
    """

    #: result files of a distillation folder (see :func:`~bilevel.distill.write_outputs`)
    OUTPUTS = ("distilled.pt", "images.png", "init_vs_distilled.png", "curves.png",
               "summary.json")

    def __init__(self, data: ImageDataset, config: DistillConfig = DistillConfig()) -> None:
        self.config = cfg = config
        self.data = data
        if not isinstance(data, ImageDataset):
            raise TypeError(f"Distiller: data must be a bilevel.data.ImageDataset, got "
                            f"{type(data).__name__} (see bilevel.data.load_arrays)")
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"DistillConfig.device is {cfg.device!r} but CUDA is not "
                             "available here")
        dtype = cfg.torch_dtype
        x = data.train_x.to(self.device, dtype)
        dims = (0, 2, 3)
        self.mean = x.mean(dims)
        self.std = x.std(dims).clamp_min(1e-6)
        self.train_x = self._normalise(x)
        self.train_y = data.train_y.to(self.device)
        self.test_x = self._normalise(data.test_x.to(self.device, dtype))
        self.test_y = data.test_y.to(self.device)
        self.num_classes = k = data.num_classes
        self.make_net = cfg.net_factory(data.image_shape, k)
        # fail early on a net that does not fit the images; kept to redraw w_0 in place
        self._init_net = self.make_net()

        gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "real":
            images, _ = random_subset(self.train_x, self.train_y, cfg.ipc, k, seed=cfg.seed)
        else:
            images = torch.randn((k * cfg.ipc, *data.image_shape), generator=gen).to(
                self.device, dtype)
        self.classes = torch.arange(k, device=self.device).repeat_interleave(cfg.ipc)
        # the starting point, for the init-vs-distilled figure: a function of the data and
        # the config (seed) alone, so a resumed run rebuilds exactly the same images here
        self.initial_images = images.detach().clone()
        self.hparams: dict[str, torch.Tensor] = {"images": images.clone().requires_grad_()}
        groups = [{"params": [self.hparams["images"]], "lr": cfg.image_lr}]
        if cfg.learn_labels:
            logits = cfg.label_scale * F.one_hot(self.classes, k).to(dtype)
            self.hparams["labels"] = logits.requires_grad_()
            groups.append({"params": [self.hparams["labels"]], "lr": cfg.label_lr})
        if cfg.learn_lr:
            self.hparams["log_lr"] = torch.tensor(math.log(cfg.inner_lr), device=self.device,
                                                  dtype=dtype, requires_grad=True)
            groups.append({"params": [self.hparams["log_lr"]], "lr": cfg.lr_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.estimator = make_estimator(cfg)
        self._inner_optimizer = self.inner_optimizer()  # one per run: a function of cfg
        self.net, _ = init_networks(self.make_net, [0], self.device, dtype)
        self._net_call = _ParameterSwap(self.net)
        self.loop = self._new_loop(None)

    # -- the bilevel problem ---------------------------------------------------------

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def targets(self, hparams: dict[str, torch.Tensor]) -> torch.Tensor:
        """Soft-label probabilities (or one-hot rows without learned labels); inside the
        inner steps of one run computed once (:func:`hypergrad.problem.once_per_run`)."""
        if "labels" in hparams:
            return once_per_run(_soft_labels, hparams["labels"])
        return F.one_hot(self.classes, self.num_classes).to(hparams["images"].dtype)

    def lr(self, hparams: dict[str, torch.Tensor] | None = None) -> torch.Tensor | float:
        hparams = self.hparams if hparams is None else hparams
        if "log_lr" in hparams:
            return hparams["log_lr"].detach().exp()
        return self.config.inner_lr

    def inner_optimizer(self) -> hg.optim.InnerOptimizer:
        lr: Any = (lambda h: h["log_lr"].exp()) if self.config.learn_lr else self.config.inner_lr
        return self.config.eval_recipe(1.0).inner_optimizer(lr)

    def problem(self, step: int) -> tuple[hg.Problem, dict[str, torch.Tensor]]:
        """The bilevel problem of outer step ``step`` and its fresh inner start w_0 (the
        outer loop's problem factory)."""
        cfg = self.config
        seed = hg.mix_seed(cfg.seed, step)
        gen = torch.Generator().manual_seed(seed)
        n = self.train_x.shape[0]
        idx = torch.randperm(n, generator=gen)[:min(cfg.outer_batch, n)].to(self.device)
        outer = (self.train_x[idx], self.train_y[idx])
        draws = cfg.augment.draw(self.hparams["images"].shape[0], gen, steps=cfg.inner_steps) \
            if cfg.augment.active else None
        net, augment = self._net_call, cfg.augment

        def inner_loss(p: dict, h: dict, draw: torch.Tensor | None) -> torch.Tensor:
            logits = net(p, augment(h["images"], draw))
            return soft_cross_entropy(logits, self.targets(h))

        def outer_loss(p: dict, h: dict, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(net(p, batch[0]), batch[1])

        problem = hg.Problem(
            inner_loss, outer_loss, inner_batch=None if draws is None else draws[-1],
            outer_batch=outer, optimizer=self._inner_optimizer, steps=cfg.inner_steps,
            step_batch=None if draws is None else (lambda t: draws[t]))
        return problem, self.initial_params(seed)

    def initial_params(self, seed: int) -> dict[str, torch.Tensor]:
        """The parameters ``make_net()`` draws after ``torch.manual_seed(seed)`` (those of
        ``init_networks(make_net, [seed])``, unstacked), as detached tensors on the
        distiller's device and dtype; the global random state is left as it was.

        The networks of :mod:`bilevel.nets` draw their parameters in their layers'
        ``reset_parameters``, in module order, and nothing else: redrawing them in place
        on one network kept for the purpose gives the same numbers as building a new one,
        without the construction. Networks are built on the CPU, so seeding the CPU
        generator alone draws the same."""
        net = self._init_net
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if _redrawable(net):
                for m in net.modules():
                    if type(m) in _INIT_LAYERS:
                        m.reset_parameters()
            else:
                net = self.make_net()
        return {k: v.detach().to(device=self.device, dtype=self.config.torch_dtype, copy=True)
                for k, v in net.named_parameters()}

    # -- the outer loop --------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """The config that identifies this run in its folder (evaluation settings may
        change between stop and resume; ``outer_steps`` may grow)."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in _RESUMABLE}
        return {"distill": config, "outer_steps": self.config.outer_steps,
                "dataset": self.data.name}

    def _new_loop(self, run_dir: Any, run_mode: str = "auto", checkpoint_every: int = 0,
                  progress: bool | None = None) -> OuterLoop:
        cfg = self.config
        clamp = {"log_lr": lambda t: t.clamp(max=math.log(cfg.max_lr))} \
            if "log_lr" in self.hparams and cfg.max_lr is not None else None
        return OuterLoop(
            self.problem, self.hparams, estimator=self.estimator, optimizer=self.optimizer,
            clip_norm=cfg.clip_norm, constraint=clamp,
            evaluate=self._evaluate_metrics if cfg.eval_every else None,
            eval_every=cfg.eval_every, metrics=lambda h: {"inner_lr": float(self.lr(h))},
            run_dir=run_dir, run_mode=run_mode, kind="distill", config=self._identity(),
            outputs=self.OUTPUTS, checkpoint_every=checkpoint_every, keep_checkpoints=2,
            progress=progress, device=self.device, dtype=cfg.torch_dtype,
            progress_fields={"loss": "outer_loss", "lr": "inner_lr",
                             "acc": "eval_acc_mean"})

    def _evaluate_metrics(self, hparams: dict[str, torch.Tensor], params: Any) -> dict:
        ev = self.evaluate()
        return {"acc_mean": ev.mean, "acc_std": ev.std}

    def attach(self, run_dir: str | Path, run_mode: str = "auto", checkpoint_every: int = 0,
               progress: bool | None = None) -> OuterLoop:
        """Run in the folder ``run_dir`` from now on (locked until :meth:`close`): a new
        loop on it continues from this distiller's current state. ``run_mode`` as in
        :class:`~bilevel.outer.OuterLoop` (``"auto"``: new, or this same run resumed by
        :meth:`resume`; ``"new"``; ``"resume"``; ``"overwrite"``)."""
        old = self.loop
        if self._holds(run_dir):
            old.checkpoint_every = checkpoint_every
            old.progress = progress
            return old
        self.loop = self._new_loop(run_dir, run_mode, checkpoint_every, progress)
        if old.global_step:
            self.loop.load_state_dict(old.state_dict())
        old.close()
        return self.loop

    def step(self) -> dict[str, Any]:
        """One outer step (hypergradient, clipped Adam step, lr projection, evaluation
        when due); returns the step's record."""
        return self.loop.step()

    def run(self, steps: int | None = None, progress: bool | None = None,
            callback: Callable[[dict[str, Any]], Any] | None = None,
            run_dir: str | Path | None = None, checkpoint_every: int = 0,
            run_mode: str = "auto") -> DistilledSet:
        """Run until ``steps`` (default ``config.outer_steps``) outer steps in total.

        ``progress`` shows a bar with the outer loss, the learned lr and the last
        evaluation (``None``: only on a terminal); ``callback(record)`` is called after
        every step. With ``run_dir`` the run lives in that folder (see :meth:`attach`): a
        checkpoint every ``checkpoint_every`` steps and at the end, metrics as it goes.
        """
        if run_dir is not None and not self._holds(run_dir):
            self.attach(run_dir, run_mode, checkpoint_every, progress)
        elif run_dir is not None:
            self.loop.checkpoint_every = checkpoint_every or self.loop.checkpoint_every
            self.loop.progress = progress if progress is not None else self.loop.progress
        else:
            self.loop.progress = progress if progress is not None else self.loop.progress
        total = self.config.outer_steps if steps is None else steps
        hook = _RecordCallback(callback) if callback is not None else None
        if hook is not None:
            self.loop.callbacks.append(hook)
        try:
            self.loop.run(total)
        finally:
            if hook is not None:
                self.loop.callbacks.remove(hook)
        return self.distilled

    def resume(self, run_dir: str | Path, path: str | Path | None = None) -> int:
        """Continue the run in ``run_dir`` (which must hold it) from its newest good
        checkpoint, or from the checkpoint file ``path``; returns the step reached (0 when
        there is no checkpoint yet). The continued run is bit-identical to an
        uninterrupted one on the same machine."""
        loop = self.loop if self._holds(run_dir) else self.attach(run_dir, "resume")
        return loop.resume(path)

    def _holds(self, run_dir: str | Path) -> bool:
        """Whether this distiller runs in the folder ``run_dir`` now."""
        folder = self.loop.folder
        return folder is not None and Path(folder.path).resolve() == Path(run_dir).resolve()

    def close(self) -> None:
        """Release the run folder (its lock); the distiller can go on without one."""
        self.loop.close()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Outer steps taken."""
        return self.loop.global_step

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per outer step (see :class:`~bilevel.outer.OuterLoop`)."""
        return self.loop.history

    @property
    def seconds(self) -> float:
        """Wall time of the outer steps taken (evaluations included)."""
        return float(sum(r.get("step_seconds", 0.0) for r in self.loop.history))

    @property
    def estimator_state(self) -> hg.EstimatorState:
        return self.loop.state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run (see :meth:`OuterLoop.state_dict`)."""
        return self.loop.state_dict()

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.loop.load_state_dict(payload)

    @property
    def folder(self) -> Any:
        """The :class:`~bilevel.run_folder.RunFolder` the run lives in, or ``None``."""
        return self.loop.folder

    @property
    def lr_at_cap(self) -> bool:
        """Whether the learned inner learning rate sits at its cap ``config.max_lr``
        (within 0.1 %): the outer loop pushes it up, the projection holds it there."""
        cfg = self.config
        return bool(cfg.learn_lr and cfg.max_lr is not None
                    and float(self.lr()) >= cfg.max_lr * (1 - 1e-3))

    @property
    def distilled(self) -> DistilledSet:
        """The current synthetic set (detached copies), with its initial images and the
        dataset's class names."""
        with torch.no_grad():
            return DistilledSet(
                images=self.hparams["images"].detach().clone(),
                labels=self.targets(self.hparams).detach().clone(), lr=float(self.lr()),
                mean=self.mean.clone(), std=self.std.clone(), num_classes=self.num_classes,
                config=self.config.to_dict(),
                meta={"dataset": self.data.name, "outer_steps": self.step_count,
                      "seconds": self.seconds, "image_shape": list(self.data.image_shape)},
                initial=self.initial_images.clone(),
                class_names=tuple(getattr(self.data, "class_names", ()) or ()))

    def evaluate(self, n_nets: int | None = None, seed: int = 0) -> EvalResult:
        """Test accuracy of ``n_nets`` fresh networks trained on the current set by the
        inner recipe (seeds disjoint from those used while distilling; the same networks
        as :func:`~bilevel.distill.protocol` with the same ``seed``)."""
        d = self.distilled
        return evaluate(self.make_net, d.images, d.labels, self.test_x, self.test_y,
                        self.config.eval_recipe(d.lr), n_nets or self.config.eval_nets,
                        seed=10_000 + seed)


def _soft_labels(logits: torch.Tensor) -> torch.Tensor:
    """Soft-label probabilities of label logits ``(N, K)``: their row softmax."""
    return F.softmax(logits, dim=-1)


#: layers whose construction draws exactly what their ``reset_parameters`` draws
_INIT_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)
#: layers without parameters
_PLAIN_LAYERS = (nn.Sequential, nn.Flatten, nn.ReLU, nn.AvgPool2d)


def _redrawable(net: nn.Module) -> bool:
    """Whether ``net`` is a network of :mod:`bilevel.nets` built from the layers above
    alone, in the default dtype, so that resetting its layers in module order redraws
    what building it anew draws."""
    return type(net) in (MLP, ConvNet) and all(
        type(m) in _INIT_LAYERS or type(m) in _PLAIN_LAYERS
        for m in list(net.modules())[1:]) and all(
        p.dtype == torch.get_default_dtype() for p in net.parameters())


class _ParameterSwap:
    """``net`` evaluated at other parameters: ``swap(params, x)`` is
    ``torch.func.functional_call(net, params, (x,))`` for a network without buffers, tied or
    parametrized weights (those of :mod:`bilevel.nets`), by putting the tensors of ``params``
    (a dict with one tensor per parameter name) in the modules' parameter slots for the call
    and the originals back afterwards, without functional_call's checks at every call."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.slots = [(m, n, f"{prefix}.{n}" if prefix else n)
                      for prefix, m in net.named_modules() for n in m._parameters]
        if len({k for *_, k in self.slots}) != len(dict(net.named_parameters())):
            raise ValueError("_ParameterSwap: tied parameters are not supported")

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if type(self.net) is MLP:
            return self.net.functional(params, x)
        old = [m._parameters[n] for m, n, _ in self.slots]
        try:
            for m, n, k in self.slots:
                m._parameters[n] = params[k]
            return self.net(x)
        finally:
            for (m, n, _), o in zip(self.slots, old, strict=True):
                m._parameters[n] = o


class _RecordCallback(Callback):
    """``run(callback=f)``: ``f(record)`` after every step."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.fn = fn

    def on_step(self, loop: OuterLoop, record: dict[str, Any]) -> None:
        self.fn(record)


#: settings that may differ between a checkpoint and the run resuming it
_RESUMABLE = ("outer_steps", "eval_every", "eval_nets")


__all__ = ["DISTILL_ESTIMATORS", "DistillConfig", "DistilledSet", "Distiller", "make_estimator"]

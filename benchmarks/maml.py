"""Benchmark of MAML meta-gradients (:mod:`bilevel.meta`): time against peer libraries, and
peak memory against the number of inner steps.

Usage::

    python benchmarks/maml.py --json benchmarks/results/maml_cpu.json [--quick]
        [--only speed,memory] [--threads 1] [--device cpu|cuda] [--tasks 32[,128]]
        [--rounds 15] [--malloc both|default|keep] [--standalone-rounds 3]
        [--memory-repeats 3] [--check-float64] [--l2l-src DIR]

The setting is the standard one: digits-D4 (:func:`bilevel.meta.digits_d4`, meta-train
classes of ``class_splits(80)``), 5-way 5-shot with 15 queries per class, 32 tasks (seed 0),
an MLP 64-256-256-5 (ReLU), cross-entropy, 5 inner SGD steps at rate 0.5; the meta-loss is
the mean over tasks of the query loss after adaptation, and the meta-gradient is taken with
respect to the initial parameters (second-order MAML).

Parts (``--only`` selects some; the JSON file is updated part by part, so parts can be
run one at a time into the same file):

``speed``
    One meta-gradient by each implementation, every one returning the gradients in
    ``model.parameters()`` order:

    * ``torchopt`` -- the canonical ``torchopt.MetaSGD`` loop over tasks
      (``extract_state_dict`` / ``recover_state_dict``, ``(loss / B).backward()`` per
      task); the unit of every ratio.
    * ``higher`` -- ``higher.innerloop_ctx(net, SGD, copy_initial_weights=False)`` per task.
    * ``torchfunc_vmap`` -- hand-written: ``vmap`` over tasks of an inner loop of
      ``torch.func.grad`` + ``functional_call``, ``torch.autograd.grad`` of the mean. The
      reference for the agreement check.
    * ``autograd_loop`` -- hand-written plain autograd per task (``F.linear`` layers,
      ``autograd.grad(create_graph=True)``): the least Python a loop over tasks can have.
    * ``learn2learn`` -- ``l2l.algorithms.MAML(net, lr).clone()`` + ``adapt`` per task, when
      importable; otherwise its algorithm modules loaded from an unpacked sdist given by
      ``--l2l-src`` (its package ``__init__`` needs compiled Cython data modules, gym and
      torchvision; ``pip download learn2learn==0.2.0 --no-deps --no-binary :all:`` and
      untar it); otherwise recorded as unavailable with the reason.
    * ``ours`` -- ``MetaLearner(model, "maml", inner_lr=0.5, inner_steps=5).meta_gradient(
      tasks)`` with the default batching, ``ours[loop]`` / ``ours[vmap]`` with
      ``batching="loop"`` / ``"vmap"``, and ``ours[vmap,chunk8]`` with ``task_chunk=8``
      (vmap over 8 tasks at a time: 4× smaller working set); the learner is built once,
      outside the timing.

    Agreement: every implementation's meta-gradient against ``torchfunc_vmap`` (max abs
    difference, and that over the reference's max abs entry), in float32 and, with
    ``--check-float64``, in float64. Timing: ``torch.set_num_threads(--threads)``, a
    warm-up, then ``--rounds`` rounds, each timing every implementation once in an order
    shuffled per round (CUDA: synchronised before and after). Reported: median ms, IQR,
    the ratio of medians to torchopt and the median over rounds of the per-round ratio to
    torchopt (paired; robust to load drifting between rounds). Where the time goes:
    ``torch.profiler`` over three meta-gradients of ``ours`` and of ``torchopt``, the top 8
    ops by self CPU time per meta-gradient, the share of BLAS kernels (mm, addmm, bmm, ...)
    and the wall time not spent inside any op (Python, dispatch, autograd bookkeeping).
    Minor page faults per meta-gradient are recorded beside the times.

    The allocator matters on a CPU: glibc returns large freed blocks to the OS and faults
    them in again on the next allocation, and its thresholds adapt to what the process
    freed before, so one process running every implementation puts them all in a state
    none of them would be in alone. Hence three views: in one process with glibc's
    defaults (``malloc: default``), in one process after ``mallopt`` keeps freed memory
    mapped (``malloc: keep``; no faults for anyone), and ``standalone``: each
    implementation alone in a fresh process with glibc's defaults, the processes run
    round-robin for ``--standalone-rounds`` rounds (ratios paired by round) -- what a
    training script running only that implementation sees.

    With ``--device cuda`` the part runs once per ``--tasks`` count (e.g. ``32,128``) and
    records ``torch.cuda.get_device_name()``.
``memory``
    Peak memory of one meta-gradient against the number of inner steps T = 5, 10, 20, 50,
    100 (digits 5-way 5-shot, 32 tasks, inner rate 0.05 so that 100 steps stay stable):
    ``ours`` for ``"maml"`` (estimator ``"unrolled"``), ``"maml"`` with
    ``estimator="recompute"``, ``"imaml"`` (its default solver settings), and the
    hand-written ``torchfunc_vmap`` for reference. Each measurement runs in a fresh
    subprocess (``PYTHONHASHSEED=0``) that loads the data, builds the learner, warms up on
    one task with one inner step, returns freed heap to the OS (``malloc_trim``), resets
    the peak resident size (``/proc/self/clear_refs``) and reports the increase of
    ``VmHWM`` over ``VmRSS`` during one meta-gradient (cross-checked by ``RssAnon`` sampled
    every 2 ms; on CUDA: ``torch.cuda.max_memory_allocated`` over the allocation before
    the call). The resident figure of one process varies by up to about ±25 % between
    identical runs (allocator retention), so each cell is the median of
    ``--memory-repeats`` processes run round-robin. The same process then repeats the
    meta-gradient under ``torch.profiler(profile_memory=True)`` and reports the peak of
    the bytes held by tensors allocated during the call (``tensor_peak_mib``):
    deterministic, and without the Python objects and the allocator's retained pages.
    Writes a table and docs/img/maml_memory.png (both measures against T).

The JSON holds ``meta`` (torch, torchopt, higher and learn2learn versions, CPU model,
threads, date) beside each part; every part records its command and settings.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # bench_util
from bench_util import hardware  # noqa: E402

from bilevel.meta import EpisodeSampler, class_splits, digits_d4  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 5, 15
INNER_LR, INNER_STEPS = 0.5, 5
MEMORY_LR = 0.05
MEMORY_STEPS = (5, 10, 20, 50, 100)
TARGET_RATIO = 0.6
#: relative agreement (max abs difference over the reference's max abs entry) per dtype
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
BLAS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv",
        "aten::dot", "aten::_efficientzerotensor")
MEMORY_VARIANTS = {  # name -> (algorithm, MetaLearner keyword arguments); None: hand-written
    "maml_unrolled": ("maml", {"estimator": "unrolled"}),
    "maml_recompute": ("maml", {"estimator": "recompute"}),
    "imaml": ("imaml", {}),
    "torchfunc_vmap": None,
}

Grads = list[Tensor]


# -- helpers ------------------------------------------------------------------------------

def proc_mib(key: str) -> float:
    """``VmHWM`` (peak resident) or ``VmRSS`` of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Return freed heap to the OS and reset ``VmHWM`` to ``VmRSS``; False where impossible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, WAYS))


def make_tasks(num_tasks: int, device: str, dtype: torch.dtype):
    x, y = digits_d4()
    x = x.flatten(1)
    train, _, _ = class_splits(80)
    tasks = EpisodeSampler(x, y, ways=WAYS, shots=SHOTS, queries=QUERIES, classes=train,
                           seed=0).sample(num_tasks)
    return tasks.to(device=device, dtype=dtype)


# -- the implementations ------------------------------------------------------------------
# Each factory does its set-up (outside the timing) and returns a function that computes
# one meta-gradient from scratch and returns it as a list in model.parameters() order.

def impl_torchopt(net: nn.Module, tasks, lr: float, steps: int) -> Callable[[], Grads]:
    import torchopt

    inner_opt = torchopt.MetaSGD(net, lr=lr)
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    num = tasks.num_tasks

    def run() -> Grads:
        net.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(net)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for i in range(num):
            for _ in range(steps):
                inner_opt.step(F.cross_entropy(net(sx[i]), sy[i]))
            (F.cross_entropy(net(qx[i]), qy[i]) / num).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return [p.grad for p in net.parameters()]

    return run


def impl_higher(net: nn.Module, tasks, lr: float, steps: int) -> Callable[[], Grads]:
    import higher

    inner_opt = torch.optim.SGD(net.parameters(), lr=lr)
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    num = tasks.num_tasks

    def run() -> Grads:
        net.zero_grad(set_to_none=True)
        for i in range(num):
            ctx = higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False)
            with ctx as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fnet(sx[i]), sy[i]))
                (F.cross_entropy(fnet(qx[i]), qy[i]) / num).backward()
        return [p.grad for p in net.parameters()]

    return run


def torchfunc_meta_loss(net: nn.Module, tasks, lr: float, steps: int) -> tuple[Tensor, list]:
    """The mean query loss after adaptation, by vmap over tasks (for the reference)."""
    params = dict(net.named_parameters())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    def task_loss(p, sx, sy, qx, qy):
        for _ in range(steps):
            g = grad(loss)(p, sx, sy)
            p = {k: p[k] - lr * g[k] for k in p}
        return loss(p, qx, qy)

    losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(
        params, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
    return losses.mean(), list(params.values())


def impl_torchfunc(net: nn.Module, tasks, lr: float, steps: int) -> Callable[[], Grads]:
    def run() -> Grads:
        meta_loss, params = torchfunc_meta_loss(net, tasks, lr, steps)
        return list(torch.autograd.grad(meta_loss, params))

    return run


def impl_autograd_loop(net: nn.Module, tasks, lr: float, steps: int) -> Callable[[], Grads]:
    params = list(net.parameters())
    n_lin = len(params) // 2
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    num = tasks.num_tasks

    def forward(p: list[Tensor], x: Tensor) -> Tensor:
        for k in range(n_lin):
            x = F.linear(x, p[2 * k], p[2 * k + 1])
            if k < n_lin - 1:
                x = torch.relu(x)
        return x

    def run() -> Grads:
        total: list[Tensor] | None = None
        for i in range(num):
            p = params
            for _ in range(steps):
                g = torch.autograd.grad(F.cross_entropy(forward(p, sx[i]), sy[i]), p,
                                        create_graph=True)
                p = [w - lr * gw for w, gw in zip(p, g, strict=True)]
            gi = torch.autograd.grad(F.cross_entropy(forward(p, qx[i]), qy[i]) / num, params)
            total = list(gi) if total is None else [a + b for a, b in zip(total, gi, strict=True)]
        assert total is not None
        return total

    return run


L2L_INFO: dict[str, Any] = {}


def load_l2l(src: str | None) -> Any:
    """The ``learn2learn.algorithms.MAML`` class, or None (the reason goes to ``L2L_INFO``)."""
    if L2L_INFO:
        return L2L_INFO.get("_cls")
    try:
        import learn2learn as l2l

        L2L_INFO.update(available=True, how="import learn2learn", version=l2l.__version__,
                        _cls=l2l.algorithms.MAML)
        return l2l.algorithms.MAML
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        why = (f"import learn2learn failed ({type(e).__name__}: {e}). learn2learn 0.2.0 is "
               f"an sdist only (no wheel), and on Python >= 3.11 it does not build: its "
               f"pre-generated Cython C includes longintrepr.h, which 3.11 removed; its "
               f"package __init__ also needs gym and torchvision (this Python: "
               f"{platform.python_version()})")
    root = Path(src) / "learn2learn" if src else None
    if root is None or not (root / "algorithms" / "maml.py").exists():
        L2L_INFO.update(available=False, why=why + (
            "; pass --l2l-src DIR (an unpacked learn2learn sdist) to load its pure-Python "
            "MAML" if src is None else f"; --l2l-src {src} holds no learn2learn/algorithms"))
        return None
    # load the unmodified pure-Python modules (algorithms.maml, algorithms.base_learner,
    # utils) under stub packages, without running learn2learn/__init__.py
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", root / "algorithms")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    maml = importlib.import_module("learn2learn.algorithms.maml")
    ver = (root / "_version.py").read_text().split("'")[1] if (root / "_version.py").exists() \
        else None
    L2L_INFO.update(available=True, version=ver, why_not_installed=why,
                    how=f"learn2learn/algorithms/maml.py, base_learner.py and utils/ of the "
                        f"sdist in {src}, imported under stub packages (package __init__ "
                        f"not run); the MAML code itself is unmodified", _cls=maml.MAML)
    return maml.MAML


def impl_learn2learn(net: nn.Module, tasks, lr: float, steps: int,
                     src: str | None = None) -> Callable[[], Grads]:
    maml_cls = load_l2l(src)
    if maml_cls is None:
        raise ImportError(L2L_INFO["why"])
    maml = maml_cls(net, lr=lr)
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    num = tasks.num_tasks

    def run() -> Grads:
        net.zero_grad(set_to_none=True)
        for i in range(num):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(sx[i]), sy[i]))
            (F.cross_entropy(learner(qx[i]), qy[i]) / num).backward()
        return [p.grad for p in net.parameters()]

    return run


def ours_available() -> tuple[bool, str]:
    try:
        from bilevel.meta import MetaLearner  # noqa: F401
    except ImportError as e:
        exists = (ROOT / "bilevel" / "meta" / "learner.py").exists()
        return False, (f"from bilevel.meta import MetaLearner failed ({e}); "
                       f"bilevel/meta/learner.py {'exists' if exists else 'does not exist'}")
    return True, ""


def make_learner(net: nn.Module, algorithm: str, lr: float, steps: int, **kw: Any):
    from bilevel.meta import MetaLearner

    return MetaLearner(net, algorithm, inner_lr=lr, inner_steps=steps, **kw)


def impl_ours(net: nn.Module, tasks, lr: float, steps: int,
              **kw: Any) -> Callable[[], Grads]:
    ok, why = ours_available()
    if not ok:
        raise ImportError(why)
    learner = make_learner(net, "maml", lr, steps, **kw)
    names = [n for n, _ in net.named_parameters()]
    last: dict[str, Any] = {}

    def run() -> Grads:
        result = learner.meta_gradient(tasks)
        last["outer_loss"] = result.diagnostics.outer_loss
        return [result.grad[n] for n in names]

    run.last = last  # type: ignore[attr-defined]
    return run


def implementations(args: argparse.Namespace) -> dict[str, Callable[..., Callable[[], Grads]]]:
    impls: dict[str, Callable[..., Callable[[], Grads]]] = {
        "torchopt": impl_torchopt,
        "higher": impl_higher,
        "torchfunc_vmap": impl_torchfunc,
        "autograd_loop": impl_autograd_loop,
        "learn2learn": lambda n, t, lr, s: impl_learn2learn(n, t, lr, s, args.l2l_src),
        "ours": impl_ours,
        "ours[loop]": lambda n, t, lr, s: impl_ours(n, t, lr, s, batching="loop"),
        "ours[vmap]": lambda n, t, lr, s: impl_ours(n, t, lr, s, batching="vmap"),
        "ours[vmap,chunk8]": lambda n, t, lr, s: impl_ours(n, t, lr, s, batching="vmap",
                                                           task_chunk=8),
    }
    return impls


def build_all(args: argparse.Namespace, num_tasks: int, dtype: torch.dtype
              ) -> tuple[Any, nn.Module, dict[str, Callable[[], Grads]], dict[str, str]]:
    """Tasks, the initial net, every available implementation (each on its own copy of the
    net) and the reasons of those that are not."""
    tasks = make_tasks(num_tasks, args.device, dtype)
    net0 = make_net().to(device=args.device, dtype=dtype)
    fns, missing = {}, {}
    for name, factory in implementations(args).items():
        try:
            fns[name] = factory(copy.deepcopy(net0), tasks, INNER_LR, INNER_STEPS)
        except Exception as e:  # noqa: BLE001 - recorded, the others go on
            missing[name] = f"{type(e).__name__}: {e}"
    return tasks, net0, fns, missing


# -- part a: speed ------------------------------------------------------------------------

def agreement(args: argparse.Namespace, num_tasks: int, dtype: torch.dtype) -> dict[str, Any]:
    """Every implementation's meta-gradient against the torch.func reference."""
    tasks, net0, fns, missing = build_all(args, num_tasks, dtype)
    ref_net = copy.deepcopy(net0)
    ref_loss, ref_params = torchfunc_meta_loss(ref_net, tasks, INNER_LR, INNER_STEPS)
    ref = [g.detach() for g in torch.autograd.grad(ref_loss, ref_params)]
    scale = max(float(g.abs().max()) for g in ref)
    rows: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            got = fn()
            diff = max(float((a.detach() - b).abs().max()) for a, b in zip(got, ref, strict=True))
            shapes_ok = [tuple(a.shape) for a in got] == [tuple(b.shape) for b in ref]
            row = {"max_abs_diff": diff, "rel_diff": diff / scale, "shapes_ok": shapes_ok,
                   "ok": shapes_ok and diff / scale <= TOL[dtype]}
            if hasattr(fn, "last") and "outer_loss" in fn.last:
                ol = float(fn.last["outer_loss"])
                row["outer_loss"] = ol
                row["outer_loss_abs_diff"] = abs(ol - float(ref_loss.detach()))
        except Exception as e:  # noqa: BLE001
            row = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        rows[name] = row
    return {"dtype": str(dtype).replace("torch.", ""), "reference": "torchfunc_vmap",
            "reference_max_abs": scale, "reference_meta_loss": float(ref_loss.detach()),
            "tolerance_rel": TOL[dtype], "rows": rows, "unavailable": missing}


def time_all(args: argparse.Namespace, fns: dict[str, Callable[[], Grads]], rounds: int,
             warmup: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds and minor page faults per meta-gradient, ``rounds`` per implementation, order
    shuffled per round."""
    dev = args.device
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(dev)
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            gc.collect()
            sync(dev)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            out = fns[name]()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del out
    return times, faults


def profile_one(args: argparse.Namespace, fn: Callable[[], Grads], wall_ms: float,
                repeats: int = 3, top: int = 8) -> dict[str, Any]:
    """The top ``top`` ops by self CPU time per meta-gradient (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        acts.append(ProfilerActivity.CUDA)
    fn()
    sync(args.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(args.device)
        prof_wall = (time.perf_counter() - t0) / repeats
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) / 1000 / repeats
    blas = sum(e.self_cpu_time_total for e in events if e.key in BLAS) / 1000 / repeats
    out_top = []
    for e in rows[:top]:
        row = {"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000 / repeats,
               "calls": e.count / repeats}
        dev_t = getattr(e, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(e, "self_cuda_time_total", None)
        if args.device.startswith("cuda") and dev_t is not None:
            row["self_device_ms"] = dev_t / 1000 / repeats
        out_top.append(row)
    n_ops = sum(e.count for e in events if e.key.startswith("aten::")) / repeats
    return {"top_ops_by_self_cpu": out_top, "op_self_cpu_ms_total": total_self,
            "blas_self_cpu_ms": blas, "aten_op_calls": n_ops,
            "wall_ms_unprofiled_median": wall_ms, "wall_ms_profiled": 1000 * prof_wall,
            "outside_ops_ms": 1000 * prof_wall - total_self,
            "note": "per meta-gradient (mean of 3 profiled calls); outside_ops_ms is the "
                    "profiled wall time not inside any op: Python, autograd engine "
                    "bookkeeping and profiler overhead; BLAS = mm/addmm/bmm/baddbmm/mv kernels"}


def set_malloc(policy: str) -> bool:
    """``"keep"``: glibc keeps freed memory (mmap threshold 1 GiB, no trimming), so large
    tensors reuse pages that are already mapped instead of faulting fresh ones in;
    ``"default"``: glibc's defaults (dynamic mmap threshold, 128 KiB trim threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if policy != "keep":
        return True
    m_trim, m_mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    return bool(libc.mallopt(m_mmap, 1 << 30)) and bool(libc.mallopt(m_trim, 2**31 - 1))


def speed_run(args: argparse.Namespace, num_tasks: int, malloc: str,
              agree: bool = True) -> dict[str, Any]:
    rounds = 3 if args.quick else args.rounds
    warmup = 1 if args.quick else 2
    out: dict[str, Any] = {"tasks": num_tasks, "malloc": malloc, "rounds": rounds,
                           "warmup": warmup}
    if malloc != "default":
        out["malloc_set"] = set_malloc(malloc)
    if agree:
        out["agreement_float32"] = agreement(args, num_tasks, torch.float32)
        if args.check_float64:
            out["agreement_float64"] = agreement(args, num_tasks, torch.float64)
    tasks, _, fns, missing = build_all(args, num_tasks, torch.float32)
    times, faults = time_all(args, fns, rounds, warmup)
    base = times.get("torchopt")
    base_med = statistics.median(base) if base else None
    rows = {}
    for name, ts in times.items():
        q1, med, q3 = quartiles([1000 * t for t in ts])
        row: dict[str, Any] = {"median_ms": med, "iqr_ms": q3 - q1, "q1_ms": q1, "q3_ms": q3,
                               "min_ms": 1000 * min(ts), "times_ms": [1000 * t for t in ts],
                               "minor_page_faults_median": statistics.median(faults[name])}
        if base:
            row["ratio_to_torchopt"] = med / (1000 * base_med)
            row["paired_ratio_median"] = statistics.median(
                a / b for a, b in zip(ts, base, strict=True))
        rows[name] = row
    out["rows"] = rows
    out["unavailable"] = missing
    if "learn2learn" in missing or not L2L_INFO.get("available", True):
        out["learn2learn"] = {"available": False, "why": L2L_INFO.get(
            "why", missing.get("learn2learn"))}
    else:
        out["learn2learn"] = {k: v for k, v in L2L_INFO.items() if not k.startswith("_")}
    ours = rows.get("ours")
    if ours and base:
        out["target"] = {"ratio": TARGET_RATIO, "ours_ratio": ours["ratio_to_torchopt"],
                         "ours_paired_ratio": ours["paired_ratio_median"],
                         "met": ours["paired_ratio_median"] <= TARGET_RATIO}
    prof = {}
    for name in ("ours", "torchopt", "torchfunc_vmap"):
        if name in fns:
            prof[name] = profile_one(args, fns[name], rows[name]["median_ms"])
    out["profile"] = prof
    if prof and base:
        split = {name: {"blas_ms": q["blas_self_cpu_ms"],
                        "other_ops_ms": q["op_self_cpu_ms_total"] - q["blas_self_cpu_ms"],
                        "outside_ops_ms": q["outside_ops_ms"], "aten_calls": q["aten_op_calls"]}
                 for name, q in prof.items()}
        floor = {name: q["blas_self_cpu_ms"] / (1000 * base_med) for name, q in prof.items()}
        out["where_the_time_goes"] = {
            "split_ms": split, "blas_floor_ratio_to_torchopt": floor,
            "note": "per meta-gradient under the profiler; blas_floor_ratio is the BLAS "
                    "kernel time alone over torchopt's unprofiled median: no implementation "
                    "that keeps these matrix products can have a smaller ratio"}
    print(f"  tasks {num_tasks}, malloc {malloc}, {rounds} rounds, {args.device}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    for name, row in rows.items():
        agr = out.get("agreement_float32", {"rows": {}})["rows"].get(name, {})
        ratio = (f"×{row['ratio_to_torchopt']:.2f} (paired ×{row['paired_ratio_median']:.2f})"
                 if base else "")
        print(f"  {name:<18} {row['median_ms']:8.1f} ms  IQR {row['iqr_ms']:6.1f}  {ratio}"
              f"  {row['minor_page_faults_median']:7.0f} faults"
              f"  rel diff {agr.get('rel_diff', float('nan')):.1e}", flush=True)
    for name, why in missing.items():
        print(f"  {name:<16} unavailable: {why[:160]}", flush=True)
    for name, p in prof.items():
        tops = ", ".join(f"{r['name']} {r['self_cpu_ms']:.1f}"
                         for r in p["top_ops_by_self_cpu"][:4])
        print(f"  profile {name}: ops {p['op_self_cpu_ms_total']:.1f} ms (BLAS "
              f"{p['blas_self_cpu_ms']:.1f}), outside ops {p['outside_ops_ms']:.1f} ms, "
              f"{p['aten_op_calls']:.0f} aten calls; {tops}", flush=True)
    return out


def part_speed(args: argparse.Namespace) -> dict[str, Any]:
    policies = ["default", "keep"] if args.malloc == "both" else [args.malloc]
    if args.device.startswith("cuda"):
        policies = policies[:1]  # host allocations do not matter there
    res: dict[str, Any] = {
        "setting": {"dataset": "digits_d4 (meta-train classes of class_splits(80))",
                    "ways": WAYS, "shots": SHOTS, "queries": QUERIES,
                    "net": "MLP 64-256-256-5 ReLU", "loss": "cross-entropy",
                    "inner_lr": INNER_LR, "inner_steps": INNER_STEPS,
                    "meta_loss": "mean over tasks of the query loss after adaptation",
                    "seed": 0},
        "malloc_policies": {"default": "glibc defaults", "keep": set_malloc.__doc__},
        # every default-policy run first: glibc's dynamic threshold cannot be restored
        "runs": [speed_run(args, n, m, agree=(m == policies[0]))
                 for m in policies for n in args.task_counts]}
    names = [n for n in res["runs"][0]["rows"]]
    if (args.standalone_rounds > 0 or args.quick) and names:
        res["standalone"] = [standalone(args, n, names) for n in args.task_counts]
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    return res


def speed_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: one implementation alone, ``calls`` timed meta-gradients."""
    args = argparse.Namespace(device=spec["device"], l2l_src=spec.get("l2l_src"))
    tasks = make_tasks(spec["tasks"], args.device, torch.float32)
    fn = implementations(args)[spec["impl"]](make_net().to(args.device), tasks, INNER_LR,
                                             INNER_STEPS)
    for _ in range(spec["warmup"]):
        fn()
    times, faults = [], []
    for _ in range(spec["calls"]):
        sync(args.device)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out = fn()
        sync(args.device)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        del out
    return {"median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
            "minor_page_faults_median": statistics.median(faults)}


def standalone(args: argparse.Namespace, num_tasks: int, names: list[str]) -> dict[str, Any]:
    """Every implementation alone in its own fresh process (glibc's default malloc, whose
    thresholds then adapt to that implementation only), the processes run round-robin in
    an order shuffled per round; ratios paired by round."""
    rounds = 1 if args.quick else args.standalone_rounds
    calls = 3 if args.quick else 10
    per: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    rng = random.Random(1)
    order = list(names)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            spec = {"kind": "speed", "impl": name, "tasks": num_tasks, "device": args.device,
                    "calls": calls, "warmup": 2, "l2l_src": args.l2l_src}
            per[name].append(spawn(args, spec))
    rows: dict[str, Any] = {}
    base = [r.get("median_ms") for r in per.get("torchopt", [])]
    for name, rs in per.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            rows[name] = {"error": rs[-1].get("error")}
            continue
        meds = [r["median_ms"] for r in good]
        row = {"median_ms": statistics.median(meds), "process_medians_ms": meds,
               "minor_page_faults_median": statistics.median(
                   r["minor_page_faults_median"] for r in good)}
        if base and len(good) == len(rs) and None not in base:
            row["paired_ratio_median"] = statistics.median(
                a / b for a, b in zip(meds, base, strict=True))
        rows[name] = row
    print(f"  standalone (one fresh process per implementation, {rounds} rounds x {calls} "
          f"calls, glibc default malloc), tasks {num_tasks}:", flush=True)
    for name, row in rows.items():
        if "error" in row:
            print(f"  {name:<18} error: {row['error']}", flush=True)
            continue
        print(f"  {name:<18} {row['median_ms']:8.1f} ms  paired ×"
              f"{row.get('paired_ratio_median', float('nan')):.2f}  "
              f"{row['minor_page_faults_median']:7.0f} faults", flush=True)
    return {"tasks": num_tasks, "rounds": rounds, "calls": calls, "rows": rows,
            "note": "each implementation alone in a fresh process, glibc malloc defaults: "
                    "what a training script that runs only that implementation sees"}


# -- part b: memory -----------------------------------------------------------------------

class AnonSampler:
    """Samples ``RssAnon`` (and the smallest ``RssFile``) every ``period`` seconds in a
    thread while the ``with`` block runs (torch kernels release the GIL)."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self.min_file, self.count = period, 0.0, float("inf"), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, proc_mib("RssAnon"))
        self.min_file = min(self.min_file, proc_mib("RssFile"))
        self.count += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> AnonSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: the peak memory of one meta-gradient of one variant."""
    dev, steps = spec["device"], spec["steps"]
    tasks = make_tasks(spec["tasks"], dev, torch.float32)
    net = make_net().to(dev)
    variant = MEMORY_VARIANTS[spec["variant"]]
    if variant is None:
        def run(t):
            meta_loss, params = torchfunc_meta_loss(net, t, MEMORY_LR, steps)
            return torch.autograd.grad(meta_loss, params)

        def warm(t):
            meta_loss, params = torchfunc_meta_loss(net, t, MEMORY_LR, 1)
            return torch.autograd.grad(meta_loss, params)
    else:
        algorithm, kw = variant
        learner = make_learner(net, algorithm, MEMORY_LR, steps, **kw)
        small = make_learner(copy.deepcopy(net), algorithm, MEMORY_LR, 1, **kw)

        def run(t):
            return learner.meta_gradient(t)

        def warm(t):
            return small.meta_gradient(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm(tasks.select(0))  # lazy initialisations, one task, one inner step
    gc.collect()
    sync(dev)
    reset_ok = reset_peak()
    base_hwm, base_rss = proc_mib("VmHWM"), proc_mib("VmRSS")
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_anon, base_file = proc_mib("RssAnon"), proc_mib("RssFile")
    sampler = AnonSampler()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, sampler:
        warnings.simplefilter("always")
        result = run(tasks)
        sync(dev)
    seconds = time.perf_counter() - t0
    out = {"peak_mib": proc_mib("VmHWM") - base_rss,
           "peak_anon_sampled_mib": sampler.peak - base_anon, "samples": sampler.count,
           "baseline_rss_mib": base_rss, "baseline_slack_mib": base_hwm - base_rss,
           "baseline_file_mib": base_file, "min_file_mib": min(sampler.min_file, base_file),
           "hwm_reset": reset_ok, "seconds": seconds,
           "warnings": sorted({str(w.message)[:200] for w in caught})}
    if dev.startswith("cuda"):
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    if variant is not None:
        out["outer_loss"] = float(result.diagnostics.outer_loss)
    else:
        out["outer_loss"] = None
    del result
    gc.collect()
    if not dev.startswith("cuda"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["tensor_peak_mib"] = tensor_peak_mib(lambda: run(tasks))
    return out


def tensor_peak_mib(fn: Callable[[], Any]) -> float:
    """The peak of the bytes held by tensors allocated during ``fn()`` (the CPU allocator's
    allocation and free events recorded by ``torch.profiler(profile_memory=True)``):
    deterministic, and blind to the Python objects and the allocator's retained pages
    that the resident size also counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def variant_desc(name: str) -> dict[str, Any] | str:
    v = MEMORY_VARIANTS[name]
    if v is None:
        return "hand-written torch.func vmap over tasks, unrolled (autograd through the loop)"
    return {"algorithm": v[0], **v[1]}


def spawn(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same set orders in every child
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1][:500] if res.stderr.strip()
                else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    steps_list = (5, 10) if args.quick else MEMORY_STEPS
    ok, why = ours_available()
    variants = list(MEMORY_VARIANTS) if ok else ["torchfunc_vmap"]
    num_tasks = args.task_counts[0]
    repeats = 1 if args.quick else args.memory_repeats
    key = "cuda_peak_mib" if args.device.startswith("cuda") else "peak_mib"
    raw: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(repeats):  # repeats outermost: a transient disturbance hits one copy
        for steps in steps_list:
            for v in variants:
                spec = {"variant": v, "steps": steps, "tasks": num_tasks, "device": args.device}
                r = spawn(args, spec)
                raw.setdefault((v, steps), []).append(r)
                msg = r["error"] if "error" in r else (
                    f"{r[key]:8.1f} MiB (sampled RssAnon {r.get('peak_anon_sampled_mib', 0):.1f}"
                    f", tensors {r.get('tensor_peak_mib', 0):.1f})  {r['seconds']:6.2f} s")
                print(f"  [{rep + 1}/{repeats}] T={steps:<4} {v:<16} {msg}", flush=True)
    table: dict[str, dict[str, Any]] = {v: {} for v in variants}
    for (v, steps), rs in raw.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            table[v][str(steps)] = {"error": rs[-1]["error"]}
            continue
        cell: dict[str, Any] = {"repeats": len(good)}
        for k in (key, "peak_anon_sampled_mib", "tensor_peak_mib", "seconds"):
            vals = [r[k] for r in good if k in r]
            if vals:
                cell[k] = statistics.median(vals)
                cell[k + "_all"] = vals
        cell["spread"] = (max(cell[key + "_all"]) - min(cell[key + "_all"])) / cell[key]
        cell["runs"] = good
        table[v][str(steps)] = cell
    peaks = {v: [table[v][str(s)].get(key) for s in steps_list] for v in variants}
    tensor_peaks = {v: [table[v][str(s)].get("tensor_peak_mib") for s in steps_list]
                    for v in variants}
    checks: dict[str, Any] = {}
    if ok:
        checks = {key: shape_checks(peaks), "tensor_peak_mib": shape_checks(tensor_peaks)}
    if not args.quick:
        name = "maml_memory.png" if args.device == "cpu" else "maml_memory_cuda.png"
        plot_memory(steps_list, peaks, tensor_peaks, ROOT / "docs/img" / name, args, num_tasks)
    return {"setting": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "tasks": num_tasks,
                        "inner_lr": MEMORY_LR, "net": "MLP 64-256-256-5 ReLU",
                        "variants": {v: variant_desc(v) for v in variants}},
            "steps": list(steps_list), "peak_mib": peaks, "tensor_peak_mib": tensor_peaks,
            "table": table, "checks": checks,
            "ours_unavailable": None if ok else why,
            "memory_method": (
                "fresh subprocess per measurement; warm-up on one task with one inner step, "
                "malloc_trim, VmHWM reset via /proc/self/clear_refs, then the increase of "
                "VmHWM over VmRSS during one meta-gradient (cross-check: RssAnon sampled every "
                "2 ms by a thread); median of `repeats` subprocesses, run round-robin"
                if key == "peak_mib" else
                "torch.cuda.max_memory_allocated minus memory_allocated before the call; median "
                "of `repeats` subprocesses"), "repeats": repeats}


def shape_checks(peaks: dict[str, list]) -> dict[str, Any]:
    """iMAML flat (max/min within 10 %), MAML growing, recompute in between."""
    if any(x is None for xs in peaks.values() for x in xs) or "imaml" not in peaks:
        return {}
    im, un, rc = peaks["imaml"], peaks["maml_unrolled"], peaks["maml_recompute"]
    return {"imaml_spread": (max(im) - min(im)) / min(im),
            "imaml_flat_within_10pct": (max(im) - min(im)) / min(im) <= 0.10,
            "maml_unrolled_growth": un[-1] / un[0],
            "maml_recompute_growth": rc[-1] / rc[0],
            "recompute_between": [im[i] <= rc[i] <= un[i] for i in range(len(im))]}


def plot_memory(steps: tuple[int, ...], peaks: dict[str, list], tensor_peaks: dict[str, list],
                path: Path, args: argparse.Namespace, num_tasks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"maml_unrolled": "MAML (unrolled)", "maml_recompute": "MAML (recompute)",
              "imaml": "iMAML", "torchfunc_vmap": "hand-written torch.func (unrolled)"}
    styles = {"torchfunc_vmap": dict(ls="--", color="gray", marker="x")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    panels = ((peaks, "increase of peak resident size (VmHWM)"),
              (tensor_peaks, "peak of live tensor bytes (profiler)"))
    if args.device.startswith("cuda"):
        panels = panels[:1]
        axes[1].set_visible(False)
    for ax, (data, what) in zip(axes, panels, strict=False):
        for v, ys in data.items():
            pts = [(s, y) for s, y in zip(steps, ys, strict=True) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts],
                        **{"marker": "o", "ms": 4, **styles.get(v, {})}, label=labels[v])
        ax.set(xscale="log", yscale="log", xlabel="inner steps T", title=what)
        ax.set_xticks(list(steps), [str(s) for s in steps])
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("MiB, one meta-gradient")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MAML-family memory: digits 5-way 5-shot, {num_tasks} tasks, "
                 f"MLP 64-256-256-5, inner lr {MEMORY_LR} ({args.device}, median of "
                 f"{args.memory_repeats} processes)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------

PARTS = {"speed": part_speed, "memory": part_memory}


def meta(args: argparse.Namespace) -> dict[str, Any]:
    out = {"torch": torch.__version__, "torchopt": version("torchopt"),
           "higher": version("higher"), "learn2learn": version("learn2learn"),
           "python": platform.python_version(), "cpu": hardware(),
           "threads": torch.get_num_threads(), "device": args.device, "quick": args.quick,
           "malloc": getattr(args, "malloc", None),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    learner = ROOT / "bilevel" / "meta" / "learner.py"
    if learner.exists():
        out["learner_py_sha256_12"] = hashlib.sha256(learner.read_bytes()).hexdigest()[:12]
        out["learner_py_mtime"] = time.strftime("%Y-%m-%d %H:%M:%S",
                                                time.localtime(learner.stat().st_mtime))
    try:
        out["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                         capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    if L2L_INFO.get("available") and not out["learn2learn"]:
        out["learn2learn"] = f"{L2L_INFO.get('version')} (source, not installed)"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write (update) the results here")
    p.add_argument("--quick", action="store_true", help="smoke mode (about a minute)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", default="32", help="comma-separated task counts, e.g. 32,128")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--only", default="speed,memory",
                   help="comma-separated parts: " + ",".join(PARTS))
    p.add_argument("--malloc", choices=("default", "keep", "both"), default="both",
                   help="speed part: glibc's default malloc policy, one that keeps freed "
                   "memory mapped (mallopt), or both one after the other (CPU)")
    p.add_argument("--standalone-rounds", type=int,
                   help="speed part: rounds of one fresh process per implementation (0: none; "
                   "default 3 on CPU, 0 on CUDA)")
    p.add_argument("--memory-repeats", type=int, default=3,
                   help="subprocesses per memory cell (the median is reported)")
    p.add_argument("--check-float64", action="store_true",
                   help="also check the agreement of the meta-gradients in float64")
    p.add_argument("--l2l-src", help="an unpacked learn2learn sdist, used when learn2learn "
                   "is not importable")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.task_counts = [int(s) for s in args.tasks.split(",") if s.strip()]
    if args.standalone_rounds is None:
        args.standalone_rounds = 0 if args.device.startswith("cuda") else 3
    torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        child = speed_child if spec.get("kind") == "speed" else memory_child
        print(json.dumps(child(spec)))
        return 0
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    results: dict[str, Any] = {}
    if args.json and Path(args.json).exists():
        results = json.loads(Path(args.json).read_text())
    for part in parts:
        print(f"== {part}", flush=True)
        t0 = time.perf_counter()
        res = PARTS[part](args)
        res["part_seconds"] = time.perf_counter() - t0
        res["command"] = " ".join(["python", "benchmarks/maml.py", *sys.argv[1:]])
        res["meta"] = meta(args)
        results[part] = res
        results["meta"] = res["meta"]
        print(f"== {part}: {res['part_seconds']:.0f} s", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

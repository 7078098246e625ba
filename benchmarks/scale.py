"""Cost of an implicit hypergradient at scale, next to one training step of the same model,
with the Hessian on the full training batch and on a sub-batch of it.

Usage::

    python benchmarks/scale.py --json benchmarks/results/scale_cpu.json [--device cpu|cuda]
        [--params 10M|100M] [--quick] [--threads N] [--cg 1,2,5,10,20] [--cg-full 1,2,5]
        [--damping 10] [--residual-k 20] [--rounds 3] [--pretrain 40] [--no-memory]
        [--no-self-check]

The model is a pre-LayerNorm transformer language model written with ``torch.nn`` (the
attention with basic ops, so that double backward works on every device: the fused
attention kernels of CUDA have none) and called through ``torch.func.functional_call``,
on tokens of a seeded random sparse Markov chain (each token followed by one of 4; a cost
benchmark, the data only need to be learnable). ``10M``: 4 layers, d_model 384,
vocabulary 4096, batch 16 × 80 tokens, sub-batch 2 × 80 (10.3 M parameters); ``100M``:
12 layers, d_model 768, vocabulary 8192, batch 32 × 128 tokens, sub-batch 4 × 128 (98 M
parameters).

The hyperparameters are one log weight decay λ_i per parameter tensor (λ_i = log 5e-4):
inner loss f(w, λ) = CE(train batch) + Σ_i exp(λ_i)/2 ‖w_i‖², outer loss F(w) =
CE(validation batch, same size). w is "trained-ish": ``--pretrain`` Adam steps on f from
GPT-2's initialization (N(0, 0.02)), then taken as w* (``inner_steps=0``). The
hypergradient is ``hg.Implicit(ConjugateGradient(tol=0, maxiter=k, damping=d),
hvp="linearized", inner_steps=0, inner_tol=None, warm_start=False, self_check="off")``:
exactly k CG iterations on the cached pullback of ∇_w f. H = ∇²_ww f is indefinite at
such a point (CG without damping meets negative curvature and its residual grows), hence
``--damping`` (default 10: at 1, H + I is still indefinite there and CG's iterates
wander; at 10 both systems are positive definite); the cost does not depend on it.

Two configurations (``config``) differ only in the Problem's ``inner_batch``, the batch of
the optimality conditions ∇_w f = 0 (with ``inner_steps=0`` Implicit uses it for the
linearization and every HVP, and for nothing else): ``full``, the whole training batch
the step sees; ``sub``, its first ``hessian_batch`` sequences (1/8). The outer gradient is
on the whole validation batch in both. ``sub`` is stochastic implicit differentiation,
the Hessian on a minibatch: Lorraine, Vicol, Duvenaud, "Optimizing millions of
hyperparameters by implicit differentiation", AISTATS 2020; Grazzi, Pontil, Salzo,
"Convergence properties of stochastic hypergradients", AISTATS 2021.

Writes one JSON list of records (and prints them):

``meta``
    machine, torch, device, sizes (``params``, ``tokens``, ``hessian_tokens``),
    threads, total seconds.
``step``
    one training step (``torch.autograd``: forward, backward, SGD update of the
    module's parameters, on the inner loss and the whole training batch): ``seconds``,
    ``cpu_seconds`` (process CPU time), ``tokens``, ``peak_mib``.
``parts``
    the pieces of an implicit hypergradient, timed in the same rounds as the step:
    ``grad`` (one ∇_w f on the training batch by ``torch.func.grad``); per ``config``,
    ``linearize`` (∇_w f on the Hessian's batch with its graph kept:
    ``hg.Linearization(..., mode="linearized")``) and ``hvp`` (one product on that
    graph, the cost of a CG iteration); ``tokens`` and ``ratio_to_step`` for each.
``hypergrad``
    per ``config`` and CG iteration count k (``--cg`` for ``sub``, ``--cg-full`` for
    ``full``): ``seconds``, ``cpu_seconds``, ``ratio_to_step`` (wall) and
    ``cpu_ratio_to_step``, ``residual`` (relative residual ‖b − (H + dI)v‖/‖b‖ after k
    iterations, H on that configuration's batch), ``peak_mib`` and ``memory_ratio``
    (only for the smallest k). ``parts`` record ``linearize`` carries the peak of the
    linearization plus one product.
``fit``
    per ``config``: least squares t(k) = a + b·k over the measured k (in step units)
    and the largest k with t(k) ≤ 3 steps.
``self_check``
    the first call of ``Implicit(self_check="error")`` (``sub``; it runs the
    second-order self-check once per inner objective, on the Hessian's batch) against a
    later call, and the check alone (``check_seconds``).
``residuals``
    the relative residual after each of ``--residual-k`` CG iterations (one untimed run)
    and CG's ``note`` (negative curvature met): ``sub`` at damping 0 and ``--damping``,
    ``full`` at ``--damping``.
``agreement``
    per timed hypergradient: ``cosine`` similarity and ``relative_distance``
    ‖g − g_ref‖/‖g_ref‖ to the ``reference``, the ``full`` residual run (``--residual-k``
    iterations; without it, the ``full`` run with the most iterations).
``targets``
    ``{"config", "name", "value", "target", "met"}``: time ≤ 3 steps, peak memory ≤ 2
    steps.

Timing: every round runs the step, the parts and each hypergradient once, interleaved,
after one warm-up of each; medians over ``--rounds`` rounds. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call. On CPU each of
the step, the linearizations and the hypergradients runs in a fresh subprocess that
loads w and the data, warms up with one step and one hypergradient of a tiny model (the
code paths, thread pool and allocator, without touching the measured model), and reports
the increase of its peak resident size (``VmHWM``) over that baseline
(``peak_slack_mib``: the baseline's peak minus its resident size, the amount an
allocation could hide in).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # bench_util
from bench_util import cuda_peak, proc_status_mib  # noqa: E402

import hypergrad as hg  # noqa: E402
from hypergrad.second_order import check_second_order, clear_cache  # noqa: E402

Record = dict[str, Any]
START = time.perf_counter()
TIME_TARGET, MEMORY_TARGET = 3.0, 2.0  # hypergradient / training step

#: model and batch sizes: layers, d_model, heads, vocabulary, batch, sequence length
#: and the sequences of the training batch the sub-batch Hessian sees (the first ones)
SIZES = {
    "10M": {"layers": 4, "d": 384, "heads": 6, "vocab": 4096, "batch": 16, "seq": 80,
            "hessian_batch": 2},
    "100M": {"layers": 12, "d": 768, "heads": 12, "vocab": 8192, "batch": 32, "seq": 128,
             "hessian_batch": 4},
    "quick": {"layers": 2, "d": 128, "heads": 4, "vocab": 512, "batch": 8, "seq": 16,
              "hessian_batch": 1},
}
#: where the optimality conditions (every HVP and the linearization) are evaluated:
#: the whole training batch, or its first ``hessian_batch`` sequences
CONFIGS = ("full", "sub")


# --------------------------------------------------------------------------- the model


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (b, heads, t, d_head)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads) + mask
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Causal transformer language model: token and position embeddings, blocks, head."""

    def __init__(self, layers: int, d: int, heads: int, vocab: int, seq: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", torch.full((seq, seq), -1e9).triu(1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln(x))


class Case:
    """The model, its data, the bilevel objectives and the hyperparameters λ."""

    def __init__(self, size: dict, device: str, seed: int = 0):
        torch.manual_seed(seed)
        self.size = size
        self.model = TinyLM(size["layers"], size["d"], size["heads"], size["vocab"],
                            size["seq"]).to(device)
        self.model.apply(init_weights)
        g = torch.Generator().manual_seed(seed + 1)
        successors = torch.randint(0, size["vocab"], (size["vocab"], SUCCESSORS), generator=g)
        self.train = markov_tokens(successors, size["batch"], size["seq"] + 1, g).to(device)
        self.val = markov_tokens(successors, size["batch"], size["seq"] + 1, g).to(device)
        self.sub = self.train[:size["hessian_batch"]]
        self.hparams = {key(n): torch.tensor(math.log(5e-4), device=device)
                        for n, _ in self.model.named_parameters()}

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def cross_entropy(self, params: dict, tokens: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, params, (tokens[:, :-1],))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def inner(self, params: dict, hparams: dict, tokens: torch.Tensor) -> torch.Tensor:
        """f(w, λ) = CE + Σ_i exp(λ_i)/2 ‖w_i‖²."""
        decay = sum(hparams[key(n)].exp() * (w * w).sum() for n, w in params.items())
        return self.cross_entropy(params, tokens) + 0.5 * decay

    def outer(self, params: dict, hparams: dict, tokens: torch.Tensor) -> torch.Tensor:
        """F(w) = CE on the validation batch."""
        return self.cross_entropy(params, tokens)

    def hessian_batch(self, config: str) -> torch.Tensor:
        """The batch of the optimality conditions ∇_w f = 0 in ``config``."""
        return {"full": self.train, "sub": self.sub}[config]

    def problem(self, config: str = "full") -> hg.Problem:
        """``inner_batch`` is the Hessian's batch: with ``inner_steps=0``, Implicit uses
        it only for the linearization of ∇_w f and every HVP (``Problem.full_batch``)."""
        return hg.Problem(self.inner, self.outer, self.hessian_batch(config), self.val,
                          optimizer=hg.SGD(lr=0.1), steps=0)


#: each token is followed by one of this many tokens (uniformly): an entropy of log 4 nats
SUCCESSORS = 4


def markov_tokens(successors: torch.Tensor, batch: int, length: int,
                  gen: torch.Generator) -> torch.Tensor:
    """(batch, length) token ids of a random sparse Markov chain: data a model can learn,
    so that a few steps of training reach a "trained-ish" point."""
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, successors.shape[0], (batch,), generator=gen)
    for t in range(1, length):
        pick = torch.randint(0, successors.shape[1], (batch,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    return tokens


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialization: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def key(name: str) -> str:
    """The hyperparameter key of a parameter tensor: its name with ``_`` for ``.``."""
    return name.replace(".", "_")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pretrain(case: Case, steps: int, lr: float = 3e-3) -> list[float]:
    """Adam on f from the initialization (a "trained-ish" w); the losses."""
    opt = torch.optim.Adam(case.model.parameters(), lr=lr)
    return [training_step(case, opt) for _ in range(steps)]


def training_step(case: Case, opt: torch.optim.Optimizer) -> float:
    """One step of plain training: forward, backward, SGD update (torch.autograd)."""
    loss = case.inner(dict(case.model.named_parameters()), case.hparams, case.train)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def estimator(k: int, damping: float, self_check: str = "off") -> hg.Implicit:
    """Implicit with exactly k CG iterations on (H + damping·I) v = ∇_w F."""
    solver = hg.ConjugateGradient(tol=0.0, maxiter=k, damping=damping)
    return hg.Implicit(solver=solver, hvp="linearized", inner_steps=0, inner_tol=None,
                       warm_start=False, self_check=self_check)


def hypergradient(case: Case, k: int, damping: float, self_check: str = "off",
                  config: str = "full") -> hg.Hypergradient:
    return estimator(k, damping, self_check)(case.problem(config), case.hparams,
                                             case.params())


# --------------------------------------------------------------------------- timing


def sync_fn(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def clock(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call."""
    sync()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - w0, time.process_time() - c0, out


def rounds(fns: dict[str, Callable[[], Any]], n: int, sync: Callable[[], None],
           warm: list[str]) -> dict[str, tuple[float, float, Any]]:
    """Each function once per round, interleaved, after one warm-up call of those in
    ``warm``: the median wall and CPU seconds over ``n`` rounds and the last result."""
    for name in warm:
        fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for r in range(n):
        for name, fn in fns.items():
            w, c, last[name] = clock(fn, sync)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"  [{time.perf_counter() - START:5.0f} s] round {r + 1}/{n}: "
              + ", ".join(f"{k}={statistics.median(v):.3f}" for k, v in wall.items()),
              flush=True)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]), last[name])
            for name in fns}


# --------------------------------------------------------------------------- memory


def memory_child(spec: dict) -> None:
    """Entry point of the fresh subprocess measuring one call's peak RSS increase."""
    torch.set_num_threads(spec["threads"])
    warnings.simplefilter("ignore")
    case = Case(spec["size"], "cpu")
    case.model.load_state_dict(torch.load(spec["state"], mmap=True))
    tiny = Case(SIZES["quick"], "cpu")  # warm-up of every code path on a tiny model
    training_step(tiny, torch.optim.SGD(tiny.model.parameters(), lr=0.1))
    hypergradient(tiny, 1, spec["damping"])
    hg.Linearization(tiny.inner, tiny.params(), tiny.hparams, tiny.train,
                     mode="linearized").matvec(tiny.params())
    del tiny
    base = proc_status_mib("VmHWM")
    slack = base - proc_status_mib("VmRSS")
    if spec["what"] == "step":
        training_step(case, torch.optim.SGD(case.model.parameters(), lr=0.1))
    elif spec["what"] == "linearize":  # the graph kept for the solve, and one product on it
        lin = hg.Linearization(case.inner, case.params(), case.hparams,
                               case.hessian_batch(spec["config"]), mode="linearized")
        lin.matvec(case.params())
    else:
        hypergradient(case, spec["k"], spec["damping"], config=spec["config"])
    peak = proc_status_mib("VmHWM") - base
    print(json.dumps({"peak_mib": peak, "peak_slack_mib": slack}))


def cpu_peak(what: str, size: dict, state_path: str, threads: int, k: int = 0,
             damping: float = 0.0, config: str = "full") -> dict:
    spec = {"what": what, "size": size, "state": state_path, "threads": threads, "k": k,
            "damping": damping, "config": config}
    out = subprocess.run([sys.executable, __file__, "--json", "-", "--memory-child",
                          json.dumps(spec)], capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peaks(case: Case, ks: dict[str, int], args: argparse.Namespace) -> dict[str, dict]:
    """Peak memory of one training step and, per configuration, of the linearization
    with one product on it and of one hypergradient with ``ks[config]`` CG iterations;
    keys ``step``, ``linearize_<config>``, ``hypergrad_<config>``."""
    if args.device == "cuda":
        opt = torch.optim.SGD(case.model.parameters(), lr=0.0)
        p, h = case.params(), case.hparams
        out = {"step": {"peak_mib": cuda_peak(lambda: training_step(case, opt))}}
        for c in CONFIGS:
            out[f"linearize_{c}"] = {"peak_mib": cuda_peak(lambda c=c: hg.Linearization(
                case.inner, p, h, case.hessian_batch(c), mode="linearized").matvec(p))}
            out[f"hypergrad_{c}"] = {"peak_mib": cuda_peak(
                lambda c=c: hypergradient(case, ks[c], args.damping, config=c))}
        return out
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(case.model.state_dict(), path)
        threads = torch.get_num_threads()
        out = {"step": cpu_peak("step", case.size, path, threads)}
        for c in CONFIGS:
            for what in ("linearize", "hypergrad"):
                out[f"{what}_{c}"] = cpu_peak(what, case.size, path, threads, ks[c],
                                              args.damping, c)
        return out
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------- benchmark


def bench(case: Case, args: argparse.Namespace) -> list[Record]:
    """The step, the parts and the hypergradients of both configurations, timed in the
    same interleaved rounds; then the peaks (``args.memory``)."""
    sync = sync_fn(args.device)
    p, h = case.params(), case.hparams
    opt = torch.optim.SGD(case.model.parameters(), lr=0.0)  # lr 0: w stays where it is
    v = {n: torch.randn_like(x) for n, x in p.items()}
    fns: dict[str, Callable[[], Any]] = {
        "step": lambda: training_step(case, opt),
        "grad": lambda: grad(case.inner)(p, h, case.train),
    }
    for c in CONFIGS:
        batch = case.hessian_batch(c)
        lin = hg.Linearization(case.inner, p, h, batch, mode="linearized")
        fns[f"linearize_{c}"] = lambda b=batch: hg.Linearization(case.inner, p, h, b,
                                                                 mode="linearized")
        fns[f"hvp_{c}"] = lambda lin=lin: lin.matvec(v)
    for c in CONFIGS:
        for k in args.cg[c]:
            fns[f"hypergrad_{c}_k{k}"] = lambda k=k, c=c: hypergradient(
                case, k, args.damping, config=c)
    warm = [n for n in fns if not n.startswith("hypergrad")]
    warm += [f"hypergrad_{c}_k{args.cg[c][0]}" for c in CONFIGS]
    timed = rounds(fns, args.rounds, sync, warm)
    step_wall, step_cpu, _ = timed["step"]
    records: list[Record] = [{"section": "step", "seconds": step_wall, "cpu_seconds": step_cpu,
                              "tokens": case.train.shape[0] * (case.train.shape[1] - 1),
                              "peak_mib": None}]

    def part(name: str, config: str | None, tokens: int) -> Record:
        wall, cpu, _ = timed[name if config is None else f"{name}_{config}"]
        return {"section": "parts", "part": name, "config": config, "tokens": tokens,
                "seconds": wall, "cpu_seconds": cpu, "ratio_to_step": wall / step_wall,
                "cpu_ratio_to_step": cpu / step_cpu, "peak_mib": None}

    records.append(part("grad", None, records[0]["tokens"]))
    for c in CONFIGS:
        tokens = case.hessian_batch(c).shape[0] * (case.hessian_batch(c).shape[1] - 1)
        records += [part("linearize", c, tokens), part("hvp", c, tokens)]
    ratio = "cpu_ratio_to_step" if args.device == "cpu" else "ratio_to_step"
    for c in CONFIGS:
        for k in args.cg[c]:
            wall, cpu, out = timed[f"hypergrad_{c}_k{k}"]
            d = out.diagnostics
            records.append({"section": "hypergrad", "config": c, "cg_iterations": k,
                            "damping": args.damping, "seconds": wall, "cpu_seconds": cpu,
                            "ratio_to_step": wall / step_wall,
                            "cpu_ratio_to_step": cpu / step_cpu,
                            "residual": d.solve_residual, "hypergrad_norm": d.hypergrad_norm,
                            "peak_mib": None, "hypergrad": flat(out.grad)})
        records.append({**fit(records, ratio, c), "config": c})
    if args.memory:
        ks = {c: args.cg[c][0] for c in CONFIGS}
        mem = peaks(case, ks, args)
        step_mib = mem["step"]["peak_mib"]
        records[0].update(mem["step"])
        for c in CONFIGS:
            next(x for x in records if x.get("part") == "linearize"
                 and x["config"] == c).update(mem[f"linearize_{c}"])
            rec = next(x for x in records if x["section"] == "hypergrad"
                       and x["config"] == c and x["cg_iterations"] == ks[c])
            rec.update(mem[f"hypergrad_{c}"])
            rec["memory_ratio"] = (mem[f"hypergrad_{c}"]["peak_mib"] / step_mib
                                   if step_mib > 0 else None)  # --quick: below the slack
            print(f"  [{time.perf_counter() - START:5.0f} s] peak MiB ({c}): step "
                  f"{step_mib:.1f}, linearization + 1 product "
                  f"{mem[f'linearize_{c}']['peak_mib']:.1f}, hypergradient (k={ks[c]}) "
                  f"{mem[f'hypergrad_{c}']['peak_mib']:.1f}", flush=True)
    return records


def flat(tree: dict[str, torch.Tensor]) -> list[float]:
    """The hypergradient (one entry per hyperparameter, in key order) as a list."""
    return [float(tree[name]) for name in sorted(tree)]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def agreement(records: list[Record], reference: Record) -> list[Record]:
    """Cosine similarity and relative distance of every timed hypergradient to the
    reference (the full-batch Hessian at the most CG iterations run)."""
    ref = reference["hypergrad"]
    norm = math.sqrt(sum(x * x for x in ref))
    out = []
    for x in records:
        if x["section"] == "hypergrad":
            diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(x["hypergrad"], ref,
                                                              strict=True)))
            out.append({"section": "agreement", "config": x["config"],
                        "cg_iterations": x["cg_iterations"],
                        "reference": {"config": reference["config"],
                                      "cg_iterations": reference["cg_iterations"]},
                        "cosine": cosine(x["hypergrad"], ref),
                        "relative_distance": diff / norm})
    return out


def residual_curves(case: Case, k: int, dampings: list[float], config: str) -> list[Record]:
    """The relative residual after each of k CG iterations, per damping (one untimed run
    each), CG's note when it met non-positive curvature, and the hypergradient."""
    out = []
    for damping in dampings:
        result = hypergradient(case, k, damping, config=config)
        d = result.diagnostics
        out.append({"section": "residuals", "config": config, "damping": damping,
                    "cg_iterations": k, "residuals": d.solve_residuals, "note": d.solve_note,
                    "hypergrad": flat(result.grad)})
        print(f"  [{time.perf_counter() - START:5.0f} s] residuals ({config}), damping "
              f"{damping:g}: " + " ".join(f"{r:.2g}" for r in d.solve_residuals), flush=True)
    return out


def fit(records: list[Record], ratio: str, config: str | None = None) -> Record:
    """t(k) = a + b·k in step units by least squares over the measured k (of ``config``
    only, unless ``None``); the largest k with t(k) ≤ TIME_TARGET."""
    pts = [(x["cg_iterations"], x[ratio]) for x in records if x["section"] == "hypergrad"
           and (config is None or x.get("config") == config)]
    if len(pts) < 2:
        return {"section": "fit", "ratio": ratio, "fixed": None, "per_iteration": None,
                "max_k_within_target": None}
    n = len(pts)
    mk, mt = sum(k for k, _ in pts) / n, sum(t for _, t in pts) / n
    b = sum((k - mk) * (t - mt) for k, t in pts) / sum((k - mk) ** 2 for k, _ in pts)
    a = mt - b * mk
    best = math.floor((TIME_TARGET - a) / b + 1e-9) if b > 0 else None  # 1e-9: rounding
    return {"section": "fit", "ratio": ratio, "fixed": a, "per_iteration": b,
            "max_k_within_target": best if best is None or best >= 0 else -1}


def bench_self_check(case: Case, k: int, damping: float, sync: Callable[[], None],
                     config: str) -> Record:
    """The first call of Implicit(self_check="error") (check included, on the Hessian's
    batch) against a later call, and the check alone."""
    clear_cache()
    first, first_cpu, _ = clock(lambda: hypergradient(case, k, damping, "error", config), sync)
    later, later_cpu, _ = clock(lambda: hypergradient(case, k, damping, "error", config), sync)
    report = check_second_order(case.inner, case.hparams, case.params(),
                                case.hessian_batch(config))
    rec = {"section": "self_check", "config": config, "cg_iterations": k,
           "first_seconds": first,
           "later_seconds": later, "first_cpu_seconds": first_cpu,
           "later_cpu_seconds": later_cpu, "check_seconds": report.seconds,
           "statuses": {r: report.routes[r].status for r in report.routes}}
    print(f"  [{time.perf_counter() - START:5.0f} s] self-check: first call {first:.2f} s, "
          f"later {later:.2f} s, check alone {report.seconds:.2f} s", flush=True)
    return rec


def targets(records: list[Record], device: str) -> list[Record]:
    ratio = "cpu_ratio_to_step" if device == "cpu" else "ratio_to_step"
    rows = []
    for x in records:
        if x["section"] == "hypergrad":
            name = f"{x['config']} k={x['cg_iterations']}"
            rows.append((x["config"], f"hypergradient {name} time / step", x[ratio],
                         TIME_TARGET))
            if x.get("memory_ratio") is not None:
                rows.append((x["config"], f"hypergradient {name} peak memory / step",
                             x["memory_ratio"], MEMORY_TARGET))
    return [{"section": "targets", "config": c, "name": n, "value": v, "target": t,
             "met": v is not None and v <= t} for c, n, v, t in rows]


def print_report(records: list[Record]) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    for x in records:
        if x["section"] in ("hypergrad",):
            print(f"  {x['config']:>4} CG k={x['cg_iterations']:>3}: {f(x['seconds'])} s wall, "
                  f"ratio "
                  f"{f(x['ratio_to_step'])} (cpu {f(x['cpu_ratio_to_step'])}), residual "
                  f"{f(x['residual'])}, peak {f(x['peak_mib'])} MiB")
        elif x["section"] not in ("meta", "targets"):
            print("  " + ", ".join(f"{k}={f(v)}" for k, v in x.items()
                                   if k not in ("residuals", "statuses", "note", "reference",
                                                "size")))
    for x in records:
        if x["section"] == "targets":
            print(f"  {x['name']:44} {f(x['value']):>8} <= {x['target']:g}: "
                  f"{'met' if x['met'] else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="output file for the JSON records")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--params", default="10M", choices=("10M", "100M"),
                    help="model size (10M for CPU, 100M for a GPU)")
    ap.add_argument("--quick", action="store_true", help="a tiny model for a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cg", default="1,2,5,10,20",
                    help="comma-separated CG iteration counts to time, sub-batch Hessian")
    ap.add_argument("--cg-full", default="1,2,5",
                    help="comma-separated CG iteration counts to time, full-batch Hessian")
    ap.add_argument("--damping", type=float, default=10.0,
                    help="CG solves (H + damping·I) v = ∇_w F (H is indefinite here)")
    ap.add_argument("--residual-k", type=int, default=20,
                    help="CG iterations of the untimed residual curves (0: none); the "
                         "full-batch one at --damping is the reference hypergradient")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--pretrain", type=int, default=40, help="Adam steps before measuring")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory measurement")
    ap.add_argument("--no-self-check", dest="self_check", action="store_false",
                    help="skip timing the first call with the second-order self-check")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("scale.py: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.cg = {c: sorted({int(k) for k in arg.split(",")})
                   for c, arg in (("sub", args.cg), ("full", args.cg_full))}
    except ValueError:
        ap.error("--cg and --cg-full take comma-separated integers")
    if any(k < 1 for ks in args.cg.values() for k in ks):
        ap.error("--cg and --cg-full: CG iteration counts must be >= 1")
    warnings.simplefilter("ignore", hg.ConvergenceWarning)  # k iterations stop the solve on purpose
    size = SIZES["quick" if args.quick else args.params]
    case = Case(size, args.device)
    meta: Record = {"section": "meta", "torch": torch.__version__, "device": args.device,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "quick": args.quick, "size": size, "params": n_params(case.model),
                    "hyperparameters": len(case.hparams), "tokens": size["batch"] * size["seq"],
                    "hessian_tokens": size["hessian_batch"] * size["seq"],
                    "rounds": args.rounds, "pretrain_steps": args.pretrain}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
    print(f"# {meta['params'] / 1e6:.1f} M parameters, {len(case.hparams)} hyperparameters, "
          f"{meta['tokens']} tokens per batch, sub-batch Hessian on {meta['hessian_tokens']}, "
          f"{meta['threads']} threads", flush=True)
    losses = pretrain(case, args.pretrain)
    meta["pretrain_loss"] = [losses[0], losses[-1]] if losses else None
    print(f"  [{time.perf_counter() - START:5.0f} s] pretrained: loss "
          f"{losses[0] if losses else float('nan'):.3f} -> "
          f"{losses[-1] if losses else float('nan'):.3f}", flush=True)
    records = bench(case, args)
    if args.self_check:
        records.append(bench_self_check(case, args.cg["sub"][0], args.damping,
                                        sync_fn(args.device), "sub"))
    if args.residual_k:  # undamped only on the sub-batch: on the full batch it costs most
        records += residual_curves(case, args.residual_k, sorted({0.0, args.damping}), "sub")
        records += residual_curves(case, args.residual_k, [args.damping], "full")
        reference = next(x for x in records if x["section"] == "residuals"
                         and x["config"] == "full")
    else:
        reference = max((x for x in records if x["section"] == "hypergrad"
                         and x["config"] == "full"), key=lambda x: x["cg_iterations"])
    records += agreement(records, reference)
    for x in records:
        x.pop("hypergrad", None)  # 54 numbers each; the agreement records summarise them
    records += targets(records, args.device)
    meta["total_seconds"] = time.perf_counter() - START
    meta["load_average_1min_at_end"] = os.getloadavg()[0]  # other processes on the machine
    records.insert(0, meta)
    print_report(records)
    print(f"total {meta['total_seconds']:.0f} s")
    if args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()

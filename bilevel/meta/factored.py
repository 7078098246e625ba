"""A fast, exact MAML inner loop for multilayer perceptrons: adapt every task at once without
ever forming a per-task copy of the weights.

The idea. With plain SGD at a scalar step ``a`` on a task's support loss, the gradient of a
linear layer ``z = h W^T + b`` is ``delta^T h``, where ``h`` ``(n, in)`` are the layer's inputs
and ``delta = dL/dz`` ``(n, out)`` the gradients of the loss with respect to its outputs (the
pre-activations). So after ``t`` steps the task's weights are, exactly,

    W_t = W_0 - a * sum_{s<t} delta_s^T h_s,        b_t = b_0 - a * sum_{s<t} sum_n delta_s,

a low-rank correction to the shared ``W_0`` whose factors are activation-sized. The layer's
output on inputs ``x`` of task ``b`` is then

    x W_t^T + b_t = x W_0^T + b_0 - a * sum_s (x h_s^T + 1) delta_s,

one GEMM with the *shared* weights for all tasks at once (``(B * n, in) @ (in, out)``), plus
batched products of activation-sized tensors: ``(B, n, t * n_s)`` Gram matrices of the inputs
and the stacked ``delta``'s. No per-task ``(B, out, in)`` weight of such a layer is formed, and
nothing is approximated: the result equals the per-task dense computation up to floating-point
rounding (the tests check float64 agreement to 1e-10 relative).
The inputs of the first linear layer do not change across steps, so its Gram matrix is
computed once and its ``delta``'s are summed. For a layer whose weight is small next to its
factors (an output layer with a few classes) per-task weights ``(B, out, in)`` are cheaper,
and :func:`factored_adapt` chooses per layer by operation count (``strategy``).

The inner gradients are ``torch.autograd.grad`` of the sum over tasks of the per-task support
losses (times ``-lr``, which makes them the factors directly) with respect to the
pre-activation tensors (with ``create_graph=True`` for second-order MAML), never with respect
to weights; everything is differentiable by autograd, so the meta-gradient is
``torch.autograd.grad(query_losses.mean(), params)``.

Cost. Per inner step the shared GEMMs do what a per-task loop does without its weight
gradients ``delta^T h`` (and without any weight-sized tensor), but step ``t`` adds Gram
products over ``t * n_s`` rows (and the query ones over ``steps * n_s`` rows): the arithmetic
matches a per-task loop's near 5 steps of 25 examples on 256-wide layers and exceeds it
beyond, so the gain (fewer, larger kernels; no per-task weight traffic) shrinks as steps
grow. Memory holds the activations of every step, as any unrolled second-order MAML.

* :func:`supports_factored` -- whether a model qualifies (a ``nn.Sequential`` of ``nn.Linear``
  and parameter-free elementwise activations), or why not.
* :func:`factored_layers` -- the description of such a model that the functions below take.
* :func:`factored_adapt` -- adapt every task; a :class:`FactoredAdaptation` that predicts
  (:meth:`~FactoredAdaptation.predict`) and gives dense per-task parameters
  (:meth:`~FactoredAdaptation.dense_params`).
* :func:`factored_query_losses` -- per-task query losses after adaptation (the MAML objective).
* :func:`factored_adapted` / :func:`factored_predict` -- dense adapted parameters / predictions.
* :func:`per_task_cross_entropy` / :func:`per_task_mse` -- per-task mean losses ``(B,)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypergrad.errors import BilevelInputError

__all__ = [
    "FactoredAdaptation", "FactoredLayers", "FactoredLinear", "factored_adapt",
    "factored_adapted", "factored_layers", "factored_predict", "factored_query_losses",
    "per_task_cross_entropy", "per_task_mse", "supports_factored",
]

#: Parameter-free modules that act on each entry separately (exact types: a subclass may
#: override ``forward``).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
    nn.Identity, nn.ReLU6, nn.Hardtanh, nn.SELU, nn.CELU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Strategy = Literal["auto", "factored", "dense"]


# --------------------------------------------------------------------------------------------
# Which models qualify
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactoredLinear:
    """One ``nn.Linear`` of the model: its parameter names (as ``model.named_parameters()``
    gives them; ``bias`` is ``None`` for ``bias=False``) and its sizes."""

    weight: str
    bias: str | None
    in_features: int
    out_features: int


@dataclass(frozen=True)
class FactoredLayers:
    """A model reduced to what the factored inner loop needs (built by :func:`factored_layers`).

    Attributes:
        linears: the linear layers in order.
        acts: ``len(linears) + 1`` tuples of parameter-free elementwise modules: those before
            the first linear layer, between consecutive ones, and after the last.
        flatten: whether an ``nn.Flatten`` comes before the first linear layer (inputs
            ``(B, n, *features)`` are then flattened to ``(B, n, prod(features))``).
    """

    linears: tuple[FactoredLinear, ...]
    acts: tuple[tuple[nn.Module, ...], ...]
    flatten: bool = False

    @property
    def param_names(self) -> list[str]:
        """The names of every parameter, weights and biases, in order."""
        names = []
        for lin in self.linears:
            names.append(lin.weight)
            if lin.bias is not None:
                names.append(lin.bias)
        return names


def _walk(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The leaves of nested ``nn.Sequential``'s with their dotted names, in order (every
    occurrence: ``named_children`` would skip a module met twice)."""
    out = []
    for name, child in model._modules.items():
        if child is None:
            continue
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out.extend(_walk(child, full + "."))
        else:
            out.append((full, child))
    return out


def _describe(model: nn.Module) -> FactoredLayers | str:
    """The :class:`FactoredLayers` of ``model``, or the reason it does not qualify."""
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    for name, mod in model.named_modules(remove_duplicate=False):
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"{type(mod).__name__} at {name or 'the top'} has forward hooks"
    linears: list[FactoredLinear] = []
    acts: list[list[nn.Module]] = [[]]
    flatten = False
    seen: dict[int, str] = {}
    for name, mod in _walk(model, ""):
        kind = type(mod).__name__
        if type(mod) is nn.Linear and id(mod) in seen:
            return f"Linear at {name} is the Linear at {seen[id(mod)]} again (shared weights)"
        seen[id(mod)] = name
        if type(mod) is nn.Linear:
            linears.append(FactoredLinear(f"{name}.weight",
                                          None if mod.bias is None else f"{name}.bias",
                                          mod.in_features, mod.out_features))
            acts.append([])
        elif type(mod) is nn.Flatten:
            if mod.start_dim != 1 or mod.end_dim != -1:
                return (f"Flatten at {name} has start_dim={mod.start_dim}, end_dim={mod.end_dim}"
                        f" (only the default 1, -1 is supported)")
            flatten = flatten or not linears  # after a linear layer it is the identity
        elif type(mod) in ELEMENTWISE:
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                return f"{kind} at {name} has parameters or buffers"
            if getattr(mod, "inplace", False):  # the pre-activations must stay intact
                mod = copy.copy(mod)
                mod.inplace = False
            acts[-1].append(mod)
        else:
            return f"{kind} at {name} is not elementwise"
    if not linears:
        return "the model has no nn.Linear layer"
    return FactoredLayers(tuple(linears), tuple(tuple(a) for a in acts), flatten)


def supports_factored(model: nn.Module) -> str | None:
    """``None`` if ``model`` qualifies for the factored inner loop, else a short reason why not.

    A model qualifies if it is an ``nn.Sequential`` (possibly of nested ``nn.Sequential``'s) of
    ``nn.Linear`` layers and parameter-free elementwise activations (the exact types in
    :data:`ELEMENTWISE`: ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU, ELU, Softplus, Identity,
    ...), with optionally ``nn.Flatten()`` (default dimensions), and holds at least one linear
    layer, no linear layer twice and no forward hooks. For example
    ``"BatchNorm1d at 1 is not elementwise"``. (In-place activations are run out of place.)
    """
    found = _describe(model)
    return found if isinstance(found, str) else None


def factored_layers(model: nn.Module) -> FactoredLayers:
    """The :class:`FactoredLayers` description of ``model`` for the ``factored_*`` functions.

    The activation modules are the model's own (they hold no parameters); parameters are
    referred to by name and passed separately, so one description serves any parameters.

    Raises:
        BilevelInputError: if :func:`supports_factored` refuses the model (with its reason).
    """
    found = _describe(model)
    if isinstance(found, str):
        raise BilevelInputError(f"the factored MAML inner loop does not support this model: "
                                f"{found}")
    return found


# --------------------------------------------------------------------------------------------
# Per-task losses
# --------------------------------------------------------------------------------------------


def per_task_cross_entropy(pred: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of logits ``pred`` ``(B, n, C)`` against labels ``y`` ``(B, n)``, averaged
    over each task's examples: ``(B,)``."""
    num, n = y.shape[:2]
    return F.cross_entropy(pred.reshape(num * n, -1), y.reshape(-1),
                           reduction="none").view(num, n).mean(1)


def per_task_mse(pred: Tensor, y: Tensor) -> Tensor:
    """Squared error of ``pred`` against ``y`` (both ``(B, n, ...)``), averaged over each
    task's entries: ``(B,)`` (``F.mse_loss`` of each task)."""
    return (pred - y).square().flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# The adaptation
# --------------------------------------------------------------------------------------------


_ONE: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _one(like: Tensor) -> Tensor:
    key = (like.dtype, like.device)
    if key not in _ONE:
        _ONE[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return _ONE[key]


def _addmm3(add: Tensor | float | None, x: Tensor, y: Tensor) -> Tensor:
    """``add + x @ y`` (batched); ``add`` a tensor, the constant ``1.0`` or ``None``."""
    if add is None:
        return torch.bmm(x, y)
    return torch.baddbmm(_one(x) if isinstance(add, float) else add, x, y)


class _StackProduct(torch.autograd.Function):
    """``add + x @ S^T`` (``transpose``) or ``add + x @ S``, batched, for a tensor ``x`` and a
    stack ``S`` ``(B, m, k)`` of blocks ``(B, m_i, k)`` along ``m`` (``data`` holds their values
    contiguously; the blocks are the autograd inputs).

    Why not ``torch.bmm``: autograd returns the gradient of a transposed operand transposed,
    and ``S`` is used both ways (``S^T`` in a Gram matrix, ``S`` in the inner backward pass),
    so gradients of mixed layouts would meet, and the elementwise backward ops after them run
    many times slower on transposed layouts. This function returns every gradient in its
    input's layout; its backward is made of this function, so it is differentiable (second
    order). And with ``skip_once``, the first backward pass through it (the inner gradient,
    taken right after the support forward pass, with respect to that pass's pre-activations,
    to which the stack of earlier steps does not lead) skips the stack's gradient, which
    autograd cannot tell a custom function it does not need.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor,
                add: Tensor | float | None, transpose: bool, skip_once: bool, data: Tensor,
                *blocks: Tensor) -> Tensor:
        ctx.data, ctx.transpose, ctx.skip = data, transpose, skip_once
        ctx.sizes = [b.shape[1] for b in blocks]
        ctx.add_shape = add.shape if isinstance(add, Tensor) else None
        ctx.save_for_backward(x, *blocks)
        return _addmm3(add, x, data.transpose(1, 2) if transpose else data)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 g: Tensor) -> tuple[Tensor | None, ...]:
        x, *blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = gadd = None
        if need[0]:  # x @ S^T -> g @ S;  x @ S -> g @ S^T
            gx = _StackProduct.apply(g, None, not ctx.transpose, False, ctx.data, *blocks)
        if need[1]:
            gadd = g if ctx.add_shape == g.shape else g.sum_to_size(ctx.add_shape)
        gblocks = [None] * len(blocks)
        if not ctx.skip and any(need[5:]):
            # x @ S^T -> g^T @ x;  x @ S -> x^T @ g: (B, m, k) either way
            gs = torch.bmm(g.transpose(1, 2), x) if ctx.transpose else torch.bmm(
                x.transpose(1, 2), g)
            gblocks = [gi if n else None for gi, n in zip(gs.split(ctx.sizes, 1), need[5:],
                                                          strict=True)]
        ctx.skip = False
        return (gx, gadd, None, None, None, *gblocks)


@dataclass(eq=False)
class _Stack:
    """One factor of a layer (its inputs ``H`` or its scaled output gradients ``D``), one block
    ``(B, n_s, k)`` per step: ``blocks`` (autograd-tracked) and a copy of their values in one
    preallocated buffer (written once per block, so no concatenation per step)."""

    capacity: int
    blocks: list[Tensor] = field(default_factory=list)
    buffer: Tensor | None = None
    rows: int = 0

    def append(self, block: Tensor) -> None:
        n = block.shape[1]
        if self.buffer is None:
            self.buffer = block.new_empty(block.shape[0], self.capacity * n, block.shape[2])
        with torch.no_grad():
            self.buffer[:, self.rows:self.rows + n].copy_(block)
        self.rows += n
        self.blocks.append(block)

    def args(self, detached: bool) -> tuple[Tensor, ...]:
        """``(data, *blocks)`` for :class:`_StackProduct`."""
        blocks = [b.detach() for b in self.blocks] if detached else self.blocks
        return (self.buffer[:, :self.rows], *blocks)

    def cat(self) -> Tensor:
        """The blocks concatenated (autograd-tracked)."""
        return torch.cat(self.blocks, 1)


@dataclass(eq=False)
class _Layer:
    """The adaptation state of one linear layer, as factors scaled by ``-lr``
    (``D_s = -lr * delta_s``, so that ``W_t = W_0 + sum_s D_s^T h_s``).

    ``kind`` is ``"input"`` for the first layer (inputs constant across steps: ``dsum`` is
    ``sum_s D_s``; when the inputs require grad, the detached steps' sum is kept apart in
    ``dsum_det``, to be paired with the detached inputs), ``"factored"`` (``hs``, ``ds``: the
    stacks of the inputs ``h_s`` and ``D_s`` of every step so far) or ``"dense"``
    (``dw = sum_s D_s^T h_s`` ``(B, out, in)`` and ``dbias``, the sum over steps and examples
    of ``D_s`` ``(B, out)``). The first two fold the bias into their Gram matrix as a ``+1``
    (the bias is the weight of a constant input 1).
    """

    kind: str
    has_bias: bool
    steps: int
    split: bool = False
    dsum: Tensor | None = None
    dsum_det: Tensor | None = None
    hs: _Stack | None = None
    ds: _Stack | None = None
    dw: Tensor | None = None
    dbias: Tensor | None = None

    def record(self, h: Tensor, d: Tensor, detached: bool) -> None:
        """Add one step's inputs ``h`` and scaled output gradients ``d = -lr * delta``."""
        if self.kind == "input" and detached and self.split:
            self.dsum_det = d if self.dsum_det is None else self.dsum_det + d
        elif self.kind == "input":
            self.dsum = d if self.dsum is None else self.dsum + d
        elif self.kind == "factored":
            if self.hs is None:
                self.hs, self.ds = _Stack(self.steps), _Stack(self.steps)
            self.hs.append(h)
            self.ds.append(d)
        else:
            dt = d.transpose(1, 2)
            self.dw = torch.bmm(dt, h) if self.dw is None else torch.baddbmm(self.dw, dt, h)
            if self.has_bias:
                db = d.sum(1)
                self.dbias = db if self.dbias is None else self.dbias + db

    @property
    def empty(self) -> bool:
        return (self.dsum is None and self.dsum_det is None and self.hs is None
                and self.dw is None)

    def outputs(self, h: Tensor, w: Tensor, b: Tensor | None, first: _Grams | None,
                first_base: Tensor | None, detached: bool, support: bool) -> Tensor:
        """The adapted layer's outputs ``h W_t^T + b_t`` ``(B, n, out)`` on inputs ``h``
        ``(B, n, in)``, from the shared ``w``, ``b`` and this state; ``first`` are the Gram
        matrices of ``h`` and the support inputs, and the detached support inputs (``"input"``
        layers), ``first_base`` the
        unadapted outputs when known; ``support``: the forward pass of an inner step (see
        :class:`_StackProduct`)."""
        def det(t: Tensor) -> Tensor:
            return t.detach() if detached else t

        if self.kind == "dense" and not self.empty:
            wt = w + det(self.dw)  # (B, out, in): the per-task weights of a small layer
            bt = None if b is None else (b + det(self.dbias)).unsqueeze(1)
            return _StackProduct.apply(h, bt, True, support, wt, wt)
        z = F.linear(h, w, b) if first_base is None else first_base
        if self.empty:
            return z
        if self.kind == "input":
            if self.dsum is not None:
                z = torch.baddbmm(z, first[0], det(self.dsum))
            if self.dsum_det is not None:
                z = torch.baddbmm(z, first[1], det(self.dsum_det))
            return z
        gram = _StackProduct.apply(h, 1.0 if self.has_bias else None, True, support,
                                   *self.hs.args(detached))
        return _StackProduct.apply(gram, z, False, support, *self.ds.args(detached))


_Grams = tuple[Tensor, Tensor]


def _gram(x: Tensor, h: Tensor, bias: bool) -> Tensor:
    """``x h^T`` ``(B, n, m)``, ``+ 1`` when the layer has a bias (``b`` folded as an input 1)."""
    return _addmm3(1.0 if bias else None, x, h.transpose(1, 2))


def _apply(acts: tuple[nn.Module, ...], h: Tensor) -> Tensor:
    for act in acts:
        h = act(h)
    return h


def _prepare(spec: FactoredLayers, x: Tensor, name: str) -> Tensor:
    """Inputs ``(B, n, *features)`` flattened (if the model flattens) and through the
    activations before the first linear layer: ``(B, n, in)``."""
    if not isinstance(x, Tensor) or x.dim() < 3:
        raise BilevelInputError(f"{name} must be a tensor (B, n, *features), got "
                                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    if spec.flatten:
        x = x.flatten(2)
    if x.dim() != 3 or x.shape[2] != spec.linears[0].in_features:
        raise BilevelInputError(
            f"{name}: the first linear layer takes {spec.linears[0].in_features} features, "
            f"got inputs of shape {tuple(x.shape)}" + ("" if spec.flatten else
                                                       " (and the model has no Flatten)"))
    return _apply(spec.acts[0], x)


#: The cost, in multiply-adds, of the passes over a per-task weight-sized tensor in one step
#: of a ``"dense"`` layer (a heuristic: these passes are memory-bound, out of cache).
_WEIGHT_PASS = 200


def _choose(spec: FactoredLayers, steps: int, n_s: int, n_q: int,
            strategy: Strategy) -> list[str]:
    """The kind of each linear layer: the first is ``"input"``; each other is ``"factored"`` or
    ``"dense"``, by ``strategy`` or (``"auto"``) whichever costs less per task: the Gram
    products (forward, ``(in + out) * n_s * (n_s * steps * (steps - 1) / 2 + n_q * steps)``
    multiply-adds) or the per-task weight updates plus :data:`_WEIGHT_PASS` per weight entry
    and step for their memory traffic."""
    kinds = ["input"]
    for lin in spec.linears[1:]:
        if strategy != "auto":
            kinds.append(strategy)
            continue
        io, width = lin.in_features * lin.out_features, lin.in_features + lin.out_features
        factored = width * n_s * (n_s * steps * (steps - 1) // 2 + n_q * steps)
        dense = io * steps * (n_s + _WEIGHT_PASS)
        kinds.append("factored" if factored <= dense else "dense")
    return kinds


@dataclass(eq=False)
class FactoredAdaptation:
    """Every task adapted by :func:`factored_adapt`, held as factors (no per-task weights of
    the factored layers): :meth:`predict` runs the adapted models, :meth:`dense_params` forms
    their parameters.

    Attributes:
        spec: the model's :class:`FactoredLayers`.
        weights, biases: the shared initial parameters of each linear layer (``None`` for no
            bias), as passed (with their graph).
        lr: the inner step size.
        support_in: the support inputs as the first linear layer takes them ``(B, n_s, in)``.
        layers: the per-layer adaptation state (internal).
        steps: the number of SGD steps taken.
        support_losses: ``(B,)`` the per-task support losses at the last inner step (before its
            update; the unadapted losses when ``steps == 0``), detached: a diagnostic.
    """

    spec: FactoredLayers
    weights: list[Tensor]
    biases: list[Tensor | None]
    lr: float | Tensor
    support_in: Tensor
    layers: list[_Layer]
    steps: int
    support_losses: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        """``B``."""
        return int(self.support_in.shape[0])

    def _forward(self, h: Tensor, first: _Grams | None, first_base: Tensor | None = None,
                 detached: bool = False, support: bool = False
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Outputs ``(B, n, out)`` of the adapted models on prepared inputs ``h`` ``(B, n, in)``,
        and the inputs and pre-activations of every linear layer. ``first`` are the first
        layer's Gram matrices (:meth:`_first_grams`; ``None`` before any step);
        ``first_base`` its unadapted pre-activations when already known (not modified);
        ``detached``: with every parameter and factor detached; ``support``: the forward pass
        of an inner step, whose inner gradient is taken next."""
        zs, hs = [], []
        for i, state in enumerate(self.layers):
            hs.append(h)
            w, b = self.weights[i], self.biases[i]
            if detached:
                w, b = w.detach(), None if b is None else b.detach()
            z = state.outputs(h, w, b, first, first_base if i == 0 else None, detached,
                              support)
            zs.append(z)
            h = _apply(self.spec.acts[i + 1], z)
        return h, zs, hs

    def predict(self, x: Tensor) -> Tensor:
        """The adapted models' outputs ``(B, n, out)`` on inputs ``x`` ``(B, n, *features)``
        (each task's model on its own inputs), differentiable to the parameters.

        Raises:
            BilevelInputError: for inputs of the wrong shape or task count.
        """
        h = _prepare(self.spec, x, "x")
        if h.shape[0] != self.num_tasks:
            raise BilevelInputError(f"x holds {h.shape[0]} tasks, the adaptation "
                                    f"{self.num_tasks}")
        return self._forward(h, self._first_grams(h))[0]

    def _first_grams(self, h: Tensor) -> _Grams | None:
        """The Gram matrices of prepared inputs ``h`` with the support inputs, and with the
        detached support inputs (the factors of detached steps, when the inputs require grad;
        else the same matrix): the first layer's factors."""
        state = self.layers[0]
        if state.empty:
            return None
        live = _gram(h, self.support_in, state.has_bias)
        return live, _gram(h, self.support_in.detach(), state.has_bias) if state.split else live

    def dense_params(self) -> dict[str, Tensor]:
        """The adapted parameters of every task, densely: name -> ``(B, *shape)`` (one batched
        product per layer, ``W_T = W_0 - lr * sum_s delta_s^T h_s``), differentiable to the
        parameters. For evaluation or inspection: this forms the per-task weights that the
        factored path avoids."""
        out = {}
        num = self.num_tasks
        for lin, state, w, b in zip(self.spec.linears, self.layers, self.weights, self.biases,
                                    strict=True):
            wt = w.expand(num, *w.shape)
            bt = None if b is None else b.expand(num, *b.shape)
            if state.kind == "dense" and not state.empty:
                pairs = []
                wt = wt + state.dw
                bt = None if b is None else bt + state.dbias
            elif state.kind == "input":
                pairs = [(self.support_in, state.dsum), (self.support_in.detach(), state.dsum_det)]
            else:
                pairs = [] if state.empty else [(state.hs.cat(), state.ds.cat())]
            for h, d in pairs:  # W_T = W_0 + sum_s D_s^T h_s, b_T = b_0 + sum_s sum_n D_s
                if d is not None:
                    wt = wt + torch.bmm(d.transpose(1, 2), h)
                    bt = None if b is None else bt + d.sum(1)
            out[lin.weight] = wt
            if lin.bias is not None:
                out[lin.bias] = bt
        return out


def _check_loss(value: Tensor, num: int, where: str) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (num,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise BilevelInputError(f"loss_fn must return per-task losses of shape ({num},), got "
                                f"{shape} on the {where}")
    return value


def _resolve(layers: FactoredLayers | nn.Module) -> FactoredLayers:
    if isinstance(layers, FactoredLayers):
        return layers
    if isinstance(layers, nn.Module):
        return factored_layers(layers)
    raise BilevelInputError(f"layers must be a FactoredLayers (from factored_layers(model)) or "
                            f"the model, got {type(layers).__name__}")


def factored_adapt(
    layers: FactoredLayers | nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    lr: float | Tensor,
    steps: int,
    first_order: bool = False,
    window: int | None = None,
    *,
    strategy: Strategy = "auto",
) -> FactoredAdaptation:
    """Adapt every task with ``steps`` SGD steps at ``lr`` on its own support loss, starting
    from the shared ``params``; exact (not an approximation) and without per-task weights.

    Task ``b``'s inner gradient is the gradient of its mean support loss ``loss_fn(...)[b]``
    (the sum over tasks of the per-task losses is differentiated once). See the module
    docstring for the factorisation.

    Args:
        layers: :func:`factored_layers` of the model (or the model itself).
        params: name -> tensor as ``model.named_parameters()`` gives them, shared by all tasks
            (no task axis); extra names are ignored.
        support_x: ``(B, n_s, *features)``.
        support_y: ``(B, n_s, ...)`` targets, as ``loss_fn`` takes them.
        loss_fn: ``loss_fn(pred (B, n, out), y (B, n, ...)) -> (B,)`` per-task losses, e.g.
            :func:`per_task_cross_entropy`; task ``b``'s loss must depend on task ``b``'s
            predictions only (the inner gradients are taken of their sum).
        lr: the inner step size, a float or a scalar tensor (which may require grad).
        steps: the number of inner steps, ``>= 0``.
        first_order: do not differentiate through the inner gradients (first-order MAML: the
            adapted parameters depend on ``params`` only as ``params + constant``).
        window: differentiate through the last ``window`` steps only; the earlier steps'
            gradients are detached (``window=0`` is first-order). ``None``: every step.
        strategy: for the layers after the first: ``"auto"`` (per layer, by operation
            count), ``"factored"`` or ``"dense"`` (per-task weights ``(B, out, in)``, updated
            each step: for small layers); the result is the same up to rounding.

    Returns:
        A :class:`FactoredAdaptation`; its ``predict(x)`` are the adapted models' outputs.

    Raises:
        BilevelInputError: for a bad argument (a missing or mis-shaped parameter, inputs of
            the wrong shape, a ``loss_fn`` that does not return ``(B,)``, ``steps < 0``).
    """
    return _adapt(layers, params, support_x, support_y, loss_fn, lr, steps, first_order,
                  window, strategy, None)


def _adapt(layers: FactoredLayers | nn.Module, params: Mapping[str, Tensor], support_x: Tensor,
           support_y: Tensor, loss_fn: LossFn, lr: float | Tensor, steps: int,
           first_order: bool, window: int | None, strategy: Strategy,
           n_query: int | None) -> FactoredAdaptation:
    """:func:`factored_adapt`; ``n_query`` (the examples to predict after, if known) only
    informs the choice of strategy per layer."""
    spec = _resolve(layers)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise BilevelInputError(f"steps must be an int >= 0, got {steps!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 0):
        raise BilevelInputError(f"window must be None or an int >= 0, got {window!r}")
    if strategy not in ("auto", "factored", "dense"):
        raise BilevelInputError(f"strategy must be 'auto', 'factored' or 'dense', got "
                                f"{strategy!r}")
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise BilevelInputError(f"lr must be a float or a scalar tensor, got shape "
                                    f"{tuple(lr.shape)}")
        lr = lr.reshape(())
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise BilevelInputError(f"lr must be a float or a scalar tensor, got {lr!r}")
    else:
        lr = float(lr)
    weights, biases = [], []
    for lin in spec.linears:
        for name, shape in ((lin.weight, (lin.out_features, lin.in_features)),
                            (lin.bias, (lin.out_features,))):
            if name is None:
                continue
            if name not in params:
                raise BilevelInputError(f"params has no {name!r} (it has {sorted(params)})")
            if tuple(params[name].shape) != shape:
                raise BilevelInputError(f"params[{name!r}] has shape "
                                        f"{tuple(params[name].shape)}, expected {shape}")
        weights.append(params[lin.weight])
        biases.append(None if lin.bias is None else params[lin.bias])
    h0 = _prepare(spec, support_x, "support_x")
    num, n_s = h0.shape[:2]
    if support_y.dim() < 2 or support_y.shape[:2] != (num, n_s):
        raise BilevelInputError(f"support_y must lead with {(num, n_s)}, got shape "
                                f"{tuple(support_y.shape)}")
    live_steps = 0 if first_order else steps if window is None else min(window, steps)
    kinds = _choose(spec, steps, n_s, n_s if n_query is None else n_query, strategy)
    state = [_Layer(k, lin.bias is not None, steps, h0.requires_grad)
             for k, lin in zip(kinds, spec.linears, strict=True)]

    net = FactoredAdaptation(spec, weights, biases, lr, h0, state, steps)
    gram = _gram(h0, h0, state[0].has_bias) if steps else None
    grams = None if gram is None else (
        gram, _gram(h0, h0.detach(), state[0].has_bias) if h0.requires_grad else gram)
    base: dict[bool, Tensor] = {}  # the first layer's unadapted support outputs, once
    losses = None
    for t in range(steps):
        detached = t < steps - live_steps
        with torch.enable_grad():
            if detached not in base:
                w, b = weights[0], biases[0]
                if detached:
                    w, b = w.detach(), None if b is None else b.detach()
                base[detached] = F.linear(h0.detach() if detached else h0, w, b)
            first_base = base[True].requires_grad_() if detached else base[False]
            first = grams if grams is None or not detached else (grams[0].detach(),
                                                                   grams[1].detach())
            pred, zs, hs = net._forward(h0, first, first_base, detached, support=True)
            losses = _check_loss(loss_fn(pred, support_y), num, "support set")
            # the gradients of -lr * loss are the factors D = -lr * delta directly, except
            # where a detached step must keep its factors' graph to a tensor lr
            post = detached and isinstance(lr, Tensor) and lr.requires_grad
            deltas = torch.autograd.grad(losses.sum() * (1.0 if post else -lr), zs,
                                         create_graph=not detached)
        for layer, h, d in zip(state, hs, deltas, strict=True):
            layer.record(h.detach() if detached else h, d * -lr if post else d, detached)
    if losses is None:
        with torch.no_grad():
            losses = _check_loss(loss_fn(net.predict(support_x), support_y), num, "support set")
    net.support_losses = losses.detach()
    return net


def factored_query_losses(
    layers: FactoredLayers | nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    loss_fn: LossFn,
    lr: float | Tensor,
    steps: int,
    first_order: bool = False,
    window: int | None = None,
    *,
    strategy: Strategy = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-task query losses after ``steps`` SGD steps at ``lr`` on each task's support loss,
    starting from the shared ``params``: the MAML objective, with the graph to ``params``
    (and to ``lr`` when a tensor), computed exactly by the factored inner loop (see the
    module docstring) -- never forming per-task weights.

    Second order unless ``first_order``; with ``window=K`` only the last ``K`` steps are
    differentiated through, the earlier steps' gradients detached (``window=0`` equals
    first-order: the adapted parameters still depend on ``params`` as ``params + offset``).
    The meta-gradient is ``torch.autograd.grad(query_losses.mean(), list(params.values()))``.

    Args:
        query_x: ``(B, n_q, *features)``.
        query_y: ``(B, n_q, ...)`` targets.
        layers, params, support_x, support_y, loss_fn: as :func:`factored_adapt`.
        lr, steps, first_order, window, strategy: as :func:`factored_adapt`.

    Returns:
        ``(query_losses, support_losses)``, both ``(B,)``: ``query_losses`` carries the graph;
        ``support_losses`` are the detached per-task support losses at the last inner step
        (before its update; unadapted when ``steps == 0``).

    Raises:
        BilevelInputError: as :func:`factored_adapt`, and for query tensors whose task axis or
            shapes do not match.
    """
    net = _adapt(layers, params, support_x, support_y, loss_fn, lr, steps, first_order, window,
                 strategy, query_x.shape[1] if isinstance(query_x, Tensor) else None)
    pred = net.predict(query_x)
    if query_y.dim() < 2 or query_y.shape[:2] != pred.shape[:2]:
        raise BilevelInputError(f"query_y must lead with {tuple(pred.shape[:2])}, got shape "
                                f"{tuple(query_y.shape)}")
    return _check_loss(loss_fn(pred, query_y), net.num_tasks, "query set"), net.support_losses


def factored_adapted(
    layers: FactoredLayers | nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    lr: float | Tensor,
    steps: int,
    first_order: bool = False,
    window: int | None = None,
    *,
    strategy: Strategy = "auto",
) -> dict[str, Tensor]:
    """The adapted parameters of every task, dense: name -> ``(B, *shape)`` (e.g. weights
    ``(B, out, in)``), as :func:`factored_adapt` then
    :meth:`FactoredAdaptation.dense_params`; usable with ``torch.func.functional_call`` per
    task or under ``vmap``.

    Raises:
        BilevelInputError: as :func:`factored_adapt`.
    """
    return factored_adapt(layers, params, support_x, support_y, loss_fn, lr, steps,
                          first_order, window, strategy=strategy).dense_params()


def factored_predict(
    layers: FactoredLayers | nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    x: Tensor,
    loss_fn: LossFn,
    lr: float | Tensor,
    steps: int,
    first_order: bool = True,
    *,
    strategy: Strategy = "auto",
) -> Tensor:
    """The outputs ``(B, n, out)`` on ``x`` ``(B, n, *features)`` of each task's model adapted
    on its support set (as :func:`factored_adapt`; first-order by default, the cheaper choice
    for evaluation -- the values are the same).

    Raises:
        BilevelInputError: as :func:`factored_adapt`.
    """
    return factored_adapt(layers, params, support_x, support_y, loss_fn, lr, steps,
                          first_order, strategy=strategy).predict(x)

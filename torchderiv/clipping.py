"""``torchderiv.per_sample(model)``: each example's gradient norm, gradient and flat clipping, in one backward.

Inside the context, one ordinary ``loss.backward()`` of a model built from torchderiv's modules also
gives every example's gradient norm (``ps.norms``), optionally clips each example's gradient before the
sum that lands in ``.grad`` (``max_norm``), and optionally stores each example's gradient
(``p.grad_sample``). The formulas and where they run are in ``docs/derivation.md`` §"Per-example
gradients" and :mod:`torchderiv.functional._per_sample`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .functional import _per_sample, _torch_internals
from .nn.convert import MODULE_TWINS, embedding_options
from .nn.modules import (
    Conv1d,
    Conv2d,
    GroupNorm,
    LinearCrossEntropyLoss,
    MultiheadAttention,
    Positional,
    TorchderivModule,
    attention_options,
)

__all__ = ["per_sample", "PerSample"]


def _own_batch_first(module: nn.Module) -> bool | None:
    """The layout a torch transformer module declares for the inputs of the Linears it holds (None: not one):
    an encoder/decoder layer's linear1/linear2 see the layer's own input, (B, T, d) or (T, B, d), as its
    attention (``self_attn.batch_first``) is told."""
    if isinstance(module, MultiheadAttention):
        return False  # it works sequence-first whatever its batch_first: its projections see (T, B, d)
    if isinstance(module, (Conv1d, Conv2d, GroupNorm)):
        return True  # (N, C, *spatial): torch's convolutions and GroupNorm take the batch first whatever the layout
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        module = module.self_attn
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer, Positional)):
        return bool(module.batch_first)
    return None


def check_model(model: nn.Module) -> dict:
    """``{id(p): (p, name)}`` of the parameters to track; one clear error naming every part of the model whose
    per-example gradient cannot be computed exactly, each with what to do instead."""
    tracked: dict[int, tuple[torch.Tensor, str]] = {}
    owner: dict[int, str] = {}
    modules = list(model.named_modules(remove_duplicate=False))  # one walk of the model for both loops
    # what torchderiv's modules say their Functions hand per_sample a rule for (TorchderivModule)
    covered = {id(p) for _, m in modules if isinstance(m, TorchderivModule) for p in m.per_sample_parameters()}
    problems: list[str] = []
    uncovered: dict[str, tuple[nn.Module, list[str]]] = {}  # module name -> (module, its parameters' names)
    for mod_name, module in modules:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            problems.append(
                f"{mod_name or 'the model'} ({type(module).__name__}) is in training mode: batch statistics mix the "
                f"examples, so no example has a gradient of its own; use GroupNorm/LayerNorm or call .eval() on it"
            )
        for p_name, p in module._parameters.items():
            if p is None or not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in owner:
                problems.append(
                    f"parameter {name} is also {owner[id(p)]} (tied weights): each example's gradient is then a sum "
                    f"whose norm the per-layer factors do not give; untie them or freeze one"
                )
                continue
            owner[id(p)] = name
            if id(p) not in covered:
                uncovered.setdefault(mod_name, (module, []))[1].append(name)
                continue
            tracked[id(p)] = (p, name)
    for mod_name, (module, names) in uncovered.items():
        problems.append(
            f"parameter{'s' if len(names) > 1 else ''} {', '.join(names)} of {type(module).__name__}: not computed by "
            f"torchderiv's Functions (Linear, Dense, MLP, LayerNorm, RMSNorm, Embedding, Positional, "
            f"LinearCrossEntropyLoss), so the per-example gradient is unknown; {_alternative(model, mod_name, module)}"
        )
    if problems:
        raise RuntimeError(
            f"per_sample: {len(problems)} part{'s' if len(problems) > 1 else ''} of the model cannot be clipped per "
            f"example:\n  - " + "\n  - ".join(problems)
        )
    return tracked


def _alternative(model: nn.Module, mod_name: str, module: nn.Module) -> str:
    """What to do about a module whose trainable parameters no torchderiv Function computes."""
    freeze = f"freeze it ({mod_name or 'model'}.requires_grad_(False))"
    parent = model.get_submodule(mod_name.rpartition(".")[0]) if mod_name else None
    if isinstance(parent, LinearCrossEntropyLoss):
        return (
            f"a K-dimensional LinearCrossEntropyLoss (out_features={parent.out_features}) runs outside the fused "
            f"Function: {freeze}"
        )
    attention = module if isinstance(module, nn.MultiheadAttention) else parent
    options = (
        attention_options(attention)
        if isinstance(attention, nn.MultiheadAttention)
        else embedding_options(module)
        if isinstance(module, nn.Embedding)
        else []
    )
    if options:
        return f"{', '.join(options)}: not supported by torchderiv's Function; {freeze}"
    if type(module) in MODULE_TWINS or isinstance(attention, nn.MultiheadAttention):
        return "convert the model first with torchderiv.convert(model)"
    if not type(module).__module__.startswith(("torch.", "torchderiv.")):
        # a parameter of the user's own module, used directly in its forward (x + self.pos)
        return (
            f"a parameter used directly in a forward has no Function to compute its per-example gradient: hold an "
            f"added position parameter in torchderiv.nn.Positional (or look positions up in torchderiv.nn.Embedding), "
            f"or {freeze}"
        )
    return f"{freeze} or leave it out of the model"


def _layouts(model: nn.Module, tracked: dict, batch_first: bool) -> dict[int, int]:
    """``{id(p): 0 or 1}`` for the tracked parameters: where the examples are in their layer's (3-D or longer)
    inputs. ``batch_first`` decides, except inside torch's transformer modules, whose own ``batch_first`` does."""
    layouts: dict[int, int] = {}
    # NOTE: a stack, in the order of a recursive walk: a nested function that calls itself is a reference cycle,
    # which only the garbage collector frees (once per context, per step)
    stack = [(model, 0 if batch_first else 1)]
    while stack:
        module, layout = stack.pop()
        own = _own_batch_first(module)
        if own is not None:
            layout = 0 if own else 1
        for p in module._parameters.values():
            if p is not None and id(p) in tracked:
                layouts[id(p)] = layout
        stack += [(child, layout) for child in reversed(list(module.children()))]
    return layouts


class PerSample:
    """The context :func:`per_sample` returns; after each backward inside it:

    Attributes:
        norms: ``(B,)``, each example's gradient norm over the tracked parameters (float32, or float64
            for a float64 model), from the latest backward pass; None before the first.
        max_norm, grad_sample, loss_reduction, clipped_sum, loss_scale, batch_first: as given.
    """

    def __init__(
        self,
        model: nn.Module,
        max_norm,
        grad_sample,
        loss_reduction,
        clipped_sum=False,
        loss_scale=None,
        batch_first=True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"per_sample: expected an nn.Module, got {type(model).__name__}")
        if max_norm is not None and not (
            isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)
        ):
            raise ValueError(f"per_sample: expected max_norm to be a positive finite number or None, got {max_norm!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"per_sample: expected loss_reduction 'mean' or 'sum', got {loss_reduction!r}")
        _check_loss_scale(loss_scale)
        if not isinstance(batch_first, bool):
            raise TypeError(f"per_sample: expected batch_first to be True or False, got {batch_first!r}")
        self.model = model
        self.batch_first = batch_first
        self.max_norm = None if max_norm is None else float(max_norm)
        self.grad_sample = bool(grad_sample)
        self.loss_reduction = loss_reduction
        self.clipped_sum = bool(clipped_sum)
        self.loss_scale = loss_scale
        self._recorder: _per_sample.Recorder | None = None
        self._hooks: list = []

    @property
    def norms(self) -> torch.Tensor | None:
        return None if self._recorder is None else self._recorder.norms

    def __enter__(self) -> PerSample:
        if _per_sample.current is not None:
            raise RuntimeError("per_sample: contexts do not nest; one is already active")
        _torch_internals.require()  # the torch internals the clipping relies on still behave as it expects
        tracked = check_model(self.model)
        self._recorder = _per_sample.Recorder(
            tracked,
            self.max_norm,
            self.grad_sample,
            self.loss_reduction,
            self.clipped_sum,
            self.loss_scale,
            recheck=functools.partial(check_model, self.model),  # not a lambda of self: no cycle through it
            layouts=_layouts(self.model, tracked, self.batch_first),
        )
        # partials of module-level functions: a model deep-copied or pickled inside the context copies them as is
        note = functools.partial(_note_batch, id(self.model), self.batch_first)
        self._hooks.append(self.model.register_forward_pre_hook(note, with_kwargs=True))
        done = functools.partial(_forward_done, id(self.model))
        self._hooks.append(self.model.register_forward_hook(done, always_call=True))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Only where DistributedDataParallel can run; a global hook, as the DDP wrapper may sit above `model`
            self._hooks.append(nn.modules.module.register_module_forward_pre_hook(_refuse_synced_ddp(tracked)))
        for p, name in tracked.values():
            # A gradient reaching a tracked parameter by autograd means an op other than torchderiv's
            # Functions used it (torchderiv's defer theirs and return None): its norm would be missed.
            self._hooks.append(p.register_hook(_foreign(name)))
        _per_sample.current = self._recorder
        return self

    def __exit__(self, *exc) -> None:
        _per_sample.current = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _note_batch(model_id: int, batch_first: bool, module, args, kwargs) -> None:
    """The model's forward pre-hook: read B off its input (the first tensor argument); every tracked layer whose
    forward runs inside this one must then see B examples in its backward, or the norms would be per row or per
    position (``Recorder._one_batch``). A copy of the model made inside the context carries the hook but is not the
    model. Pushed here, popped by :func:`_forward_done`."""
    rec = _per_sample.current
    if rec is None or id(module) != model_id:
        return
    found = None
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            dim = 0 if batch_first or t.dim() < 2 else 1
            if t.dim() > dim:
                found = (t.shape[dim], f"{tuple(t.shape)} along dim {dim} (batch_first={batch_first})")
            break
    rec.inputs.append(found)


def _forward_done(model_id: int, module, args, output) -> None:
    """The model's forward hook (also called when the forward raised): the end of that model forward."""
    rec = _per_sample.current
    if rec is not None and id(module) == model_id and rec.inputs:
        rec.inputs.pop()


def _check_loss_scale(loss_scale) -> None:
    if loss_scale is None or callable(getattr(loss_scale, "get_scale", None)):
        return
    if isinstance(loss_scale, torch.Tensor):
        if loss_scale.numel() == 1 and loss_scale.is_floating_point():
            return
    elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        if loss_scale > 0 and math.isfinite(loss_scale):
            return
    what = (
        f"a tensor of shape {tuple(loss_scale.shape)} and dtype {loss_scale.dtype}"
        if isinstance(loss_scale, torch.Tensor)
        else repr(loss_scale)
    )
    raise ValueError(
        f"per_sample: expected loss_scale to be None, a positive finite number, a one-element floating tensor or a "
        f"GradScaler, got {what}"
    )


def _refuse_synced_ddp(tracked: dict):
    """A forward pre-hook on every module: refuse a DistributedDataParallel forward over tracked parameters that
    prepares an all-reducing backward. DDP's reducer all-reduces .grad when each parameter's accumulator runs,
    before the end of the pass where the clipped gradients are made, and then writes its result over them:
    .grad came out zero (or, with find_unused_parameters, each process's own), silently."""
    from torch.nn.parallel import DistributedDataParallel

    def hook(module, args):
        if (
            isinstance(module, DistributedDataParallel)
            and module.require_backward_grad_sync
            and torch.is_grad_enabled()
            and any(id(p) in tracked for p in module.module.parameters())
        ):
            raise RuntimeError(
                "per_sample: a DistributedDataParallel forward that all-reduces in its backward: DDP would reduce "
                ".grad before the (clipped) gradients are made at the end of the pass and overwrite them; run the "
                "forward and backward under ddp.no_sync() and all-reduce the gradients after the pass (Opacus's "
                "DistributedDPOptimizer, torchderiv.privacy.private_optimizer(..., distributed=True), does it for "
                "clipped sums, adding the noise once)"
            )

    return hook


def _foreign(name: str):
    def hook(grad):
        if grad is not None:
            raise RuntimeError(
                f"per_sample: parameter {name} received a gradient from an op that is not one of torchderiv's "
                f"Functions (a direct use of the parameter, a torch op, a parametrization), so its per-example "
                f"gradient is unknown"
            )

    return hook


def per_sample(
    model: nn.Module,
    *,
    max_norm: float | None = None,
    grad_sample: bool = False,
    loss_reduction: str = "mean",
    clipped_sum: bool = False,
    loss_scale=None,
    batch_first: bool = True,
) -> PerSample:
    """Per-example gradient norms, flat clipping and per-example gradients in the ordinary backward.

    Inside ``with torchderiv.per_sample(model, ...) as ps:`` one ``loss.backward()`` of a model built from
    torchderiv's modules — ``Linear``, ``Dense``, ``MLP``, ``Conv1d``, ``Conv2d``, ``LayerNorm``, ``RMSNorm``,
    ``GroupNorm``, ``Embedding``, ``Positional``, ``MultiheadAttention``, ``LinearCrossEntropyLoss``, with any of its
    activations and losses — or of a torch model after :func:`torchderiv.convert` (a whole transformer or CNN) also
    gives, for every example i of the batch (along dim 0 of the model's input, or dim 1 with ``batch_first=False``):

    - ``ps.norms[i] = ‖gᵢ‖``, the norm over every parameter of ``model`` that requires grad of example
      i's gradient ``gᵢ``: the gradient of example i's own term of the batch loss (the batch's divisor
      kept), times B for ``loss_reduction="mean"`` (Opacus's convention);
    - with ``max_norm=C``: ``.grad`` receives ``Σᵢ cᵢ gᵢ`` (divided by B for "mean"),
      ``cᵢ = min(1, C / (‖gᵢ‖ + 1e-6))``, instead of the unclipped ``Σᵢ gᵢ`` (/ B);
    - with ``grad_sample=True``: ``p.grad_sample``, ``(B, *p.shape)``, each example's (unclipped) ``gᵢ``.

    The examples' dim is never guessed: each tracked layer reads example i's rows along dim 0 of its input
    ``(B, T, …, n)``, or dim 1 ``(T, B, …, n)`` with ``batch_first=False`` (Opacus's argument), except inside
    torch's ``TransformerEncoderLayer``/``TransformerDecoderLayer``, whose own ``batch_first`` decides; a 2-D
    input is ``(B, n)`` either way. Every tracked layer, and the model's input (its first tensor argument) of
    the forward each layer ran inside, must then show the same B, or the backward raises naming each: a sequence-first
    input read batch-first, or a batch folded into rows (``x.reshape(-1, n)``), would give per-position or
    per-row norms.

    Each parameter-holding Function hands the recorder one rule (``functional/_per_sample.py``): for a dense
    layer ``‖gᵢ‖²`` takes ``‖δᵢ‖² ‖hᵢ‖²`` (or the Gram form for inputs ``(B, T, n)``) plus the bias's
    ``‖Σ_t δᵢₜ‖²``, and the clipped gradient is the ordinary GEMM with scaled rows ``(c ⊙ Δ)ᵀ H``; a convolution
    is the dense layer over its patches (T = output positions), and norms, embeddings (repeated tokens exact) and
    positions have theirs (docs/derivation.md): one backward pass.
    Activation checkpointing (reentrant or not) and ``save_on_cpu`` work inside the context.
    Refused with a clear error: parameters that torchderiv's Functions do not compute (unless frozen),
    parameters used twice in one forward (tied weights, a module called twice), BatchNorm in training mode,
    ``create_graph=True``, torch.func transforms, a pass that does not accumulate into every tracked
    ``.grad`` (``torch.autograd.grad``, ``backward(inputs=...)`` leaving one out) inside the context, and a
    ``DistributedDataParallel`` forward there outside ``ddp.no_sync()`` (its reducer would all-reduce ``.grad``
    before the clipped gradients exist and overwrite them; all-reduce after the pass instead).

    Args:
        model: the module whose trainable parameters are clipped.
        max_norm: C, or None for norms (and ``grad_sample``) only.
        grad_sample: also store ``p.grad_sample``.
        loss_reduction: how the loss reduces over the batch, ``"mean"`` or ``"sum"``.
        clipped_sum: ``.grad`` receives ``Σᵢ cᵢ gᵢ`` also for "mean" (not divided by this batch's size):
            what Opacus's ``DPOptimizerFastGradientClipping`` takes, which then adds the noise and divides by
            the *expected* batch size (Poisson sampling varies the actual one).
        batch_first: where the examples are in the model's input and in the (3-D or longer) inputs of its
            tracked layers: dim 0 (True) or dim 1 (False, torch's sequence-first ``(T, B, …)`` layout).
        loss_scale: S when the loss that is backpropagated is S times the loss (mixed precision's loss
            scaling): a number, a one-element tensor, or a ``torch.amp.GradScaler``, whose current scale is
            read at the end of each backward pass. Norms, clipping factors and ``grad_sample`` are then of the
            unscaled loss (example i's gradient is the backward's ``S gᵢ`` divided by S), while ``.grad`` keeps
            the scale, ``S Σᵢ cᵢ gᵢ`` (/ B), for the scaler's ``unscale_``/``step`` as without the context.
            Without it, a scaled loss would be clipped at ``S‖gᵢ‖``: every example S times too strongly.

    Example::

        >>> with torchderiv.per_sample(model, max_norm=1.0) as ps:
        ...     F.cross_entropy(model(x), y).backward()
        >>> ps.norms.shape
        torch.Size([B])
    """
    return PerSample(model, max_norm, grad_sample, loss_reduction, clipped_sum, loss_scale, batch_first)

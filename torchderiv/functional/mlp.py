"""The whole seed network in one Function: forward propagation (§2), the loss, and the backward pass (§3).

Holding every layer in one Function lets backward choose what to keep: for activations whose
derivative needs ``z`` (gelu, silu, softplus) only ``Z⁽ᵏ⁾`` is kept and ``H⁽ᵏ⁾ = g(Z⁽ᵏ⁾)`` is recomputed
when the next layer's weight gradient needs it, where autograd keeps both ``Z⁽ᵏ⁾`` and ``H⁽ᵏ⁾``.
With the cross-entropy folded in (:func:`mlp_cross_entropy`), a training step is one autograd node, as
in the seed's backprop, which starts from the loss (§3.1) and runs to the first layer (§3.6).
"""

from __future__ import annotations

import math

import torch

from . import _per_sample
from . import _torch_internals as internals
from ._core import (
    apply,
    autocast_apply,
    autocast_cast,
    autocast_enabled,
    check_reduction,
    compile_twin,
    may_overwrite,
    save_for_forward,
)
from .activations import ACTIVATIONS, DEFAULT_PARAMS, get_activation, times
from .linear import check_linear_args, linear_backward, linear_forward, linear_jvp
from .losses import ce_grads, ce_jvp, ce_value, check_cross_entropy_args, softmax_minus_one_hot_

__all__ = ["MLPFunction", "mlp", "mlp_cross_entropy", "mlp_layers", "mlp_cross_entropy_layers", "check_layers"]

_LAYERS = 6  # index of W⁽¹⁾ among MLPFunction's inputs


class MLPFunction(torch.autograd.Function):
    """``Z⁽ᵏ⁾ = H⁽ᵏ⁻¹⁾ W⁽ᵏ⁾ᵀ + b⁽ᵏ⁾``, ``H⁽ᵏ⁾ = g(Z⁽ᵏ⁾)`` for k = 1 … L, the linear output ``Z⁽ᴸ⁺¹⁾``,
    and optionally the cross-entropy ``J(Z⁽ᴸ⁺¹⁾, T)``.

    Inputs: ``(X, T, w, activation, act_params, loss, W⁽¹⁾, b⁽¹⁾, …, W⁽ᴸ⁺¹⁾, b⁽ᴸ⁺¹⁾)`` (biases may be
    None). ``loss`` is None (no loss; T and the class weights w are None) or
    ``(reduction, ignore_index, label_smoothing, upcast)``, ``upcast`` asking for the loss in float32
    from half-precision logits (torch's autocast policy for cross_entropy).
    Outputs: ``(Z⁽ᴸ⁺¹⁾, S⁽¹⁾, …, S⁽ᴸ⁾)``, or ``(J, Z⁽ᴸ⁺¹⁾, S⁽¹⁾, …, S⁽ᴸ⁾)`` with a loss, where ``S⁽ᵏ⁾``
    is what backward keeps of layer k — ``H⁽ᵏ⁾`` when ``g'`` is exact from the output (relu, tanh,
    sigmoid, …), ``Z⁽ᵏ⁾`` otherwise. They are outputs so that they can be saved; they stay
    differentiable, and a gradient arriving for one is added in.

    backward (seed §3.1 and §3.6, batched): ``Δ⁽ᴸ⁺¹⁾ = ∂J/∂Z⁽ᴸ⁺¹⁾`` — with the loss, ``s (p − y) / D``
    (class weights and smoothing as in :func:`~torchderiv.functional.cross_entropy`) — then for
    k = L+1 … 1: ``∂J/∂W⁽ᵏ⁾ = Δ⁽ᵏ⁾ᵀ H⁽ᵏ⁻¹⁾``, ``∂J/∂b⁽ᵏ⁾ = Σ_rows Δ⁽ᵏ⁾``,
    ``Δ⁽ᵏ⁻¹⁾ = (Δ⁽ᵏ⁾ W⁽ᵏ⁾) ⊙ g'(Z⁽ᵏ⁻¹⁾)``, and ``∂J/∂X = Δ⁽¹⁾ W⁽¹⁾``. A plain training step (only the first
    output differentiated, no options, every parameter trained; :func:`_plain_case`) runs these formulas as they
    stand (:func:`_plain_backward`); the general loop adds what options, frozen layers and double backward need.
    jvp: ``dZ⁽ᵏ⁾ = dH⁽ᵏ⁻¹⁾ W⁽ᵏ⁾ᵀ + H⁽ᵏ⁻¹⁾ dW⁽ᵏ⁾ᵀ + db⁽ᵏ⁾``, ``dH⁽ᵏ⁾ = g'(Z⁽ᵏ⁾) ⊙ dZ⁽ᵏ⁾``, then
    ``dJ = reduce(Σ_c ∂ℓ/∂z_c dz_c + ∂ℓ/∂t_c dt_c)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, activation, act_params, loss, *layers):
        act = get_activation(activation)
        keep_h = act.saves_output(*act_params)
        # When only H is kept, g is applied in place: Z is our own fresh GEMM result, needed no more.
        value = act.value_ if keep_h else act.value
        h, kept = input, []
        for k in range(0, len(layers) - 2, 2):
            z = linear_forward(h, layers[k], layers[k + 1])
            h = value(z, *act_params)
            kept.append(h if keep_h else z)
        z = linear_forward(h, layers[-2], layers[-1])
        if loss is None:
            return (z, *kept)
        return (ce_value(_loss_logits(z, loss), target, weight, *loss[:3]), z, *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, activation, act_params, loss, *layers = inputs
        ctx.activation, ctx.act_params, ctx.loss, ctx.n_layers = activation, act_params, loss, len(layers) // 2
        ctx.set_materialize_grads(False)
        kept = output if loss is None else output[1:]  # Z⁽ᴸ⁺¹⁾ (kept only with a loss), S⁽¹⁾ … S⁽ᴸ⁾
        ctx.save_for_backward(input, target, weight, *layers, *kept[loss is None :])
        save_for_forward(ctx, input, target, weight, *layers, *kept[loss is None :])
        ctx.plain = _plain_case(ctx, input, target, weight, activation, act_params, loss, layers, kept)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, *layers)

    @staticmethod
    def _unpack(ctx):
        saved = ctx.saved_tensors
        n = ctx.n_layers
        act = get_activation(ctx.activation)
        layers, rest = saved[3 : 3 + 2 * n], saved[3 + 2 * n :]
        z = None if ctx.loss is None else rest[0]
        return act, saved[0], saved[1], saved[2], layers, z, rest[ctx.loss is not None :]

    @staticmethod
    def backward(ctx, *grads):
        if ctx.plain:
            step = _plain_backward(ctx, grads)
            if step is not None:
                return step
        act, input, target, weight, layers, z, kept = MLPFunction._unpack(ctx)
        params, needs, n = ctx.act_params, ctx.needs_input_grad, ctx.n_layers
        writable = may_overwrite(next((g for g in grads if g is not None), None))  # may overwrite its own buffers
        delta, grad_kept, grad_target = _output_error(ctx, grads, z, target, weight, writable)  # Δ⁽ᴸ⁺¹⁾, §3.1
        first = _first_needing(needs, n)
        layer_grads, grad_input = [None] * (2 * n), None
        for k in range(n - 1, -1, -1):  # layer k + 1 of the derivation, from the output back (§3.2–3.5)
            gi, factor = None, None
            if delta is not None:
                h_prev, factor = _layer_input(act, params, input, kept, k, needs, first, writable)  # H⁽ᵏ⁾
                gi, layer_grads[2 * k], layer_grads[2 * k + 1] = _dense_gradients(ctx, k, first, delta, h_prev, layers)
            if k == 0:
                grad_input = gi  # ∂J/∂X = Δ⁽¹⁾ W⁽¹⁾
                break
            delta = _previous_error(act, params, gi, factor, kept[k - 1], grad_kept[k - 1], writable)  # (ΔW) ⊙ g'(Z)
        return (grad_input, grad_target if needs[1] else None, None, None, None, None, *layer_grads)

    @staticmethod
    def jvp(ctx, d_input, d_target, _weight, _activation, _act_params, _loss, *d_layers):
        act, input, target, weight, layers, z, kept = MLPFunction._unpack(ctx)
        params, loss = ctx.act_params, ctx.loss
        keep_h = act.saves_output(*params)
        h, dh, d_kept = input, d_input, []
        for k in range(ctx.n_layers):
            dz = linear_jvp(h, layers[2 * k], layers[2 * k + 1], dh, d_layers[2 * k], d_layers[2 * k + 1])
            if k == ctx.n_layers - 1:
                break
            h = kept[k] if keep_h else act.value(kept[k], *params)  # H⁽ᵏ⁺¹⁾, the next layer's input
            dh = act.backprop(dz, kept[k], *params)  # dH = g'(Z) ⊙ dZ
            d_kept.append(dh if keep_h else dz)
        if loss is None:
            return (dz, *d_kept)
        logits = _loss_logits(z, loss)
        d_loss = ce_jvp(logits, target, weight, *loss[:3], _loss_logits(dz, loss), d_target)
        return (d_loss, dz, *d_kept)


# --- a training step's backward: the chain rule and nothing else -----------------------------------------------


def _plain_case(ctx, input, target, weight, activation, act_params, loss, layers, kept) -> bool:
    """Whether this application is a plain training step on CPU, whose backward :func:`_plain_backward` may take:
    rows ``(N, n_0)``, an activation whose derivative reads ``H``, every parameter needing its gradient, and with a
    loss, a "mean" or "sum" cross-entropy on class indices with no class weights or smoothing, in the logits' dtype.
    """
    # forward has checked the activation's name
    if input.dim() != 2 or not input.is_cpu or not ACTIVATIONS[activation].saves_output(*act_params):
        return False
    needs = ctx.needs_input_grad[_LAYERS:]
    if False in needs and not all(need or t is None for need, t in zip(needs, layers)):
        return False
    if loss is None:
        return True
    if loss[0] == "none" or weight is not None or loss[2] != 0 or target.is_floating_point():
        return False
    return not loss[3] or kept[0].dtype not in _HALF  # no float32 upcast of half-precision logits


def _plain_backward(ctx, grad_outputs):
    """The whole backward pass of a plain training step (seed §3.1–3.6), or None where it does not apply (a gradient
    arriving for another output than the first, rows ignored, an inf or NaN reaching a masked layer, a per_sample
    context, a backward that is itself differentiated): the general loop then runs from the saved tensors, which
    this pass leaves untouched.

    ``Δ⁽ᴸ⁺¹⁾ = s (P − Y) / D`` (or the logits' gradient ``grad`` without a loss); for k = L+1 … 1:
    ``∂J/∂W⁽ᵏ⁾ = Δ⁽ᵏ⁾ᵀ H⁽ᵏ⁻¹⁾``, ``∂J/∂b⁽ᵏ⁾ = Σ_rows Δ⁽ᵏ⁾``, ``Δ⁽ᵏ⁻¹⁾ = (Δ⁽ᵏ⁾ W⁽ᵏ⁾) ⊙ g'(Z⁽ᵏ⁻¹⁾)``;
    ``∂J/∂X = Δ⁽¹⁾ W⁽¹⁾`` if asked. Each Δ is built in place in a buffer of its own (the softmax, then each fresh
    ``Δ W``): the bare formulas, at what they cost (docs/performance.md).
    """
    grad = grad_outputs[0]
    if grad is None or _per_sample.current is not None or not may_overwrite(grad):
        return None
    for g in grad_outputs[1:]:  # the logits with a loss, the kept S⁽ᵏ⁾
        if g is not None:
            return None
    saved = ctx.saved_tensors
    n, loss = ctx.n_layers, ctx.loss
    layers = saved[3 : 3 + 2 * n]
    if loss is None:
        delta, kept = grad, saved[3 + 2 * n :]
    else:
        # Δ⁽ᴸ⁺¹⁾ = s (softmax(Z) − Y) / D (§3.1), None when a row is ignored (the general loop makes the softmax again)
        delta = softmax_minus_one_hot_(saved[3 + 2 * n].softmax(1), saved[1], loss[1], grad, loss[0], True)
        kept = saved[4 + 2 * n :]
        if delta is None:
            return None
    act, params = ACTIVATIONS[ctx.activation], ctx.act_params
    mask = act.mask_
    # With the loss, a NaN unit of H⁽ᵏ⁾ makes its row of Z⁽ᴸ⁺¹⁾, of the softmax and so of every Δ NaN (NaN · w is NaN
    # for every w): the mask need not pass Δ there, the check below finds the row.
    nan_h_makes_delta_nan = loss is not None
    grads = [None] * (2 * n)
    for k in range(n - 1, -1, -1):
        h = kept[k - 1] if k else saved[0]
        grads[2 * k] = delta.t().mm(h)
        if layers[2 * k + 1] is not None:
            grads[2 * k + 1] = delta.sum(0)
        if k:
            gi = delta.mm(layers[2 * k])
            if mask is not None:
                delta = mask(gi, h, nan_h_makes_delta_nan)
            else:
                delta = act.backprop(gi, h, *params, overwrite_d=True)
    # A float 0/1 mask (act.mask_) is exact where Δ W is finite; torch's select gives 0 where an inf or NaN meets a
    # unit that is off, the mask NaN. A non-finite entry of a masked Δ makes its whole row non-finite in every Δ
    # below it (Δ W spreads it along the row, the mask keeps it), so the first layer's Δ tells for all of them: one
    # sum of its column sums (its bias gradient), and the general loop, with the select, where it is not finite.
    if mask is not None and n > 1:
        sums = grads[1] if grads[1] is not None else delta.sum(0)
        if not math.isfinite(sums.sum().item()):
            return None
    grad_input = delta.mm(layers[0]) if ctx.needs_input_grad[0] else None
    return (grad_input, None, None, None, None, None, *grads)


# --- the steps of MLPFunction.backward ---------------------------------------------------------------------------


def _output_error(ctx, grads, z, target, weight, writable):
    """``(Δ⁽ᴸ⁺¹⁾, the gradients of the kept S⁽ᵏ⁾, ∂J/∂T)``: with the loss, ``Δ⁽ᴸ⁺¹⁾ = ∂J/∂Z⁽ᴸ⁺¹⁾`` (§3.1) plus
    whatever gradient reached the logits output itself; without, the logits' incoming gradient."""
    loss = ctx.loss
    if loss is None:
        return grads[0], grads[1:], None
    grad_loss, delta, grad_kept = grads[0], grads[1], grads[2:]
    grad_target = None
    if grad_loss is not None:
        logits = _loss_logits(z, loss)
        g_z, grad_target = ce_grads(logits, target, weight, loss[1], loss[2], grad_loss, loss[0], inplace=writable)
        g_z = g_z if g_z.dtype == z.dtype else g_z.to(z.dtype)
        delta = g_z if delta is None else g_z + delta
    return delta, grad_kept, grad_target


def _first_needing(needs, n: int) -> int:
    """The first layer (0-based) with a parameter that needs a gradient, -1 when the input itself needs one: layer k
    computes ``Δ W`` only if k is above it."""
    if needs[0]:
        return -1
    for k in range(n):
        if needs[_LAYERS + 2 * k] or needs[_LAYERS + 1 + 2 * k]:
            return k
    return n


def _layer_input(act, params, input, kept, k, needs, first, writable):
    """``(H, g'(Z))`` for layer k's weight gradient: its input H, made again as ``g(Z)`` when only Z was kept,
    with ``g'(Z)`` from the same costly part when the previous error will need it (else None)."""
    h_prev = input if k == 0 else kept[k - 1]
    if k > 0 and not act.saves_output(*params) and needs[_LAYERS + 2 * k]:
        if k > first and act.factor is not None:
            factor, h_prev = act.factor(h_prev, *params, writable=writable, value=True)
            return h_prev, factor
        h_prev = act.value(h_prev, *params)
    return h_prev, None


def _dense_gradients(ctx, k, first, delta, h_prev, layers):
    """``(Δ W, Δᵀ H, Σ_rows Δ)`` of layer k (B1–B3 of docs/derivation.md), each only if needed; inside a per_sample
    context the weight GEMMs of tracked parameters are left to the recorder."""
    needs = ctx.needs_input_grad
    layer_needs = (k > first, needs[_LAYERS + 2 * k], needs[_LAYERS + 1 + 2 * k])
    w, b = layers[2 * k : 2 * k + 2]
    if _per_sample.current is not None:
        layer_needs = _per_sample.defer(layer_needs, delta, h_prev, w, b, _per_sample.tracked_pair(ctx, k))
    return linear_backward(layer_needs, delta, h_prev, w, b)


def _previous_error(act, params, gi, factor, kept, g_kept, writable):
    """``Δ⁽ᵏ⁻¹⁾ = (Δ⁽ᵏ⁾ W⁽ᵏ⁾) ⊙ g'(Z⁽ᵏ⁻¹⁾)`` (B4), with a gradient that reached the kept ``S⁽ᵏ⁻¹⁾`` itself (double
    backward) added in: to ``Δ W`` when S is H, to the product when S is Z. ``Δ W`` is a fresh GEMM result, which
    the product may overwrite in a plain backward."""
    keep_h = act.saves_output(*params)
    fresh = writable and gi is not None
    if keep_h and g_kept is not None:
        gi = g_kept if gi is None else gi + g_kept
    if gi is None:
        delta = None
    elif factor is not None:
        delta = times(gi, factor, writable, fresh)
    else:
        delta = act.backprop(gi, kept, *params, overwrite_d=fresh)
    if not keep_h and g_kept is not None:
        delta = g_kept if delta is None else delta + g_kept
    return delta


_HALF = (torch.float16, torch.bfloat16)


def _loss_logits(z, loss):
    """The logits the loss sees: float32 under autocast when ``z`` is half precision (``loss[3]``)."""
    return z.float() if loss[3] and z.dtype in _HALF else z


MLP_FUNCTION = compile_twin(MLPFunction)


def _layers(weights, biases, name):
    """``[W⁽¹⁾, b⁽¹⁾, …]`` as MLPFunction takes them, from one list of weights and one of biases (or None)."""
    n = len(weights)
    biases = [None] * n if biases is None else list(biases)
    if len(biases) != n or not n:
        raise ValueError(f"{name}: expected one bias (or None) per weight, got {n} weights and {len(biases)} biases")
    return [t for pair in zip(weights, biases) for t in pair]


def check_layers(input, layers, name) -> int:
    """Raise a clear error unless ``[W⁽¹⁾, b⁽¹⁾, …]`` (biases may be None) is a network for ``input``: each
    weight takes the previous layer's outputs, each bias has one entry per output. Returns ``n_out``."""
    w, b = layers[0], layers[1]
    # check_linear_args's conditions in one expression (its name string and calls cost a small network ~1%, measured),
    # each shape read once (a torch.Size is made at every read); where one fails, it runs and raises, naming what is
    # wrong.
    if not (
        isinstance(input, torch.Tensor)
        and isinstance(w, torch.Tensor)
        and len(shape := w.shape) == 2
        and input.shape[-1:] == shape[1:]  # () for a 0-D input
        and (b is None or (isinstance(b, torch.Tensor) and b.shape == shape[:1]))
    ):
        check_linear_args(input, w, b, name=f"{name} layer 1")
    n_prev = w.shape[0]
    for k in range(2, len(layers), 2):
        w, b = layers[k], layers[k + 1]
        shape = w.shape
        if len(shape) != 2 or shape[1] != n_prev:
            raise RuntimeError(
                f"{name} layer {k // 2 + 1}: expected a weight of shape (out_features, {n_prev}) to follow "
                f"layer {k // 2}'s {n_prev} outputs, got shape {tuple(shape)}"
            )
        n_prev = shape[0]
        if b is not None and b.shape != (n_prev,):
            raise RuntimeError(
                f"{name} layer {k // 2 + 1}: expected bias of shape ({n_prev},), got shape {tuple(b.shape)}"
            )
    return n_prev


def mlp(
    input: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    activation: str = "relu",
    *act_params,
) -> torch.Tensor:
    """The seed's network in one Function: ``g`` after every hidden layer, linear output (logits).

    Args:
        input: ``(*, n_0)``.
        weights: ``[W⁽¹⁾ (n_1, n_0), …, W⁽ᴸ⁺¹⁾ (n_out, n_L)]``.
        biases: one ``(n_k,)`` tensor or None per layer (default: no biases, as in the seed).
        activation: g, one of ``ACTIVATIONS``; ``*act_params`` its parameters (torch's defaults if omitted).

    Returns:
        ``(*, n_out)``, in the autocast dtype under autocast (as ``F.linear``).
    """
    return mlp_layers(input, _layers(weights, biases, "mlp"), activation, act_params, "mlp")


def mlp_layers(input, layers, activation, act_params=(), name="mlp"):
    """:func:`mlp` of the network given as one list ``[W⁽¹⁾, b⁽¹⁾, …]`` (what :class:`torchderiv.nn.MLP` holds);
    errors name ``name``."""
    get_activation(activation)
    check_layers(input, layers, name)
    params = tuple(act_params or DEFAULT_PARAMS[activation])
    return autocast_apply(MLP_FUNCTION, "lower", input, None, None, activation, params, None, *layers)[0]


def mlp_cross_entropy(
    input: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None,
    target: torch.Tensor,
    activation: str = "relu",
    *act_params,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy(mlp(input, …), target, …)`` as one Function; returns ``(loss, logits)``.

    The same values and gradients as the two calls, with one autograd node instead of two: on small
    networks, where a step is mostly per-call overhead, that is what brings a Python backward to
    autograd's speed (README, Performance). ``logits`` are returned for metrics and stay differentiable.

    Args:
        input: ``(n_0,)`` or ``(N, n_0)``.
        weights, biases, activation, *act_params: as :func:`mlp`.
        target: class indices ``()`` / ``(N,)`` or class probabilities of the logits' shape.
        weight, ignore_index, reduction, label_smoothing: as :func:`torch.nn.functional.cross_entropy`.

    Returns:
        ``(loss, logits)``: the loss as ``F.cross_entropy`` gives it (float32 under autocast), and
        ``(n_out,)`` / ``(N, n_out)`` logits as ``F.linear`` gives them (the autocast dtype under autocast).
    """
    name = "mlp_cross_entropy"
    layers = _layers(weights, biases, name)
    return mlp_cross_entropy_layers(
        input, layers, target, activation, act_params, weight, ignore_index, reduction, label_smoothing, name
    )


def mlp_cross_entropy_layers(
    input, layers, target, activation, act_params, weight, ignore_index, reduction, label_smoothing, name
):
    """:func:`mlp_cross_entropy` of the network given as one list ``[W⁽¹⁾, b⁽¹⁾, …]`` (what
    :class:`torchderiv.nn.MLP` holds); errors name ``name``."""
    get_activation(activation)
    reduction = check_reduction(reduction)
    n_out = check_layers(input, layers, name)
    if input.dim() > 2:
        raise RuntimeError(
            f"{name}: expected input of shape (n_0,) or (N, n_0) (logits with classes last), got shape "
            f"{tuple(input.shape)}; flatten the leading dimensions first"
        )
    check_cross_entropy_args(input.shape[:-1] + (n_out,), target, weight, ignore_index, label_smoothing, name)
    params = tuple(act_params or DEFAULT_PARAMS[activation])
    upcast = internals.any_autocast() and autocast_enabled(input.device.type)
    if upcast:
        # torch's autocast policies, per argument: the network's GEMMs in the autocast dtype (F.linear),
        # the loss in float32 (F.cross_entropy). The casts happen here, where autograd differentiates them.
        low = torch.get_autocast_dtype(input.device.type)
        input, cast = autocast_cast(input, low), [autocast_cast(t, low) for t in layers]
        if _per_sample.current is not None:  # tracked parameters now reach the Function as copies
            _per_sample.current.alias(layers, cast)
        layers = cast
        target, weight = autocast_cast(target, torch.float32), autocast_cast(weight, torch.float32)
    loss = (reduction, int(ignore_index), float(label_smoothing), upcast)
    args = (input, target, weight, activation, params, loss, *layers)
    # autocast_apply with no policy of its own (the casts are done): only autocast is switched off.
    out = autocast_apply(MLP_FUNCTION, None, *args) if upcast else apply(MLP_FUNCTION, *args)
    return out[0], out[1]

"""Losses on logits (the seed's ``Loss(g(z), y)`` with the canonical pair folded in, §3.1).

torchderiv's losses take the output layer's pre-activation ``z``, as torch's ``*_with_logits`` and
``cross_entropy`` do, and implement the collapsed derivative ``∂Loss/∂z`` (docs/derivation.md, § the output error):

===========================  =======================================================
loss                         ``∂ℓ/∂z`` per element (before weights and reduction)
===========================  =======================================================
MSE (identity output)        ``2 (z − y)``
Huber                        ``clamp(z − y, −δ, δ)``
BCE with logits (sigmoid)    ``(1 + (p − 1) y) σ(z) − p y``
cross-entropy (softmax)      ``softmax(z) − y`` (with weights and smoothing: docs/derivation.md)
===========================  =======================================================

The derivative of each per-element loss, multiplied by the weights and divided by the mean's
denominator, is the "error" ``Δ = ∂J/∂Z`` of the reduced loss J; backward multiplies it by the incoming
gradient, and jvp contracts it with the tangent — one formula serves both directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._core import autocast_apply, check_reduction, compile_twin, may_overwrite, save_for_forward, shape_str

__all__ = ["mse_loss", "huber_loss", "binary_cross_entropy_with_logits", "cross_entropy"]


# ---------------------------------------------------------------------------------------------------
# Elementwise losses: MSE, Huber, BCE with logits
# ---------------------------------------------------------------------------------------------------


def _mse(x, y):
    d = x - y
    return d * d, 2 * d, -2 * d


def _huber(x, y, delta):
    d = x - y
    a = d.abs()
    loss = torch.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    g = d.clamp(-delta, delta)  # NOTE: clamp keeps NaN, as torch's huber_loss_backward does
    return loss, g, -g


def _bce(z, y, pos_weight):
    # ℓ = −[p y log σ(z) + (1 − y) log(1 − σ(z))] = (1 − y) z − (1 + (p − 1) y) log σ(z),
    # using log(1 − σ(z)) = log σ(z) − z; logsigmoid is stable for logits of any size.
    log_sig = F.logsigmoid(z)
    if pos_weight is None:
        loss = (1 - y) * z - log_sig
        return loss, torch.sigmoid(z) - y, -z
    lw = 1 + (pos_weight - 1) * y
    loss = (1 - y) * z - lw * log_sig
    # ∂ℓ/∂z = (1 + (p − 1) y) σ(z) − p y;  ∂ℓ/∂y = −z − (p − 1) log σ(z)
    return loss, lw * torch.sigmoid(z) - pos_weight * y, -z - (pos_weight - 1) * log_sig


_ELEMENTWISE = {"mse": _mse, "huber": _huber, "bce": _bce}


def reduce_loss(loss, reduction, denominator):
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / denominator


class ElementwiseLossFunction(torch.autograd.Function):
    """``J = reduce(w ⊙ ℓ(z, y))`` for an elementwise loss ℓ (MSE, Huber, BCE with logits).

    backward: ``∂J/∂z = s ⊙ w ⊙ ∂ℓ/∂z / D``, ``∂J/∂y = s ⊙ w ⊙ ∂ℓ/∂y / D`` (summed back to each
    operand's shape when it was broadcast), ``∂J/∂w = s ⊙ ℓ / D`` — and for MSE's weighted mean,
    whose denominator is ``D = Σ w``, ``∂J/∂w = s (ℓ − J) / D``. ``s`` is the incoming gradient, ``D``
    the mean's denominator (1 for "sum" and "none").
    jvp: ``dJ = reduce(w ⊙ (∂ℓ/∂z dz + ∂ℓ/∂y dy) + ℓ ⊙ dw)``, with ``− J Σdw`` for the weighted mean.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, extra, kind, reduction, mean_over_weight, *params):
        loss, _, _ = _ELEMENTWISE[kind](input, target, *((extra,) if kind == "bce" else params))
        if weight is not None:
            loss = loss * weight
        return reduce_loss(loss, reduction, _denominator(loss, weight, reduction, mean_over_weight))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, extra, kind, reduction, mean_over_weight, *params = inputs
        ctx.config = (kind, reduction, mean_over_weight, tuple(params))
        ctx.save_for_backward(input, target, weight, extra, output)
        save_for_forward(ctx, input, target, weight, extra, output)

    @staticmethod
    def _parts(ctx):
        input, target, weight, extra, output = ctx.saved_tensors
        kind, reduction, mean_over_weight, params = ctx.config
        loss, gx, gy = _ELEMENTWISE[kind](input, target, *((extra,) if kind == "bce" else params))
        if weight is not None:
            gx, gy = gx * weight, gy * weight
        denominator = _denominator(loss, weight, reduction, mean_over_weight)
        return input, target, weight, output, loss, gx, gy, reduction, mean_over_weight, denominator

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight, output, loss, gx, gy, reduction, mow, den = ElementwiseLossFunction._parts(ctx)
        scale = grad_output if reduction != "mean" else grad_output / den
        needs = ctx.needs_input_grad
        grad_input = (scale * gx).sum_to_size(input.shape) if needs[0] else None
        grad_target = (scale * gy).sum_to_size(target.shape) if needs[1] else None
        grad_weight = None
        if weight is not None and needs[2]:
            wl = loss - output if (reduction == "mean" and mow) else loss
            grad_weight = (scale * wl).sum_to_size(weight.shape)
        return (grad_input, grad_target, grad_weight) + (None,) * (4 + len(ctx.config[3]))

    @staticmethod
    def jvp(ctx, d_input, d_target, d_weight, *_):
        input, target, weight, output, loss, gx, gy, reduction, mow, den = ElementwiseLossFunction._parts(ctx)
        dl = None
        for g, t in ((gx, d_input), (gy, d_target)):
            if t is not None:
                dl = g * t if dl is None else dl + g * t
        if weight is not None and d_weight is not None:
            wl = loss - output if (reduction == "mean" and mow) else loss
            dl = wl * d_weight if dl is None else dl + wl * d_weight
        if dl is None:
            dl = torch.zeros_like(gx)
        return reduce_loss(dl.expand(gx.shape), reduction, den)


ELEMENTWISE_LOSS = compile_twin(ElementwiseLossFunction)


def _denominator(loss, weight, reduction, mean_over_weight):
    if reduction != "mean":
        return 1
    if mean_over_weight and weight is not None:
        return weight.sum()
    return loss.numel()


def _check_float_target(name, input, target):
    for label, t in (("input", input), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {label} to be a Tensor, got {type(t).__name__}")


def _broadcast_shape(name, input, target):
    try:
        return torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise RuntimeError(
            f"{name}: expected a target broadcastable to the input's shape {shape_str(input)}, "
            f"got shape {shape_str(target)}"
        ) from None


def _check_weight(name, weight, shape, what):
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected weight to be a Tensor or None, got {type(weight).__name__}")
    if what == "same" and weight.shape != shape:
        raise ValueError(
            f"{name}: Weights and input must have the same size: expected weight of shape "
            f"{shape_str(shape)}, got {shape_str(weight)}"
        )


def _elementwise_loss(name, kind, input, target, weight, extra, reduction, mean_over_weight, *params):
    if input.shape != target.shape and kind != "bce":
        import warnings

        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    return autocast_apply(
        ELEMENTWISE_LOSS, "fp32", input, target, weight, extra, kind, reduction, mean_over_weight, *params
    )


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error ``ℓ = w (z − y)²``; ``∂ℓ/∂z = 2 w (z − y)`` (identity + squared error).

    As :func:`torch.nn.functional.mse_loss`: input and target broadcast (with torch's warning);
    ``weight`` must have the input's shape, and the weighted mean divides by ``Σ w``.
    """
    _check_float_target("mse_loss", input, target)
    reduction = check_reduction(reduction, size_average, reduce)
    _broadcast_shape("mse_loss", input, target)
    _check_weight("mse_loss", weight, input.shape, "same")
    return _elementwise_loss("mse_loss", "mse", input, target, weight, None, reduction, True)


def huber_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Huber loss: ``½ d²`` where ``|d| < δ``, else ``δ(|d| − ½δ)``, ``d = z − y``; ``∂ℓ/∂z = clamp(d, −δ, δ)``."""
    _check_float_target("huber_loss", input, target)
    reduction = check_reduction(reduction)
    if delta <= 0:
        raise RuntimeError(f"huber_loss does not support non-positive values for delta, got delta={delta}")
    _broadcast_shape("huber_loss", input, target)
    _check_weight("huber_loss", weight, input.shape, "same")
    return _elementwise_loss("huber_loss", "huber", input, target, weight, None, reduction, False, float(delta))


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid + binary cross-entropy on logits, the seed's single output node.

    ``ℓ = −w [p y log σ(z) + (1 − y) log(1 − σ(z))]``, ``∂ℓ/∂z = w [(1 + (p − 1) y) σ(z) − p y]``
    (``σ(z) − y`` without weights), ``∂ℓ/∂y = −w [z + (p − 1) log σ(z)]``.
    ``weight`` broadcasts to the input; ``pos_weight`` broadcasts along the last (class) dimension.
    """
    name = "binary_cross_entropy_with_logits"
    _check_float_target(name, input, target)
    reduction = check_reduction(reduction, size_average, reduce)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    for label, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        if t.requires_grad:
            raise RuntimeError(
                f"{name}: the loss is not differentiable with respect to {label} (as in torch); "
                f"pass a {label} that does not require grad"
            )
        try:
            torch.broadcast_shapes(t.shape, input.shape)
        except RuntimeError:
            raise RuntimeError(
                f"{name}: expected {label} broadcastable to the input's shape {shape_str(input)}, "
                f"got shape {shape_str(t)}"
            ) from None
    return _elementwise_loss(name, "bce", input, target, weight, pos_weight, reduction, False)


# ---------------------------------------------------------------------------------------------------
# Cross-entropy on logits: softmax + negative log-likelihood
# ---------------------------------------------------------------------------------------------------


def _class_dim(input):
    return 1 if input.dim() >= 2 else 0


def _class_weight(weight, input, c):
    """Class weights shaped to broadcast along the class dimension, or None."""
    if weight is None:
        return None
    shape = [1] * input.dim()
    shape[c] = weight.shape[0]
    return weight.reshape(shape)


def index_rows(target, ignore_index, c):
    """``valid`` rows (not ``ignore_index``) and gather-safe class indices ``(…, 1, …)``."""
    valid = target != ignore_index
    return valid, target.where(valid, 0).long().unsqueeze(c)


def class_divisor(valid, w_y):
    """The mean's divisor ``D``: the count of rows not ignored, or ``Σ w_y`` over them."""
    return valid.sum() if w_y is None else w_y.where(valid, 0).sum()


def _ce_divisor(input, target, weight, ignore_index):
    """The mean's divisor ``D`` alone, as :func:`ce_loss` gives it, without a log-softmax."""
    c = _class_dim(input)
    if target.is_floating_point():
        return input.numel() // input.shape[c] if input.shape[c] else 0
    valid, idx = index_rows(target, ignore_index, c)
    return class_divisor(valid, weight[idx.squeeze(c)] if weight is not None else None)


def ce_loss(input, target, weight, ignore_index, eps, log_p=None):
    """Per-row loss ``ℓ`` and the mean's divisor. ``log p = log_softmax(z)``: stable for any logits."""
    c = _class_dim(input)
    n_classes = input.shape[c]
    log_p = input.log_softmax(c) if log_p is None else log_p
    w = _class_weight(weight, input, c)
    if target.is_floating_point():
        # Class probabilities: ℓ = −Σ_c w_c t'_c log p_c,  t' = (1 − ε) t + ε / C.
        t = target * (1 - eps) + eps / n_classes if eps > 0 else target
        wt = t if w is None else t * w
        return -(wt * log_p).sum(c), _ce_divisor(input, target, weight, ignore_index)
    valid, idx = index_rows(target, ignore_index, c)
    nll = -log_p.gather(c, idx).squeeze(c)  # −log p_y
    w_y = weight[idx.squeeze(c)] if weight is not None else None
    if w_y is not None:
        nll = nll * w_y
    loss = (1 - eps) * nll if eps > 0 else nll
    if eps > 0:
        smooth = -(log_p * w).sum(c) if w is not None else -log_p.sum(c)
        loss = loss + (eps / n_classes) * smooth
    loss = loss.where(valid, 0)
    return loss, class_divisor(valid, w_y)


def ce_grads(input, target, weight, ignore_index, eps, grad_output=None, reduction="sum", log_p=None, inplace=None):
    """Gradients of ``J = reduce(ℓ)`` times ``s = grad_output`` (1 if None): ``(∂J/∂z, ∂J/∂t or None)``.

    Class indices: ``∂ℓ/∂z = a p − (1 − ε) w_y e_y − (ε/C) w`` with ``a = (1 − ε) w_y + (ε/C) Σ_c w_c``,
    zero for rows equal to ``ignore_index``; probabilities: ``∂ℓ/∂z = (Σ_c w_c t'_c) p − w ⊙ t'``,
    ``∂ℓ/∂t = −(1 − ε) w ⊙ log p`` (docs/derivation.md). "mean" divides by ``D`` (``Σ w_y`` over rows not ignored,
    or the row count); "none" takes ``s`` per row.
    ``log_p`` (if given) is used instead of recomputing ``log_softmax(input)``; with ``inplace`` (default:
    when nothing differentiates these ops) the result is built in the buffer of ``p = softmax(z)``, which
    is then ``log_p`` itself when given: one logits-sized buffer instead of five.
    """
    c = _class_dim(input)
    n_classes = input.shape[c]
    w = _class_weight(weight, input, c)
    inplace = may_overwrite(grad_output) if inplace is None else inplace
    if target.is_floating_point():
        log_p = input.log_softmax(c) if log_p is None else log_p
        p = log_p.exp()
        t = target * (1 - eps) + eps / n_classes if eps > 0 else target
        wt = t if w is None else t * w
        grad_z = wt.sum(c, keepdim=True) * p - wt
        grad_t = -(1 - eps) * (log_p if w is None else log_p * w)
        scale = _row_scale(grad_output, reduction, _ce_divisor(input, target, weight, ignore_index), c)
        return (grad_z, grad_t) if scale is None else (grad_z * scale, grad_t * scale)
    if log_p is None:
        p = input.softmax(c)
    else:
        p = log_p.exp_() if inplace else log_p.exp()
    if weight is None and eps == 0 and inplace:
        grad_z = softmax_minus_one_hot_(p, target, ignore_index, grad_output, reduction, p_can_be_remade=log_p is None)
        if grad_z is not None:
            return grad_z, None
        p = input.softmax(c) if log_p is None else p  # a refused scatter may have written part of p
    # Per-row factors first, shaped (N, 1, d1, …): the logits-sized buffer p is then touched by one
    # multiply, one scatter and, with smoothing, one more pass.
    valid, idx = index_rows(target, ignore_index, c)
    valid = valid.unsqueeze(c)
    w_y = weight[idx] if weight is not None else None
    scale = _row_scale(grad_output, reduction, class_divisor(valid, w_y) if reduction == "mean" else None, c)
    # 1[not ignored] · s / D, by a select on the (per-row, small) factor: an inf/NaN incoming gradient at an
    # ignored row gives 0 there, as torch's nll_loss backward does. Logits that are inf/NaN in an ignored
    # row still give NaN through p, as torch's log_softmax backward does.
    m = valid.to(p.dtype) if scale is None else torch.where(valid, scale, 0)
    m = m if m.dtype == p.dtype else m.to(p.dtype)
    mw = m if w_y is None else m * w_y
    if eps > 0:
        a = (1 - eps) * mw + (eps / n_classes) * (weight.sum() if weight is not None else n_classes) * m
        src = -(1 - eps) * mw
    else:
        a, src = mw, -mw
    grad_z = p.mul_(a) if inplace else p * a
    grad_z = grad_z.scatter_add_(c, idx, src) if inplace else grad_z.scatter_add(c, idx, src)
    if eps > 0:  # − (ε/C) m w_c
        w_c = w if w is not None else m.new_ones(())
        k = -eps / n_classes
        grad_z = grad_z.addcmul_(m, w_c, value=k) if inplace else grad_z.addcmul(m, w_c, value=k)
    return grad_z, None


def softmax_minus_one_hot_(p, target, ignore_index, grad_output, reduction, p_can_be_remade=False):
    """``∂J/∂z = s (p − e_y) / D`` (seed §3.1; D the row count for "mean", 1 for "sum"; "none": ``s`` per row),
    written into ``p = softmax(z)``, for class indices with no class weights or smoothing when no row is ignored;
    None otherwise. One scatter and one multiply: the general path of :func:`ce_grads` spends ~8 more small ops on
    per-row masks and divisors, each ~3 µs on CPU, a quarter of a small network's step (measured).

    On CPU only (elsewhere telling whether a row is ignored would wait for the device), where ``s`` may be read as
    a number (a 0-dim tensor division costs a kernel call). When the caller can make ``p`` again and
    ``ignore_index`` lies outside ``[0, C)``, no reduction asks whether a row is ignored: forward's ``nll_loss`` has
    accepted only classes and ``ignore_index``, so an ignored row is an index the scatter refuses — after writing
    part of ``p``, which is why the caller must be able to make it again.
    """
    if not target.is_cpu:
        return None
    c = _class_dim(p)
    index = (target if target.dtype == torch.long else target.long()).unsqueeze(c)
    if p_can_be_remade and not 0 <= ignore_index < p.shape[c]:
        try:
            grad_z = p.scatter_(c, index, -1.0, reduce="add")
        except RuntimeError:
            return None
    elif _none_ignored(target, ignore_index):
        grad_z = p.scatter_(c, index, -1.0, reduce="add")
    else:
        return None
    if reduction == "none":
        return grad_z if grad_output is None else grad_z.mul_(grad_output.unsqueeze(c))
    scale = 1.0 if grad_output is None else grad_output.item()
    scale = scale / max(target.numel(), 1) if reduction == "mean" else scale
    return grad_z if scale == 1 else grad_z.mul_(scale)


def _none_ignored(target, ignore_index):
    """Whether no row's class is ``ignore_index``. Asked on CPU only: elsewhere reading the answer
    would wait for the device, so the general path (correct either way) is taken."""
    if not target.is_cpu:
        return False
    if ignore_index < 0:  # the usual -100: then "none ignored" is "min ≥ 0", one op instead of two
        return target.numel() == 0 or target.min().item() >= 0
    return not (target == ignore_index).any().item()


def _row_scale(grad_output, reduction, divisor, c):
    """``s / D`` ("mean"), ``s`` ("sum"), or ``s`` per row ("none"), broadcastable along the class dim."""
    if grad_output is None:
        return None if reduction != "mean" else 1 / gradient_divisor(divisor)
    if reduction == "none":
        return grad_output.unsqueeze(c)
    return grad_output / gradient_divisor(divisor) if reduction == "mean" else grad_output


def gradient_divisor(divisor):
    # NOTE: a divisor of 0 means every row is ignored (or there are none): the loss is 0/0 = NaN as in
    # torch, but every row's ∂ℓ/∂z is exactly 0 and torch's gradient is 0, so the gradient divides by 1.
    if not isinstance(divisor, torch.Tensor):
        return max(divisor, 1)
    if not divisor.is_floating_point():
        return divisor.clamp_min(1)  # a row count
    return torch.where(divisor == 0, 1, divisor)


def ce_value(input, target, weight, reduction, ignore_index, label_smoothing):
    """``J = reduce(ℓ)``: the cross-entropy's value (forward of :class:`CrossEntropyFunction`)."""
    if label_smoothing == 0 and not target.is_floating_point():
        # −w_y log p_y per row (0 where ignored), reduced: torch's nll_loss on log softmax computes
        # exactly this value, in one kernel.
        log_p = input.log_softmax(_class_dim(input))
        return F.nll_loss(log_p, target, weight, ignore_index=ignore_index, reduction=reduction)
    loss, divisor = ce_loss(input, target, weight, ignore_index, label_smoothing)
    return reduce_loss(loss, reduction, divisor)


def ce_jvp(input, target, weight, reduction, ignore_index, label_smoothing, d_input, d_target):
    """``dJ = reduce(Σ_c (∂ℓ/∂z_c dz_c + ∂ℓ/∂t_c dt_c))`` for tangents ``dz = d_input``, ``dt = d_target``."""
    # Per-row derivatives, reduced afterwards by the true divisor: a mean over no rows is 0/0 = NaN,
    # its tangent too (as torch's), where backward's gradient is 0.
    grad_z, grad_t = ce_grads(input, target, weight, ignore_index, label_smoothing)
    dl = torch.zeros_like(grad_z)
    if d_input is not None:
        dl = dl + grad_z * d_input
    if d_target is not None and grad_t is not None:
        dl = dl + grad_t * d_target
    divisor = _ce_divisor(input, target, weight, ignore_index) if reduction == "mean" else 1
    return reduce_loss(dl.sum(_class_dim(input)), reduction, divisor)


class CrossEntropyFunction(torch.autograd.Function):
    """``J = reduce(ℓ)``, ``ℓ = −Σ_c w_c t_c log softmax(z)_c`` (one-hot t for class indices).

    backward: ``∂J/∂z = s (a ⊙ p − (1 − ε) w_y e_y − (ε/C) w) / D`` for class indices, and
    ``s ((Σ_c w_c t'_c) p − w ⊙ t') / D`` for probabilities, whose own gradient is
    ``∂J/∂t = −s (1 − ε) w ⊙ log p / D`` — the softmax + cross-entropy pair collapsed to
    ``p − y`` (seed §3.1). ``p = softmax(z)`` is recomputed from the saved logits; ``D`` is the
    mean's divisor (``Σ w_y`` over rows not ignored, or the row count).
    jvp: ``dJ = reduce(Σ_c (∂ℓ/∂z_c dz_c + ∂ℓ/∂t_c dt_c))``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction, ignore_index, label_smoothing):
        return ce_value(input, target, weight, reduction, ignore_index, label_smoothing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction, ignore_index, label_smoothing = inputs
        ctx.config = (reduction, ignore_index, label_smoothing)
        ctx.save_for_backward(input, target, weight)
        save_for_forward(ctx, input, target, weight)

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight = ctx.saved_tensors
        reduction, ignore_index, label_smoothing = ctx.config
        needs = ctx.needs_input_grad
        if not (needs[0] or needs[1]):
            return None, None, None, None, None, None
        grad_z, grad_t = ce_grads(input, target, weight, ignore_index, label_smoothing, grad_output, reduction)
        return (grad_z if needs[0] else None), (grad_t if needs[1] else None), None, None, None, None

    @staticmethod
    def jvp(ctx, d_input, d_target, *_):
        input, target, weight = ctx.saved_tensors
        return ce_jvp(input, target, weight, *ctx.config, d_input, d_target)


CROSS_ENTROPY = compile_twin(CrossEntropyFunction)


def check_cross_entropy_args(shape, target, weight, ignore_index, label_smoothing, name="cross_entropy"):
    """Raise a clear error unless ``target``, ``weight`` and the options fit logits of this ``shape``."""
    # The usual call, (N, C) logits and N class indices with no options, in one expression: a small network's step
    # is mostly such per-call work (docs/performance.md). Anything else goes through the checks below.
    if (
        weight is None
        and label_smoothing == 0
        and len(shape) == 2
        and isinstance(target, torch.Tensor)
        and target.dtype == torch.long
        and target.shape == shape[:1]
    ):
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: expected target to be a Tensor, got {type(target).__name__}")
    if len(shape) == 0:
        raise RuntimeError(f"{name}: expected input of shape (C,) or (N, C, d1, …), got a 0-D tensor")
    c = 1 if len(shape) >= 2 else 0
    n_classes = shape[c]
    if c == 1 and target.dim() >= 1 and target.shape[0] != shape[0]:
        # torch's type for this one error is ValueError (its message first, then ours)
        raise ValueError(
            f"Expected input batch_size ({shape[0]}) to match target batch_size ({target.shape[0]}). "
            f"{name}: input of shape {shape_str(shape)}, target of shape {shape_str(target)}"
        )
    if target.is_floating_point():
        indices = shape[:c] + shape[c + 1 :]
        if target.shape == indices and target.shape != shape:
            # the shape of class indices with a float dtype: as torch, a dtype error, and what either form needs
            raise RuntimeError(
                f"{name}: expected target dtype to be Long or Byte, but got {target.dtype}: class indices of shape "
                f"{shape_str(indices)} must be integers (target.long()); class probabilities have the input's shape "
                f"{shape_str(shape)}"
            )
        if target.shape != shape:
            raise RuntimeError(
                f"{name}: expected class-probability target of the input's shape {shape_str(shape)}, "
                f"got shape {shape_str(target)}"
            )
        if ignore_index != -100:
            raise RuntimeError(f"{name}: ignore_index is not supported for floating point target")
    else:
        if target.dtype not in (torch.long, torch.uint8):
            raise RuntimeError(f"{name}: expected target dtype to be Long or Byte, but got {target.dtype}")
        expected = shape[:c] + shape[c + 1 :]
        if target.shape != expected:
            raise RuntimeError(
                f"{name}: expected class-index target of shape {shape_str(expected)} for input "
                f"of shape {shape_str(shape)}, got shape {shape_str(target)}"
            )
    if weight is not None:
        if weight.shape != (n_classes,):
            raise RuntimeError(
                f"{name}: expected weight of shape ({n_classes},) (one per class), got shape {shape_str(weight)}"
            )
        if weight.requires_grad:
            raise RuntimeError(
                f"{name}: the loss is not differentiable with respect to weight (as in torch); "
                "pass a weight that does not require grad"
            )
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"{name}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax + cross-entropy on logits, as :func:`torch.nn.functional.cross_entropy`.

    Input ``(C,)``, ``(N, C)`` or ``(N, C, d1, …)``; target class indices ``()``, ``(N,)``,
    ``(N, d1, …)`` or class probabilities of the input's shape. ``∂ℓ/∂z = softmax(z) − y`` for
    one-hot y; class weights, ``ignore_index`` and label smoothing as docs/derivation.md states.
    Stable for logits of any size (``log softmax = z − logsumexp(z)``).
    """
    reduction = check_reduction(reduction, size_average, reduce)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"cross_entropy: expected input to be a Tensor, got {type(input).__name__}")
    check_cross_entropy_args(input.shape, target, weight, ignore_index, label_smoothing)
    return autocast_apply(
        CROSS_ENTROPY, "fp32", input, target, weight, reduction, int(ignore_index), float(label_smoothing)
    )

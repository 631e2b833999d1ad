"""Linear layer + cross-entropy fused and chunked: the full ``(N, C)`` logits never exist.

For a language-model head (C in the tens of thousands) the logits dominate memory. Here rows are
processed ``chunk_size`` at a time: each chunk's logits ``Z_r = X_r Wᵀ + b`` live only while its loss
and its error ``Δ_r = ∂ℓ/∂Z_r`` (seed §3.1; docs/derivation.md) are computed, and ``Δ_r`` is folded at once into
the three gradients (seed §3.2–3.5):

    ∂J/∂X_r = Δ_r W,    ∂J/∂W = Σ_r Δ_rᵀ X_r,    ∂J/∂b = Σ_r Σ_rows Δ_r.

That is 3 GEMMs in all, as many as the unfused op. For "mean" and "sum" they run in forward and the
(unscaled) results are kept, so a plain backward only rescales them by the incoming gradient. When
backward is itself differentiated (``create_graph=True``), for "none", and for forward mode, the
chunks are recomputed with differentiable operations instead, so double backward, jvp, vmap and
compile all work — what torch's own chunked path gives up.
"""

from __future__ import annotations

import math

import torch

from . import _per_sample
from ._core import apply, autocast_cast, autocast_enabled, check_reduction, compile_twin, save_for_forward
from .linear import linear, linear_backward, linear_forward, linear_jvp
from .losses import ce_grads, ce_loss, class_divisor, cross_entropy, gradient_divisor, index_rows, reduce_loss

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy", "default_chunk_size"]

# Rows per chunk: enough that a chunk's logits take about this many bytes. At 32 MiB (i) the two
# logits-sized buffers a chunk needs stay near 64 MiB for any C, (ii) each GEMM has >= 256 rows for C up
# to 32k (float32), and (iii) every such buffer is at glibc's largest mmap threshold, so it goes back to
# the OS when freed: with smaller buffers the heap kept freed chunks and peak RSS varied 120–600 MiB
# from run to run (measured on 4096 x 256 x 32768).
_CHUNK_BYTES = 32 * 2**20


def default_chunk_size(n_rows: int, n_classes: int, element_size: int = 4) -> int:
    return max(1, min(n_rows, _CHUNK_BYTES // max(1, n_classes * element_size)))


def _batch_divisor(target, class_weight, ignore_index):
    """The mean's divisor for the whole batch, from the targets alone (no logits needed)."""
    valid, idx = index_rows(target, ignore_index, 0)
    return class_divisor(valid, class_weight[idx.squeeze(0)] if class_weight is not None else None)


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _chunk_logits(x, w, b, upcast):
    z = linear_forward(x, w, b)
    return z.float() if upcast else z


def _chunk_error(x, w, b, t, class_weight, ignore_index, eps, upcast, need_loss):
    """Loss (per row) and ``Δ_r = ∂ℓ/∂Z_r`` (unscaled) of one chunk, from one log-softmax."""
    log_p = _chunk_logits(x, w, b, upcast).log_softmax(1)  # the logits themselves are freed at once
    # log_p stands in for the logits below: the helpers read only its shape and dtype when given log_p.
    loss = ce_loss(log_p, t, class_weight, ignore_index, eps, log_p=log_p)[0] if need_loss else None
    grad_z = ce_grads(log_p, t, class_weight, ignore_index, eps, log_p=log_p)[0]
    return loss, grad_z.to(x.dtype)


def _recompute(ctx, saved, scale_rows, needs):
    """Backward by recomputation, chunk by chunk, with differentiable ops (``create_graph``, "none"). ``saved``:
    ``ctx.saved_tensors`` as backward unpacked them (a checkpoint's may be unpacked only once)."""
    input, w, b, target, class_weight = saved[:5]
    ignore_index, eps, chunk, upcast = ctx.config[1:]
    gi_parts, gw, gb = [], None, None
    for s, e in _chunks(input.shape[0], chunk):
        _, delta = _chunk_error(input[s:e], w, b, target[s:e], class_weight, ignore_index, eps, upcast, False)
        gi_r, gw_r, gb_r = linear_backward(needs[:3], delta * scale_rows(s, e), input[s:e], w, b)
        if gi_r is not None:
            gi_parts.append(gi_r)
        if gw_r is not None:
            gw = gw_r if gw is None else gw + gw_r
        if gb_r is not None:
            gb = gb_r if gb is None else gb + gb_r
    gi = (torch.cat(gi_parts) if gi_parts else input.new_zeros(input.shape)) if needs[0] else None
    if needs[1] and gw is None:
        gw = torch.zeros_like(w)
    if b is not None and needs[2] and gb is None:
        gb = torch.zeros_like(b)
    return gi, gw, gb


def _per_sample_backward(ctx, saved, rec, scale_rows, needs, tracked_w, tracked_b):
    """Backward inside :func:`torchderiv.per_sample`, for a tracked weight and/or bias: ``∂J/∂X`` now; each
    example's share of ``‖gᵢ‖²`` now, ``s²‖δᵢ‖² (‖xᵢ‖² + 1)`` (weight, bias; s the incoming scale); the
    (clipped) weight and bias gradients ``Σᵢ cᵢ s δᵢᵀ xᵢ``, ``Σᵢ cᵢ s δᵢ`` at the end of the pass, when the
    factors cᵢ are known, by recomputing each chunk's ``Δ`` once more: holding ``Δ`` (B × classes) until then
    would build the very logits-sized buffer this Function exists to avoid (docs/derivation.md). ``saved`` as in
    :func:`_recompute`."""
    input, w, b, target, class_weight = saved[:5]
    ignore_index, eps, chunk, upcast = ctx.config[1:]
    norm_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    chunks = _chunks(input.shape[0], chunk)

    def errors():
        for s, e in chunks:
            _, delta = _chunk_error(input[s:e], w, b, target[s:e], class_weight, ignore_index, eps, upcast, False)
            yield s, e, delta * scale_rows(s, e)

    gi_parts, delta_sq = [], []
    gw = gb = None  # a weight or bias that needs a gradient but is not tracked (not a parameter of the model)
    for s, e, delta in errors():
        if needs[0]:
            gi_parts.append(delta.mm(w))
        delta_sq.append(torch.linalg.vector_norm(delta, dim=1, dtype=norm_dtype).square())
        if needs[1] and tracked_w is None:
            gw = delta.t().mm(input[s:e]) if gw is None else gw.addmm_(delta.t(), input[s:e])
        if b is not None and needs[2] and tracked_b is None:
            gb = delta.sum(0) if gb is None else gb + delta.sum(0)
    sq_delta = torch.cat(delta_sq) if delta_sq else input.new_zeros(0, dtype=norm_dtype)
    sq = torch.zeros_like(sq_delta)
    if tracked_w is not None:
        sq += sq_delta * torch.linalg.vector_norm(input, dim=1, dtype=norm_dtype).square()  # ‖δᵢ‖² ‖xᵢ‖²
    if tracked_b is not None:
        sq += sq_delta

    def make(c):
        gw_t = torch.zeros_like(w) if tracked_w is not None else None
        gb_t = torch.zeros_like(b) if tracked_b is not None else None
        for s, e, delta in errors():
            rows = delta if c is None else delta * c[s:e, None].to(delta.dtype)  # c ⊙ Δ
            if gw_t is not None:
                gw_t.addmm_(rows.t(), input[s:e])  # (c ⊙ Δ)ᵀ X
            if gb_t is not None:
                gb_t += rows.sum(0)
        return gw_t, gb_t

    def samples():
        gs_w = input.new_empty(input.shape[0], *w.shape) if tracked_w is not None else None
        gs_b = input.new_empty(input.shape[0], *b.shape) if tracked_b is not None else None
        for s, e, delta in errors():
            if gs_w is not None:
                torch.mul(delta[:, :, None], input[s:e, None, :], out=gs_w[s:e])  # δᵢᵀ xᵢ per example
            if gs_b is not None:
                gs_b[s:e] = delta
        return gs_w, gs_b

    rec.take_rows(tracked_w, tracked_b, sq, make, samples, input)
    gi = (torch.cat(gi_parts) if gi_parts else input.new_zeros(input.shape)) if needs[0] else None
    return gi, gw, gb


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``J = reduce(CE(X Wᵀ + b, y))`` for ``X: (N, in)``, ``W: (C, in)``, class-index targets ``y: (N,)``.

    Outputs ``(J, G_X, G_W, G_b)``: the loss and, when precomputed in forward ("mean"/"sum" with
    gradients wanted), the unscaled gradient sums ``Σ Δ_r W`` (per row), ``Σ Δ_rᵀ X_r``, ``Σ Δ_r``
    (empty otherwise). They are marked non-differentiable: only the plain backward reads them;
    every differentiable path (double backward, jvp) recomputes from the inputs.

    backward: ``∂J/∂X = s G_X / D``, ``∂J/∂W = s G_W / D``, ``∂J/∂b = s G_b / D`` (s the incoming
    gradient, D the mean's divisor), or the same sums recomputed chunk by chunk.
    jvp: ``dJ = reduce(Σ_c Δ ⊙ (dX Wᵀ + X dWᵀ + db))``, chunk by chunk.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, w, b, target, class_weight, reduction, ignore_index, eps, chunk, upcast, precompute):
        losses, gi_parts, gw, gb = [], [], None, None
        for s, e in _chunks(input.shape[0], chunk):
            x = input[s:e]
            loss, delta = _chunk_error(x, w, b, target[s:e], class_weight, ignore_index, eps, upcast, True)
            losses.append(loss)
            if precompute:
                gi_parts.append(delta.mm(w))
                # NOTE: accumulate in place into a buffer that already carries any vmap batch dim (it is
                # the first chunk's product), so vmap can batch the in-place addmm.
                gw = delta.t().mm(x) if gw is None else gw.addmm_(delta.t(), x)
                if b is not None:
                    gb = delta.sum(0) if gb is None else gb.add_(delta.sum(0))
        loss = torch.cat(losses) if losses else input.new_zeros(0, dtype=torch.float32 if upcast else input.dtype)
        out = reduce_loss(loss, reduction, _batch_divisor(target, class_weight, ignore_index).to(loss.dtype))
        empty = input.new_empty(0)
        if not precompute:
            return out, empty, empty, empty
        gi = torch.cat(gi_parts) if gi_parts else torch.zeros_like(input)
        gw = torch.zeros_like(w) if gw is None else gw
        gb = empty if b is None else (torch.zeros_like(b) if gb is None else gb)
        return out, gi, gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, w, b, target, class_weight, reduction, ignore_index, eps, chunk, upcast, precompute = inputs
        ctx.config = (reduction, ignore_index, eps, chunk, upcast)
        ctx.precomputed = precompute
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(input, w, b, target, class_weight, *output[1:])
        save_for_forward(ctx, input, w, b, target, class_weight)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, w, b)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        needs = ctx.needs_input_grad
        reduction = ctx.config[0]
        saved = ctx.saved_tensors
        input, w, b, target, class_weight, gi, gw, gb = saved
        none = (None,) * 8
        if not (needs[0] or needs[1] or needs[2]):
            return (None, None, None) + none
        if reduction == "none":
            scale_rows = lambda s, e: grad_loss[s:e].unsqueeze(1).to(input.dtype)
        else:
            scale = grad_loss
            if reduction == "mean":
                scale = scale / gradient_divisor(
                    _batch_divisor(target, class_weight, ctx.config[1]).to(grad_loss.dtype)
                )
            scale = scale.to(input.dtype)
            scale_rows = lambda s, e: scale
        rec = _per_sample.current
        if rec is not None:
            w_p, b_p = rec.pair(w, b, _per_sample.tracked_pair(ctx))
            tracked_w = w_p if needs[1] else None
            tracked_b = b_p if b is not None and needs[2] else None
            if tracked_w is not None or tracked_b is not None:
                return _per_sample_backward(ctx, saved, rec, scale_rows, needs, tracked_w, tracked_b) + none
        if reduction != "none":
            if ctx.precomputed and not torch.is_grad_enabled():
                return (
                    scale * gi if needs[0] else None,
                    scale * gw if needs[1] else None,
                    scale * gb if (b is not None and needs[2]) else None,
                ) + none
        return _recompute(ctx, saved, scale_rows, needs) + none

    @staticmethod
    def jvp(ctx, d_input, d_w, d_b, *_):
        input, w, b, target, class_weight = ctx.saved_tensors
        reduction, ignore_index, eps, chunk, upcast = ctx.config
        parts = []
        for s, e in _chunks(input.shape[0], chunk):
            x = input[s:e]
            _, delta = _chunk_error(x, w, b, target[s:e], class_weight, ignore_index, eps, upcast, False)
            dz = linear_jvp(x, w, b, None if d_input is None else d_input[s:e], d_w, d_b)
            parts.append((delta * dz).sum(1))
        dl = torch.cat(parts) if parts else input.new_zeros(0)
        if upcast:
            dl = dl.float()
        d_out = reduce_loss(dl, reduction, _batch_divisor(target, class_weight, ignore_index).to(dl.dtype))
        return d_out, None, None, None


LINEAR_CROSS_ENTROPY = compile_twin(LinearCrossEntropyFunction)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, …)`` without building the logits.

    torch 2.13's signature plus ``chunk_size`` (rows per chunk). torch's ``options``
    (a ``torch.nn.LinearCrossEntropyOptions``) is accepted: its ``batch_chunk_size`` is used when
    ``chunk_size`` is None; every path here is chunked either way. With neither, a chunk holds about
    32 MiB of logits. Shapes as :func:`torch.nn.functional.linear_cross_entropy`:
    input ``(in,)`` or ``(N, in)``, ``linear_weight (C, in)`` or ``(C, d1, …, in)``, targets class
    indices or probabilities.

    Class-index targets with a 2-D ``linear_weight`` take the fused, chunked Function. K-dimensional
    weights and class-probability targets are computed as torchderiv's ``linear`` followed by
    ``cross_entropy`` (the same hand-derived formulas, with the logits built in full).
    """
    name = "linear_cross_entropy"
    reduction = check_reduction(reduction)
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"{name}: expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"{name}: expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features, num_classes = input.shape[-1], linear_weight.shape[0]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            f"{name}: expected equal input and linear_weight last dimensions (in_features), "
            f"got {in_features} and {linear_weight.shape[-1]}, respectively"
        )
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(
            f"{name}: expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"{name}: K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}"
        )
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape and target.is_floating_point()
    if probabilities and ignore_index is not None:
        raise RuntimeError(f"{name}: ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"{name}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if input.dim() == 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]}). "
            f"{name}: input of shape {tuple(input.shape)}, target of shape {tuple(target.shape)}"
        )
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name}: expected a positive chunk_size, got {chunk_size}")
    if out_features or probabilities:
        w2 = linear_weight.reshape(math.prod(out_features, start=num_classes), in_features)
        b2 = None if linear_bias is None else linear_bias.reshape(-1)
        logits = linear(input, w2, b2).reshape(logits_shape)
        return cross_entropy(
            logits,
            target,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    expected = tuple(input.shape[:-1])
    if tuple(target.shape) != expected or target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"{name}: expected class-index target of shape {expected} and dtype int64 (or class probabilities "
            f"of shape {logits_shape}), got shape {tuple(target.shape)} and dtype {target.dtype}"
        )
    if weight is not None and tuple(weight.shape) != (num_classes,):
        raise RuntimeError(f"{name}: expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
    unbatched = input.dim() == 1
    x, t = (input.unsqueeze(0), target.unsqueeze(0)) if unbatched else (input, target)
    chunk = chunk_size or default_chunk_size(x.shape[0], num_classes, x.element_size())
    grads_wanted = torch.is_grad_enabled() and (
        input.requires_grad or linear_weight.requires_grad or (linear_bias is not None and linear_bias.requires_grad)
    )
    upcast = autocast_enabled(x.device.type)
    rec = _per_sample.current
    tracked = rec is not None and (rec.param(linear_weight) is not None or rec.param(linear_bias) is not None)
    if tracked and unbatched:
        raise RuntimeError(
            f"per_sample: {name} was called on an input of shape {tuple(input.shape)}; expected examples along "
            f"dim 0, i.e. an input of shape (B, {in_features})"
        )
    args = (
        x,
        linear_weight,
        linear_bias,
        t,
        weight,
        reduction,
        ignore_index,
        float(label_smoothing),
        int(chunk),
        upcast,
        # Inside per_sample the tracked weight's gradient is made at the end of backward, clipped: nothing
        # to precompute here.
        bool(grads_wanted and reduction != "none" and not tracked),
    )
    if upcast:
        low = torch.get_autocast_dtype(x.device.type)
        cast = [autocast_cast(a, low) for a in (x, linear_weight, linear_bias)]
        if rec is not None:  # a tracked parameter now reaches the Function as a copy
            rec.alias((x, linear_weight, linear_bias), cast)
        args = (*cast, t, None if weight is None else weight.float()) + args[5:]
        with torch.autocast(x.device.type, enabled=False):
            loss = apply(LINEAR_CROSS_ENTROPY, *args)[0]
    else:
        loss = apply(LINEAR_CROSS_ENTROPY, *args)[0]
    return loss.squeeze(0) if unbatched and reduction == "none" else loss

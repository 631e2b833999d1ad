"""Multi-head attention whose parameters all pass through torchderiv's dense Functions.

Attention's parameters are two dense layers (seed §2): the packed input projection ``[W_q; W_k; W_v]`` (3d × d)
and the output projection. The parameter-free core between them, ``softmax(q kᵀ/√d_h + mask) v`` per head, is
torch's (``scaled_dot_product_attention``); its backward is torch's too, and hands the projections their Δ.

- Self-attention (one input ``x`` for query, key and value) is one dense layer with 3d outputs: ``linear``.
- Separate query, key and value inputs use :class:`PackedLinearFunction`: three row blocks of one weight on three
  inputs, ``Z_b = H_b W_bᵀ + b_b``; example i's gradient of the packed weight is the three blocks' ``Δᵢᵇᵀ Hᵢᵇ``
  stacked, so its squared norm is the sum of the blocks' (disjoint rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _per_sample
from ._core import autocast_apply, compile_twin, save_for_forward
from .linear import linear, linear_backward, linear_forward, linear_jvp

__all__ = ["PackedLinearFunction", "packed_linear", "multi_head_attention"]


def _blocks(weight, bias):
    """``([W_q, W_k, W_v], [b_q, b_k, b_v])``: the three row blocks (views)."""
    return weight.chunk(3), ((None,) * 3 if bias is None else bias.chunk(3))


class PackedLinearFunction(torch.autograd.Function):
    """``Z_b = H_b W_bᵀ + b_b`` for the three row blocks b of ``W = [W_q; W_k; W_v]`` (3n × m) and ``b``.

    backward (seed §3.2–3.5 per block): ``∂J/∂H_b = Δ_b W_b``, ``∂J/∂W = [Δ_qᵀ H_q; Δ_kᵀ H_k; Δ_vᵀ H_v]``,
    ``∂J/∂b = [Σ_rows Δ_q; Σ_rows Δ_k; Σ_rows Δ_v]``. jvp: ``dZ_b = dH_b W_bᵀ + H_b dW_bᵀ + db_b``. Inside
    :func:`torchderiv.per_sample` each block is a dense rule and the packed weight's rule stacks them
    (:class:`~torchderiv.functional._per_sample.BlockRule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, weight, bias):
        ws, bs = _blocks(weight, bias)
        return tuple(linear_forward(x, w, b) for x, w, b in zip((query, key, value), ws, bs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, value, weight, bias = inputs
        ctx.save_for_backward(query, key, value, weight, bias)
        save_for_forward(ctx, query, key, value, weight, bias)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        query, key, value, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        inputs, deltas = (query, key, value), (grad_q, grad_k, grad_v)
        want_w, want_b = needs[3], bias is not None and needs[4]
        rec = _per_sample.current
        if rec is not None and (want_w or want_b):
            w_p, b_p = rec.pair(weight, bias, _per_sample.tracked_pair(ctx))
            w_p, b_p = (w_p if want_w else None), (b_p if want_b else None)
            if w_p is not None or b_p is not None:
                rec.take_blocks(w_p, b_p, deltas, inputs)
                want_w, want_b = want_w and w_p is None, want_b and b_p is None
        ws, bs = _blocks(weight, bias)
        grads = [linear_backward((needs[i], want_w, want_b), deltas[i], inputs[i], ws[i], bs[i]) for i in range(3)]
        grad_weight = torch.cat([g[1] for g in grads]) if want_w else None
        grad_bias = torch.cat([g[2] for g in grads]) if want_b else None
        return grads[0][0], grads[1][0], grads[2][0], grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, d_query, d_key, d_value, d_weight, d_bias):
        query, key, value, weight, bias = ctx.saved_tensors
        ws, bs = _blocks(weight, bias)
        dws = (None,) * 3 if d_weight is None else d_weight.chunk(3)
        dbs = (None,) * 3 if d_bias is None or bias is None else d_bias.chunk(3)
        return tuple(
            linear_jvp(x, w, b, dx, dw, db)
            for x, w, b, dx, dw, db in zip((query, key, value), ws, bs, (d_query, d_key, d_value), dws, dbs)
        )


PACKED = compile_twin(PackedLinearFunction)


def packed_linear(query, key, value, weight, bias=None):
    """``(H_q W_qᵀ + b_q, H_k W_kᵀ + b_k, H_v W_vᵀ + b_v)`` for ``W = [W_q; W_k; W_v]``: attention's packed
    input projection on separate inputs, with torch's autocast policy for ``linear``."""
    n_in = weight.shape[1]
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.shape[-1] != n_in:
            raise RuntimeError(f"packed_linear: expected {name} with {n_in} features (last dim), got {tuple(x.shape)}")
    return autocast_apply(PACKED, "lower", query, key, value, weight, bias)


def _additive(mask, dtype):
    """A mask as torch's attention takes it (bool: True = may not attend; float: added to the scores), as a
    float mask to add."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _heads(t, batch, heads):
    """``(T, B, d)`` -> ``(B, heads, T, d_h)``."""
    return t.reshape(t.shape[0], batch, heads, t.shape[-1] // heads).permute(1, 2, 0, 3)  # explicit: B may be 0


def multi_head_attention(
    query,
    key,
    value,
    num_heads: int,
    in_proj_weight,
    in_proj_bias,
    out_proj_weight,
    out_proj_bias,
    *,
    batch_first: bool = False,
    key_padding_mask=None,
    need_weights: bool = True,
    attn_mask=None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout_p: float = 0.0,
):
    """``nn.MultiheadAttention``'s forward (packed ``in_proj``, no ``bias_k``/``bias_v``, no zero attention) with
    both projections through torchderiv's dense Functions; returns ``(output, weights or None)`` as torch does.

    Like torch's, it works sequence-first: a ``batch_first`` input ``(B, T, d)`` is read as its transposed view
    ``(T, B, d)`` and the output returned as a view of a ``(T, B, d)`` tensor, so that what follows sees torch's
    memory layout (a dropout after attention then draws the same mask as after torch's). The projections thus
    see ``(T, B, d)`` inputs, where :func:`torchderiv.per_sample` reads example i at ``[:, i]`` whatever
    ``batch_first`` is. ``is_causal`` is, as in torch, a hint that ``attn_mask`` is the causal mask (which must be
    given); the mask itself is applied.
    """
    if is_causal and attn_mask is None:
        raise RuntimeError("multi_head_attention: need attn_mask if specifying the is_causal hint")
    batched = query.dim() == 3
    self_attention = query is key and key is value
    if not batched:  # (T, d): one example
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:  # (B, T, d) -> (T, B, d), as views
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    d = query.shape[-1]
    if d % num_heads:
        raise RuntimeError(f"multi_head_attention: embed_dim {d} is not divisible by num_heads {num_heads}")
    batch = query.shape[1]
    if self_attention:  # one dense layer with 3d outputs
        q, k, v = linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    else:
        q, k, v = packed_linear(query, key, value, in_proj_weight, in_proj_bias)
    q, k, v = (_heads(t, batch, num_heads) for t in (q, k, v))  # (B, H, T, d_h), (B, H, S, d_h)
    t_len, s_len = q.shape[2], k.shape[2]
    mask = None
    if attn_mask is not None:
        m = _additive(attn_mask, q.dtype)
        mask = m.reshape(1, 1, t_len, s_len) if m.dim() == 2 else m.reshape(batch, num_heads, t_len, s_len)
    if key_padding_mask is not None:
        m = _additive(key_padding_mask, q.dtype).reshape(batch, 1, 1, s_len)
        mask = m if mask is None else mask + m
    weights = None
    if need_weights:  # the attention probabilities are asked for: computed explicitly, dropout included (as torch)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        weights = F.dropout(scores.softmax(-1), p=dropout_p) if dropout_p > 0 else scores.softmax(-1)
        out = weights @ v
        weights = weights.mean(1) if average_attn_weights else weights
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = linear(out.permute(2, 0, 1, 3).reshape(t_len, batch, d), out_proj_weight, out_proj_bias)  # (T, B, d)
    if not batched:
        return out.squeeze(1), weights
    return (out.transpose(0, 1) if batch_first else out), weights

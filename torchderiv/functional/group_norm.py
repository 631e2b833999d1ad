"""Group normalisation as an autograd Function with hand-derived derivatives (docs/derivation.md § normalisation).

The channels of each example split into ``G`` groups; each group (its ``C/G`` channels at every position, ``m``
numbers) is normalised as a LayerNorm row is, and each channel gets its own scale and shift:

    μ = mean(x),  r = (mean((x − μ)²) + ε)^½,  x̂ = (x − μ) / r   (per example and group)
    y = γ_c ⊙ x̂ + β_c                                             (per channel c)

With ``g = δ ⊙ γ_c`` (``δ = ∂J/∂y``) and means over the group, the derivatives are LayerNorm's:

    ∂J/∂x = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)) / r
    ∂J/∂γ_c = Σ_{examples, positions} δ ⊙ x̂,    ∂J/∂β_c = Σ_{examples, positions} δ

and example i's own ``∂J/∂γ``, ``∂J/∂β`` are those sums over its positions alone: C numbers each, formed directly.
GroupNorm normalises within one example, so unlike BatchNorm it leaves each example's gradient its own: the
normalisation DP-SGD uses in place of BatchNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _per_sample
from . import _torch_internals as internals
from ._core import autocast_apply, compile_twin, shape_str

__all__ = ["GroupNormFunction", "group_norm"]


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, *) -> (N, G, m)``, ``m = C/G · prod(*)``: each group's numbers in one row (the sizes given: a -1 is
    ambiguous for an empty batch)."""
    return t.reshape(t.shape[0], groups, math.prod(t.shape[1:]) // groups)


def _stats(x: torch.Tensor, groups: int, eps: float):
    """``(x̂, 1/r)``: x normalised per example and group, in x's shape, in float32 at least; ``1/r`` as ``(N, G, 1)``."""
    xg = _grouped(x.to(torch.promote_types(x.dtype, torch.float32)), groups)
    xc = xg - xg.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    return (xc * rstd).reshape(x.shape), rstd


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` tensor shaped to broadcast over ``like``'s ``(N, C, *)``."""
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ`` over every dim but the channels': ``(N, C, *) -> (C,)``."""
    return t.sum((0, *range(2, t.dim())))


class GroupNormFunction(torch.autograd.Function):
    """``y = γ_c ⊙ x̂ + β_c`` with ``x̂`` each example's channel groups normalised; ``weight`` γ and ``bias`` β of
    shape ``(C,)`` or None.

    backward: ``∂J/∂x = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)) / r`` per group with ``g = δ ⊙ γ_c``; ``∂J/∂γ_c = Σ δ ⊙ x̂``,
    ``∂J/∂β_c = Σ δ`` over examples and positions. jvp: ``dy = γ ⊙ dx̂ + dγ ⊙ x̂ + dβ`` with
    ``dx̂ = (dx − mean(dx) − x̂ ⊙ mean(x̂ ⊙ dx)) / r``. Saves only its inputs (x̂ and r made again in backward).
    Inside :func:`torchderiv.per_sample` the parameter gradients become each example's sums over its positions
    (:class:`~torchderiv.functional._per_sample.ExampleRule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, groups, eps):
        plain = not (torch.is_grad_enabled() or internals.transforms_active() or torch.compiler.is_compiling())
        if plain and len({t.dtype for t in (input, weight, bias) if t is not None}) == 1:
            return F.group_norm(input, groups, weight, bias, eps)  # torch's fused kernel for the value
        x_hat, _ = _stats(input, groups, eps)
        y = x_hat if weight is None else x_hat * _per_channel(weight, x_hat)
        y = y if bias is None else y + _per_channel(bias, y)
        return y.to(input.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, groups, eps = inputs
        ctx.save_for_backward(input, weight, bias)
        ctx.save_for_forward(input, weight, bias)
        ctx.config = (groups, eps)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        groups, eps = ctx.config
        needs = ctx.needs_input_grad
        x_hat, rstd = _stats(input, groups, eps)
        delta = grad_output.to(x_hat.dtype)
        grad_input = grad_weight = grad_bias = None
        if needs[0]:
            g = _grouped(delta if weight is None else delta * _per_channel(weight.to(x_hat.dtype), delta), groups)
            xg = _grouped(x_hat, groups)
            inner = g - g.mean(-1, keepdim=True) - xg * (g * xg).mean(-1, keepdim=True)
            grad_input = (inner * rstd).reshape(input.shape).to(input.dtype)
        want_w = weight is not None and needs[1]
        want_b = bias is not None and needs[2]
        rec = _per_sample.current
        if rec is not None and (want_w or want_b):
            w_p, b_p = rec.pair(weight, bias, _per_sample.tracked_pair(ctx))
            w_p, b_p = (w_p if want_w else None), (b_p if want_b else None)
            if w_p is not None or b_p is not None:
                _keep_examples(rec, w_p, b_p, delta, x_hat)
                want_w, want_b = want_w and w_p is None, want_b and b_p is None
        if want_w:
            grad_weight = _channel_sum(delta * x_hat).to(weight.dtype)
        if want_b:
            grad_bias = _channel_sum(delta).to(bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        input, weight, bias = ctx.saved_tensors
        groups, eps = ctx.config
        x_hat, rstd = _stats(input, groups, eps)
        dy = None
        if d_input is not None:
            dx, xg = _grouped(d_input.to(x_hat.dtype), groups), _grouped(x_hat, groups)
            dx_hat = ((dx - dx.mean(-1, keepdim=True) - xg * (xg * dx).mean(-1, keepdim=True)) * rstd).reshape(
                input.shape
            )
            dy = dx_hat if weight is None else dx_hat * _per_channel(weight, dx_hat)
        if weight is not None and d_weight is not None:
            term = x_hat * _per_channel(d_weight, x_hat)
            dy = term if dy is None else dy + term
        if bias is not None and d_bias is not None:
            term = _per_channel(d_bias, x_hat).expand(x_hat.shape)
            dy = term if dy is None else dy + term
        if dy is None:
            dy = torch.zeros_like(x_hat)
        return dy.to(input.dtype)


def _keep_examples(rec, w, b, delta, x_hat) -> None:
    """Hand each example's ``∂J/∂γ = Σ_positions δᵢ ⊙ x̂ᵢ`` and ``∂J/∂β = Σ_positions δᵢ`` (C numbers each) to the
    per_sample recorder."""

    def build(dim):
        dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
        lead = delta.reshape(delta.shape[0], delta.shape[1], math.prod(delta.shape[2:]))  # (N, C, positions)
        gw = None if w is None else (lead * x_hat.reshape(lead.shape)).sum(-1, dtype=dtype)
        gb = None if b is None else lead.sum(-1, dtype=dtype)
        return _per_sample.ExampleRule((w, b), (gw, gb))

    rec.keep((w, b), delta, x_hat, build)  # x̂ has the input's shape, (N, C, *): the examples along dim 0


GROUP_NORM = compile_twin(GroupNormFunction)


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """:func:`torch.nn.functional.group_norm` with torchderiv's backward and jvp: LayerNorm's derivatives per example
    and channel group, per-channel ``γ`` and ``β``. Same arguments, shapes and dtypes (statistics in float32 for
    lower-precision inputs; in float32 under CUDA autocast, as torch)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"group_norm: expected input to be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"group_norm: expected an input of shape (N, C, *), got shape {shape_str(input)}")
    channels = input.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise RuntimeError(
            f"group_norm: expected the number of channels of input ({channels}) to be divisible by num_groups, "
            f"but got input of shape {shape_str(input)} and num_groups={num_groups}"
        )
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (channels,)):
            got = shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"group_norm: expected {label} of shape ({channels},), got {got}")
    policy = "fp32" if input.device.type == "cuda" else None
    return autocast_apply(GROUP_NORM, policy, input, weight, bias, num_groups, float(eps))

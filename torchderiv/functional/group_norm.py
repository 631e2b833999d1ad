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
from ._core import autocast_apply, compile_twin, may_overwrite, save_for_forward, shape_str

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
        save_for_forward(ctx, input, weight, bias)
        ctx.config = (groups, eps)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        groups, eps = ctx.config
        needs = ctx.needs_input_grad
        # inside per_sample: the tracked (γ, β), whose per-example gradients go to the recorder
        keep, want_w, want_b = _per_sample.tracked_affine(
            ctx, weight, bias, weight is not None and needs[1], bias is not None and needs[2]
        )
        if _plain_backward_applies(grad_output, input, weight, bias):
            grads = _backward_plain(needs[0], want_w, want_b, grad_output, input, weight, groups, eps, keep)
            return grads + (None, None)
        x_hat, rstd = _stats(input, groups, eps)
        delta = grad_output.to(x_hat.dtype)
        grad_input = grad_weight = grad_bias = None
        if needs[0]:
            g = _grouped(delta if weight is None else delta * _per_channel(weight.to(x_hat.dtype), delta), groups)
            xg = _grouped(x_hat, groups)
            inner = g - g.mean(-1, keepdim=True) - xg * (g * xg).mean(-1, keepdim=True)
            grad_input = (inner * rstd).reshape(input.shape).to(input.dtype)
        if keep is not None:
            _keep_examples(*keep, delta, x_hat)
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


def _plain_backward_applies(grad_output, *tensors) -> bool:
    """A plain backward (nothing differentiates it) on one float32 or float64 dtype and a non-empty input, where
    torch's fused forward kernel gives x̂ and its statistics exactly as :func:`_stats` would (lower precisions keep x̂
    in float32)."""
    dtypes = {t.dtype for t in (grad_output, *tensors) if t is not None}
    plain = may_overwrite(grad_output) and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}
    # an empty input goes the general way: torch 2.14's kernel refuses no positions (its forward refuses them first)
    return plain and tensors[0].numel() > 0


_CHUNK_FLOATS = 1 << 20  # the scratch of the sums Σ δ ⊙ x̂: 4 MiB of float32, reused a few examples at a time


def _position_dots(delta: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``Σ_positions δ ⊙ x̂`` per example and channel, ``(N, C, L) -> (N, C)``, through one small scratch buffer:
    a product of the whole tensors would be a fresh buffer of x's size, whose pages cost more than the arithmetic
    on CPU."""
    n, c, length = delta.shape
    out = delta.new_empty(n, c)
    step = max(1, _CHUNK_FLOATS // max(1, c * length))
    scratch = delta.new_empty(min(step, n), c, length)
    for start in range(0, n, step):
        part = scratch[: min(step, n - start)]
        torch.mul(delta[start : start + step], x_hat[start : start + step], out=part)
        torch.sum(part, -1, out=out[start : start + step])
    return out


def _backward_plain(want_x, want_w, want_b, grad_output, input, weight, groups, eps, keep):
    """The backward's formulas (docs/derivation.md § normalisation layers) in a plain backward, arranged to pass over
    x few times: torch's forward kernel gives ``x̂``, ``μ`` and ``1/r`` in one pass and a fresh buffer, which becomes
    ``∂J/∂x``. With per example and channel ``s_c = Σ_pos δ`` and ``p_c = Σ_pos δ ⊙ x̂`` (each example's own
    ``∂J/∂β`` and ``∂J/∂γ``), the group means ``mean(g) = Σ_{c∈group} γ_c s_c / m`` and
    ``mean(g ⊙ x̂) = Σ_{c∈group} γ_c p_c / m``, and
    ``∂J/∂x = δ ⊙ (γ_c / r) − x̂ ⊙ mean(g ⊙ x̂) / r − mean(g) / r``."""
    n, c = input.shape[:2]
    length = math.prod(input.shape[2:])
    per = c // groups
    x_hat, _, rstd = torch.native_group_norm(input.contiguous(), None, None, n, c, length, groups, eps)
    delta = _positions(grad_output)  # (N, C, L)
    hat = _positions(x_hat)
    s = delta.sum(-1)  # (N, C)
    p = _position_dots(delta, hat) if (want_x or want_w or (keep is not None and keep[1] is not None)) else None
    if keep is not None:
        _keep_examples(*keep, grad_output, x_hat, sums=(p, s))
    grad_input = grad_weight = grad_bias = None
    if want_x:
        gamma = None if weight is None else weight.reshape(1, groups, per)
        r_inv = rstd.reshape(n, groups, 1)  # 1/r per example and group

        def group_mean(t):  # Σ_{c ∈ group} γ_c t_c / m, (N, C) -> (N, G, 1)
            t = t.reshape(n, groups, per)
            return (t if gamma is None else t * gamma).sum(-1, keepdim=True).div_(per * length)

        scale = r_inv.expand(n, groups, per) if gamma is None else r_inv * gamma  # γ_c / r, (N, G, C/G)
        grouped = hat.reshape(n, groups, per * length)
        # x̂ ⊙ (−mean(g ⊙ x̂) / r) − mean(g) / r written over x̂. NOTE: as two in-place passes: addcmul with these
        # per-group factors broadcast took 2.5 ms against 0.9 on (256, 8, 4096) (CPU, 2 threads, measured).
        grouped.mul_(group_mean(p).mul_(r_inv).neg_()).sub_(group_mean(s).mul_(r_inv))
        grouped.view(n, groups, per, length).addcmul_(delta.reshape(n, groups, per, length), scale.unsqueeze(-1))
        grad_input = x_hat
    if want_w:
        grad_weight = p.sum(0)
    if want_b:
        grad_bias = s.sum(0)
    return grad_input, grad_weight, grad_bias


def _positions(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, *) -> (N, C, L)`` (the sizes given: a -1 is ambiguous for an empty batch)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _keep_examples(rec, w, b, delta, x_hat, sums=None) -> None:
    """Hand each example's ``∂J/∂γ = Σ_positions δᵢ ⊙ x̂ᵢ`` and ``∂J/∂β = Σ_positions δᵢ`` (C numbers each) to the
    per_sample recorder; ``sums``: those two ``(N, C)`` sums when the caller has made them already."""

    def build(dim):
        if sums is not None:
            gw, gb = sums
        else:
            dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
            lead = _positions(delta)
            gw = None if w is None else (lead * _positions(x_hat)).sum(-1, dtype=dtype)
            gb = None if b is None else lead.sum(-1, dtype=dtype)
        return _per_sample.ExampleRule((w, b), (gw if w is not None else None, gb if b is not None else None))

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

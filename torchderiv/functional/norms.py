"""Layer normalisation and RMS normalisation as one autograd Function with hand-derived derivatives.

Over the last k dims of ``x`` (the normalised shape, n elements a row), with ``r`` the row's scale:

    LayerNorm:  μ = mean(x),  r = (mean((x − μ)²) + ε)^½,  x̂ = (x − μ) / r,  y = γ ⊙ x̂ + β
    RMSNorm:    μ = 0,        r = (mean(x²) + ε)^½,         x̂ = x / r,        y = γ ⊙ x̂

Neither is in the seed, whose layers are dense; they are the normalisations a transformer puts between its
dense layers. Derivation (docs/derivation.md § normalisation layers): with ``g = δ ⊙ γ`` (``δ = ∂J/∂y``) and
means over the row,

    ∂J/∂x = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)) / r      (RMSNorm: without the − mean(g))
    ∂J/∂γ = Σ_rows δ ⊙ x̂,    ∂J/∂β = Σ_rows δ

and the forward derivative ``dy = γ ⊙ dx̂ + dγ ⊙ x̂ + dβ`` with ``dx̂ = (dx − mean(dx) − x̂ ⊙ mean(x̂ ⊙ dx)) / r``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _per_sample
from . import _torch_internals as internals
from ._core import autocast_apply, compile_twin, may_overwrite, save_for_forward

__all__ = ["NormFunction", "layer_norm", "rms_norm"]


def _stats(x: torch.Tensor, k: int, eps: float, centered: bool):
    """``(x̂, 1/r)`` of each row over the last ``k`` dims, in float32 at least (torch's kernels accumulate there)."""
    dims = tuple(range(-k, 0))
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if centered:
        x = x - x.mean(dims, keepdim=True)
    rstd = torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    return x * rstd, rstd


def _row_mean(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.mean(tuple(range(-k, 0)), keepdim=True)


def _leading_sum(t: torch.Tensor, k: int) -> torch.Tensor:
    """``Σ_rows``: the sum over every dim but the last ``k``, shape ``t.shape[-k:]``."""
    lead = t.dim() - k
    return t.sum(tuple(range(lead))) if lead else t


def _affine(x_hat, weight, bias, out_dtype):
    y = x_hat if weight is None else x_hat * weight
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


class NormFunction(torch.autograd.Function):
    """``y = γ ⊙ x̂ + β`` with ``x̂`` the row normalised over the last ``k`` dims (centred for LayerNorm, not for
    RMSNorm); ``weight`` γ and ``bias`` β of the normalised shape, or None.

    backward: ``∂J/∂x = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)) / r`` with ``g = δ ⊙ γ`` (no ``mean(g)`` for RMSNorm),
    ``∂J/∂γ = Σ_rows δ ⊙ x̂``, ``∂J/∂β = Σ_rows δ``; jvp: ``dy = γ ⊙ dx̂ + dγ ⊙ x̂ + dβ``. Saves only its inputs:
    ``x̂`` and ``r`` are made again in backward (one pass over x), so double backward differentiates through them.
    Inside :func:`torchderiv.per_sample` the parameter gradients become each example's ``Σ_t δᵢₜ ⊙ x̂ᵢₜ`` and
    ``Σ_t δᵢₜ`` (n-sized: formed directly, :class:`~torchderiv.functional._per_sample.ExampleRule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, k, eps, centered):
        if _plain_eager(input, weight, bias):
            # torch's fused kernel for the value (one pass over x); the derivatives below are ours
            shape = input.shape[input.dim() - k :]
            if centered:
                return F.layer_norm(input, shape, weight, bias, eps)
            return F.rms_norm(input, shape, weight, eps)
        x_hat, _ = _stats(input, k, eps, centered)
        return _affine(x_hat, weight, bias, input.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, k, eps, centered = inputs
        ctx.save_for_backward(input, weight, bias)
        save_for_forward(ctx, input, weight, bias)
        ctx.config = (k, eps, centered)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        k, eps, centered = ctx.config
        needs = ctx.needs_input_grad
        # inside per_sample: the tracked (γ, β), whose per-example gradients go to the recorder
        keep, want_w, want_b = _per_sample.tracked_affine(
            ctx, weight, bias, weight is not None and needs[1], bias is not None and needs[2]
        )
        if may_overwrite(grad_output):
            grads = _backward_plain(needs[0], want_w, want_b, grad_output, input, weight, bias, k, eps, centered, keep)
            return grads + (None, None, None)
        x_hat, rstd = _stats(input, k, eps, centered)
        delta = grad_output.to(x_hat.dtype)
        grad_input = grad_weight = grad_bias = None
        if needs[0]:
            g = delta if weight is None else delta * weight
            inner = g - x_hat * _row_mean(g * x_hat, k)
            if centered:
                inner = inner - _row_mean(g, k)
            grad_input = (inner * rstd).to(input.dtype)
        if keep is not None:
            _keep_examples(*keep, delta, x_hat, k)
        if want_w:
            grad_weight = _leading_sum(delta * x_hat, k).to(weight.dtype)
        if want_b:
            grad_bias = _leading_sum(delta, k).to(bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        input, weight, bias = ctx.saved_tensors
        k, eps, centered = ctx.config
        x_hat, rstd = _stats(input, k, eps, centered)
        dy = None
        if d_input is not None:
            dx = d_input.to(x_hat.dtype)
            inner = dx - x_hat * _row_mean(x_hat * dx, k)
            if centered:
                inner = inner - _row_mean(dx, k)
            dy = inner * rstd if weight is None else inner * rstd * weight
        if weight is not None and d_weight is not None:
            dy = x_hat * d_weight if dy is None else dy + x_hat * d_weight
        if bias is not None and d_bias is not None:
            dy = d_bias.expand(x_hat.shape).to(x_hat.dtype) if dy is None else dy + d_bias
        if dy is None:
            dy = torch.zeros_like(x_hat)
        return dy.to(input.dtype)


def _plain_eager(*tensors) -> bool:
    """Nothing records, transforms or traces this forward, and every tensor is dense on one dtype: torch's fused
    kernel computes the same value."""
    if torch.is_grad_enabled() or internals.transforms_active() or torch.compiler.is_compiling():
        return False
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and all(t is None or t.layout == torch.strided for t in tensors)


def _backward_plain(want_x, want_w, want_b, grad_output, input, weight, bias, k, eps, centered, keep):
    """The backward's formulas (docs/derivation.md § normalisation layers) in a plain backward, where nothing
    differentiates them, arranged to pass over the ``(N, n)`` rows few times: ``x̂`` and ``r`` made again from
    ``x``; with ``P = δ ⊙ x̂``, the row mean ``mean(g ⊙ x̂) = P γ / n`` as a matrix–vector product,
    ``∂J/∂γ = Σ_rows P`` and ``∂J/∂β = Σ_rows δ`` as column sums, and ``∂J/∂x = (g − x̂ ⊙ mean(g ⊙ x̂) − mean(g)) / r``
    built over ``x̂`` in its own buffer, ``g = δ ⊙ γ`` in ``P``'s."""
    shape = input.shape[input.dim() - k :]
    n = math.prod(shape)
    x = input.to(torch.promote_types(input.dtype, torch.float32))
    if centered:
        # NOTE: x̂, μ and 1/r from torch's forward kernel, one pass over x: making them with torch ops took three
        # passes and two more (N, n) buffers, ~2.5 ms against 0.4 on (256, 64, 64) (CPU, 2 threads). γ = 1 is
        # passed, not None: torch's CPU kernel without an affine weight took 0.7-0.9 ms there against 0.35-0.5.
        x_hat, _, rstd = torch.native_layer_norm(x, shape, x.new_ones(shape), None, eps)
    else:
        rstd = torch.rsqrt(x.square().mean(tuple(range(-k, 0)), keepdim=True).add_(eps))
        x_hat = x * rstd
    delta = grad_output.to(x_hat.dtype)
    if keep is not None:
        _keep_examples(*keep, delta, x_hat, k)  # each example's sums are made here: x̂ is free afterwards
    rows, hat = delta.reshape(-1, n), x_hat.reshape(-1, n)
    gamma = None if weight is None else weight.reshape(n).to(x_hat.dtype)
    p = rows * hat if (want_x or want_w) else None
    grad_input = grad_weight = grad_bias = None
    if want_w:
        grad_weight = p.sum(0).reshape(weight.shape).to(weight.dtype)
    if want_b:
        grad_bias = rows.sum(0).reshape(bias.shape).to(bias.dtype)
    if want_x:
        lead = (-1, 1)
        # mean(g ⊙ x̂) = P γ / n, before P's buffer takes g
        m_gx = (p.sum(1) if gamma is None else p.mv(gamma)).div_(n).reshape(lead)
        g = rows if gamma is None else torch.mul(rows, gamma, out=p)  # g = δ ⊙ γ
        out = hat.mul_(m_gx.neg_())  # − x̂ ⊙ mean(g ⊙ x̂), over x̂
        if centered:
            # NOTE: mean(g) from the g that is added below, not as δ γ / n: where the two cancel (a row of one
            # element, where ∂J/∂x = 0) a product rounded differently leaves an ulp of g times 1/r
            out.sub_(g.mean(1, keepdim=True))
        grad_input = out.add_(g).mul_(rstd.reshape(lead)).reshape(input.shape).to(input.dtype)
    return grad_input, grad_weight, grad_bias


def _keep_examples(rec, w, b, delta, x_hat, k) -> None:
    """Hand each example's ``∂J/∂γ = Σ_t δᵢₜ ⊙ x̂ᵢₜ`` and ``∂J/∂β = Σ_t δᵢₜ`` to the per_sample recorder."""
    shape = delta.shape[delta.dim() - k :]
    n = math.prod(shape)
    # rows of n elements, (*, n): the examples' dim is among the leading ones, as for a dense layer's input
    rows, d_rows = x_hat.reshape(*x_hat.shape[: x_hat.dim() - k], n), delta.reshape(*delta.shape[: delta.dim() - k], n)

    def build(dim):
        dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
        gw = None if w is None else _per_sample.per_example_sum(d_rows * rows, dim, dtype).reshape(-1, *shape)
        gb = None if b is None else _per_sample.per_example_sum(d_rows, dim, dtype).reshape(-1, *shape)
        return _per_sample.ExampleRule((w, b), (gw, gb))

    rec.keep((w, b), d_rows, rows, build)


NORM = compile_twin(NormFunction)


def _normalized(input, normalized_shape, weight, bias, name):
    """Check the arguments as torch's ``layer_norm``/``rms_norm`` do; return the normalised shape as a tuple."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: expected input to be a Tensor, got {type(input).__name__}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if not shape:
        raise RuntimeError(f"{name}: expected normalized_shape to be at least 1-dimensional, got {list(shape)}")
    for label, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {label} to be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise RuntimeError(
                f"{name}: expected {label} of the normalized shape {list(shape)}, got {label} of shape {list(t.shape)}"
            )
    if tuple(input.shape[input.dim() - len(shape) :]) != shape or input.dim() < len(shape):
        raise RuntimeError(
            f"{name}: given normalized_shape={list(shape)}, expected input with shape [*, {', '.join(map(str, shape))}]"
            f", got input of size {list(input.shape)}"
        )
    return shape


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""``y = γ ⊙ (x − μ)/r + β`` over the last ``len(normalized_shape)`` dims, with torchderiv's backward and jvp.

    Same arguments, shapes and dtypes as :func:`torch.nn.functional.layer_norm` (statistics in float32 for
    lower-precision inputs; under CUDA autocast in float32, as torch; on CPU autocast leaves it alone, as torch).
    """
    shape = _normalized(input, normalized_shape, weight, bias, "layer_norm")
    policy = "fp32" if input.device.type == "cuda" else None
    return autocast_apply(NORM, policy, input, weight, bias, len(shape), float(eps), True)


def rms_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    r"""``y = γ ⊙ x/r``, ``r = (mean(x²) + ε)^½`` over the last ``len(normalized_shape)`` dims, with torchderiv's
    backward and jvp. Same arguments as :func:`torch.nn.functional.rms_norm` (``eps=None``: the input dtype's
    machine epsilon, as torch)."""
    shape = _normalized(input, normalized_shape, weight, None, "rms_norm")
    if eps is None:
        eps = torch.finfo(input.dtype if input.is_floating_point() else torch.float32).eps
    return autocast_apply(NORM, None, input, weight, None, len(shape), float(eps), False)

"""``H = g(H_prev Wᵀ + b)``: one dense layer and its activation in a single Function."""

from __future__ import annotations

import torch

from . import _per_sample
from ._core import autocast_apply, compile_twin, save_for_forward
from .activations import DEFAULT_PARAMS, get_activation
from .linear import check_linear_args, linear_backward, linear_forward, linear_jvp

__all__ = ["DenseFunction", "dense"]


class DenseFunction(torch.autograd.Function):
    """``Z = H⁽ᵏ⁻¹⁾ W⁽ᵏ⁾ᵀ + b⁽ᵏ⁾``, ``H⁽ᵏ⁾ = g(Z)``; returns ``(H⁽ᵏ⁾, Z)``.

    backward (seed §3.5–3.6, batched): ``Δ⁽ᵏ⁾ = ∂J/∂H⁽ᵏ⁾ ⊙ g'(Z) (+ ∂J/∂Z)``, then
    ``∂J/∂H⁽ᵏ⁻¹⁾ = Δ W``, ``∂J/∂W = Δᵀ H⁽ᵏ⁻¹⁾``, ``∂J/∂b = Σ_rows Δ``.
    jvp: ``dZ = dH Wᵀ + H dWᵀ + db``, ``dH⁽ᵏ⁾ = g'(Z) ⊙ dZ``.

    ``Z`` is an output so that an activation whose derivative needs ``z`` (gelu, silu, softplus) can
    keep it without recomputing the GEMM; it stays differentiable, so a gradient or
    tangent arriving for it is added in.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, activation, *params):
        z = linear_forward(input, weight, bias)
        return get_activation(activation).value(z, *params), z

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, activation, *params = inputs
        h, z = output
        act = get_activation(activation)
        ctx.act, ctx.params = act, tuple(params)
        saved = h if act.saves_output(*params) else z
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, weight, bias, saved)
        save_for_forward(ctx, input, weight, bias, saved)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_h, grad_z):
        input, weight, bias, saved = ctx.saved_tensors
        n_params = 1 + len(ctx.params)
        if grad_h is None and grad_z is None:
            return (None, None, None) + (None,) * n_params
        delta = None if grad_h is None else ctx.act.backprop(grad_h, saved, *ctx.params)
        if grad_z is not None:
            delta = grad_z if delta is None else delta + grad_z
        needs = ctx.needs_input_grad
        if _per_sample.current is not None:  # per-example norms / clipping: the weight GEMM is deferred
            needs = _per_sample.defer(needs, delta, input, weight, bias, _per_sample.tracked_pair(ctx))
        grads = linear_backward(needs, delta, input, weight, bias)
        return grads + (None,) * n_params

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        input, weight, bias, saved = ctx.saved_tensors
        dz = linear_jvp(input, weight, bias, d_input, d_weight, d_bias)
        return ctx.act.backprop(dz, saved, *ctx.params), dz


DENSE = compile_twin(DenseFunction)


def dense(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "relu",
    *params,
) -> torch.Tensor:
    """``g(x Wᵀ + b)`` in one Function: the seed's layer ``h⁽ᵏ⁾ = g(z⁽ᵏ⁾)``.

    Args:
        input: ``(*, in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        activation: one of :data:`~torchderiv.functional.activations.ACTIVATIONS`.
        *params: the activation's own parameters in torch's order (e.g. ``negative_slope``);
            torch's defaults when omitted.

    Returns:
        ``(*, out_features)``, in the autocast dtype under autocast, like ``F.linear``.
    """
    check_linear_args(input, weight, bias, name="dense")
    get_activation(activation)
    if not params:
        params = DEFAULT_PARAMS[activation]
    h, _ = autocast_apply(DENSE, "lower", input, weight, bias, activation, *params)
    return h

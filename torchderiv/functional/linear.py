"""The dense layer ``Z = H Wᵀ + b`` as an autograd Function with hand-derived derivatives."""

from __future__ import annotations

import math

import torch

from . import _per_sample
from . import _torch_internals as internals
from ._core import autocast_apply, compile_twin, save_for_forward, shape_str

__all__ = ["LinearFunction", "linear", "check_linear_args", "linear_backward", "linear_jvp"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(*, n) -> (prod(*), n)``. ``reshape``, not ``view``: gradients may arrive permuted."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def linear_forward(input, weight, bias):
    """``Z = H Wᵀ + b`` for ``H`` of shape ``(*, n_in)`` (seed §2, batched; docs/derivation.md)."""
    # NOTE: no reshape of the result: a returned view of an intermediate breaks forward-mode AD under
    # vmap ("tangent ... same layout as primal"). matmul folds leading dims without creating one.
    if input.dim() == 2:
        return torch.addmm(bias, input, weight.t()) if bias is not None else input.mm(weight.t())  # (N, n_out)
    if bias is not None and input.is_contiguous() and _plain_eager():
        # The bias added inside the GEMM (one pass less over Z), on the rows of H, written through a view into Z:
        # Z itself is then no view (a view of a temporary breaks forward-mode AD's tangent layout check).
        rows = math.prod(input.shape[:-1])  # explicit: a view to -1 is ambiguous when a size is 0
        z = input.new_empty(*input.shape[:-1], weight.shape[0])
        torch.addmm(bias, input.view(rows, input.shape[-1]), weight.t(), out=z.view(rows, weight.shape[0]))
        return z
    z = input.matmul(weight.t())  # (*, n_out)
    return z + bias if bias is not None else z


def _plain_eager() -> bool:
    """No autograd recording, torch.func transform or compiler tracing: an ``out=`` kernel may run."""
    return not (torch.is_grad_enabled() or internals.transforms_active() or torch.compiler.is_compiling())


def linear_backward(needs, delta, input, weight, bias):
    """Gradients of the reduced loss through ``Z = H Wᵀ + b`` given ``Δ = ∂J/∂Z``.

    ``∂J/∂H = Δ W`` (seed §3.4–3.5), ``∂J/∂W = Δᵀ H`` summed over all rows (§3.2–3.3),
    ``∂J/∂b = Σ_rows Δ`` (bias: erratum 7). Each GEMM runs only when ``needs`` asks for it.
    """
    grad_input = grad_weight = grad_bias = None
    flat = delta.dim() == 2
    if needs[0]:
        # NOTE: mm for the common 2-D case: matmul's dispatch costs ~10 µs more a call (measured).
        grad_input = delta.mm(weight) if flat else delta.matmul(weight)  # (*, n_in)
    if needs[1] or (bias is not None and needs[2]):
        d = delta if flat else _rows(delta)  # (N, n_out)
        if needs[1]:
            grad_weight = d.t().mm(input if flat else _rows(input))  # (n_out, n_in)
        if bias is not None and needs[2]:
            grad_bias = d.sum(0)  # (n_out,)
    return grad_input, grad_weight, grad_bias


def linear_jvp(input, weight, bias, d_input, d_weight, d_bias):
    """Forward-mode derivative: ``dZ = dH Wᵀ + H dWᵀ + db`` (product rule on seed §2)."""
    dz = None
    if d_input is not None:
        dz = d_input.matmul(weight.t())
    if d_weight is not None:
        term = input.matmul(d_weight.t())
        dz = term if dz is None else dz + term
    if bias is not None and d_bias is not None:
        dz = d_bias.expand(*input.shape[:-1], weight.shape[0]) if dz is None else dz + d_bias
    if dz is None:
        dz = input.new_zeros(*input.shape[:-1], weight.shape[0])
    return dz


class LinearFunction(torch.autograd.Function):
    """``Z = H Wᵀ + b`` with ``H: (*, n_in)``, ``W: (n_out, n_in)``, ``b: (n_out,)`` or None.

    backward (seed §3.2–3.5, batched): ``∂J/∂H = Δ W``, ``∂J/∂W = Δᵀ H``, ``∂J/∂b = Σ_rows Δ``.
    jvp: ``dZ = dH Wᵀ + H dWᵀ + db``. Saves only its inputs (H and W are needed anyway).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias):
        return linear_forward(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight, bias)
        save_for_forward(ctx, input, weight, bias)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if _per_sample.current is not None:  # per-example norms / clipping: the weight GEMM is deferred
            needs = _per_sample.defer(needs, grad_output, input, weight, bias, _per_sample.tracked_pair(ctx))
        return linear_backward(needs, grad_output, input, weight, bias)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias):
        input, weight, bias = ctx.saved_tensors
        return linear_jvp(input, weight, bias, d_input, d_weight, d_bias)


LINEAR = compile_twin(LinearFunction)


def check_linear_args(input, weight, bias, name="linear"):
    """Raise a clear error unless ``input (*, n_in)``, ``weight (n_out, n_in)``, ``bias (n_out,)`` fit."""
    for label, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {label} to be a Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise RuntimeError(f"{name}: expected a 2-D weight (out_features, in_features), got shape {shape_str(weight)}")
    if input.dim() < 1:
        raise RuntimeError(f"{name}: expected input with at least 1 dimension (*, {weight.shape[1]}), got a 0-D tensor")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"{name}: expected input with {weight.shape[1]} features (last dim), got shape {shape_str(input)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: expected bias to be a Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise RuntimeError(f"{name}: expected bias of shape ({weight.shape[0]},), got shape {shape_str(bias)}")


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""Applies ``y = x Aᵀ + b`` with torchderiv's hand-derived backward and jvp.

    Same arguments, shapes and autocast behaviour as :func:`torch.nn.functional.linear`.

    Args:
        input: ``(*, in_features)``; ``*`` may be empty or contain 0.
        weight: ``(out_features, in_features)``, or ``(in_features,)`` as torch also takes (one output
            feature, dropped from the result's shape).
        bias: ``(out_features,)`` or None; a 0-D tensor or None with a 1-D weight.

    Returns:
        ``(*, out_features)``, or ``(*)`` for a 1-D weight.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 0):
            raise RuntimeError(
                f"linear: with a 1-D weight of shape {shape_str(weight)} expected a 0-D bias or None, "
                f"got {shape_str(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
            )
        # One output feature: the same Function on a (1, in_features) weight; autograd differentiates
        # the reshapes around it.
        out = linear(input, weight.unsqueeze(0), None if bias is None else bias.reshape(1))
        return out.squeeze(-1)
    check_linear_args(input, weight, bias)
    return autocast_apply(LINEAR, "lower", input, weight, bias)

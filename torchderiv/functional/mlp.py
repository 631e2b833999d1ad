"""The whole seed network in one Function: forward propagation (§2) and the full backward pass (§3.6).

Holding every layer in one Function lets backward choose what to keep: for activations whose
derivative needs ``z`` (gelu, silu, softplus) only ``Z⁽ᵏ⁾`` is kept and ``H⁽ᵏ⁾ = g(Z⁽ᵏ⁾)`` is recomputed
when the next layer's weight gradient needs it, where autograd keeps both ``Z⁽ᵏ⁾`` and ``H⁽ᵏ⁾``.
"""

from __future__ import annotations

import torch

from ._core import autocast_apply, compile_twin
from .activations import DEFAULT_PARAMS, get_activation
from .linear import check_linear_args, linear_backward, linear_forward, linear_jvp

__all__ = ["MLPFunction", "mlp"]


class MLPFunction(torch.autograd.Function):
    """``Z⁽ᵏ⁾ = H⁽ᵏ⁻¹⁾ W⁽ᵏ⁾ᵀ + b⁽ᵏ⁾``, ``H⁽ᵏ⁾ = g(Z⁽ᵏ⁾)`` for k = 1 … L, then the linear output ``Z⁽ᴸ⁺¹⁾``.

    Inputs: ``(X, activation, act_params, W⁽¹⁾, b⁽¹⁾, …, W⁽ᴸ⁺¹⁾, b⁽ᴸ⁺¹⁾)`` (biases may be None).
    Outputs: ``(Z⁽ᴸ⁺¹⁾, S⁽¹⁾, …, S⁽ᴸ⁾)`` where ``S⁽ᵏ⁾`` is what backward keeps of layer k — ``H⁽ᵏ⁾`` when
    ``g'`` is exact from the output (relu, tanh, sigmoid, …), ``Z⁽ᵏ⁾`` otherwise. They are outputs so
    that they can be saved (DESIGN §4); they stay differentiable, and a gradient arriving for one is
    added in.

    backward (seed §3.6, batched), for k = L+1 … 1 with ``Δ⁽ᴸ⁺¹⁾ = ∂J/∂Z⁽ᴸ⁺¹⁾``:
    ``∂J/∂W⁽ᵏ⁾ = Δ⁽ᵏ⁾ᵀ H⁽ᵏ⁻¹⁾``, ``∂J/∂b⁽ᵏ⁾ = Σ_rows Δ⁽ᵏ⁾``, ``Δ⁽ᵏ⁻¹⁾ = (Δ⁽ᵏ⁾ W⁽ᵏ⁾) ⊙ g'(Z⁽ᵏ⁻¹⁾)``,
    and ``∂J/∂X = Δ⁽¹⁾ W⁽¹⁾``.
    jvp: ``dZ⁽ᵏ⁾ = dH⁽ᵏ⁻¹⁾ W⁽ᵏ⁾ᵀ + H⁽ᵏ⁻¹⁾ dW⁽ᵏ⁾ᵀ + db⁽ᵏ⁾``, ``dH⁽ᵏ⁾ = g'(Z⁽ᵏ⁾) ⊙ dZ⁽ᵏ⁾``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, activation, act_params, *layers):
        act = get_activation(activation)
        keep_h = act.saves_output(*act_params)
        # When only H is kept, g is applied in place: Z is our own fresh GEMM result, needed no more.
        value = act.value_ if keep_h else act.value
        h, kept = input, []
        for k in range(0, len(layers) - 2, 2):
            z = linear_forward(h, layers[k], layers[k + 1])
            h = value(z, *act_params)
            kept.append(h if keep_h else z)
        return (linear_forward(h, layers[-2], layers[-1]), *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, activation, act_params, *layers = inputs
        ctx.activation, ctx.act_params, ctx.n_layers = activation, act_params, len(layers) // 2
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, *layers, *output[1:])
        ctx.save_for_forward(input, *layers, *output[1:])

    @staticmethod
    def _unpack(ctx):
        saved = ctx.saved_tensors
        n = ctx.n_layers
        act = get_activation(ctx.activation)
        return act, saved[0], saved[1 : 1 + 2 * n], list(saved[1 + 2 * n :])

    @staticmethod
    def _layer_inputs(act, input, kept, act_params):
        """``H⁽⁰⁾ … H⁽ᴸ⁾``: kept directly, or recomputed from the kept ``Z`` (cheap next to a GEMM)."""
        keep_h = act.saves_output(*act_params)
        return [input] + [s if keep_h else act.value(s, *act_params) for s in kept]

    @staticmethod
    def backward(ctx, grad_output, *grad_kept):
        act, input, layers, kept = MLPFunction._unpack(ctx)
        params = ctx.act_params
        keep_h = act.saves_output(*params)
        needs = ctx.needs_input_grad
        n = ctx.n_layers
        grads = [None] * (2 * n)
        grad_input = None
        # Layer k (0-based) needs Δ⁽ᵏ⁾ W⁽ᵏ⁾ if anything before it needs a gradient.
        upstream = [needs[0] or any(needs[3 : 3 + 2 * k]) for k in range(n)]
        delta = grad_output
        for k in range(n - 1, -1, -1):
            gi = None
            if delta is not None:
                h_prev = input if k == 0 else (kept[k - 1] if keep_h else act.value(kept[k - 1], *params))
                layer_needs = (upstream[k], needs[3 + 2 * k], needs[4 + 2 * k])
                gi, grads[2 * k], grads[2 * k + 1] = linear_backward(
                    layer_needs, delta, h_prev, *layers[2 * k : 2 * k + 2]
                )
            if k == 0:
                grad_input = gi
                break
            # A gradient may also arrive for the kept S⁽ᵏ⁾ itself (e.g. in double backward): add it in.
            g_kept = grad_kept[k - 1]
            owned = gi is not None  # a fresh GEMM result (or sum), which the product may overwrite
            if keep_h and g_kept is not None:
                gi = g_kept if gi is None else gi + g_kept
            # Δ⁽ᵏ⁻¹⁾ = (Δ W) ⊙ g'(Z)
            delta = None if gi is None else act.backprop(gi, kept[k - 1], *params, owned=owned)
            if not keep_h and g_kept is not None:
                delta = g_kept if delta is None else delta + g_kept
        return (grad_input, None, None, *grads)

    @staticmethod
    def jvp(ctx, d_input, _activation, _act_params, *d_layers):
        act, input, layers, kept = MLPFunction._unpack(ctx)
        params = ctx.act_params
        keep_h = act.saves_output(*params)
        hs = MLPFunction._layer_inputs(act, input, kept, params)
        dh, d_kept = d_input, []
        for k in range(ctx.n_layers):
            dz = linear_jvp(hs[k], layers[2 * k], layers[2 * k + 1], dh, d_layers[2 * k], d_layers[2 * k + 1])
            if k == ctx.n_layers - 1:
                return (dz, *d_kept)
            dh = act.backprop(dz, kept[k], *params)  # dH = g'(Z) ⊙ dZ
            d_kept.append(dh if keep_h else dz)


MLP_FUNCTION = compile_twin(MLPFunction)


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
    get_activation(activation)
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights) or not weights:
        raise ValueError(
            f"mlp: expected one bias (or None) per weight, got {len(weights)} weights and {len(biases)} biases"
        )
    check_linear_args(input, weights[0], biases[0], name="mlp layer 1")
    for k in range(1, len(weights)):
        w, b, n_prev = weights[k], biases[k], weights[k - 1].shape[0]
        if w.dim() != 2 or w.shape[1] != n_prev:
            raise RuntimeError(
                f"mlp layer {k + 1}: expected a weight of shape (out_features, {n_prev}) to follow "
                f"layer {k}'s {n_prev} outputs, got shape {tuple(w.shape)}"
            )
        if b is not None and b.shape != (w.shape[0],):
            raise RuntimeError(f"mlp layer {k + 1}: expected bias of shape ({w.shape[0]},), got shape {tuple(b.shape)}")
    params = act_params or DEFAULT_PARAMS[activation]
    layers = [t for pair in zip(weights, biases) for t in pair]
    return autocast_apply(MLP_FUNCTION, "lower", input, activation, tuple(params), *layers)[0]

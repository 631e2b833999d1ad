"""A learned additive position parameter ``y = x + P`` as an autograd Function with hand-derived derivatives.

Not in the seed (whose inputs carry no positions); docs/derivation.md § Embeddings, positions and attention: the
sum passes Δ to x unchanged and gives row t of P the sum of the examples' rows t of Δ.
"""

from __future__ import annotations

import torch

from . import _per_sample
from ._core import apply, compile_twin, shape_str

__all__ = ["PositionalFunction", "positional"]


def _rows(weight: torch.Tensor, t: int, seq_first: bool) -> torch.Tensor:
    """``P[:T]`` shaped to broadcast over the batch: ``(T, d)``, or ``(T, 1, d)`` for ``(T, B, d)`` inputs."""
    p = weight[:t]
    return p.unsqueeze(1) if seq_first else p


class PositionalFunction(torch.autograd.Function):
    """``y[…, t, :] = x[…, t, :] + P[t]`` for the T positions of ``x`` (``P: (num_positions, d)``).

    backward: ``∂J/∂x = Δ``, ``∂J/∂P[t] = Σ_examples δ_t`` (rows past T zero); jvp: ``dy = dx + dP[:T]``.
    Inside :func:`torchderiv.per_sample` example i's gradient is its own ``Δᵢ`` (T × d, padded to P's rows), its
    squared norm ``‖Δᵢ‖²`` (:class:`~torchderiv.functional._per_sample.ExampleRule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, seq_first):
        t = input.shape[0 if seq_first else -2]
        return input + _rows(weight, t, seq_first)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, seq_first = inputs
        ctx.config = (input.shape[0 if seq_first else -2], weight.shape[0], seq_first, output.shape, weight.dtype)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, None)

    @staticmethod
    def backward(ctx, grad_output):
        t, num, seq_first, _, w_dtype = ctx.config
        needs = ctx.needs_input_grad
        grad_weight = None
        if needs[1]:
            rec = _per_sample.current
            w = None if rec is None else rec.pair(None, None, _per_sample.tracked_pair(ctx))[0]
            if w is not None:
                rec.keep((w,), grad_output, grad_output, lambda dim: _examples(w, grad_output, dim, num))
            else:
                # Σ over the examples: (B, T, d) or (T, B, d); an unbatched (T, d) is one example
                summed = grad_output if grad_output.dim() == 2 else grad_output.sum(1 if seq_first else 0)
                grad_weight = torch.nn.functional.pad(summed, (0, 0, 0, num - t)).to(w_dtype)
        return (grad_output if needs[0] else None), grad_weight, None

    @staticmethod
    def jvp(ctx, d_input, d_weight, _):
        t, _, seq_first, shape, _ = ctx.config
        if d_weight is None:
            return d_input
        rows = _rows(d_weight, t, seq_first).expand(shape)
        return rows if d_input is None else d_input + rows


def _examples(w, delta, dim, num):
    """Example i's gradient ``Δᵢ`` (its T rows), padded to ``num`` rows: ``(B, num, d)``."""
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    rows = _per_sample.by_sample(delta, dim).to(dtype)  # (B, T, d)
    return _per_sample.ExampleRule((w,), (torch.nn.functional.pad(rows, (0, 0, 0, num - rows.shape[1])),))


POSITIONAL = compile_twin(PositionalFunction)


def positional(input: torch.Tensor, weight: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """``input + weight[:T]`` over the T positions of ``input``: ``(B, T, d)`` (``batch_first``), ``(T, B, d)``
    (not), or ``(T, d)`` unbatched; ``weight: (num_positions, d)`` with ``T ≤ num_positions``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        what = shape_str(weight) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise RuntimeError(f"positional: expected a 2-D weight (num_positions, embedding_dim), got {what}")
    if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3) or input.shape[-1] != weight.shape[1]:
        what = shape_str(input) if isinstance(input, torch.Tensor) else type(input).__name__
        raise RuntimeError(
            f"positional: expected input (B, T, {weight.shape[1]}), (T, B, {weight.shape[1]}) or "
            f"(T, {weight.shape[1]}), got {what}"
        )
    rec = _per_sample.current
    if rec is not None and input.dim() == 2 and rec.param(weight) is not None:
        raise RuntimeError(
            f"per_sample: positional was called on an unbatched input of shape {shape_str(input)}; expected (B, T, "
            f"{weight.shape[1]}), or (T, B, {weight.shape[1]}) with batch_first=False"
        )
    seq_first = not batch_first and input.dim() == 3
    t = input.shape[0 if seq_first else -2]
    if t > weight.shape[0]:
        raise RuntimeError(
            f"positional: {t} positions in an input of shape {shape_str(input)}, but {weight.shape[0]} in weight"
        )
    return apply(POSITIONAL, input, weight, seq_first)

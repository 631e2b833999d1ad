"""The embedding lookup ``out[r] = W[x_r]`` as an autograd Function with hand-derived derivatives.

A lookup is a dense layer whose input is a one-hot row, ``out_r = e_{x_r}ᵀ W`` (seed §2 with ``H = onehot(x)``
and no bias), so the seed's weight gradient ``Δᵀ H`` (§3.2–3.3) becomes: row v of ``∂J/∂W`` is the sum of the
rows of Δ whose index is v, ``∂J/∂W = Σ_r e_{x_r} δ_rᵀ`` — an index-add, never the one-hot product. The indices
get no gradient. ``padding_idx``'s row gets none either (torch's convention: that row stays as initialised).
"""

from __future__ import annotations

import torch

from . import _per_sample
from ._core import apply, compile_twin, save_for_forward, shape_str

__all__ = ["EmbeddingFunction", "embedding"]


def _index_add_rows(num: int, index: torch.Tensor, rows: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """``Σ_r e_{index_r} rows_rᵀ``: ``(num, d)``, out of place (differentiable in ``rows``), row ``padding_idx``
    zero."""
    out = rows.new_zeros(num, rows.shape[-1]).index_add(0, index, rows)
    if padding_idx is not None:
        out = out.index_fill(0, out.new_tensor([padding_idx], dtype=torch.long), 0)
    return out


class EmbeddingFunction(torch.autograd.Function):
    """``out[…] = W[x[…]]`` for integer ``x`` of any shape and ``W: (V, d)``.

    backward: ``∂J/∂W = Σ_r e_{x_r} δ_rᵀ`` (index-add of Δ's rows; the dense rule ``Δᵀ H`` with one-hot H), row
    ``padding_idx`` zero; jvp: ``d out = dW[x]``. Inside :func:`torchderiv.per_sample` the weight's gradient is
    each example's ``Gᵢ = Σ_t e_{x_it} δᵢₜᵀ``: a token repeated within an example adds its rows before the square
    (:class:`EmbeddingRule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, padding_idx):
        flat = torch.index_select(weight, 0, input.reshape(-1))  # (N, d); an out-of-range index raises
        return flat.reshape(*input.shape, weight.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, padding_idx = inputs
        ctx.save_for_backward(input)
        save_for_forward(ctx, input)
        ctx.config = (weight.shape[0], padding_idx)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, None)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        num, padding_idx = ctx.config
        if not ctx.needs_input_grad[1]:
            return None, None, None
        rec = _per_sample.current
        if rec is not None:
            w = rec.pair(None, None, _per_sample.tracked_pair(ctx))[0]
            if w is not None:
                # Δ's leading dims are the indices': they stand for the layer's rows in the checks
                rule = lambda dim: EmbeddingRule(w, input, grad_output, dim, num, padding_idx)  # noqa: E731
                rec.keep((w,), grad_output, grad_output, rule)
                return None, None, None
        index = input.reshape(-1)
        return (
            None,
            _index_add_rows(num, index, grad_output.reshape(index.shape[0], grad_output.shape[-1]), padding_idx),
            None,
        )

    @staticmethod
    def jvp(ctx, d_input, d_weight, _):
        (input,) = ctx.saved_tensors
        flat = torch.index_select(d_weight, 0, input.reshape(-1))
        return flat.reshape(*input.shape, d_weight.shape[1])


class EmbeddingRule(_per_sample.Rule):
    """An embedding's per-example gradients ``Gᵢ = Σ_t e_{x_it} δᵢₜᵀ`` (V × d, at most T nonzero rows).

    ``‖Gᵢ‖² = Σ_v ‖Σ_{t: x_it = v} δᵢₜ‖²``: Δ's rows summed by unique (example, token) pair, then squared —
    equal to the masked Gram ``Σ_{t,s} [x_it = x_is] ⟨δᵢₜ, δᵢₛ⟩`` at O(B·T·d) instead of O(B·T²·d). Treating a
    repeated token's rows as separate outer products would leave out the cross terms. Clipped sum: the
    ordinary index-add with example i's rows scaled by ``cᵢ``. ``padding_idx`` rows count nowhere.
    """

    def __init__(self, w, input, delta, dim, num, padding_idx):
        super().__init__((w,))
        self.num, self.padding_idx, self.dim = num, padding_idx, dim
        dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
        # (B, T) indices and (B, T, d) rows of each example
        self.index = _per_sample.by_sample(input.unsqueeze(-1), dim).squeeze(-1)
        self.delta = _per_sample.by_sample(delta, dim)
        b, t, d = self.delta.shape
        rows = self.delta.reshape(b * t, d).to(dtype)
        if padding_idx is not None:
            rows = rows.masked_fill((self.index.reshape(-1) == padding_idx).unsqueeze(1), 0)
        example = torch.arange(b, device=delta.device).repeat_interleave(t)
        self.key = example * num + self.index.reshape(-1)  # one key per (example, token)
        pairs, which = torch.unique(self.key, return_inverse=True)
        summed = rows.new_zeros(pairs.shape[0], d).index_add_(0, which, rows)
        self.sq = rows.new_zeros(b).index_add_(0, pairs // num, summed.square().sum(1))

    def clipped(self, c):
        b, t, d = self.delta.shape
        rows = self.delta if c is None else self.delta * c.reshape(b, 1, 1).to(self.delta.dtype)
        return (_index_add_rows(self.num, self.index.reshape(-1), rows.reshape(b * t, d), self.padding_idx),)

    def samples(self):
        b, t, d = self.delta.shape
        dense = _index_add_rows(b * self.num, self.key, self.delta.reshape(b * t, d), None).reshape(b, self.num, d)
        if self.padding_idx is not None:
            dense[:, self.padding_idx] = 0
        return (dense,)


EMBEDDING = compile_twin(EmbeddingFunction)


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    r"""``out[…] = weight[input[…]]`` with torchderiv's backward and jvp; torch's arguments.

    ``max_norm`` (which renormalises rows of ``weight`` in place during the forward), ``scale_grad_by_freq`` and
    ``sparse`` are not supported: each raises ``NotImplementedError`` rather than be ignored.

    Args:
        input: integer indices of any shape. weight: ``(num_embeddings, embedding_dim)``.
        padding_idx: a row that gets no gradient (negative counts from the end, as torch).

    Returns:
        ``(*input.shape, embedding_dim)``.
    """
    unsupported = [
        name
        for name, value, default in (
            ("max_norm", max_norm, None),
            ("scale_grad_by_freq", scale_grad_by_freq, False),
            ("sparse", sparse, False),
        )
        if value != default
    ]
    if unsupported:
        raise NotImplementedError(
            f"embedding: {', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not supported by "
            f"torchderiv's Function (use torch.nn.functional.embedding for it)"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        what = shape_str(weight) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise RuntimeError(f"embedding: expected a 2-D weight (num_embeddings, embedding_dim), got {what}")
    if not isinstance(input, torch.Tensor) or input.dtype not in (torch.long, torch.int):
        what = input.dtype if isinstance(input, torch.Tensor) else type(input).__name__
        raise RuntimeError(f"embedding: expected input to be a Long or Int tensor of indices, got {what}")
    if padding_idx is not None:
        num = weight.shape[0]
        if not -num <= padding_idx < num:
            raise AssertionError(f"embedding: padding_idx must be within num_embeddings ({num}), got {padding_idx}")
        padding_idx = padding_idx % num
    return apply(EMBEDDING, input.long(), weight, padding_idx)

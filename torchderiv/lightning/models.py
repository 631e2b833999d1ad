"""Models to train from a config (``model.init_args.model.class_path``), built from ``torch.nn``:
:class:`~torchderiv.lightning.ModelModule` converts them to torchderiv's Functions."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import Positional

__all__ = ["TokenTransformer"]


class TokenTransformer(nn.Module):
    """A transformer classifier of token sequences: embedding + learned positions, pre-norm encoder layers, a
    final LayerNorm and a linear head on the flattened positions.

    Each of the ``length`` positions of an input ``(B, length)`` of token ids gets ``E[x_t] + P[t]``; the encoder
    layers (``batch_first``, GELU) mix them; the head reads every position's features, ``(B, length · d_model)``,
    so it knows where each feature came from. Every parameter is one that :func:`torchderiv.per_sample` clips
    after :func:`torchderiv.convert`.

    Args:
        num_tokens: vocabulary size (digits: intensities 0–16, 17). length: positions per example.
        d_model, nhead, dim_feedforward, num_layers, dropout, norm_first: as :class:`torch.nn.TransformerEncoderLayer`.
        num_classes: outputs (logits).
        position_std: the positions' initial standard deviation (1: as large as the token embeddings', N(0, 1),
            so that where a pixel lies counts from the first step).
    """

    def __init__(
        self,
        num_tokens: int = 17,
        length: int = 64,
        d_model: int = 32,
        nhead: int = 4,
        dim_feedforward: int = 128,
        num_layers: int = 2,
        num_classes: int = 10,
        dropout: float = 0.1,
        norm_first: bool = True,
        position_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, d_model)
        self.positions = Positional(length, d_model, batch_first=True, init_std=position_std)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation="gelu", batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(length * d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, length) -> (B, num_classes)
        h = self.norm(self.encoder(self.positions(self.embedding(tokens))))  # (B, length, d_model)
        return self.head(h.flatten(1))

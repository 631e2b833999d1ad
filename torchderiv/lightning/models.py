"""Models to train from a config (``model.init_args.model.class_path``), built from ``torch.nn``:
:class:`~torchderiv.lightning.ModelModule` converts them to torchderiv's Functions."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..nn import Positional

__all__ = ["TokenTransformer", "DigitsCNN"]


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


class DigitsCNN(nn.Module):
    """A small CNN for 8×8 images given as 64 features (digits), in the shape of Opacus's MNIST example: two
    convolutions with ReLU and 2×2 max-pooling, then two dense layers.

    ``(B, 64) -> (B, 1, 8, 8)``, conv 3×3 (padding 1) to ``channels[0]``, pool to 4×4, conv 3×3 to ``channels[1]``,
    pool to 2×2, flatten, dense to ``hidden``, ReLU, dense to ``num_classes``. Every parameter is one that
    :func:`torchderiv.per_sample` clips after :func:`torchderiv.convert` (the pooling has none).

    Args:
        channels: output channels of the two convolutions.
        hidden: units of the hidden dense layer.
        num_classes: outputs (logits).
        side: the images' side (digits: 8); a multiple of 4.
        activation: after each convolution and the hidden layer: ``relu`` or ``tanh`` (bounded: often the better
            choice under DP-SGD, whose clipping and noise favour small, bounded activations).
    """

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        num_classes: int = 10,
        side: int = 8,
        activation: Literal["relu", "tanh"] = "relu",
    ) -> None:
        super().__init__()
        if side % 4:
            raise ValueError(f"DigitsCNN: expected the images' side to be a multiple of 4, got {side}")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"DigitsCNN: expected activation 'relu' or 'tanh', got {activation!r}")
        self.side = side
        act = nn.ReLU if activation == "relu" else nn.Tanh
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            act(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * (side // 4) ** 2, hidden), act(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, side²) -> (B, num_classes)
        return self.classifier(self.features(x.reshape(-1, 1, self.side, self.side)))

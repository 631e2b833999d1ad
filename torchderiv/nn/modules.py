"""Drop-in ``torch.nn`` modules whose forward calls torchderiv's Functions.

Each module subclasses its torch counterpart: same constructor, initialisation, buffers,
``state_dict`` keys and ``extra_repr``. Only ``forward`` changes, so an optimizer, a checkpoint or an
inspection tool sees ordinary torch modules.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as TF
from ..functional.activations import get_activation

__all__ = [
    "Linear",
    "Dense",
    "MLP",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "LeakyReLU",
    "ELU",
    "Softplus",
    "GELU",
    "SiLU",
    "MSELoss",
    "HuberLoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
]


class Linear(nn.Linear):
    r"""``y = x Aᵀ + b`` — :class:`torch.nn.Linear` with torchderiv's hand-derived backward.

    Args / Shape: as :class:`torch.nn.Linear` (input ``(*, in_features)``, output ``(*, out_features)``).

    Examples::

        >>> layer = Linear(20, 30)
        >>> layer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def forward(self, input: Tensor) -> Tensor:
        return TF.linear(input, self.weight, self.bias)


class Dense(Linear):
    r"""``h = g(x Aᵀ + b)``: a dense layer and its activation in one Function (seed §2).

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        activation: name of g, one of ``torchderiv.functional.ACTIVATIONS`` (torch's default parameters).

    Parameters are those of :class:`torch.nn.Linear` (``weight``, ``bias``), initialised the same way.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "relu",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        get_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return TF.dense(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"


class MLP(nn.Module):
    r"""The seed's network: ``sizes = [n_0, n_1, …, n_L, n_out]``.

    ``H⁽ᵏ⁾ = g(H⁽ᵏ⁻¹⁾ W⁽ᵏ⁾ᵀ + b⁽ᵏ⁾)`` for the L hidden layers, then the linear output
    ``Z⁽ᴸ⁺¹⁾ = H⁽ᴸ⁾ W⁽ᴸ⁺¹⁾ᵀ + b⁽ᴸ⁺¹⁾`` (logits, before the loss). The layers are held in order as
    :class:`Linear` modules in ``layers`` and are the only parameters, so ``state_dict`` keys are
    ``layers.{k}.weight`` / ``layers.{k}.bias``.

    Args:
        sizes: layer widths, input first, output last (at least two entries).
        activation: g, one of ``torchderiv.functional.ACTIVATIONS``.
        bias: whether every layer has a bias (the seed's has none; erratum 7).
    """

    def __init__(self, sizes, activation: str = "relu", bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"MLP: expected sizes [n_0, …, n_out] of at least two positive widths, got {sizes}")
        get_activation(activation)
        self.sizes = sizes
        self.activation = activation
        self.layers = nn.ModuleList(
            Linear(n_in, n_out, bias=bias, device=device, dtype=dtype) for n_in, n_out in zip(sizes[:-1], sizes[1:])
        )

    def _weights_and_biases(self) -> tuple[list[Tensor], list[Tensor | None]]:
        # NOTE: read the parameters from each layer's _parameters dict: nn.Module.__getattr__ costs ~1 µs a
        # lookup, a measurable share of a small network's step.
        params = [m._parameters for m in self.layers._modules.values()]
        return [p["weight"] for p in params], [p["bias"] for p in params]

    def forward(self, input: Tensor) -> Tensor:
        # One Function for the whole network (torchderiv.functional.mlp): it keeps only what backward needs.
        return TF.mlp(input, *self._weights_and_biases(), self.activation)

    def cross_entropy(
        self,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """``(F.cross_entropy(self(input), target, …), self(input))`` in one Function (one autograd node).

        The loss and the logits (for metrics), with the values and gradients of the two calls; on a
        small network this is the faster way to train (:func:`torchderiv.functional.mlp_cross_entropy`).
        Input ``(n_0,)`` or ``(N, n_0)``; the other arguments as :func:`torch.nn.functional.cross_entropy`.
        """
        return TF.mlp_cross_entropy(
            input,
            *self._weights_and_biases(),
            target,
            self.activation,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation!r}"


# --- activations: torch's modules, torchderiv's forward -------------------------------------------


class ReLU(nn.ReLU):
    """:class:`torch.nn.ReLU` through :func:`torchderiv.functional.relu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.relu(input, inplace=self.inplace)


class Sigmoid(nn.Sigmoid):
    """:class:`torch.nn.Sigmoid` through :func:`torchderiv.functional.sigmoid`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.sigmoid(input)


class Tanh(nn.Tanh):
    """:class:`torch.nn.Tanh` through :func:`torchderiv.functional.tanh`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.tanh(input)


class LeakyReLU(nn.LeakyReLU):
    """:class:`torch.nn.LeakyReLU` through :func:`torchderiv.functional.leaky_relu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(nn.ELU):
    """:class:`torch.nn.ELU` through :func:`torchderiv.functional.elu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.elu(input, self.alpha, self.inplace)


class Softplus(nn.Softplus):
    """:class:`torch.nn.Softplus` through :func:`torchderiv.functional.softplus`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.softplus(input, self.beta, self.threshold)


class GELU(nn.GELU):
    """:class:`torch.nn.GELU` through :func:`torchderiv.functional.gelu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.gelu(input, approximate=self.approximate)


class SiLU(nn.SiLU):
    """:class:`torch.nn.SiLU` through :func:`torchderiv.functional.silu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.silu(input, inplace=self.inplace)


# --- losses -------------------------------------------------------------------------------------------


class MSELoss(nn.MSELoss):
    """:class:`torch.nn.MSELoss` through :func:`torchderiv.functional.mse_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.mse_loss(input, target, reduction=self.reduction)


class HuberLoss(nn.HuberLoss):
    """:class:`torch.nn.HuberLoss` through :func:`torchderiv.functional.huber_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` through :func:`torchderiv.functional.binary_cross_entropy_with_logits`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` through :func:`torchderiv.functional.cross_entropy`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class LinearCrossEntropyLoss(nn.LinearCrossEntropyLoss):
    """:class:`torch.nn.LinearCrossEntropyLoss` through :func:`torchderiv.functional.linear_cross_entropy`.

    Same constructor, parameters and ``state_dict`` keys (``linear.weight``, ``linear.bias``) as torch's,
    plus ``chunk_size`` (rows per chunk). When it is None, ``options.batch_chunk_size`` is used if
    given, else a size chosen from the number of classes. Every path is chunked and keeps double
    backward, forward AD, torch.func, compile and label smoothing.
    """

    def __init__(self, in_features: int, num_classes: int, *, chunk_size: int | None = None, **kwargs) -> None:
        super().__init__(in_features, num_classes, **kwargs)
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        bias = None if self.linear.bias is None else self.linear.bias.reshape((self.num_classes, *self.out_features))
        return TF.linear_cross_entropy(
            input,
            weight,
            target,
            linear_bias=bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else "")

"""Drop-in ``torch.nn`` modules whose forward calls torchderiv's Functions.

Each module subclasses its torch counterpart: same constructor, initialisation, buffers,
``state_dict`` keys and ``extra_repr``. Only ``forward`` changes, so an optimizer, a checkpoint or an
inspection tool sees ordinary torch modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .. import functional as TF
from ..functional.activations import get_activation
from ..functional.mlp import mlp_cross_entropy_layers, mlp_layers

__all__ = [
    "TorchderivModule",
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
    "LayerNorm",
    "RMSNorm",
    "Embedding",
    "Positional",
    "MultiheadAttention",
    "Conv1d",
    "Conv2d",
    "GroupNorm",
]


class TorchderivModule:
    """Mixin of every drop-in twin: ``print(model)`` names it ``torchderiv.<Name>``, so a converted model
    shows which of its layers run torchderiv's Functions."""

    def _get_name(self) -> str:
        return "torchderiv." + type(self).__name__

    def per_sample_parameters(self) -> tuple:
        """The parameters whose per-example gradients this module's Functions hand to
        :func:`torchderiv.per_sample` (a rule each, ``functional/_per_sample.py``); per_sample tracks these and
        refuses any other trainable parameter. None by default (activations, losses)."""
        return ()


def _own(module: nn.Module, *names: str) -> tuple:
    return tuple(p for p in (getattr(module, n) for n in names) if p is not None)


class Linear(TorchderivModule, nn.Linear):
    r"""``y = x Aᵀ + b`` — :class:`torch.nn.Linear` with torchderiv's hand-derived backward.

    Args / Shape: as :class:`torch.nn.Linear` (input ``(*, in_features)``, output ``(*, out_features)``).

    Examples::

        >>> layer = Linear(20, 30)
        >>> layer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def forward(self, input: Tensor) -> Tensor:
        return TF.linear(input, self.weight, self.bias)

    def per_sample_parameters(self) -> tuple:
        return _own(self, "weight", "bias")


class _ConvTwin(TorchderivModule):
    """What torchderiv's Conv1d and Conv2d share: torch's forward, with the convolution itself torchderiv's."""

    _functional = None

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            # torch's own padding for the other modes (autograd differentiates it), then a convolution without
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return type(self)._functional(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return type(self)._functional(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def per_sample_parameters(self) -> tuple:
        return _own(self, "weight", "bias")


class Conv1d(_ConvTwin, nn.Conv1d):
    r""":class:`torch.nn.Conv1d` with torchderiv's backward: the dense layer over patches
    (:func:`torchderiv.functional.conv1d`). Args / Shape: as torch's; every ``padding_mode``."""

    _functional = staticmethod(TF.conv1d)


class Conv2d(_ConvTwin, nn.Conv2d):
    r""":class:`torch.nn.Conv2d` with torchderiv's backward: the dense layer over patches
    (:func:`torchderiv.functional.conv2d`). Args / Shape: as torch's; every ``padding_mode``.

    Examples::

        >>> conv = Conv2d(1, 8, 3, padding=1)
        >>> conv(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 8, 8, 8])
    """

    _functional = staticmethod(TF.conv2d)


class GroupNorm(TorchderivModule, nn.GroupNorm):
    r""":class:`torch.nn.GroupNorm` with torchderiv's backward (:func:`torchderiv.functional.group_norm`): LayerNorm's
    derivatives per example and channel group. Args / Shape: as torch's."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def per_sample_parameters(self) -> tuple:
        return _own(self, "weight", "bias")


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

    The whole network runs as one Function (:func:`torchderiv.functional.mlp`), which reads the children's
    weights directly, as long as every child is a plain :class:`Linear`. When one is hooked (forward,
    forward-pre or backward hooks, or global module hooks), parametrized (``weight_norm``,
    ``spectral_norm``), pruned (``torch.nn.utils.prune``) or replaced by another module, the network runs
    child by child instead, exactly as the ``nn.Sequential`` of its layers and activations would: the
    same values and gradients, every hook firing. The check is a few dictionary lookups a call.

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

    def _plain_layers(self) -> list[Tensor | None] | None:
        """``[W⁽¹⁾, b⁽¹⁾, …]`` (a bias None where a layer has none) when every child is a plain :class:`Linear`,
        else None.

        Plain: exactly torchderiv's ``Linear`` (a parametrization or a replacement changes the class), no
        hooks of its own or global ones (pruning registers a forward pre-hook), its ``weight`` a
        Parameter. Otherwise the network must run child by child, as ``nn.Sequential`` would.
        """
        if (
            _module._global_forward_hooks
            or _module._global_forward_pre_hooks
            or _module._global_backward_hooks
            or (_module._global_backward_pre_hooks)
        ):
            return None
        layers = []
        # NOTE: the modules' dicts are read directly: nn.Module.__getattr__ costs ~1 µs a lookup, a measurable
        # share of a small network's step.
        for m in self._modules["layers"]._modules.values():
            if (
                type(m) is not Linear
                or m._forward_hooks
                or m._forward_pre_hooks
                or m._backward_hooks
                or (m._backward_pre_hooks)
            ):
                return None
            params = m._parameters
            w = params.get("weight")
            if w is None:
                return None
            layers += (w, params.get("bias"))
        return layers

    def _child_by_child(self, input: Tensor) -> Tensor:
        """The network as the ``nn.Sequential`` of its children: each child called, hooks and all."""
        g = getattr(TF, self.activation)
        last = len(self.layers) - 1
        h = input
        for k, layer in enumerate(self.layers):
            h = layer(h)
            if k < last:
                h = g(h)
        return h

    def forward(self, input: Tensor) -> Tensor:
        layers = self._plain_layers()
        if layers is None:
            return self._child_by_child(input)
        # One Function for the whole network (torchderiv.functional.mlp): it keeps only what backward needs.
        return mlp_layers(input, layers, self.activation, (), "MLP")

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
        When a child is hooked, parametrized, pruned or replaced, the two calls are made child by child.
        """
        layers = self._plain_layers()
        if layers is None:
            logits = self._child_by_child(input)
            kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
            return TF.cross_entropy(logits, target, **kw), logits
        return mlp_cross_entropy_layers(
            input, layers, target, self.activation, (), weight, ignore_index, reduction, label_smoothing, "MLP"
        )

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation!r}"


# --- activations: torch's modules, torchderiv's forward -------------------------------------------


class ReLU(TorchderivModule, nn.ReLU):
    """:class:`torch.nn.ReLU` through :func:`torchderiv.functional.relu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.relu(input, inplace=self.inplace)


class Sigmoid(TorchderivModule, nn.Sigmoid):
    """:class:`torch.nn.Sigmoid` through :func:`torchderiv.functional.sigmoid`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.sigmoid(input)


class Tanh(TorchderivModule, nn.Tanh):
    """:class:`torch.nn.Tanh` through :func:`torchderiv.functional.tanh`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.tanh(input)


class LeakyReLU(TorchderivModule, nn.LeakyReLU):
    """:class:`torch.nn.LeakyReLU` through :func:`torchderiv.functional.leaky_relu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(TorchderivModule, nn.ELU):
    """:class:`torch.nn.ELU` through :func:`torchderiv.functional.elu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.elu(input, self.alpha, self.inplace)


class Softplus(TorchderivModule, nn.Softplus):
    """:class:`torch.nn.Softplus` through :func:`torchderiv.functional.softplus`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.softplus(input, self.beta, self.threshold)


class GELU(TorchderivModule, nn.GELU):
    """:class:`torch.nn.GELU` through :func:`torchderiv.functional.gelu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.gelu(input, approximate=self.approximate)


class SiLU(TorchderivModule, nn.SiLU):
    """:class:`torch.nn.SiLU` through :func:`torchderiv.functional.silu`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.silu(input, inplace=self.inplace)


# --- losses -------------------------------------------------------------------------------------------


class MSELoss(TorchderivModule, nn.MSELoss):
    """:class:`torch.nn.MSELoss` through :func:`torchderiv.functional.mse_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.mse_loss(input, target, reduction=self.reduction)


class HuberLoss(TorchderivModule, nn.HuberLoss):
    """:class:`torch.nn.HuberLoss` through :func:`torchderiv.functional.huber_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class BCEWithLogitsLoss(TorchderivModule, nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` through :func:`torchderiv.functional.binary_cross_entropy_with_logits`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return TF.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class CrossEntropyLoss(TorchderivModule, nn.CrossEntropyLoss):
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


class LinearCrossEntropyLoss(TorchderivModule, nn.LinearCrossEntropyLoss):
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
        weight, bias = self.linear.weight, self.linear.bias
        if self.out_features:  # (C·d1·…, in) as (C, d1, …, in); without them the parameters go as they are
            weight = weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
            bias = None if bias is None else bias.reshape((self.num_classes, *self.out_features))
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

    def per_sample_parameters(self) -> tuple:
        # its (torch) Linear's, which run through the fused Function unless reshaped for K-dimensional outputs
        return () if self.out_features else _own(self.linear, "weight", "bias")


class LayerNorm(TorchderivModule, nn.LayerNorm):
    r"""``y = γ ⊙ (x − μ)/r + β`` — :class:`torch.nn.LayerNorm` through :func:`torchderiv.functional.layer_norm`.

    Args / Shape: as :class:`torch.nn.LayerNorm` (``elementwise_affine``, ``bias``; input ``(*, *normalized_shape)``).
    """

    def forward(self, input: Tensor) -> Tensor:
        return TF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def per_sample_parameters(self) -> tuple:
        return _own(self, "weight", "bias")


class RMSNorm(TorchderivModule, nn.RMSNorm):
    r"""``y = γ ⊙ x/r``, ``r = (mean(x²) + ε)^½`` — :class:`torch.nn.RMSNorm` through
    :func:`torchderiv.functional.rms_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def per_sample_parameters(self) -> tuple:
        return _own(self, "weight")


class Embedding(TorchderivModule, nn.Embedding):
    r"""``out[…] = W[x[…]]`` — :class:`torch.nn.Embedding` through :func:`torchderiv.functional.embedding`.

    ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` are refused at the forward (``NotImplementedError``).
    """

    def forward(self, input: Tensor) -> Tensor:
        return TF.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def per_sample_parameters(self) -> tuple:
        return _own(self, "weight")


class Positional(TorchderivModule, nn.Module):
    r"""A learned additive position parameter: ``y[…, t, :] = x[…, t, :] + P[t]`` for the T positions of ``x``.

    What a bare ``self.pos = nn.Parameter(...)`` added in a model's forward does, as a module whose Function
    :func:`torchderiv.per_sample` can clip (each example's gradient is its own ``Δᵢ``, T × d).

    Args:
        num_positions: the longest sequence (rows of P). embedding_dim: d.
        batch_first: inputs ``(B, T, d)`` (True) or ``(T, B, d)`` (False, torch's transformer default).
        init_std: P starts as ``N(0, init_std²)``.

    Shape: input ``(B, T, d)`` or ``(T, B, d)`` with ``T ≤ num_positions``, or ``(T, d)`` unbatched; output the same.
    """

    def __init__(
        self,
        num_positions: int,
        embedding_dim: int,
        batch_first: bool = True,
        init_std: float = 0.02,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_positions, self.embedding_dim, self.batch_first = num_positions, embedding_dim, batch_first
        self.weight = nn.Parameter(torch.empty(num_positions, embedding_dim, device=device, dtype=dtype))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, input: Tensor) -> Tensor:
        return TF.positional(input, self.weight, self.batch_first)

    def extra_repr(self) -> str:
        return f"{self.num_positions}, {self.embedding_dim}, batch_first={self.batch_first}"

    def per_sample_parameters(self) -> tuple:
        return (self.weight,)


class MultiheadAttention(TorchderivModule, nn.MultiheadAttention):
    r""":class:`torch.nn.MultiheadAttention` with both projections through torchderiv's dense Functions
    (:func:`torchderiv.functional.multi_head_attention`): the packed ``in_proj_weight``/``in_proj_bias`` (one dense
    layer with 3d outputs for self-attention; three row blocks on separate query, key, value) and ``out_proj``.
    The attention core is torch's ``scaled_dot_product_attention``.

    Same constructor, parameters, ``state_dict`` and forward arguments as torch's. Not supported (refused at the
    forward with ``NotImplementedError``; :func:`torchderiv.convert` leaves such a module on torch): ``kdim``/``vdim``
    other than ``embed_dim`` (separate projection weights), ``add_bias_kv``, ``add_zero_attn``.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        unsupported = attention_options(self)
        if unsupported:
            raise NotImplementedError(
                f"torchderiv.nn.MultiheadAttention: {', '.join(unsupported)} not supported "
                f"(use torch.nn.MultiheadAttention)"
            )
        return TF.multi_head_attention(
            query,
            key,
            value,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            batch_first=self.batch_first,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def per_sample_parameters(self) -> tuple:
        return _own(self, "in_proj_weight", "in_proj_bias") + _own(self.out_proj, "weight", "bias")


def attention_options(module: nn.MultiheadAttention) -> list[str]:
    """The options of a MultiheadAttention that torchderiv's attention does not support."""
    return [
        name
        for name, on in (
            ("kdim/vdim other than embed_dim", not module._qkv_same_embed_dim),
            ("add_bias_kv", module.bias_k is not None),
            ("add_zero_attn", module.add_zero_attn),
        )
        if on
    ]

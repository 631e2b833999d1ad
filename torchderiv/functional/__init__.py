"""torchderiv.functional: every op an ``autograd.Function`` with a hand-derived backward and jvp.

The lowercase wrappers take exactly torch 2.13's parameters, in torch's order.
"""

from .activations import ACTIVATIONS, elu, gelu, get_activation, leaky_relu, relu, sigmoid, silu, softplus, tanh
from .attention import multi_head_attention, packed_linear
from .conv import conv1d, conv2d
from .embedding import embedding
from .fused import dense
from .group_norm import group_norm
from .linear import linear
from .linear_cross_entropy import linear_cross_entropy
from .losses import binary_cross_entropy_with_logits, cross_entropy, huber_loss, mse_loss
from .mlp import mlp, mlp_cross_entropy
from .norms import layer_norm, rms_norm
from .positional import positional

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "linear",
    "conv1d",
    "conv2d",
    "group_norm",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "softplus",
    "gelu",
    "silu",
    "dense",
    "mlp",
    "mlp_cross_entropy",
    "mse_loss",
    "huber_loss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "layer_norm",
    "rms_norm",
    "embedding",
    "positional",
    "packed_linear",
    "multi_head_attention",
]

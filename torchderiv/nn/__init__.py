"""torchderiv.nn: drop-in torch modules backed by torchderiv's hand-derived Functions."""

from .convert import convert
from .modules import (
    ELU,
    GELU,
    MLP,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    Dense,
    HuberLoss,
    LeakyReLU,
    Linear,
    LinearCrossEntropyLoss,
    MSELoss,
    ReLU,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)

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
    "convert",
]

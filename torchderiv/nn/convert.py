"""``convert(model)``: move an existing torch model onto torchderiv's Functions, in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as TF
from . import modules as M

__all__ = ["convert"]

# Exact torch type -> torchderiv twin. Each twin subclasses the torch class and adds no state, so
# the swap is a change of class on the same object: parameters, buffers and hooks stay as they were.
_MODULE_TWINS: dict[type, type] = {
    nn.Linear: M.Linear,
    nn.ReLU: M.ReLU,
    nn.Sigmoid: M.Sigmoid,
    nn.Tanh: M.Tanh,
    nn.LeakyReLU: M.LeakyReLU,
    nn.ELU: M.ELU,
    nn.Softplus: M.Softplus,
    nn.GELU: M.GELU,
    nn.SiLU: M.SiLU,
}

# torch activation functions a module may hold as an attribute (TransformerEncoderLayer.activation).
_FUNCTION_TWINS: dict[Callable, Callable] = {
    F.relu: TF.relu,
    torch.relu: TF.relu,
    F.gelu: TF.gelu,
    F.silu: TF.silu,
    F.elu: TF.elu,
    F.leaky_relu: TF.leaky_relu,
    F.softplus: TF.softplus,
    torch.sigmoid: TF.sigmoid,
    F.sigmoid: TF.sigmoid,
    torch.tanh: TF.tanh,
    F.tanh: TF.tanh,
}


def convert(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` and supported activation of ``model`` for its torchderiv twin, in place.

    Only modules whose type is *exactly* a supported torch class are swapped (subclasses such as
    attention's ``NonDynamicallyQuantizableLinear`` may rely on being called in other ways and are
    left alone). Torch activation functions held as attributes, such as
    ``TransformerEncoderLayer.activation = F.relu``, are replaced by torchderiv's. The Parameter
    objects are the same before and after, so optimizers already holding them keep working and
    outputs and gradients are unchanged.

    Args:
        model: the module to convert (changed in place and returned).
        filter_fn: ``filter_fn(module, name) -> bool``; a module (with its fully qualified name) is
            converted only where it returns True. Default: convert everything supported.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if filter_fn is not None and not filter_fn(module, name):
            continue
        twin = _MODULE_TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or not callable(value):
                continue
            try:
                replacement = _FUNCTION_TWINS.get(value)
            except TypeError:  # unhashable callables cannot be torch functions
                continue
            if replacement is not None:
                setattr(module, attr, replacement)
    return model

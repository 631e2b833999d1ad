"""``convert(model)``: move an existing torch model onto torchderiv's Functions, in place."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as TF
from . import modules as M

__all__ = ["convert", "ConversionReport"]

_log = logging.getLogger("torchderiv")

# Exact torch type -> torchderiv twin. Each twin subclasses the torch class and adds no state, so
# the swap is a change of class on the same object: parameters, buffers and hooks stay as they were.
MODULE_TWINS: dict[type, type] = {
    nn.Linear: M.Linear,
    nn.ReLU: M.ReLU,
    nn.Sigmoid: M.Sigmoid,
    nn.Tanh: M.Tanh,
    nn.LeakyReLU: M.LeakyReLU,
    nn.ELU: M.ELU,
    nn.Softplus: M.Softplus,
    nn.GELU: M.GELU,
    nn.SiLU: M.SiLU,
    nn.LayerNorm: M.LayerNorm,
    nn.RMSNorm: M.RMSNorm,
    nn.Embedding: M.Embedding,
    nn.MultiheadAttention: M.MultiheadAttention,
    nn.Conv1d: M.Conv1d,
    nn.Conv2d: M.Conv2d,
    nn.GroupNorm: M.GroupNorm,
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


class ConversionReport:
    """What :func:`convert` changed and what it left on torch, and why; ``str()`` gives a table.

    Attributes:
        converted: ``[(name, "nn.X -> torchderiv.X")]`` for each swapped module or function attribute.
        left: ``[(name, type name, reason)]`` for each module with parameters of its own (or a supported
            type) that still runs on torch.
    """

    def __init__(self) -> None:
        self.converted: list[tuple[str, str]] = []
        self.left: list[tuple[str, str, str]] = []

    def __str__(self) -> str:
        lines = [f"torchderiv.convert: {len(self.converted)} converted, {len(self.left)} left on torch"]
        lines += [f"  converted  {name or '(model)'}: {what}" for name, what in self.converted]
        lines += [f"  on torch   {name or '(model)'} ({kind}): {why}" for name, kind, why in self.left]
        return "\n".join(lines)

    __repr__ = __str__


def _reason_left(module: nn.Module) -> str | None:
    """Why a module that was not swapped stays on torch (None: nothing worth reporting)."""
    if isinstance(module, nn.Embedding) and embedding_options(module):
        return f"{', '.join(embedding_options(module))}: not supported by torchderiv's embedding"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "not yet initialised (lazy): run one forward pass first, then convert"
    if isinstance(module, nn.MultiheadAttention) and M.attention_options(module):
        return f"{', '.join(M.attention_options(module))}: not supported by torchderiv's attention"
    if isinstance(module, nn.Linear):
        return (
            f"a subclass of nn.Linear ({type(module).__name__}) may be used other than through its forward "
            "(attention's out_proj is): only exact nn.Linear is swapped"
        )
    if module._parameters and any(p is not None for p in module._parameters.values()):
        return "no torchderiv twin for this layer"
    return None


def embedding_options(module: nn.Embedding) -> list[str]:
    """The options of an Embedding that torchderiv's embedding refuses (it then stays on torch)."""
    return [
        name
        for name, on in (
            ("max_norm", module.max_norm is not None),
            ("scale_grad_by_freq", module.scale_grad_by_freq),
            ("sparse", module.sparse),
        )
        if on
    ]


def convert(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap every supported torch module of ``model`` for its torchderiv twin, in place: ``nn.Linear``,
    ``Conv1d``/``Conv2d``, the norms (``LayerNorm``, ``RMSNorm``, ``GroupNorm``), ``Embedding``,
    ``MultiheadAttention`` and the activations (``MODULE_TWINS`` lists them).

    Only modules whose type is *exactly* a supported torch class are swapped (subclasses such as
    attention's ``NonDynamicallyQuantizableLinear`` may rely on being called in other ways and are
    left alone). Torch activation functions held as attributes, such as
    ``TransformerEncoderLayer.activation = F.relu``, are replaced by torchderiv's. The Parameter
    objects are the same before and after, so optimizers already holding them keep working and
    outputs and gradients are unchanged. ``print(model)`` then names the swapped modules
    ``torchderiv.Linear`` etc.

    What was changed and what was left on torch, with the reason, is in
    ``model.torchderiv_conversion`` (a :class:`ConversionReport`; ``print`` it, or log it), and is
    logged at INFO level on the ``torchderiv`` logger.

    Args:
        model: the module to convert (changed in place and returned).
        filter_fn: ``filter_fn(module, name) -> bool``; a module (with its fully qualified name) is
            converted only where it returns True. Default: convert everything supported.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    handled: set[int] = set()  # children whose parameters a converted parent's Function computes (out_proj)
    for name, module in model.named_modules():
        if id(module) in handled:
            continue
        twin = MODULE_TWINS.get(type(module))
        if (twin is M.Embedding and embedding_options(module)) or (
            twin is M.MultiheadAttention and M.attention_options(module)
        ):
            twin = None
        if filter_fn is not None and not filter_fn(module, name):
            if twin is not None or _reason_left(module) is not None:
                report.left.append((name, type(module).__name__, "excluded by filter_fn"))
            continue
        if twin is not None:
            report.converted.append((name, f"nn.{type(module).__name__} -> torchderiv.{twin.__name__}"))
            module.__class__ = twin
            if twin is M.MultiheadAttention:
                handled.add(id(module.out_proj))
        elif not isinstance(module, M.TorchderivModule):
            reason = _reason_left(module)
            if reason is not None:
                report.left.append((name, type(module).__name__, reason))
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or not callable(value):
                continue
            try:
                replacement = _FUNCTION_TWINS.get(value)
            except TypeError:  # unhashable callables cannot be torch functions
                continue
            if replacement is not None:
                setattr(module, attr, replacement)
                qual = f"{name}.{attr}" if name else attr
                report.converted.append((qual, f"{getattr(value, '__name__', value)} -> torchderiv.functional"))
    model.torchderiv_conversion = report
    _log.info("%s", report)
    return model

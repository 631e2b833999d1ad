"""Machinery shared by every torchderiv Function: the compile twin, autocast policy, reductions.

Nothing here computes a derivative; it only decides *which* Function runs and in which dtype.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import _per_sample
from . import _torch_internals as internals
from ._torch_internals import autocast_enabled

__all__ = [
    "FunctionForms",
    "compile_twin",
    "apply",
    "autocast_apply",
    "autocast_cast",
    "autocast_enabled",
    "may_overwrite",
    "save_for_forward",
    "check_reduction",
    "shape_str",
]


class FunctionForms(NamedTuple):
    """A Function, its jvp-free twin and its classic-form twin (and that twin's C entry); :func:`apply` picks one."""

    eager: type
    compiled: type
    classic: type
    classic_apply: object


def compile_twin(cls) -> FunctionForms:
    """Pair ``cls`` with the same Function without ``jvp``, for torch.compile.

    torch.compile (Dynamo) refuses any ``autograd.Function`` that defines a custom ``jvp``
    (measured with torch 2.13). The twin inherits forward, setup_context and backward
    unchanged and restores ``Function.jvp``, which Dynamo recognises as "no custom jvp". Eager code keeps
    forward-mode AD; compiled code gets ``fullgraph=True``. The pair is a plain tuple because Dynamo
    cannot follow a class attribute of a Function class (``cls.twin.apply``) nor a dict keyed by class.
    """
    twin = type(
        cls.__name__ + "Compiled",
        (cls,),
        {"jvp": torch.autograd.Function.jvp, "__doc__": f"{cls.__name__} without jvp, for torch.compile."},
    )
    classic = _classic(cls)
    return FunctionForms(cls, twin, classic, internals.c_apply(classic))


def _classic(cls) -> type:
    """The same Function in the classic form, ``forward(ctx, *inputs)``, which calls ``cls``'s own
    ``forward`` and ``setup_context``: the same formulas, the same backward and jvp, the same node name.

    NOTE: torch applies a Function written with ``setup_context`` by first binding its arguments with
    ``inspect.signature`` — in torch 2.14 inside ``Function.apply``'s C entry itself (``_bind_default_args``,
    ~35 µs a call, measured: 48 µs against 8 µs for a classic Function doing the same work). The
    ``setup_context`` form is what torch.func needs, so :func:`apply` uses this twin only where no
    transform is active and Dynamo is not tracing.
    """

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    return type(
        cls.__name__,
        (torch.autograd.Function,),
        {
            "__doc__": cls.__doc__,
            "__module__": cls.__module__,
            "forward": staticmethod(forward),
            "backward": staticmethod(cls.backward),
            "jvp": staticmethod(cls.jvp),
        },
    )


def apply(fn: FunctionForms, *args):
    """Apply the Function ``fn``: its jvp-free twin while Dynamo traces, ``fn.eager`` (the ``setup_context``
    form torch.func needs) under a torch.func transform, its classic-form twin otherwise."""
    if torch.compiler.is_compiling():
        return fn.compiled.apply(*args)
    if internals.transforms_active():
        if _per_sample.current is not None:
            raise RuntimeError(
                f"per_sample: torch.func transforms (vmap, grad, jvp) are not supported inside the context "
                f"({fn.eager.__name__}); it already gives each example's gradient norm (and gradient)"
            )
        return fn.eager.apply(*args)
    # Outside torch.func transforms: the classic-form twin, which torch applies without binding arguments
    # through inspect.signature (see _classic). Our wrappers pass every argument positionally.
    if _unwrap is not None:  # tensors left wrapped by a finished transform, as Function.apply does
        args = [_unwrap(a) if isinstance(a, torch.Tensor) else a for a in args]
    # Function.apply's C entry (torch 2.13 wraps it in Python; 2.14 exposes it as apply itself)
    return fn.classic_apply(*args)


_unwrap = internals.UNWRAP_IF_DEAD


def may_overwrite(grad: torch.Tensor | None = None) -> bool:
    """Whether a derivative may overwrite temporaries it created: nothing is recording these ops.

    True in a plain backward (grad mode off); False when backward is itself differentiated
    (``create_graph=True``: autograd may need the overwritten values) or runs under a vmap (which
    cannot write a batched result into an unbatched temporary). ``grad`` is the incoming gradient:
    gradcheck's ``check_batched_grad`` batches it with the legacy vmap, which sets no transform flag.
    """
    if torch.compiler.is_compiling():  # the compiler plans buffers itself
        return False
    if torch.is_grad_enabled() or internals.transforms_active():
        return False
    return grad is None or not internals.is_legacy_batched(grad)


def save_for_forward(ctx, *tensors) -> None:
    """``ctx.save_for_forward(*tensors)`` where a jvp may need them: only while forward-mode AD can run (a dual
    level or a torch.func transform), since outside one no input has a tangent. Each saved tuple is a few µs of a
    small network's step."""
    if internals.forward_ad_active():
        ctx.save_for_forward(*tensors)


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def autocast_apply(fn: FunctionForms, policy: str | None, *args):
    """Apply the Function ``fn`` to ``args`` under torch's autocast policy for the op it replaces.

    ``policy`` is what torch's autocast does to the op on this device: ``"lower"`` casts floating
    tensors (not float64) to the autocast dtype (torch's ``linear``), ``"fp32"`` casts them to float32
    (torch's losses), ``None`` leaves them alone (elementwise activations). The casts happen here,
    outside the Function, so autograd differentiates them and parameter gradients come back in the
    parameters' own dtype. The Function itself then runs with autocast off, so its forward and
    backward see exactly the dtypes chosen here.
    """
    if not internals.any_autocast():
        return apply(fn, *args)
    device_type = _device_type(args)
    if not autocast_enabled(device_type):
        return apply(fn, *args)
    if policy is not None:
        target = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
        cast = tuple(autocast_cast(a, target) for a in args)
        if _per_sample.current is not None:  # a tracked parameter now reaches the Function as a copy
            _per_sample.current.alias(args, cast)
        args = cast
    with torch.autocast(device_type, enabled=False):
        return apply(fn, *args)


def autocast_cast(a, dtype: torch.dtype):
    """``a`` in ``dtype`` if autocast would cast it: a floating tensor other than float64; else ``a``."""
    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
        return a.to(dtype)
    return a


_REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str, size_average=None, reduce=None) -> str:
    """Validate ``reduction``; the legacy ``size_average``/``reduce`` pair maps onto it as torch does."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = ("mean" if size_average else "sum") if reduce else "none"
        warnings.warn(
            f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
            stacklevel=3,
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction: expected one of 'none', 'mean', 'sum'")
    return reduction


def shape_str(t) -> str:
    """``(2, 5)``, ``(4,)``, ``()``: a tensor's (or a size's) shape as Python writes a tuple."""
    return str(tuple(t.shape if isinstance(t, torch.Tensor) else t))

"""Activations ``H = g(Z)`` and their derivatives ``g'(Z)`` (seed §2 and §3.1, §3.5).

Every activation is described once, as an :class:`Activation` (its value, the product ``d ⊙ g'(z)``,
and whether it keeps ``h = g(z)`` or ``z`` for the derivative); the same description serves the
elementwise Functions here, the fused :func:`~torchderiv.functional.dense` and the whole-network MLP.
Because ``d ⊙ g'(z)`` is linear in ``d``, one formula gives both the backward (``d = ∂J/∂H``) and
the jvp (``d`` = the tangent of ``Z``).

Forward values come from torch's own kernels so that they agree with ``torch.nn.functional`` bit
for bit; every derivative is the formula written out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._core import autocast_apply, compile_twin, may_overwrite, save_for_forward

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "get_activation",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "softplus",
    "gelu",
    "silu",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715  # the cubic coefficient of GELU's tanh approximation (Hendrycks & Gimpel)


class Activation(NamedTuple):
    """One nonlinearity g: how to compute it and how to multiply by its derivative.

    Attributes:
        name: the name used by ``activation=`` arguments.
        value: ``(z, *params) -> g(z)``.
        backprop: ``(d, s, *params, overwrite_d=False) -> d ⊙ g'(z)``, where ``s`` is what ``saves_output``
            selects; ``overwrite_d=True`` lets it overwrite ``d``: the caller holds the only reference to ``d``
            and has checked that nothing differentiates this product (:func:`~._core.may_overwrite`).
        saves_output: ``(*params) -> bool``; True when ``g'(z)`` is cheap and exact from ``h = g(z)``.
        derivative: the formula, for docstrings and the derivation doc.
        value_: ``(z, *params) -> g(z)`` written over ``z``, for a caller that owns ``z`` and keeps only
            ``h`` (an activation that ``saves_output``); None where there is none.
        factor: ``(z, *params, writable, value) -> (g'(z), g(z) if value else None)`` for an activation that
            keeps ``z``, when ``g(z)`` is one multiply away from what ``g'(z)`` computes anyway (``Φ(z)``
            for gelu, ``σ(z)`` for silu): a backward that needs ``H`` again gets it almost free. ``writable``
            as for ``backprop`` (may work in place on its own temporaries); None where there is none.
        mask_: ``(d, h, nan_h_makes_d_nan=False) -> d ⊙ g'(z)`` written into ``d`` by a float 0/1 mask, exact
            wherever ``d`` is finite (``inf · 0`` is NaN where torch's select gives 0); ``backprop`` checks ``d``
            before using it, a caller that checks the result once for several layers may use it directly. With
            ``nan_h_makes_d_nan`` the caller vouches that ``d`` is NaN wherever ``h`` is (then the mask may
            be anything there: the result is NaN and the check finds it). None where there is none.

    A NamedTuple rather than a dataclass: Dynamo can trace through it.
    """

    name: str
    value: Callable
    backprop: Callable
    saves_output: Callable[..., bool]
    derivative: str
    value_: Callable | None = None
    factor: Callable | None = None
    mask_: Callable | None = None


def _always(*_):
    return True


def _never(*_):
    return False


# NOTE on speed (README, § Performance): on CPU, a fresh logits- or activation-sized buffer costs page faults each
# time glibc hands freed memory back to the system, and a float × bool multiply takes a slow casting
# path. So every derivative below uses float ops only, and when nothing differentiates them
# (``may_overwrite()``: a plain backward) builds g'(z) in one buffer of its own, in place, and multiplies it
# into ``d`` in place when the caller may overwrite ``d`` (``overwrite_d=True``: a fresh GEMM result).


def times(d, factor, writable, overwrite_d):
    """``d ⊙ factor``; in place (into ``d`` if overwrite_d, else into the fresh ``factor``) when ``writable``."""
    if not writable:
        return d * factor
    return d.mul_(factor) if overwrite_d else factor.mul_(d)


def _relu_backprop(d, h, overwrite_d=False):
    # g'(z) = 1[z > 0]: the gradient is kept where h = relu(z) > 0 or h is NaN (torch's threshold_backward
    # passes it there too) and is 0 elsewhere — a select: an incoming inf/NaN at a unit with h = 0 gives 0.
    if not (overwrite_d or may_overwrite(d)):
        return d.masked_fill(h <= 0, 0)
    # NOTE: on CPU the select's bool kernels (comparison + masked_fill) took ~2-3x the float mask below on
    # 64 x 128 (a measurable share of a small network's step). The float mask multiplies, which equals the
    # select unless d holds inf/NaN (inf · 0 = NaN): one sum tells, and only then the select runs.
    if not d.is_cpu or not math.isfinite(d.sum().item()):
        return d.masked_fill_(h <= 0, 0) if overwrite_d else d.masked_fill(h <= 0, 0)
    return _relu_mask_(d, h) if overwrite_d else _relu_on(h).mul_(d)


def _relu_on(h):
    """1[h > 0] as floats, and 1 at NaN (``sign(NaN)`` is 0 here)."""
    return torch.nan_to_num(h, nan=1.0).sign_()


def _relu_mask_(d, h, nan_h_makes_d_nan=False):
    # The select d ⊙ 1[h > 0] wherever d is finite. sign(h) is that mask for h = relu(z) >= 0 but for NaN, where
    # torch's select passes d: _relu_on's nan_to_num, a kernel a layer, unless d is NaN there anyway.
    return d.mul_(h.sign() if nan_h_makes_d_nan else torch.nan_to_num(h, nan=1.0).sign_())


def _leaky_relu_backprop(d, s, negative_slope, overwrite_d=False):
    # s is h when negative_slope >= 0 (then h > 0 exactly where z > 0), z otherwise.
    return torch.where(s > 0, d, d * negative_slope)


def _elu_backprop(d, s, alpha, overwrite_d=False):
    # For alpha >= 0 we keep h, and h + alpha = alpha·exp(z) on z <= 0 reuses it; for alpha < 0
    # h <= 0 no longer marks z <= 0, so we keep z.
    # NOTE: the test is `s > 0`, so a NaN input gets a NaN gradient, as torch's vectorised elu_backward
    # gives (its scalar tail, for tensors of a few dozen elements, passes the gradient instead).
    if alpha >= 0:
        return torch.where(s > 0, d, d * (s + alpha))
    return torch.where(s > 0, d, d * (alpha * torch.exp(s)))


def _softplus_backprop(d, z, beta, threshold, overwrite_d=False):
    # g'(z) = σ(βz); above the threshold torch returns z itself, whose derivative is 1.
    bz = z * beta
    return torch.where(bz > threshold, d, d * torch.sigmoid(bz))


_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_factor(z, approximate, writable=False, value=False, scratch=None):
    """``g'(z)`` for GELU, and ``g(z) = z Φ(z)`` too when ``value``: one multiply once Φ is known. ``scratch``: two
    buffers of ``z``'s size that the exact form builds ``g'`` in (``writable`` implied); g' is then the first."""
    if approximate == "tanh":
        # g = ½ z (1 + tanh u),  u = √(2/π)(z + c z³)
        # g' = ½ (1 + tanh u) + ½ z (1 − tanh² u) √(2/π)(1 + 3c z²)
        z2 = z * z
        t = torch.tanh(_SQRT_2_OVER_PI * z * (1 + _GELU_TANH_C * z2))
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z2)
        half = 0.5 * (1 + t)  # ½ (1 + tanh u), the tanh form's Φ
        return half + 0.5 * z * (1 - t * t) * du, (z * half if value else None)
    # g = z Φ(z)  ⇒  g' = Φ(z) + z φ(z),  Φ(z) = ½ erfc(−z/√2),  φ(z) = exp(−z²/2) / √(2π).
    # NOTE: erfc, not torch.special.ndtr: ndtr is one call but ran 3-13x slower than erfc on 512 x 2048
    # here (1.5-6.9 ms vs 0.5 ms, CPU, 2 threads).
    if torch.compiler.is_compiling():
        # NOTE: inductor (torch 2.13, CPU) evaluates erfc one element at a time: the whole factor took
        # 2.9 ms against 1.0 ms with erf on 512 x 2048 (measured). Compiled code therefore uses torch's own
        # Φ(z) = ½ (1 + erf(z/√2)), whose lower tail cancels to 0 below z ≈ −4 in float32, as torch's does.
        cdf = 0.5 + 0.5 * torch.erf(z * _SQRT1_2)
        return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI, (z * cdf if value else None)
    writable = writable or scratch is not None
    q = z * -_SQRT1_2 if scratch is None else torch.mul(z, -_SQRT1_2, out=scratch[0])  # −z/√2
    sq = q * q if scratch is None else torch.mul(q, q, out=scratch[1])  # z²/2
    pdf = torch.exp(sq.neg_(), out=sq) if writable else torch.exp(-sq)  # √(2π) φ(z)
    cdf = torch.special.erfc(q, out=q).mul_(0.5) if writable else 0.5 * torch.special.erfc(q)  # Φ(z)
    h = z * cdf if value else None  # before cdf's buffer becomes g'
    factor = cdf.addcmul_(z, pdf, value=_INV_SQRT_2PI) if writable else torch.addcmul(cdf, z, pdf, value=_INV_SQRT_2PI)
    return factor, h


# Elements of z per piece where a plain backward builds g'(z) a piece at a time (2 MiB of float32 per scratch buffer).
_PIECE = 1 << 19


def _gelu_backprop(d, z, approximate, overwrite_d=False):
    writable = overwrite_d or may_overwrite(d)
    if writable and approximate == "none" and _in_pieces(d, z):
        return _backprop_in_pieces(lambda part, scratch: _gelu_factor(part, "none", scratch=scratch), d, z, overwrite_d)
    return times(d, _gelu_factor(z, approximate, writable)[0], writable, overwrite_d)


def _silu_factor(z, writable=False, value=False, scratch=None):
    """``g'(z)`` for SiLU, and ``g(z) = z σ(z)`` too when ``value``; ``scratch`` as for :func:`_gelu_factor`."""
    # g = z σ(z)  ⇒  g' = σ(z) (1 + z (1 − σ(z))) = σ + σ · (z − z σ).
    writable = writable or scratch is not None
    s = torch.sigmoid(z) if scratch is None else torch.sigmoid(z, out=scratch[0])
    h = z * s if value else None
    out = {} if scratch is None else {"out": scratch[1]}
    t = z - h if value else torch.addcmul(z, z, s, value=-1, **out)  # z − z σ
    return (s.addcmul_(s, t) if writable else torch.addcmul(s, s, t)), h


def _silu_backprop(d, z, overwrite_d=False):
    writable = overwrite_d or may_overwrite(d)
    if writable and _in_pieces(d, z):
        return _backprop_in_pieces(lambda part, scratch: _silu_factor(part, scratch=scratch), d, z, overwrite_d)
    return times(d, _silu_factor(z, writable)[0], writable, overwrite_d)


def _in_pieces(d, z) -> bool:
    return (
        z.is_cpu
        and z.numel() > _PIECE
        and d.shape == z.shape
        and d.dtype == z.dtype
        and z.is_contiguous()
        and d.is_contiguous()
        and not torch.compiler.is_compiling()
    )


def _backprop_in_pieces(factor, d, z, overwrite_d):
    """``d ⊙ g'(z)`` a piece of ``_PIECE`` elements at a time, ``factor(piece, scratch)`` building g' of the piece in
    two scratch buffers of a piece's size: the result is the one buffer of ``z``'s size this makes (none when
    ``overwrite_d``).

    NOTE: built whole, g' takes two fresh buffers of z's size (GELU's Φ and φ, SiLU's σ and z − zσ); on CPU a fresh
    buffer of 16 MiB costs ~3 ms of page faults (glibc maps it afresh), as long as erfc itself, and in a
    transformer's step these were a third of GELU's backward (measured in the profiler, (256, 64, 256), 2 threads).
    Pieces of 2 MiB are reused within the call.
    """
    flat_z, flat_d = z.view(-1), d.view(-1)
    out = flat_d if overwrite_d else torch.empty_like(flat_z)
    scratch = (torch.empty(_PIECE, dtype=z.dtype), torch.empty(_PIECE, dtype=z.dtype))
    for start in range(0, flat_z.numel(), _PIECE):
        piece = flat_z[start : start + _PIECE]
        n = piece.numel()
        g, _ = factor(piece, (scratch[0][:n], scratch[1][:n]))
        torch.mul(flat_d[start : start + n], g, out=out[start : start + n])
    return out.view(z.shape)


def _sigmoid_backprop(d, h, overwrite_d=False):
    # g' = h (1 − h) = h − h·h
    writable = overwrite_d or may_overwrite(d)
    return times(d, torch.addcmul(h, h, h, value=-1), writable, overwrite_d)


def _tanh_backprop(d, h, overwrite_d=False):
    # g' = 1 − h²
    writable = overwrite_d or may_overwrite(d)
    return times(d, torch.addcmul(h.new_ones(()), h, h, value=-1), writable, overwrite_d)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("sigmoid", torch.sigmoid, _sigmoid_backprop, _always, "h (1 − h)", torch.sigmoid_),
        Activation("tanh", torch.tanh, _tanh_backprop, _always, "1 − h²", torch.tanh_),
        Activation("relu", torch.relu, _relu_backprop, _always, "1[z > 0]", torch.relu_, mask_=_relu_mask_),
        Activation(
            "leaky_relu",
            lambda z, a: F.leaky_relu(z, a),
            _leaky_relu_backprop,
            lambda a: a >= 0,
            "1 if z > 0 else a",
            lambda z, a: F.leaky_relu_(z, a),
        ),
        Activation(
            "elu",
            lambda z, a: F.elu(z, a),
            _elu_backprop,
            lambda a: a >= 0,
            "1 if z > 0 else h + α",
            lambda z, a: F.elu_(z, a),
        ),
        Activation(
            "softplus",
            lambda z, beta, threshold: F.softplus(z, beta, threshold),
            _softplus_backprop,
            _never,
            "σ(βz); 1 where βz > threshold",
        ),
        Activation(
            "gelu",
            lambda z, approximate: F.gelu(z, approximate=approximate),
            _gelu_backprop,
            _never,
            "Φ(z) + z φ(z)  (or the derivative of the tanh form)",
            factor=_gelu_factor,
        ),
        Activation("silu", F.silu, _silu_backprop, _never, "σ(z)(1 + z(1 − σ(z)))", factor=_silu_factor),
    )
}

# torch's defaults, in the order the parameters follow the input in torch's signatures.
DEFAULT_PARAMS: dict[str, tuple] = {
    "sigmoid": (),
    "tanh": (),
    "relu": (),
    "leaky_relu": (0.01,),
    "elu": (1.0,),
    "softplus": (1.0, 20.0),
    "gelu": ("none",),
    "silu": (),
}


def get_activation(name: str) -> Activation:
    """The :class:`Activation` called ``name``; a clear error for an unknown name."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}") from None


def _elementwise_function(act: Activation, class_name: str):
    """Build the autograd Function ``H = g(Z)`` for one activation."""

    def forward(input, *params):
        return act.value(input, *params)

    def setup_context(ctx, inputs, output):
        input, *params = inputs
        ctx.params = tuple(params)
        saved = output if act.saves_output(*params) else input
        ctx.save_for_backward(saved)
        save_for_forward(ctx, saved)

    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        grad = act.backprop(grad_output, saved, *ctx.params) if ctx.needs_input_grad[0] else None
        return (grad,) + (None,) * len(ctx.params)

    def jvp(ctx, d_input, *_):
        (saved,) = ctx.saved_tensors
        return act.backprop(d_input, saved, *ctx.params)

    doc = (
        f"``H = {act.name}(Z)`` elementwise.\n\n"
        f"backward: ``∂J/∂Z = ∂J/∂H ⊙ g'(Z)`` with ``g'(z) = {act.derivative}`` (seed §3.1, §3.5);\n"
        f"jvp: ``dH = g'(Z) ⊙ dZ``."
    )
    cls = type(
        class_name,
        (torch.autograd.Function,),
        {
            "__doc__": doc,
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )
    return _tag_activation(compile_twin(cls), act)


def _tag_activation(twins, act: Activation):
    # per_sample recognises a layer input made by one of these from its node (its Function class's .activation):
    # the node keeps h, or z to remake h from, until its own backward (_per_sample._remake).
    for cls in (twins.eager, twins.compiled, twins.classic):
        cls.activation = act
    return twins


# name -> (Function, its jvp-free twin); the classes are SigmoidFunction, TanhFunction, ReluFunction, ...
FUNCTIONS = {
    name: _elementwise_function(act, "".join(p.capitalize() for p in name.split("_")) + "Function")
    for name, act in ACTIVATIONS.items()
}


def _inplace_function(act: Activation, base: type, class_name: str):
    """``H = g(Z)`` written over ``Z`` (``inplace=True``) for an activation that keeps its output.

    ``base``'s backward (the elementwise Function's: it reads the saved output); the one buffer is both
    the result and what backward keeps, as torch's in-place activations do (``ctx.mark_dirty``). Forward
    AD, double backward and batched reverse gradients work; forward AD under vmap does not (functorch does
    not see the tangent updated in place).
    """

    def forward(input, *params):
        return act.value_(input, *params)

    def setup_context(ctx, inputs, output):
        input, *params = inputs
        ctx.params = tuple(params)
        ctx.mark_dirty(input)
        ctx.save_for_backward(output)
        save_for_forward(ctx, output)

    def jvp(ctx, d_input, *_):
        # the input's tangent is updated in place, as the input itself was: dH = g'(Z) ⊙ dZ
        (h,) = ctx.saved_tensors
        return d_input.copy_(act.backprop(d_input, h, *ctx.params))

    doc = f"{base.__doc__.splitlines()[0][:-1]}, in place: the result written over ``Z``.\n\n" + "\n".join(
        base.__doc__.splitlines()[2:]
    )
    cls = type(
        class_name,
        (base,),
        {
            "__doc__": doc,
            "generate_vmap_rule": False,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "jvp": staticmethod(jvp),
        },
    )
    return _tag_activation(compile_twin(cls), act)


# name -> in-place Function, for the activations with an in-place value (they keep their output)
INPLACE_FUNCTIONS = {
    name: _inplace_function(
        act, FUNCTIONS[name].eager, "".join(p.capitalize() for p in name.split("_")) + "InplaceFunction"
    )
    for name, act in ACTIVATIONS.items()
    if act.value_ is not None
}

# torch's autocast runs these ops in the input's dtype, except softplus, which CUDA autocast runs
# in float32 (it is on CUDA's fp32 list and not on the CPU's).
_AUTOCAST = {"softplus": {"cuda": "fp32"}}


def _activate(name: str, input: torch.Tensor, *params, inplace: bool = False) -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: expected input to be a Tensor, got {type(input).__name__}")
    fn = FUNCTIONS[name]
    policy = _AUTOCAST.get(name, {}).get(input.device.type)
    if not inplace:
        return autocast_apply(fn, policy, input, *params)
    # In place, as torch's `inplace=True`: the result is written into `input` and `input` is returned.
    if ACTIVATIONS[name].saves_output(*params) and name in INPLACE_FUNCTIONS:
        # One buffer, both the result and what backward keeps (torch keeps exactly this one too).
        return autocast_apply(INPLACE_FUNCTIONS[name], policy, input, *params)
    # An activation that keeps its input for backward computes from a clone (writing over the input would
    # destroy what it saved); the copy_ into `input` is recorded by autograd.
    return input.copy_(autocast_apply(fn, policy, input.clone(), *params))


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``σ(z) = 1 / (1 + e^{−z})``; backward ``∂J/∂Z = ∂J/∂H ⊙ h(1 − h)`` from the saved output."""
    return _activate("sigmoid", input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """``tanh(z)``; backward ``∂J/∂Z = ∂J/∂H ⊙ (1 − h²)`` from the saved output."""
    return _activate("tanh", input)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``max(z, 0)``; backward passes ``∂J/∂H`` where ``h > 0`` (0 at the kink, as torch)."""
    return _activate("relu", input, inplace=inplace)


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """``z`` if ``z > 0`` else ``a z``; backward multiplies by ``1`` or ``a``."""
    return _activate("leaky_relu", input, float(negative_slope), inplace=inplace)


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """``z`` if ``z > 0`` else ``α(e^z − 1)``; backward multiplies by ``1`` or ``h + α``."""
    return _activate("elu", input, float(alpha), inplace=inplace)


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``log(1 + e^{βz}) / β`` (``z`` where ``βz > threshold``); backward multiplies by ``σ(βz)``."""
    return _activate("softplus", input, float(beta), float(threshold))


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``z Φ(z)`` (``approximate="tanh"``: ``½ z (1 + tanh(√(2/π)(z + 0.044715 z³)))``).

    backward multiplies by ``Φ(z) + z φ(z)`` (or the tanh form's derivative), from the saved input.
    """
    if approximate not in ("none", "tanh"):
        raise RuntimeError(f"approximate argument must be either none or tanh, got {approximate!r}")
    return _activate("gelu", input, approximate)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``z σ(z)``; backward multiplies by ``σ(z)(1 + z(1 − σ(z)))`` from the saved input."""
    return _activate("silu", input, inplace=inplace)

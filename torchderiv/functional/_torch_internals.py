"""Every private torch API torchderiv relies on, in one place, with a self-test of their behaviour.

Per-example clipping happens inside torch's own backward pass, so it needs to know things torch's public API
does not say: which backward pass is running, when it has finished, whether it will reach a parameter's
``.grad``, which Function made a tensor, whether a node's saved tensors come back through hooks, whether a
``.grad`` was changed in place. Each of those is one function below; nothing else in torchderiv touches a
private torch name (``tests/test_torch_internals.py`` checks the source).

A private API can change meaning in any torch release without an error. Clipping that silently stops clipping is
a privacy failure that no accuracy number shows, so :func:`self_test` exercises each function on a tiny case whose
answer is known, once per process, before the first :func:`torchderiv.per_sample` context opens; if any answer is
wrong, every context refuses to open with an error naming the torch version and what changed.
"""

from __future__ import annotations

import torch

__all__ = [
    "transforms_active",
    "forward_ad_active",
    "is_legacy_batched",
    "UNWRAP_IF_DEAD",
    "function_apply",
    "c_apply",
    "graph_task_id",
    "queue_callback",
    "will_execute",
    "forward_class",
    "saved_through_hooks",
    "version",
    "autocast_enabled",
    "any_autocast",
    "self_test",
    "require",
]

TESTED = "2.13 and 2.14"  # the torch releases whose internals the self-test was written against


# Three questions every Function asks on every call, answered by torch's C functions themselves: a Python wrapper
# around each is a frame more a call, and a small network's step is mostly such per-call work (docs/performance.md).

#: ``transforms_active()``: whether a torch.func transform (vmap, grad, jvp) is running.
transforms_active = torch._C._are_functorch_transforms_active

#: ``is_legacy_batched(t)``: whether ``t`` is batched by the legacy vmap (gradcheck's batched-gradient check), which
#: sets no transform flag.
is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor

#: ``any_autocast()``: whether autocast is on for any device type: one call, where :func:`autocast_enabled` needs the
#: device.
any_autocast = torch._C._is_any_autocast_enabled


def forward_ad_active() -> bool:
    """Whether forward-mode AD can reach a Function now: inside a ``torch.autograd.forward_ad.dual_level`` (outside
    one no tensor has a tangent) or a torch.func transform (``jvp``)."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


# Unwraps a tensor left wrapped by a finished torch.func transform, as Function.apply does before its C entry (torch
# 2.13); None where that C entry unwraps by itself (2.14 makes it Function.apply) or in a torch without it. A bare
# function, not wrapped: Function application is the hot path.
_APPLY_IS_C_ENTRY = torch.autograd.Function.__dict__.get("apply") is torch._C._FunctionBase.__dict__.get("apply")
UNWRAP_IF_DEAD = None if _APPLY_IS_C_ENTRY else getattr(torch._C._functorch, "unwrap_if_dead", None)


def function_apply(cls, *args):
    """``Function.apply``'s C entry, without the Python wrapper that binds arguments by ``inspect.signature``
    (torch 2.13 wraps it in Python; 2.14 exposes it directly)."""
    return super(torch.autograd.Function, cls).apply(*args)


def c_apply(cls):
    """:func:`function_apply` bound to ``cls`` once: the C entry itself, called with the Function's inputs."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)


def graph_task_id() -> int:
    """The id of the backward pass running on this thread; -1 outside a backward pass."""
    return torch._C._current_graph_task_id()


def queue_callback(fn) -> None:
    """Run ``fn()`` once the backward pass running now has executed every node (before ``backward`` returns)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def will_execute(node) -> bool:
    """Whether the backward pass running now will execute ``node`` (a parameter's gradient accumulator: whether
    this pass writes its ``.grad``). False where torch cannot say (``torch.autograd.grad``, which writes none)."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        return False


def forward_class(node):
    """The ``torch.autograd.Function`` subclass whose ``apply`` made ``node`` (a tensor's ``grad_fn``), or None."""
    return getattr(node, "_forward_cls", None)


def saved_through_hooks(node) -> bool:
    """Whether ``node``'s saved tensors come back through saved-tensor hooks (``save_on_cpu``, a non-reentrant
    checkpoint): unpacking them then copies or recomputes."""
    return any(s.unpack_hook is not None for s in node._raw_saved_tensors)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, and False for a device type autocast does not know.

    torch raises "unknown device type for autocast" for ``meta`` (shape inference, meta-device
    initialisation) and other device types without an autocast mode; there is nothing to cast there.
    """
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def version(t: torch.Tensor) -> int:
    """``t``'s version counter: it grows with every in-place change."""
    return t._version


# --- the self-test -------------------------------------------------------------------------------------------------

_verdict: list[str] | None = None  # what self_test found (empty: all as expected); None before it ran
_running = False  # the self-test's own per_sample context must not wait for its verdict


def require() -> None:
    """Raise unless :func:`self_test` passes (run once per process; its verdict is kept)."""
    global _verdict
    if _running:
        return
    if _verdict is None:
        _verdict = self_test()
    if _verdict:
        raise RuntimeError(
            f"torchderiv: torch {torch.__version__} changed internals that per-example clipping relies on "
            f"(tested with torch {TESTED}); per_sample refuses to run rather than clip wrongly. What changed: "
            + "; ".join(_verdict)
        )


def self_test() -> list[str]:
    """Exercise every function above on a case with a known answer; returns what came out wrong (empty: nothing)."""
    global _running
    problems: list[str] = []
    _running = True
    try:
        for check in (_check_passes, _check_reach, _check_nodes, _check_transforms, _check_end_to_end):
            try:
                check(problems)
            except Exception as e:  # an API that vanished or now raises is as much a change as a wrong answer
                problems.append(f"{check.__name__[7:]}: raised {type(e).__name__}: {e}")
    finally:
        _running = False
    return problems


class _Probe(torch.autograd.Function):
    """``y = 2x``; its backward records which pass runs it and queues a callback on that pass."""

    log: list = []

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        _Probe.log.append(("node", graph_task_id()))
        if len(_Probe.log) == 1:
            queue_callback(lambda: _Probe.log.append(("callback", graph_task_id())))
        return 2 * g


def _check_passes(problems: list[str]) -> None:
    if graph_task_id() != -1:
        problems.append(f"graph task id outside a backward pass is {graph_task_id()}, expected -1")
    x = torch.ones(3, requires_grad=True)
    _Probe.log = []
    (function_apply(_Probe, x) + function_apply(_Probe, x)).sum().backward()
    log = _Probe.log
    kinds = [k for k, _ in log]
    if kinds != ["node", "node", "callback"]:
        problems.append(f"a callback queued in a backward pass ran at {kinds}, expected after both nodes")
    elif len({t for _, t in log}) != 1 or log[0][1] == -1:
        problems.append(f"graph task ids within one backward pass were {[t for _, t in log]}, expected one id")
    if not torch.equal(x.grad, torch.full((3,), 4.0)):
        problems.append(f"Function.apply's C entry gave gradient {x.grad.tolist()}, expected 4s")
    first = log[0][1] if log else None
    _Probe.log = []
    function_apply(_Probe, x).sum().backward()
    if _Probe.log and _Probe.log[0][1] == first:
        problems.append("two backward passes had the same graph task id")
    before = version(x.grad)
    x.grad.add_(1)
    if version(x.grad) == before:
        problems.append("an in-place change did not change the version counter")


def _check_reach(problems: list[str]) -> None:
    from torch.autograd.graph import get_gradient_edge

    w = torch.ones(2, requires_grad=True)
    x = torch.ones(2, requires_grad=True)
    seen = {}

    class Ask(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            seen["w"] = will_execute(get_gradient_edge(w).node)
            return g

    loss = (function_apply(Ask, w * x)).sum()
    loss.backward(retain_graph=True)
    if seen.get("w") is not True:
        problems.append(f"will_execute(w's accumulator) in loss.backward() was {seen.get('w')}, expected True")
    loss.backward(inputs=[x])
    if seen.get("w") is not False:
        problems.append(f"will_execute(w's accumulator) in backward(inputs=[x]) was {seen.get('w')}, expected False")


def _check_nodes(problems: list[str]) -> None:
    x = torch.ones(2, requires_grad=True)
    y = function_apply(_Probe, x)
    if forward_class(y.grad_fn) is not _Probe:
        problems.append(f"the Function class of a node is {forward_class(y.grad_fn)}, expected the Function")

    class Save(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return 2 * a * g

    plain = function_apply(Save, x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hooked = function_apply(Save, x)
    if saved_through_hooks(plain.grad_fn) or not saved_through_hooks(hooked.grad_fn):
        problems.append(
            f"saved through hooks: {saved_through_hooks(plain.grad_fn)} without hooks, "
            f"{saved_through_hooks(hooked.grad_fn)} with them; expected False, True"
        )


def _check_transforms(problems: list[str]) -> None:
    seen = []

    def f(t):
        seen.append(transforms_active())
        return t * 2

    if transforms_active():
        problems.append("a torch.func transform is reported active outside any")
    torch.func.vmap(f)(torch.ones(2, 3))
    if seen != [True]:
        problems.append(f"inside vmap transforms_active() was {seen}, expected [True]")
    if any_autocast():
        problems.append("autocast is reported on outside any autocast region")
    with torch.autocast("cpu"):
        if not any_autocast():
            problems.append("autocast is reported off inside torch.autocast('cpu')")
    if forward_ad_active():
        problems.append("forward-mode AD is reported active outside any dual level or transform")
    with torch.autograd.forward_ad.dual_level():
        inside = forward_ad_active()
    if not inside:
        problems.append("forward-mode AD is reported inactive inside a dual level")
    if is_legacy_batched(torch.ones(2)):
        problems.append("a plain tensor is reported batched by the legacy vmap")


def _check_end_to_end(problems: list[str]) -> None:
    """A dense layer ``z = W h + b`` on two examples, loss ``Σ z``: example i's gradient is ``(hᵢ, 1)`` for
    ``(W, b)``, with norms √2 and √5 for ``h = (1, 0), (0, 2)``; clipped to C = 1 and summed, ``.grad`` of W is
    ``(1/√2)(1, 0) + (1/√5)(0, 2)``."""
    import math

    from ..clipping import per_sample
    from ..nn import Linear

    layer = Linear(2, 1).double()
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    with per_sample(layer, max_norm=1.0, loss_reduction="sum", clipped_sum=True) as ps:
        layer(h).sum().backward()
    want = torch.tensor([math.sqrt(2), math.sqrt(5)], dtype=torch.float64)
    if ps.norms is None or not torch.allclose(ps.norms, want, rtol=1e-12, atol=0):
        problems.append(f"per-example norms {None if ps.norms is None else ps.norms.tolist()}, expected [√2, √5]")
    # cᵢ = min(1, C / (‖gᵢ‖ + 1e-6)), Opacus's rule
    grad_w = torch.tensor([[1 / (math.sqrt(2) + 1e-6), 2 / (math.sqrt(5) + 1e-6)]], dtype=torch.float64)
    if layer.weight.grad is None or not torch.allclose(layer.weight.grad, grad_w, rtol=1e-9, atol=0):
        got = None if layer.weight.grad is None else layer.weight.grad.tolist()
        problems.append(f"clipped weight gradient {got}, expected {grad_w.tolist()}")

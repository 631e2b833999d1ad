"""Shared test helpers: sample layouts, and parity of values and every gradient with torch's op."""

from __future__ import annotations

import itertools

import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

# strided ([..., ::2]) and permuted (dims reversed) layouts: one definition, shared with verify()
from torchderiv.testing import laid_out  # noqa: E402

# Leading shapes of PyTorch's sample_inputs_linear, plus a 5-D one.
LEADING_SHAPES = [(), (0,), (8,), (2, 3), (2, 1, 3, 1, 2)]
LAYOUTS = ["contiguous", "strided", "permuted"]

# fp32: GEMMs and reductions may sum in a different order than torch's fused kernels; the error
# grows like eps·sqrt(n) for the small n used here, well inside 1e-5 absolute / 1.3e-6·K relative.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-7), torch.float32: dict(atol=1e-5, rtol=1e-4)}


def leaf(t: torch.Tensor, requires_grad: bool = True, layout: str = "contiguous") -> torch.Tensor:
    out = laid_out(t.detach(), layout)
    return out.requires_grad_(requires_grad and t.is_floating_point())


def check_parity(ours, theirs, inputs, *, grad_layout="contiguous", tol=None, skip_grad_where=None):
    """Values and all gradients of ``ours(*inputs)`` equal to ``theirs(*inputs)``.

    ``inputs`` are tensors (those with ``requires_grad`` get gradients) or other arguments. The
    incoming gradient is laid out as ``grad_layout`` and must come back unmodified.
    ``skip_grad_where``: a bool mask over ``inputs[0]`` whose gradient entries are not compared
    (for a documented torch inconsistency). Returns the output of ``ours``.
    """

    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone().requires_grad_(x.requires_grad) if x.requires_grad else x
        return x

    a = [clone(x) for x in inputs]
    b = [clone(x) for x in inputs]
    out_a = ours(*a)
    out_b = theirs(*b)
    tol = tol or TOL.get(out_b.dtype, TOL[torch.float32])
    assert out_a.shape == out_b.shape, (out_a.shape, out_b.shape)
    assert out_a.dtype == out_b.dtype, (out_a.dtype, out_b.dtype)
    assert_close(out_a, out_b, equal_nan=True, **tol)
    wrt = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not wrt or not out_b.requires_grad:
        return out_a
    g = laid_out(torch.randn(out_b.shape, dtype=out_b.dtype, device=out_b.device), grad_layout)
    g_before = g.clone()
    grads_a = torch.autograd.grad(out_a, [a[i] for i in wrt], g, allow_unused=True)
    assert_close(g, g_before, rtol=0, atol=0, msg="backward modified grad_output in place")
    grads_b = torch.autograd.grad(out_b, [b[i] for i in wrt], g, allow_unused=True)
    for i, ga, gb in zip(wrt, grads_a, grads_b):
        if gb is None:
            assert ga is None or not ga.any(), f"input {i}: torch gives no gradient, ours is nonzero"
            continue
        assert ga is not None, f"input {i}: no gradient"
        assert ga.shape == gb.shape and ga.dtype == gb.dtype, (i, ga.shape, gb.shape, ga.dtype, gb.dtype)
        if i == 0 and skip_grad_where is not None:
            ga, gb = ga[~skip_grad_where], gb[~skip_grad_where]
        assert_close(ga, gb, equal_nan=True, msg=lambda m, i=i: f"gradient of input {i}: {m}", **tol)
    return out_a


def full_check(fn, inputs, *, fwd_over_rev=True, batched=True):
    """gradcheck + gradgradcheck in float64 with forward AD, batched gradients and forward-over-reverse."""
    assert gradcheck(
        fn,
        inputs,
        check_forward_ad=True,
        check_batched_grad=batched,
        check_batched_forward_grad=batched,
    )
    assert gradgradcheck(fn, inputs, check_batched_grad=batched, check_fwd_over_rev=fwd_over_rev)


def needs_grad_combinations(n: int):
    """Every non-empty requires_grad pattern over n differentiable inputs."""
    return [c for c in itertools.product([False, True], repeat=n) if any(c)]


def check_clipping_against_per_example_autograd(ours, ref, x, y, max_norm, grad_sample=False):
    """One backward of ``ours`` inside ``per_sample(max_norm=..., loss_reduction="sum")`` against one autograd backward
    per example of its twin ``ref`` (same weights): norms, clipped ``.grad`` and ``grad_sample``, to 1e-10 in float64
    and 1e-5 in float32. Returns the clipping factors."""
    import torch.nn.functional as F

    import torchderiv

    with torchderiv.per_sample(ours, max_norm=max_norm, loss_reduction="sum", grad_sample=grad_sample) as ps:
        F.cross_entropy(ours(x), y, reduction="sum").backward()
    n = len(x)
    per = [
        torch.autograd.grad(F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1], reduction="sum"), list(ref.parameters()))
        for i in range(n)
    ]
    norms = torch.stack([torch.sqrt(sum(t.square().sum() for t in g)) for g in per])
    rtol, atol = (1e-10, 1e-12) if x.dtype == torch.float64 else (1e-5, 1e-6)
    assert_close(ps.norms, norms, rtol=rtol, atol=0)
    c = (max_norm / (norms + 1e-6)).clamp(max=1)
    for k, p in enumerate(ours.parameters()):
        assert_close(p.grad, sum(c[i] * per[i][k] for i in range(n)), rtol=rtol, atol=atol)
        if grad_sample:
            assert_close(p.grad_sample, torch.stack([g[k] for g in per]), rtol=rtol, atol=atol)
    return c

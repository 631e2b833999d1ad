"""GroupNorm with LayerNorm's derivatives per example and channel group: values and gradients against torch and
finite differences; the module and convert; per-example norms and clipping against per-example autograd."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import check_clipping_against_per_example_autograd
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.functional as TF

CASES = [((3, 6, 5, 4), 3), ((2, 4, 7), 2), ((3, 6), 6), ((2, 8, 3, 3), 1)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, groups", CASES, ids=["2d", "1d", "one-per-group", "one-group"])
def test_values_and_gradients_equal_torchs(shape, groups, affine):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True) if affine else None
    out, ref = TF.group_norm(x, groups, w, b), F.group_norm(x, groups, w, b)
    assert_close(out, ref, rtol=0, atol=1e-14)
    leaves = [t for t in (x, w, b) if t is not None]
    g = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, groups", CASES[:2], ids=["2d", "1d"])
def test_gradcheck_forward_ad_double_backward(shape, groups):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: TF.group_norm(x, groups, w, b)
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


def test_float32_and_bad_input():
    x = torch.randn(4, 6, 5)
    assert_close(TF.group_norm(x, 2), F.group_norm(x, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"channels of input \(6\) to be divisible by num_groups"):
        TF.group_norm(x, 4)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \(6,\)"):
        TF.group_norm(x, 2, torch.ones(5))


def test_module_and_convert():
    ref = nn.GroupNorm(2, 6).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    assert type(ours) is torchderiv.nn.GroupNorm and isinstance(ours, nn.GroupNorm)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    assert_close(ours(x), ref(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_equals_one_backward_per_example(dtype):
    # GroupNorm in place of BatchNorm, as DP-SGD's CNNs use it: each example's γ, β gradients are its own
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4)
    ).to(dtype)
    ours = torchderiv.convert(copy.deepcopy(ref))
    x, y = torch.randn(5, 2, 6, 6, dtype=dtype), torch.randint(0, 4, (5,))
    c = check_clipping_against_per_example_autograd(ours, ref, x, y, 0.3, grad_sample=True)
    assert (c < 1).any()


@pytest.mark.parametrize(
    "shape, groups",
    [((3, 6, 5, 4), 3), ((2, 4, 7), 2), ((3, 6, 4), 6), ((2, 8, 3, 3), 1), ((4, 6), 2)],
    ids=["2d", "1d", "a-channel-a-group", "one-group", "no-positions"],
)
def test_per_sample_of_every_shape_equals_one_backward_per_example(shape, groups):
    # (N, C), (N, C, L), (N, C, H, W); a group per channel and one group for all. (Torch refuses a group of one value
    # for a batch of one, the per-example reference: CASES' (3, 6) with 6 groups has no such reference.)
    torch.manual_seed(0)
    n, channels = shape[:2]
    ref = nn.Sequential(
        nn.GroupNorm(groups, channels), nn.Tanh(), nn.Flatten(), nn.Linear(channels * math.prod(shape[2:]), 3)
    )
    ref = ref.double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    c = check_clipping_against_per_example_autograd(ours, ref, x, torch.randint(0, 3, (n,)), 0.2, grad_sample=True)
    assert (c < 1).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plain_backward_on_awkward_inputs(dtype):
    # the plain backward (x̂ and its statistics from torch's forward kernel, sums per example and channel): inputs
    # far from zero, non-contiguous, an expanded incoming gradient, an empty batch, no positions; against torch in
    # float64
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    cases = [torch.randn(4, 6, 5, 3, dtype=dtype).transpose(2, 3) * 5 + 300, torch.randn(0, 6, 4, dtype=dtype)]
    for x in cases:
        x.requires_grad_()
        w = torch.randn(6, dtype=dtype, requires_grad=True)
        b = torch.randn(6, dtype=dtype, requires_grad=True)
        g = torch.randn(x.shape[1:], dtype=dtype).expand(x.shape)
        ours = torch.autograd.grad(TF.group_norm(x, 3, w, b), (x, w, b), g)
        ref = torch.autograd.grad(F.group_norm(*(t.double() for t in (x,)), 3, w.double(), b.double()), (x, w, b), g)
        for a, c in zip(ours, ref):
            assert a.dtype == dtype
            assert_close(a.double(), c.double(), **tol)
    # no positions: each channel's sum over positions is empty, so ∂J/∂γ = ∂J/∂β = 0 (torch 2.13's kernel gives NaN
    # for γ; torch 2.14 refuses the input, and so does torchderiv there, through torch's forward kernel)
    x = torch.randn(3, 6, 0, dtype=dtype, requires_grad=True)
    w = torch.randn(6, dtype=dtype, requires_grad=True)
    try:
        F.group_norm(x, 3, w)
    except RuntimeError as refusal:
        with pytest.raises(RuntimeError, match=re.escape(str(refusal))):
            TF.group_norm(x, 3, w)
        return
    gx, gw = torch.autograd.grad(TF.group_norm(x, 3, w), (x, w), torch.randn(3, 6, 0, dtype=dtype))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(gw))

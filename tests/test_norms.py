"""layer_norm and rms_norm: gradcheck, parity with torch, the modules, convert, and per-example gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, LEADING_SHAPES, TOL, check_parity, full_check, leaf, needs_grad_combinations
from test_per_sample_layout import _check, _per_example
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.functional as TF
import torchderiv.nn as tdnn

D64 = torch.float64

# name -> (ours, torch's, the parameters it takes: (weight, bias) or (weight,))
OPS = {
    "layer_norm": (TF.layer_norm, F.layer_norm, 2),
    "rms_norm": (TF.rms_norm, F.rms_norm, 1),
}


def _call(fn, nparams, shape, eps):
    """``fn(x, shape, *params)`` with ``None`` for a parameter left out, and the op's eps."""

    def run(x, *params):
        kw = {"eps": eps} if eps is not None else {}
        return fn(x, shape, *params, **kw)

    return run


@pytest.mark.parametrize("norm_shape", [(4,), (3, 4)], ids=["k1", "k2"])
@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_and_gradgradcheck(name, lead, norm_shape):
    ours, _, nparams = OPS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, *norm_shape, dtype=D64, generator=g, requires_grad=True)
    params = [torch.randn(norm_shape, dtype=D64, generator=g, requires_grad=True) for _ in range(nparams)]
    full_check(_call(ours, nparams, norm_shape, 1e-3), (x, *params))
    full_check(_call(ours, 0, norm_shape, 1e-3), (x,))  # no affine parameters


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, D64], ids=str)
@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_parity_with_torch(name, lead, dtype, layout):
    ours, theirs, nparams = OPS[name]
    g = torch.Generator().manual_seed(1)
    # the rows at 3 + 2 x: a mean far from 0, where an uncentred variance would lose digits
    x = leaf(3 + 2 * torch.randn(*lead, 2, 6, dtype=dtype, generator=g), layout=layout)
    params = [leaf(torch.randn(6, dtype=dtype, generator=g)) for _ in range(nparams)]
    check_parity(_call(ours, nparams, (6,), None), _call(theirs, nparams, (6,), None), [x, *params], grad_layout=layout)


@pytest.mark.parametrize("needs", needs_grad_combinations(3), ids=str)
def test_every_needs_input_grad_combination(needs):
    g = torch.Generator().manual_seed(2)
    inputs = [leaf(torch.randn(*s, dtype=D64, generator=g), r) for s, r in zip([(5, 4), (4,), (4,)], needs)]
    check_parity(_call(TF.layer_norm, 2, (4,), None), _call(F.layer_norm, 2, (4,), None), inputs)


def test_constant_rows_and_extremes():
    # a constant row has x − μ = 0 and r = √ε: x̂ = 0 and the gradient is finite; rows of ±1e4 and 1e-30
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1e4, -1e4, 1e4, -1e4], [1e-30, -1e-30, 0.0, 3e-30]], dtype=D64)
    w, b = torch.randn(4, dtype=D64), torch.randn(4, dtype=D64)
    for layout in LAYOUTS[:1]:
        check_parity(
            _call(TF.layer_norm, 2, (4,), None),
            _call(F.layer_norm, 2, (4,), None),
            [leaf(x, layout=layout), leaf(w), leaf(b)],
        )
        check_parity(_call(TF.rms_norm, 1, (4,), None), _call(F.rms_norm, 1, (4,), None), [leaf(x), leaf(w)])


def test_lower_precision_input_computes_in_float32():
    # torch's kernels keep the statistics in float32 for bfloat16 inputs: ours too (not bfloat16 arithmetic)
    x = (3 + torch.randn(8, 64)).bfloat16()
    w, b = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    out, ref = TF.layer_norm(x, (64,), w, b), F.layer_norm(x, (64,), w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = F.layer_norm(x.double(), (64,), w.double(), b.double())
    assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + 1e-2


def test_bad_arguments_raise_torchs_exception_types():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[5\], expected input with shape \[\*, 5\], got .*3, 4"):
        TF.layer_norm(x, (5,))
    with pytest.raises(RuntimeError, match=r"expected weight of the normalized shape \[4\], got weight of shape \[3\]"):
        TF.layer_norm(x, (4,), torch.randn(3))
    with pytest.raises(RuntimeError, match=r"expected bias of the normalized shape"):
        TF.layer_norm(x, 4, None, torch.randn(2, 2))
    with pytest.raises(TypeError, match="expected input to be a Tensor"):
        TF.rms_norm([1.0, 2.0], (2,))


# --- modules and convert ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LayerNorm(6),
        lambda: nn.LayerNorm((2, 6), elementwise_affine=False),
        lambda: nn.LayerNorm(6, bias=False),
        lambda: nn.RMSNorm(6),
        lambda: nn.RMSNorm(6, eps=1e-3),
    ],
    ids=["ln", "ln-2d-no-affine", "ln-no-bias", "rms", "rms-eps"],
)
def test_modules_and_convert_equal_torch(make):
    torch.manual_seed(3)
    theirs = make().double()
    for p in theirs.parameters():
        p.data.normal_()
    ours = torchderiv.convert(copy.deepcopy(theirs))
    assert type(ours).__name__ in ("LayerNorm", "RMSNorm") and type(ours).__module__ == "torchderiv.nn.modules"
    assert isinstance(ours, type(theirs)) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 2, 6, dtype=D64)
    check_parity(ours, theirs, [leaf(x)])
    if any(True for _ in theirs.parameters()):
        grads = torch.autograd.grad(ours(x).square().sum(), list(ours.parameters()))
        for g, g_ref in zip(grads, torch.autograd.grad(theirs(x).square().sum(), list(theirs.parameters()))):
            assert_close(g, g_ref, **TOL[D64])
    assert str(ours).startswith("torchderiv.")


def test_meta_device():
    # shape inference and meta-device initialisation, as torch's modules
    x = torch.empty(2, 5, 4, device="meta")
    for ours in (tdnn.LayerNorm(4, device="meta"), tdnn.RMSNorm(4, device="meta")):
        out = ours(x)
        assert out.device.type == "meta" and out.shape == (2, 5, 4)


# --- per-example gradients: each example's Σ_t δ ⊙ x̂ and Σ_t δ -----------------------------------------

T, B, D = 5, 6, 8


class _Block(nn.Module):
    """Linear → LayerNorm → GELU → Linear → RMSNorm → a head on the mean over positions."""

    def __init__(self, ln_bias=True):
        super().__init__()
        self.a = nn.Linear(D, 12)
        self.ln = nn.LayerNorm(12, bias=ln_bias)
        self.b = nn.Linear(12, D)
        self.rms = nn.RMSNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, seq_dim=1):
        h = self.rms(self.b(F.gelu(self.ln(self.a(x)))))
        return self.head(h.mean(seq_dim))


def _pair(ln_bias=True, dtype=D64):
    torch.manual_seed(4)
    ref = _Block(ln_bias).to(dtype)
    for m in (ref.ln, ref.rms):  # away from γ = 1, β = 0
        for p in m.parameters():
            p.data.normal_()
    return torchderiv.convert(copy.deepcopy(ref)), ref


@pytest.mark.parametrize("ln_bias", [True, False], ids=["ln-bias", "ln-no-bias"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_per_sample_norm_layers_match_ground_truth(batch_first, ln_bias):
    ours, ref = _pair(ln_bias)
    if not batch_first:  # the model averages over dim 0 for (T, B, D) inputs
        ours.forward = lambda x, f=ours.forward: f(x, 0)
        ref.forward = lambda x, f=ref.forward: f(x, 0)
    x = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=D64)
    _check(ours, ref, x, 0, batch_first)


def test_per_sample_norm_alone_with_frozen_neighbours():
    # only the norms train: their rules alone make the norms and the clipped gradients
    ours, ref = _pair()
    for m in (ours, ref):
        for n, p in m.named_parameters():
            p.requires_grad_(n.startswith(("ln", "rms")))
    _check(ours, ref, torch.randn(B, T, D, dtype=D64), 0, True)


def test_per_sample_norm_float32():
    ours, ref = _pair(dtype=torch.float32)
    x = torch.randn(B, T, D)
    with torchderiv.per_sample(ours, max_norm=None, grad_sample=True, loss_reduction="sum") as ps:
        ours(x).sum().backward()
    # ground truth in float64 from the same parameters
    per = _per_example(copy.deepcopy(ref).double(), x.double(), 0, torch.ones(B, 3, dtype=D64))
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    assert ps.norms.dtype == torch.float32
    assert_close(ps.norms.double(), norms, rtol=1e-5, atol=1e-6)
    for p, g in zip(ours.parameters(), per):
        assert_close(p.grad_sample.double(), g, rtol=1e-4, atol=1e-5)

"""linear and dense: the seed's layer Z = H Wᵀ + b (and H = g(Z)) against finite differences and torch."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, LEADING_SHAPES, check_parity, full_check, leaf, needs_grad_combinations

import torchderiv.functional as TF
from torchderiv.functional.activations import ACTIVATIONS, DEFAULT_PARAMS

IN, OUT = 4, 3


def _inputs(lead, bias, dtype=torch.float64, requires=(True, True, True), layout="contiguous"):
    x = leaf(torch.randn(*lead, IN, dtype=dtype), requires[0], layout)
    w = leaf(torch.randn(OUT, IN, dtype=dtype), requires[1], layout)
    b = leaf(torch.randn(OUT, dtype=dtype), requires[2]) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
def test_linear_gradcheck(lead, bias):
    x, w, b = _inputs(lead, bias)
    full_check(lambda x, w, *b: TF.linear(x, w, *b), (x, w) + ((b,) if bias else ()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_layout", LAYOUTS)
@pytest.mark.parametrize("in_layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
def test_linear_matches_torch(lead, bias, in_layout, grad_layout, dtype):
    x, w, b = _inputs(lead, bias, dtype, layout=in_layout)
    check_parity(TF.linear, F.linear, [x, w, b], grad_layout=grad_layout)


@pytest.mark.parametrize("requires", needs_grad_combinations(3), ids=str)
def test_linear_every_needs_input_grad(requires):
    x, w, b = _inputs((5,), True, requires=requires)
    check_parity(TF.linear, F.linear, [x, w, b])


def test_linear_skips_unneeded_gemms():
    """A frozen weight costs no weight-gradient GEMM: backward returns None for it."""
    x, w, b = _inputs((5,), True, requires=(True, False, False))
    out = TF.linear(x, w, b)
    calls = []
    orig_mm = torch.Tensor.mm

    def counting_mm(self, other):
        calls.append((tuple(self.shape), tuple(other.shape)))
        return orig_mm(self, other)

    torch.Tensor.mm = counting_mm
    try:
        out.sum().backward()
    finally:
        torch.Tensor.mm = orig_mm
    assert w.grad is None and b.grad is None
    assert (OUT, 5) not in [c[0] for c in calls]  # no Δᵀ H product


def _activation_params():
    cases = []
    for name in ACTIVATIONS:
        cases.append((name, DEFAULT_PARAMS[name]))
    cases += [("leaky_relu", (-0.3,)), ("elu", (-0.5,)), ("elu", (0.0,)), ("softplus", (2.0, 1.0))]
    cases += [("gelu", ("tanh",))]
    return cases


ACT_CASES = _activation_params()
ACT_IDS = [f"{n}{p}" for n, p in ACT_CASES]


def _torch_act(name, z, *params):
    if name == "gelu":
        return F.gelu(z, approximate=params[0])
    if name in ("sigmoid", "tanh"):
        return getattr(torch, name)(z)
    return getattr(F, name)(z, *params)


@pytest.mark.parametrize("case", ACT_CASES, ids=ACT_IDS)
@pytest.mark.parametrize("lead", [(), (0,), (6,), (2, 3)], ids=str)
def test_dense_gradcheck(lead, case):
    name, params = case
    x, w, b = _inputs(lead, True)
    full_check(lambda x, w, b: TF.dense(x, w, b, name, *params), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", ACT_CASES, ids=ACT_IDS)
def test_dense_matches_torch(case, bias, layout, dtype):
    name, params = case
    x, w, b = _inputs((2, 5), bias, dtype, layout=layout)
    check_parity(
        lambda x, w, b: TF.dense(x, w, b, name, *params),
        lambda x, w, b: _torch_act(name, F.linear(x, w, b), *params),
        [x, w, b],
        grad_layout=layout,
    )


@pytest.mark.parametrize("requires", needs_grad_combinations(3), ids=str)
def test_dense_every_needs_input_grad(requires):
    x, w, b = _inputs((5,), True, requires=requires)
    check_parity(lambda x, w, b: TF.dense(x, w, b, "tanh"), lambda x, w, b: torch.tanh(F.linear(x, w, b)), [x, w, b])


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 5), torch.randn(3, 4)), r"expected input with 4 features \(last dim\), got shape \(2, 5\)"),
        ((torch.randn(2, 4), torch.randn(3, 4, 1)), r"expected a 2-D weight .* got shape \(3, 4, 1\)"),
        ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), r"expected bias of shape \(3,\), got shape \(4,\)"),
        ((torch.tensor(1.0), torch.randn(3, 4)), r"at least 1 dimension"),
    ],
    ids=["features", "weight-dims", "bias-shape", "0-d-input"],
)
def test_linear_bad_input(args, message):
    with pytest.raises(RuntimeError, match=message):
        TF.linear(*args)
    with pytest.raises(RuntimeError, match=message.replace("linear", "dense")):
        TF.dense(*args)


def test_dense_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'rleu': expected one of \["):
        TF.dense(torch.randn(2, 4), torch.randn(3, 4), None, "rleu")

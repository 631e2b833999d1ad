"""Elementwise activations H = g(Z): finite differences, torch parity, kinks, extremes, NaN, in place."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, check_parity, full_check, leaf

import torchderiv.functional as TF
import torchderiv.functional.activations as acts
from torchderiv.functional.activations import ACTIVATIONS

# (name, torchderiv fn, torch fn, kwargs)
CASES = [
    ("sigmoid", TF.sigmoid, torch.sigmoid, {}),
    ("tanh", TF.tanh, torch.tanh, {}),
    ("relu", TF.relu, F.relu, {}),
    ("leaky_relu", TF.leaky_relu, F.leaky_relu, {}),
    ("leaky_relu-0.2", TF.leaky_relu, F.leaky_relu, {"negative_slope": 0.2}),
    ("leaky_relu-neg", TF.leaky_relu, F.leaky_relu, {"negative_slope": -0.3}),
    ("elu", TF.elu, F.elu, {}),
    ("elu-0.5", TF.elu, F.elu, {"alpha": 0.5}),
    ("elu-neg", TF.elu, F.elu, {"alpha": -0.7}),
    ("softplus", TF.softplus, F.softplus, {}),
    ("softplus-3-0.2", TF.softplus, F.softplus, {"beta": 3.0, "threshold": 0.2}),
    ("gelu", TF.gelu, F.gelu, {}),
    ("gelu-tanh", TF.gelu, F.gelu, {"approximate": "tanh"}),
    ("silu", TF.silu, F.silu, {}),
]
IDS = [c[0] for c in CASES]
SHAPES = [(), (0,), (7,), (2, 3), (2, 1, 3, 1, 2)]

# Exact kinks, values beyond softplus' threshold, and saturated sigmoid/tanh.
KINKS = torch.tensor([-1.0, 0.0, 1.0])
EXTREMES = torch.tensor([-300.0, -30.0, -20.5, 20.5, 30.0, 300.0])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(case, shape):
    _, ours, _, kw = case
    # keep samples away from kinks, where finite differences straddle two branches
    x = torch.randn(shape, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()
    full_check(lambda x: ours(x, **kw), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch(case, layout, dtype):
    _, ours, theirs, kw = case
    x = leaf(torch.randn(3, 4, dtype=dtype) * 3, layout=layout)
    check_parity(lambda x: ours(x, **kw), lambda x: theirs(x, **kw), [x], grad_layout=layout)


@pytest.mark.parametrize("values", [KINKS, EXTREMES], ids=["kinks", "extremes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kinks_and_extremes_match_torch(case, dtype, values):
    _, ours, theirs, kw = case
    check_parity(lambda x: ours(x, **kw), lambda x: theirs(x, **kw), [leaf(values.to(dtype))])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_and_inf_propagate_like_torch(case):
    """Values and gradients at NaN and ±inf are torch's (e.g. relu passes the gradient at NaN)."""
    _, ours, theirs, kw = case
    # 256 elements so that torch takes its vectorised kernels (the scalar tail of elu's backward
    # treats NaN differently from the vectorised body; we follow the body).
    x = leaf(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5]).repeat(64))
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ya, yb = ours(a, **kw), theirs(b, **kw)
    torch.testing.assert_close(ya, yb, equal_nan=True)
    (ga,) = torch.autograd.grad(ya, a, torch.ones_like(ya))
    (gb,) = torch.autograd.grad(yb, b, torch.ones_like(yb))
    torch.testing.assert_close(ga, gb, equal_nan=True)


def test_relu_passes_gradient_at_nan():
    x = torch.tensor([float("nan"), -1.0, 2.0], requires_grad=True)
    TF.relu(x).backward(torch.ones(3))
    assert x.grad.tolist()[1:] == [0.0, 1.0]
    assert x.grad[0].item() == 1.0  # torch's threshold_backward keeps it


def test_relu_blocks_an_infinite_gradient_where_the_unit_is_off():
    # d ⊙ 1[z > 0] is a select: an inf (or NaN) arriving at a unit with z ≤ 0 gives 0, as torch's; the float mask
    # (inf · 0 = NaN) must not be used then, whatever else the tensors hold
    x = torch.tensor([-1.0, 2.0, 0.0, 3.0]).repeat(64).requires_grad_()
    d = torch.tensor([float("inf"), 1.0, float("nan"), 2.0]).repeat(64)
    (ours,) = torch.autograd.grad(TF.relu(x), x, d)
    (ref,) = torch.autograd.grad(torch.relu(x), x, d)
    assert torch.equal(ours, ref) and ours[0] == 0 and ours[2] == 0


INPLACE = [c for c in CASES if c[0].split("-")[0] in ("relu", "leaky_relu", "elu", "silu")]


@pytest.mark.parametrize("case", INPLACE, ids=[c[0] for c in INPLACE])
def test_inplace_writes_into_input(case):
    _, ours, theirs, kw = case
    base = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    a = base * 1  # a non-leaf, as torch requires for in-place ops on tensors that need grad
    out = ours(a, inplace=True, **kw)
    assert out is a
    torch.testing.assert_close(out, theirs(base * 1, **kw))
    (g,) = torch.autograd.grad(out.sum(), base)
    (g_ref,) = torch.autograd.grad(theirs(base * 1, **kw).sum(), base)
    torch.testing.assert_close(g, g_ref)


def test_inplace_on_leaf_that_needs_grad_raises_like_torch():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        TF.relu(x, inplace=True)


def test_gelu_bad_approximate():
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        TF.gelu(torch.randn(3), approximate="asdf")


def test_saved_tensors_follow_the_table():
    """relu/sigmoid/tanh keep their output; gelu/silu keep their input."""
    for name, expect_output in [("relu", True), ("sigmoid", True), ("tanh", True), ("gelu", False), ("silu", False)]:
        x = torch.randn(5, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = getattr(TF, name)(x * 1)
        assert len(saved) == 1
        ref = y if expect_output else None
        if expect_output:
            assert saved[0].data_ptr() == ref.data_ptr(), name
        else:
            assert saved[0].data_ptr() != y.data_ptr(), name


def test_gelu_derivative_keeps_its_digits_in_the_lower_tail():
    """g'(z) = Φ(z) + z φ(z) with Φ = ½ erfc(−z/√2): no cancellation where Φ is tiny.

    1 + erf(z/√2) loses every digit of Φ below z ≈ −4 in float32 (and below z ≈ −8 in float64, so
    torch's own float64 gradient is no reference there). The reference is mpmath's numerical derivative
    of GELU's definition z Φ(z) at 40 digits.
    """
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    zs = [-12.0, -10.0, -7.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0]
    ref = torch.tensor([float(mpmath.diff(lambda t: t * mpmath.ncdf(t), z)) for z in zs], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        z = leaf(torch.tensor(zs, dtype=dtype))
        (ours,) = torch.autograd.grad(TF.gelu(z).sum(), z)
        # exp(−z²/2) multiplies the rounding error of z²/2 by z²/2 (72 at z = −12): ~1e-5 relative in
        # float32 there; the cancellation this test guards against is a 100% error.
        rtol = 2e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=0, msg=f"{dtype}")


# the activations whose plain backward builds g'(z) a piece at a time: (torchderiv's, torch's, its backprop)
PIECEWISE = {"gelu": (TF.gelu, F.gelu, "_gelu_backprop"), "silu": (TF.silu, F.silu, "_silu_backprop")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(PIECEWISE))
def test_plain_backward_in_pieces(name, dtype, monkeypatch):
    """A plain backward of a large GELU or SiLU builds g' a piece at a time in two small buffers: every piece, the
    ragged last one included, equals the whole tensor's formula bit for bit, and torch's gradient; also written into
    an owned incoming gradient (the MLP's), and for a non-contiguous input (which takes the whole-tensor form)."""
    ours, theirs, backprop = PIECEWISE[name]
    extra = () if name == "silu" else ("none",)
    g = torch.Generator().manual_seed(5)
    z = torch.cat([torch.randn(400, dtype=dtype, generator=g) * 3, torch.tensor([-12.0, -5.0, 0.0, 7.0], dtype=dtype)])
    z = leaf(z.reshape(4, 101))
    d = torch.randn(4, 101, dtype=dtype, generator=g)

    def grad(x):
        (gx,) = torch.autograd.grad(ours(x), x, d)
        return gx

    whole = grad(z)  # 404 elements: one piece at the default size
    pieces = []
    real = acts._backprop_in_pieces
    monkeypatch.setattr(acts, "_backprop_in_pieces", lambda *a: pieces.append(1) or real(*a))
    # 6 pieces of 64 and one of 20. NOTE: pieces of a multiple of 64 elements, so that torch's kernels take their
    # vectorised loop for the same elements as on the whole tensor (their scalar tail may round sigmoid differently)
    monkeypatch.setattr(acts, "_PIECE", 64)
    in_pieces = grad(z)
    assert pieces, "the piecewise form did not run"
    torch.testing.assert_close(in_pieces, whole, rtol=0, atol=0)
    (ref,) = torch.autograd.grad(theirs(z), z, d)
    torch.testing.assert_close(in_pieces, ref)
    owned = d.clone()
    out = getattr(acts, backprop)(owned, z.detach(), *extra, overwrite_d=True)
    torch.testing.assert_close(out, whole, rtol=0, atol=0)
    torch.testing.assert_close(owned, whole, rtol=0, atol=0)  # written into the incoming gradient itself
    pieces.clear()
    zt = leaf(z.detach().t())  # not contiguous: the whole-tensor form
    (gt,) = torch.autograd.grad(ours(zt), zt, d.t())
    assert not pieces
    torch.testing.assert_close(gt, whole.t())  # (torch's kernels visit a transposed tensor in another order)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_twice_with_retain_graph(case):
    """A plain backward builds g'(z) in place in buffers of its own: the saved h or z stays untouched."""
    _, ours, theirs, kw = case
    x = leaf(torch.randn(4, 5))
    out = ours(x, **kw)
    g = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (second,) = torch.autograd.grad(out, x, g)
    (ref,) = torch.autograd.grad(theirs(x, **kw), x, g)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, ref)


FACTOR_CASES = [("gelu", ("none",)), ("gelu", ("tanh",)), ("silu", ())]


@pytest.mark.parametrize("value", [False, True], ids=["factor", "factor+value"])
@pytest.mark.parametrize("writable", [False, True], ids=["graph", "in-place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,params", FACTOR_CASES, ids=["gelu", "gelu-tanh", "silu"])
def test_factor_gives_torch_derivative_and_value(name, params, dtype, writable, value):
    """``Activation.factor``: g'(z) as torch's autograd has it, and g(z) as torch's forward, from shared parts."""
    act = ACTIVATIONS[name]
    z = torch.cat([torch.randn(64, dtype=dtype) * 3, KINKS.to(dtype), EXTREMES.to(dtype)])
    before = z.clone()
    factor, h = act.factor(z, *params, writable=writable, value=value)
    zr = leaf(z.clone())
    (ref,) = torch.autograd.grad(act.value(zr, *params).sum(), zr)
    torch.testing.assert_close(factor, ref)
    if value:
        torch.testing.assert_close(h, act.value(z, *params))
    else:
        assert h is None
    assert torch.equal(z, before), "factor must not write into z"


@pytest.mark.parametrize("name,params", FACTOR_CASES, ids=["gelu", "gelu-tanh", "silu"])
def test_factor_under_compile(name, params):
    act = ACTIVATIONS[name]
    z = torch.randn(50) * 3
    compiled = torch.compile(lambda t: act.factor(t, *params, value=True), backend="aot_eager", fullgraph=True)
    factor, h = compiled(z)
    eager = act.factor(z, *params, value=True)
    torch.testing.assert_close(factor, eager[0])
    torch.testing.assert_close(h, eager[1])

"""Fused, chunked linear + cross-entropy: equal to torch's, with every autograd feature kept."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_parity, full_check, leaf

import torchderiv.functional as TF
import torchderiv.nn as tnn

N, IN, C = 9, 5, 7


def _case(dtype=torch.float64, n=N, bias=True, weighted=False, ignore=True):
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(n, IN, dtype=dtype, generator=g))
    w = leaf(torch.randn(C, IN, dtype=dtype, generator=g))
    b = leaf(torch.randn(C, dtype=dtype, generator=g)) if bias else None
    t = torch.randint(0, C, (n,), generator=g)
    if ignore and n > 2:
        t[2] = -100
    cw = torch.rand(C, dtype=dtype, generator=g) + 0.1 if weighted else None
    return x, w, b, t, cw


def _pair(reduction, ls, chunk, ignore_index=None):
    def ours(x, w, b, t, cw):
        return TF.linear_cross_entropy(
            x,
            w,
            t,
            linear_bias=b,
            weight=cw,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=ls,
            chunk_size=chunk,
        )

    def theirs(x, w, b, t, cw):
        return F.linear_cross_entropy(
            x, w, t, linear_bias=b, weight=cw, reduction=reduction, ignore_index=ignore_index, label_smoothing=ls
        )

    return ours, theirs


@pytest.mark.parametrize("chunk", [1, 4, None, 100], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("ls", [0.0, 0.3], ids=["ls0", "ls0.3"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch(dtype, reduction, ls, weighted, chunk):
    x, w, b, t, cw = _case(dtype, weighted=weighted)
    ours, theirs = _pair(reduction, ls, chunk)
    check_parity(ours, theirs, [x, w, b, t, cw], grad_layout="strided")


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)], ids=str
)
def test_needs_input_grad(requires):
    x, w, b, t, _ = _case()
    for tensor, r in zip((x, w, b), requires):
        tensor.requires_grad_(r)
    ours, theirs = _pair("mean", 0.0, 4)
    check_parity(ours, theirs, [x, w, b, t, None])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_and_double_backward(reduction, bias):
    x, w, b, t, cw = _case(bias=bias, weighted=True)
    ours, _ = _pair(reduction, 0.1, 4)
    inputs = (x, w, b) if bias else (x, w)
    full_check(lambda x, w, *b: ours(x, w, b[0] if b else None, t, cw), inputs)


def test_ignore_index_and_edge_shapes():
    x, w, b, t, _ = _case()
    ours, theirs = _pair("mean", 0.0, 3, ignore_index=3)
    check_parity(ours, theirs, [x, w, b, t.clamp_min(0), None])
    ours, theirs = _pair("mean", 0.0, None)
    # unbatched input (in,) with a scalar target
    check_parity(ours, theirs, [leaf(torch.randn(IN, dtype=torch.float64)), w, b, torch.tensor(2), None])
    for reduction in ("mean", "sum", "none"):  # empty batch: NaN / 0 / empty, as torch
        o, th = _pair(reduction, 0.0, None)
        check_parity(
            o, th, [leaf(torch.randn(0, IN, dtype=torch.float64)), w, b, torch.zeros(0, dtype=torch.long), None]
        )
    all_ignored = torch.full((N,), -100)
    check_parity(ours, theirs, [x, w, b, all_ignored, None])


def test_k_dimensional_weight_and_probability_targets():
    g = torch.Generator().manual_seed(1)
    x = leaf(torch.randn(4, IN, dtype=torch.float64, generator=g))
    wk = leaf(torch.randn(C, 3, IN, dtype=torch.float64, generator=g))
    bk = leaf(torch.randn(C, 3, dtype=torch.float64, generator=g))
    tk = torch.randint(0, C, (4, 3), generator=g)
    ours, theirs = _pair("mean", 0.1, None)
    check_parity(ours, theirs, [x, wk, bk, tk, None])
    w = leaf(torch.randn(C, IN, dtype=torch.float64, generator=g))
    probs = leaf(torch.rand(4, C, dtype=torch.float64, generator=g).softmax(1))
    check_parity(ours, theirs, [x, w, None, probs, None])


def test_extreme_logits():
    x, w, b, t, _ = _case()
    with torch.no_grad():
        w.mul_(1e4)
    ours, theirs = _pair("mean", 0.0, 4)
    out = check_parity(ours, theirs, [x, w, b, t, None])
    assert torch.isfinite(out)


def test_torch_func_and_forward_ad():
    x, w, b, t, _ = _case(bias=True)
    x, w, b = x.detach(), w.detach(), b.detach()
    ours, theirs = _pair("mean", 0.1, 4)
    f = lambda x, w: ours(x, w, b, t, None)
    g = lambda x, w: theirs(x, w, b, t, None)
    torch.testing.assert_close(torch.func.grad(f, argnums=(0, 1))(x, w), torch.func.grad(g, argnums=(0, 1))(x, w))
    torch.testing.assert_close(torch.func.hessian(lambda x: f(x, w))(x), torch.func.hessian(lambda x: g(x, w))(x))
    torch.testing.assert_close(torch.func.jacfwd(lambda w: f(x, w))(w), torch.func.jacrev(lambda w: g(x, w))(w))
    xs = torch.stack([x, x * 0.5])
    torch.testing.assert_close(torch.func.vmap(lambda x: f(x, w))(xs), torch.stack([f(x, w), f(x * 0.5, w)]))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, t, _ = _case(torch.float32)
    ours, theirs = _pair("mean", 0.1, 4)
    compiled = torch.compile(lambda x, w, b: ours(x, w, b, t, None), backend="aot_eager", fullgraph=True)
    check_parity(lambda x, w, b, t, cw: compiled(x, w, b), theirs, [x, w, b, t, None])
    torch._dynamo.reset()


def test_autocast_output_dtype_matches_torch():
    x, w, b, t, _ = _case(torch.float32)
    ours, theirs = _pair("mean", 0.0, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(x, w, b, t, None), theirs(x, w, b, t, None)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    (gw,) = torch.autograd.grad(out, w)
    assert gw.dtype == torch.float32


def test_plain_backward_uses_gradients_from_forward():
    """'mean'/'sum' with gradients wanted: forward already holds them (no recomputation in backward)."""
    x, w, b, t, _ = _case(torch.float32)
    ours, _ = _pair("mean", 0.0, 4)
    out = ours(x, w, b, t, None)
    node = out.grad_fn
    assert type(node).__name__ == "LinearCrossEntropyFunctionBackward"
    gi, gw, gb = node.saved_tensors[5:]
    assert gi.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    with torch.no_grad():
        plain = ours(x, w, b, t, None)
    assert torch.equal(plain, out.detach())


def test_module_matches_torch_module():
    torch.manual_seed(0)
    ours = tnn.LinearCrossEntropyLoss(IN, C, bias=True, label_smoothing=0.1, chunk_size=4)
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(IN, C, bias=True, label_smoothing=0.1)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["linear.weight", "linear.bias"]
    x, t = torch.randn(N, IN), torch.randint(0, C, (N,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    ga = torch.autograd.grad(ours(x, t), list(ours.parameters()))
    gb = torch.autograd.grad(theirs(x, t), list(theirs.parameters()))
    for a, b_ in zip(ga, gb):
        torch.testing.assert_close(a, b_)
    k = tnn.LinearCrossEntropyLoss(
        IN, C, out_features=(3,), options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    )
    assert k(torch.randn(4, IN), torch.randint(0, C, (4, 3))).isfinite()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: TF.linear_cross_entropy(
                torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
            ),
            "dimensionality 1 or 2, got 3",
        ),
        (
            lambda: TF.linear_cross_entropy(torch.randn(2, 4), torch.randn(4), torch.zeros(2, dtype=torch.long)),
            "at least 2, got 1",
        ),
        (
            lambda: TF.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long)),
            "got 4 and 3",
        ),
        (
            lambda: TF.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)),
            r"Expected input batch_size \(2\) to match target batch_size \(3\)",
        ),
        (
            lambda: TF.linear_cross_entropy(
                torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), linear_bias=torch.randn(4)
            ),
            r"linear_bias shape \(5,\), got \(4,\)",
        ),
        (
            lambda: TF.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.rand(2, 5), ignore_index=1),
            "ignore_index cannot be specified",
        ),
        (
            lambda: TF.linear_cross_entropy(
                torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), chunk_size=0
            ),
            "positive chunk_size",
        ),
        (
            lambda: TF.linear_cross_entropy(
                torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), reduction="avg"
            ),
            "not a valid value for reduction",
        ),
    ],
    ids=[
        "input-dims",
        "weight-dims",
        "in-features",
        "target-shape",
        "bias-shape",
        "probs-ignore",
        "chunk",
        "reduction",
    ],
)
def test_bad_input(call, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        call()

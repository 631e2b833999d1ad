"""The whole-network Function (functional.mlp, used by nn.MLP): derivatives, parity, memory, transforms."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, check_parity, full_check, leaf, needs_grad_combinations

import torchderiv.functional as TF
from torchderiv.functional.activations import ACTIVATIONS
from torchderiv.testing import saved_bytes

SIZES = [4, 6, 5, 3]


def _torch_act(name):
    return {"sigmoid": torch.sigmoid, "tanh": torch.tanh}.get(name) or getattr(F, name)


def torch_mlp(x, *layers, activation="relu"):
    h = x
    n = len(layers) // 2
    for k in range(n):
        h = F.linear(h, layers[2 * k], layers[2 * k + 1])
        if k < n - 1:
            h = _torch_act(activation)(h)
    return h


def ours(x, *layers, activation="relu"):
    return TF.mlp(x, list(layers[::2]), list(layers[1::2]), activation)


def _layers(dtype=torch.float64, bias=(True, False, True), requires=True, layout="contiguous"):
    out = []
    for (n_in, n_out), b in zip(zip(SIZES[:-1], SIZES[1:]), bias):
        out.append(leaf(torch.randn(n_out, n_in, dtype=dtype), requires, layout))
        out.append(leaf(torch.randn(n_out, dtype=dtype), requires) if b else None)
    return out


@pytest.mark.parametrize("lead", [(), (0,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_gradcheck(activation, lead):
    x = leaf(torch.randn(*lead, SIZES[0], dtype=torch.float64))
    layers = [t for t in _layers() if t is not None]

    def f(x, w1, b1, w2, w3, b3):
        return ours(x, w1, b1, w2, None, w3, b3, activation=activation)

    full_check(f, (x, *layers))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_matches_torch(activation, layout, dtype):
    x = leaf(torch.randn(2, 4, SIZES[0], dtype=dtype), layout=layout)
    layers = _layers(dtype, layout=layout)
    check_parity(
        lambda *a: ours(*a, activation=activation),
        lambda *a: torch_mlp(*a, activation=activation),
        [x, *layers],
        grad_layout=layout,
    )


@pytest.mark.parametrize("requires", needs_grad_combinations(4), ids=str)
def test_every_needs_input_grad(requires):
    """Only some inputs need gradients (e.g. frozen layers): the others are still exact."""
    x = leaf(torch.randn(5, SIZES[0], dtype=torch.float64), requires[0])
    w1, b1, w2, _, w3, b3 = _layers()
    w1.requires_grad_(requires[1])
    w2.requires_grad_(requires[2])
    for t in (w3, b3, b1):
        t.requires_grad_(requires[3])
    check_parity(
        lambda *a: ours(*a, activation="tanh"),
        lambda *a: torch_mlp(*a, activation="tanh"),
        [x, w1, b1, w2, None, w3, b3],
    )


@pytest.mark.parametrize("activation, limit", [("gelu", 0.6), ("silu", 0.6), ("relu", 1.0), ("tanh", 1.0)])
def test_saved_activation_bytes(activation, limit):
    """gelu/silu: keep Z only (autograd keeps Z and H); relu/tanh: keep H, as autograd does."""
    sizes = [64, 256, 256, 10]
    torch.manual_seed(0)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [torch.randn(n_out, n_in, requires_grad=True), torch.randn(n_out, requires_grad=True)]
    x = torch.randn(128, 64)

    ours_bytes = saved_bytes(lambda: ours(x, *layers, activation=activation), exclude=layers)
    theirs_bytes = saved_bytes(lambda: torch_mlp(x, *layers, activation=activation), exclude=layers)
    assert ours_bytes <= limit * theirs_bytes, (ours_bytes, theirs_bytes)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_compile_fullgraph(activation):
    torch._dynamo.reset()
    x = torch.randn(5, SIZES[0])
    layers = _layers(torch.float32)
    f = torch.compile(
        lambda x, *layers: ours(x, *layers, activation=activation).square().sum(), backend="aot_eager", fullgraph=True
    )
    out = f(x, *layers)
    grads = torch.autograd.grad(out, [t for t in layers if t is not None])
    ref = torch_mlp(x, *layers, activation=activation).square().sum()
    ref_grads = torch.autograd.grad(ref, [t for t in layers if t is not None])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_hessian_and_vmap():
    x = torch.randn(3, SIZES[0], dtype=torch.float64)
    layers = _layers(requires=False)
    f = lambda x: ours(x, *layers, activation="silu").sum()
    g = lambda x: torch_mlp(x, *layers, activation="silu").sum()
    torch.testing.assert_close(torch.func.hessian(f)(x), torch.func.hessian(g)(x))
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(f))(x.unsqueeze(1)), torch.func.vmap(torch.func.grad(g))(x.unsqueeze(1))
    )


def test_autocast_dtype_matches_linear():
    x = torch.randn(4, SIZES[0])
    layers = _layers(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(x, *layers), torch_mlp(x, *layers)
    assert out.dtype == ref.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), [t for t in layers if t is not None])
    assert all(g.dtype == torch.float32 for g in grads)


def test_bad_shapes():
    w1, w2 = torch.randn(6, 4), torch.randn(5, 7)
    with pytest.raises(RuntimeError, match=r"mlp layer 2: expected a weight of shape \(out_features, 6\)"):
        TF.mlp(torch.randn(2, 4), [w1, w2])
    with pytest.raises(RuntimeError, match=r"mlp layer 1: expected input with 4 features"):
        TF.mlp(torch.randn(2, 5), [w1])
    with pytest.raises(ValueError, match="one bias"):
        TF.mlp(torch.randn(2, 4), [w1], [None, None])

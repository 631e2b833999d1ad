"""torch.func (vmap, grad, jacrev, hessian), torch.compile and autocast through every Function."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, vmap
from torch.testing import assert_close

import torchderiv.functional as TF

D = torch.float64
W = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(1))
B = torch.randn(3, dtype=D, generator=torch.Generator().manual_seed(2))
T_IDX = torch.tensor([0, 2, 1, 1, 0])
T_PROB = torch.rand(5, 3, dtype=D, generator=torch.Generator().manual_seed(3)).softmax(1)
Y = torch.randn(5, 3, dtype=D, generator=torch.Generator().manual_seed(4))


def _act(name, **kw):
    theirs = getattr(torch, name) if name in ("sigmoid", "tanh") else getattr(F, name)
    return getattr(TF, name), theirs, kw


# Each op as a scalar-valued pair (ours, theirs) of a (5, 4) float input: enough for grad and hessian.
def _scalar_ops():
    ops = {}
    for name, kw in [
        ("sigmoid", {}),
        ("tanh", {}),
        ("relu", {}),
        ("leaky_relu", {"negative_slope": 0.1}),
        ("elu", {}),
        ("softplus", {"beta": 2.0}),
        ("gelu", {}),
        ("gelu", {"approximate": "tanh"}),
        ("silu", {}),
    ]:
        ours, theirs, kw = _act(name, **kw)
        key = name + ("-" + "-".join(map(str, kw.values())) if kw else "")
        ops[key] = (
            lambda x, f=ours, kw=kw: f(x, **kw).pow(2).sum(),
            lambda x, f=theirs, kw=kw: f(x, **kw).pow(2).sum(),
        )
    ops["linear"] = (lambda x: TF.linear(x, W, B).pow(2).sum(), lambda x: F.linear(x, W, B).pow(2).sum())
    ops["dense-gelu"] = (
        lambda x: TF.dense(x, W, B, "gelu").pow(2).sum(),
        lambda x: F.gelu(F.linear(x, W, B)).pow(2).sum(),
    )
    ops["cross_entropy"] = (
        lambda x: TF.cross_entropy(TF.linear(x, W, B), T_IDX, label_smoothing=0.1),
        lambda x: F.cross_entropy(F.linear(x, W, B), T_IDX, label_smoothing=0.1),
    )
    ops["cross_entropy-probs"] = (
        lambda x: TF.cross_entropy(TF.linear(x, W, B), T_PROB),
        lambda x: F.cross_entropy(F.linear(x, W, B), T_PROB),
    )
    ops["mse_loss"] = (lambda x: TF.mse_loss(TF.linear(x, W, B), Y), lambda x: F.mse_loss(F.linear(x, W, B), Y))
    ops["huber_loss"] = (
        lambda x: TF.huber_loss(TF.linear(x, W, B), Y, delta=0.5),
        lambda x: F.huber_loss(F.linear(x, W, B), Y, delta=0.5),
    )
    ops["bce"] = (
        lambda x: TF.binary_cross_entropy_with_logits(TF.linear(x, W, B), T_PROB),
        lambda x: F.binary_cross_entropy_with_logits(F.linear(x, W, B), T_PROB),
    )
    g, b = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(5)), B[:1].expand(4).clone()
    ops["layer_norm"] = (
        lambda x: TF.linear(TF.layer_norm(x, (4,), g, b), W).pow(2).sum(),
        lambda x: F.linear(F.layer_norm(x, (4,), g, b), W).pow(2).sum(),
    )
    ops["rms_norm"] = (
        lambda x: TF.linear(TF.rms_norm(x, (4,), g, eps=1e-6), W).pow(2).sum(),
        lambda x: F.linear(F.rms_norm(x, (4,), g, eps=1e-6), W).pow(2).sum(),
    )
    return ops


OPS = _scalar_ops()


def _x():
    x = torch.randn(5, 4, dtype=D)
    return x + 0.1 * x.sign()  # away from kinks


@pytest.mark.parametrize("name", list(OPS))
def test_func_grad_and_hessian(name):
    ours, theirs = OPS[name]
    x = _x()
    assert_close(grad(ours)(x), grad(theirs)(x))
    assert_close(hessian(ours)(x), hessian(theirs)(x))  # forward-over-reverse
    assert_close(jacrev(jacrev(ours))(x), hessian(theirs)(x))  # reverse-over-reverse


@pytest.mark.parametrize("name", list(OPS))
def test_vmap_matches_loop(name):
    ours, _ = OPS[name]
    xs = torch.stack([_x() for _ in range(3)])
    batched = vmap(ours)(xs)
    assert_close(batched, torch.stack([ours(x) for x in xs]))
    assert_close(vmap(grad(ours))(xs), torch.stack([grad(ours)(x) for x in xs]))


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "linear", "dense-gelu", "cross_entropy", "bce"])
def test_jacfwd_equals_jacrev(name):
    ours, _ = OPS[name]
    x = _x()
    assert_close(jacfwd(ours)(x), jacrev(ours)(x))


@pytest.fixture
def fresh_dynamo():
    # The ops share lambda code objects; without a reset they count as recompiles of one function.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(OPS))
def test_compile_aot_eager_fullgraph(name, fresh_dynamo):
    ours, theirs = OPS[name]
    x = _x().requires_grad_()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    x_ref = x.detach().clone().requires_grad_()
    ref = theirs(x_ref)
    (g_ref,) = torch.autograd.grad(ref, x_ref)
    assert_close(out, ref)
    assert_close(g, g_ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPS))
def test_compile_inductor_fullgraph(name, fresh_dynamo):
    ours, theirs = OPS[name]
    x = _x().requires_grad_()
    compiled = torch.compile(ours, fullgraph=True)
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    x_ref = x.detach().clone().requires_grad_()
    ref = theirs(x_ref)
    (g_ref,) = torch.autograd.grad(ref, x_ref)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_forward_ad_still_works_in_eager_after_compile(fresh_dynamo):
    """The jvp-free twin is used only while compiling; eager keeps the hand-written jvp."""
    torch.compile(OPS["gelu"][0], backend="aot_eager", fullgraph=True)(_x())
    x, t = _x(), torch.randn(5, 4, dtype=D)
    _, out_tangent = torch.func.jvp(lambda x: TF.gelu(x), (x,), (t,))
    _, ref_tangent = torch.func.jvp(F.gelu, (x,), (t,))
    assert_close(out_tangent, ref_tangent)


# --- autocast ----------------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _autocast_cases(device):
    x = torch.randn(6, 4, device=device)
    w = torch.randn(3, 4, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    t = torch.randint(0, 3, (6,), device=device)
    y = torch.randn(6, 3, device=device)
    return {
        "linear": (lambda: TF.linear(x, w, b), lambda: F.linear(x, w, b)),
        "linear-nobias": (lambda: TF.linear(x, w), lambda: F.linear(x, w)),
        "dense-relu": (lambda: TF.dense(x, w, b, "relu"), lambda: F.relu(F.linear(x, w, b))),
        "relu-of-linear": (lambda: TF.relu(TF.linear(x, w, b)), lambda: F.relu(F.linear(x, w, b))),
        "softplus-of-linear": (lambda: TF.softplus(TF.linear(x, w, b)), lambda: F.softplus(F.linear(x, w, b))),
        "gelu-of-linear": (lambda: TF.gelu(TF.linear(x, w, b)), lambda: F.gelu(F.linear(x, w, b))),
        "cross_entropy": (
            lambda: TF.cross_entropy(TF.linear(x, w, b), t),
            lambda: F.cross_entropy(F.linear(x, w, b), t),
        ),
        "mlp_cross_entropy": (
            lambda: TF.mlp_cross_entropy(x, [w], [b], t)[0],
            lambda: F.cross_entropy(F.linear(x, w, b), t),
        ),
        "mse_loss": (lambda: TF.mse_loss(TF.linear(x, w, b), y), lambda: F.mse_loss(F.linear(x, w, b), y)),
        "huber_loss": (lambda: TF.huber_loss(TF.linear(x, w, b), y), lambda: F.huber_loss(F.linear(x, w, b), y)),
        "bce": (
            lambda: TF.binary_cross_entropy_with_logits(TF.linear(x, w, b), y.sigmoid()),
            lambda: F.binary_cross_entropy_with_logits(F.linear(x, w, b), y.sigmoid()),
        ),
        # a lower-precision input (the Linear's output) with float32 γ, β: torch's dtype on each device
        "layer_norm-of-linear": (
            lambda: TF.layer_norm(TF.linear(x, w, b), (3,), y[0], y[1]),
            lambda: F.layer_norm(F.linear(x, w, b), (3,), y[0], y[1]),
        ),
        "rms_norm-of-linear": (
            lambda: TF.rms_norm(TF.linear(x, w, b), (3,), y[0]),
            lambda: F.rms_norm(F.linear(x, w, b), (3,), y[0]),
        ),
    }, (w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_autocast_cases("cpu")[0]))
def test_autocast_dtypes_match_torch(name, dtype, device):
    cases, params = _autocast_cases(device)
    ours, theirs = cases[name]
    with torch.autocast(device, dtype=dtype):
        out, ref = ours(), theirs()
    assert out.dtype == ref.dtype
    assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)  # both in the autocast dtype
    grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad(ref.float().sum(), params, allow_unused=True)
    for g, gr, p in zip(grads, grads_ref, params):
        if gr is None:  # the bias of the bias-free case
            assert g is None
            continue
        assert g.dtype == p.dtype == torch.float32  # fp32 parameter gradients
        assert_close(g, gr, atol=5e-2, rtol=5e-2)

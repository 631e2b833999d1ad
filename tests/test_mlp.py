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


# tanh keeps H; gelu and silu keep Z and recompute H, alone or with g' (Activation.factor) as needed.
@pytest.mark.parametrize("activation", ["tanh", "gelu", "silu"])
@pytest.mark.parametrize("requires", needs_grad_combinations(4), ids=str)
def test_every_needs_input_grad(requires, activation):
    """Only some inputs need gradients (e.g. frozen layers): the others are still exact."""
    x = leaf(torch.randn(5, SIZES[0], dtype=torch.float64), requires[0])
    w1, b1, w2, _, w3, b3 = _layers()
    w1.requires_grad_(requires[1])
    w2.requires_grad_(requires[2])
    for t in (w3, b3, b1):
        t.requires_grad_(requires[3])
    check_parity(
        lambda *a: ours(*a, activation=activation),
        lambda *a: torch_mlp(*a, activation=activation),
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
    # a bias that addmm would broadcast (one entry, or one per row) is refused in every layer, the first one too
    for bias, shape in ((torch.randn(1), r"\(1,\)"), (torch.randn(2, 6), r"\(2, 6\)")):
        with pytest.raises(RuntimeError, match=rf"mlp layer 1: expected bias of shape \(6,\), got shape {shape}"):
            TF.mlp(torch.randn(2, 4), [w1], [bias])
        name = "mlp_cross_entropy layer 1"
        with pytest.raises(RuntimeError, match=rf"{name}: expected bias of shape \(6,\), got shape {shape}"):
            TF.mlp_cross_entropy(torch.randn(2, 4), [w1], [bias], torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"mlp layer 2: expected bias of shape \(3,\), got shape \(1,\)"):
        TF.mlp(torch.randn(2, 4), [w1, torch.randn(3, 6)], [None, torch.randn(1)])


# --- the network and its cross-entropy in one Function (mlp_cross_entropy) ---------------------------

N_CLASSES = SIZES[-1]


def _targets(kind, dtype, batched=True):
    """(target, ignore_index): rows ignored or not, ignore_index negative or a class, or probabilities."""
    if kind == "probs":
        shape = (6, N_CLASSES) if batched else (N_CLASSES,)
        return leaf(torch.randn(shape, dtype=dtype).softmax(-1)), -100
    if not batched:
        return torch.tensor(2), -100
    rows = {
        "all": ([0, 2, 2, 1, 1, 0], -100),  # nothing ignored: the short path on CPU
        "ignored": ([0, 2, -100, 1, -100, 0], -100),
        "ignore-class": ([0, 2, 1, 1, 2, 0], 1),  # ignore_index is a class that occurs
        "ignore-absent": ([0, 2, 0, 2, 2, 0], 1),
    }[kind]
    return torch.tensor(rows[0]), rows[1]


def _fused_and_composed(activation, weight, reduction, label_smoothing, ignore_index):
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)

    def fused(x, target, *layers):
        loss, logits = TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target, activation, **kw)
        return torch.cat([loss.reshape(-1), logits.reshape(-1)])  # a gradient reaches both outputs

    def composed(x, target, *layers):
        logits = torch_mlp(x, *layers, activation=activation)
        return torch.cat([F.cross_entropy(logits, target, **kw).reshape(-1), logits.reshape(-1)])

    return fused, composed


FUSED_CASES = [
    (kind, reduction, ls, weighted)
    for kind in ("all", "ignored", "ignore-class", "ignore-absent", "probs")
    for reduction in ("mean", "sum", "none")
    for ls in (0.0, 0.2)
    for weighted in (False, True)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind, reduction, ls, weighted", FUSED_CASES, ids=lambda v: str(v))
def test_mlp_cross_entropy_matches_torch(kind, reduction, ls, weighted, dtype):
    target, ignore_index = _targets(kind, dtype)
    weight = torch.rand(N_CLASSES, dtype=dtype) + 0.1 if weighted else None
    fused, composed = _fused_and_composed("tanh", weight, reduction, ls, ignore_index)
    x = leaf(torch.randn(6, SIZES[0], dtype=dtype))
    check_parity(fused, composed, [x, target, *_layers(dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("kind, reduction, ls, weighted", FUSED_CASES, ids=lambda v: str(v))
def test_mlp_cross_entropy_loss_alone_matches_torch(kind, reduction, ls, weighted, activation, dtype, plain_passes):
    """As above, with the gradient reaching the loss alone, as in a training step: the plain backward pass then
    applies where it can (class indices, no class weights or smoothing, "mean" or "sum"), completing where no row is
    ignored, and every other case is left to the general loop. Above, a gradient reaching the logits too keeps every
    case on the general loop."""
    target, ignore_index = _targets(kind, dtype)
    weight = torch.rand(N_CLASSES, dtype=dtype) + 0.1 if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=ls, ignore_index=ignore_index)

    def fused(x, target, *layers):
        return TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target, activation, **kw)[0]

    def composed(x, target, *layers):
        return F.cross_entropy(torch_mlp(x, *layers, activation=activation), target, **kw)

    x = leaf(torch.randn(6, SIZES[0], dtype=dtype))
    check_parity(fused, composed, [x, target, *_layers(dtype)])
    options = reduction == "none" or ls != 0 or weighted or kind == "probs"
    assert plain_passes == ([] if options else [kind in ("all", "ignore-absent")])


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "softplus"])
@pytest.mark.parametrize("kind", ["all", "ignored", "probs"])
def test_mlp_cross_entropy_activations(activation, kind):
    target, ignore_index = _targets(kind, torch.float64)
    fused, composed = _fused_and_composed(activation, None, "mean", 0.0, ignore_index)
    x = leaf(torch.randn(6, SIZES[0], dtype=torch.float64))
    check_parity(fused, composed, [x, target, *_layers()])


@pytest.mark.parametrize("kind", ["all", "ignored", "probs"])
def test_mlp_cross_entropy_unbatched_and_empty(kind):
    target, ignore_index = _targets("probs" if kind == "probs" else "all", torch.float64, batched=False)
    fused, composed = _fused_and_composed("silu", None, "mean", 0.1, ignore_index)
    check_parity(fused, composed, [leaf(torch.randn(SIZES[0], dtype=torch.float64)), target, *_layers()])
    empty_t = torch.empty(0, N_CLASSES, dtype=torch.float64) if kind == "probs" else torch.empty(0, dtype=torch.long)
    for reduction in ("sum", "none"):  # ("mean" over no rows is NaN in both, checked with CE's own tests)
        fused, composed = _fused_and_composed("silu", None, reduction, 0.0, -100)
        check_parity(fused, composed, [leaf(torch.empty(0, SIZES[0], dtype=torch.float64)), empty_t, *_layers()])


@pytest.mark.parametrize(
    "kind, reduction, ls, weighted",
    [
        ("ignored", "mean", 0.2, True),
        ("all", "mean", 0.0, False),
        ("probs", "sum", 0.2, True),
        ("all", "none", 0.0, True),
    ],
    ids=str,
)
def test_mlp_cross_entropy_gradcheck(kind, reduction, ls, weighted):
    """Backward, double backward, forward AD and their vmapped forms, in float64."""
    target, ignore_index = _targets(kind, torch.float64)
    weight = torch.rand(N_CLASSES, dtype=torch.float64) + 0.1 if weighted else None
    fused, _ = _fused_and_composed("gelu", weight, reduction, ls, ignore_index)
    x = leaf(torch.randn(6, SIZES[0], dtype=torch.float64))
    layers = [t for t in _layers() if t is not None]

    if target.is_floating_point():  # probabilities are differentiable too
        full_check(lambda x, t, w1, b1, w2, w3, b3: fused(x, t, w1, b1, w2, None, w3, b3), (x, target, *layers))
    else:
        full_check(lambda x, w1, b1, w2, w3, b3: fused(x, target, w1, b1, w2, None, w3, b3), (x, *layers))


def test_mlp_cross_entropy_frozen_layers_and_target():
    """Only some inputs need gradients; class-index targets get none."""
    target, ignore_index = _targets("ignored", torch.float64)
    fused, composed = _fused_and_composed("relu", None, "mean", 0.0, ignore_index)
    x = leaf(torch.randn(6, SIZES[0], dtype=torch.float64), requires_grad=False)
    w1, b1, w2, _, w3, b3 = _layers()
    w2.requires_grad_(False)
    w3.requires_grad_(False)
    check_parity(fused, composed, [x, target, w1, b1, w2, None, w3, b3])


def test_mlp_cross_entropy_transforms():
    """torch.func (hessian, vmap of grad) and a compiled step agree with the composed ops."""
    target, _ = _targets("ignored", torch.float64)
    layers = _layers(requires=False)
    w, b = list(layers[::2]), list(layers[1::2])
    f = lambda x: TF.mlp_cross_entropy(x, w, b, target, "silu")[0]
    g = lambda x: F.cross_entropy(torch_mlp(x, *layers, activation="silu"), target)
    x = torch.randn(6, SIZES[0], dtype=torch.float64)
    torch.testing.assert_close(torch.func.hessian(f)(x), torch.func.hessian(g)(x))
    per_row = lambda fn: torch.func.vmap(torch.func.grad(lambda xr, tr: fn(xr, tr)))(x, target.clamp_min(0))
    torch.testing.assert_close(
        per_row(lambda xr, tr: TF.mlp_cross_entropy(xr, w, b, tr, "silu")[0]),
        per_row(lambda xr, tr: F.cross_entropy(torch_mlp(xr, *layers, activation="silu"), tr)),
    )

    torch._dynamo.reset()
    layers32 = _layers(torch.float32)
    params = [t for t in layers32 if t is not None]
    x32 = torch.randn(6, SIZES[0])
    step = torch.compile(
        lambda x, *ls: TF.mlp_cross_entropy(x, list(ls[::2]), list(ls[1::2]), target, "gelu", label_smoothing=0.1)[0],
        backend="aot_eager",
        fullgraph=True,
    )
    out = step(x32, *layers32)
    ref = F.cross_entropy(torch_mlp(x32, *layers32, activation="gelu"), target, label_smoothing=0.1)
    torch.testing.assert_close(out, ref)
    for a, r in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_mlp_cross_entropy_autocast_dtypes_match_torch(plain_passes):
    """Under autocast the logits come in the autocast dtype (as F.linear), the loss in float32 (as F.cross_entropy).
    The loss's gradient is then made in float32 and cast, as torch's is: not by the plain pass, which would make it
    from the bfloat16 logits."""
    x = torch.randn(6, SIZES[0])
    layers = _layers(torch.float32)
    params = [t for t in layers if t is not None]
    probs = torch.randn(6, N_CLASSES).softmax(1)
    for target in (torch.tensor([0, 2, 2, 1, 1, 0]), torch.tensor([0, 2, -100, 1, 1, 0]), probs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logits = TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target, "relu")
            ref_logits = torch_mlp(x, *layers)
            ref = F.cross_entropy(ref_logits, target)
        assert (loss.dtype, logits.dtype) == (ref.dtype, ref_logits.dtype) == (torch.float32, torch.bfloat16)
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(loss, ref)
        grads, ref_grads = torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)
        for a, r in zip(grads, ref_grads):
            assert a.dtype == r.dtype == torch.float32
            torch.testing.assert_close(a, r, atol=1e-2, rtol=1e-2)  # bf16 GEMMs: ~3 significant digits
    assert plain_passes == []


def test_mlp_cross_entropy_bad_input():
    w = [torch.randn(6, 4), torch.randn(3, 6)]
    with pytest.raises(RuntimeError, match=r"mlp_cross_entropy: expected input of shape \(n_0,\) or \(N, n_0\)"):
        TF.mlp_cross_entropy(torch.randn(2, 5, 4), w, None, torch.zeros(2, 5, dtype=torch.long))
    # torch's exception types: ValueError for a batch-size mismatch, RuntimeError for label_smoothing
    with pytest.raises(ValueError, match=r"Expected input batch_size \(2\) to match target batch_size \(3\)"):
        TF.mlp_cross_entropy(torch.randn(2, 4), w, None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"mlp_cross_entropy: expected class-index target of shape \(2,\)"):
        TF.mlp_cross_entropy(torch.randn(2, 4), w, None, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"mlp_cross_entropy layer 2: expected a weight of shape \(out_features, 6"):
        TF.mlp_cross_entropy(torch.randn(2, 4), [w[0], torch.randn(3, 5)], None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0.0 and 1.0, got -0.5"):
        TF.mlp_cross_entropy(torch.randn(2, 4), w, None, torch.zeros(2, dtype=torch.long), label_smoothing=-0.5)
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        TF.mlp_cross_entropy(torch.randn(2, 4), w, None, torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(IndexError):  # a class out of range: torch's own nll_loss error
        TF.mlp_cross_entropy(torch.randn(2, 4), w, None, torch.tensor([0, 3]))


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu"])
@pytest.mark.parametrize("fused", [False, True], ids=["mlp", "mlp_cross_entropy"])
def test_backward_twice_with_retain_graph(activation, fused):
    """A plain backward works in place on buffers it owns: saved tensors must come out untouched."""
    x = torch.randn(6, SIZES[0])
    layers = _layers(torch.float32)
    params = [t for t in layers if t is not None]
    target = torch.tensor([0, 2, 2, 1, -100, 0])
    if fused:
        loss = TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target, activation)[0]
        ref = F.cross_entropy(torch_mlp(x, *layers, activation=activation), target)
    else:
        loss = ours(x, *layers, activation=activation).square().sum()
        ref = torch_mlp(x, *layers, activation=activation).square().sum()
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b, r in zip(first, second, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r)


# --- a plain training step: the backward that is the bare chain rule (functional/mlp.py, _plain_backward) ----------


@pytest.fixture
def plain_passes(monkeypatch):
    """Records, for each backward of MLPFunction that tried the plain pass, whether it completed (False: it handed
    the pass to the general loop) — so that a test knows which of the two gave the gradients it checks."""
    import importlib

    mlp_module = importlib.import_module("torchderiv.functional.mlp")
    plain, passes = mlp_module._plain_backward, []

    def recorded(ctx, grad_outputs):
        out = plain(ctx, grad_outputs)
        passes.append(out is not None)
        return out

    monkeypatch.setattr(mlp_module, "_plain_backward", recorded)
    return passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu", "elu"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["all", "ignored", "ignore-class", "ignore-absent"])
def test_a_training_step_matches_torch(kind, reduction, activation, dtype, plain_passes):
    """Only the loss differentiated, class indices, no options: the plain pass, unless a row is ignored (a class
    given as ignore_index, or a negative one that the scatter refuses), when the general loop takes over."""
    target, ignore_index = _targets(kind, dtype)

    def fused(x, target, *layers):
        return TF.mlp_cross_entropy(
            x, list(layers[::2]), list(layers[1::2]), target, activation, ignore_index=ignore_index, reduction=reduction
        )[0]

    def composed(x, target, *layers):
        logits = torch_mlp(x, *layers, activation=activation)
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    for x_needs in (True, False):
        x = leaf(torch.randn(6, SIZES[0], dtype=dtype), requires_grad=x_needs)
        check_parity(fused, composed, [x, target, *_layers(dtype)])
    assert plain_passes == [kind not in ("ignored", "ignore-class")] * 2


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("bias", [(True, False, True), (False, False, False)], ids=["some biases", "no biases"])
def test_the_network_alone_takes_the_plain_pass(activation, bias, plain_passes):
    """Without the loss (nn.MLP, then torch's or torchderiv's loss), the incoming gradient is Δ⁽ᴸ⁺¹⁾ itself."""
    x = leaf(torch.randn(6, SIZES[0], dtype=torch.float64))
    check_parity(
        lambda *a: ours(*a, activation=activation),
        lambda *a: torch_mlp(*a, activation=activation),
        [x, *_layers(bias=bias)],
    )
    assert plain_passes == [True]


@pytest.mark.parametrize("fused", [False, True], ids=["mlp", "mlp_cross_entropy"])
def test_an_infinite_gradient_at_units_that_are_off_gives_torch_s_zero(fused, plain_passes):
    """Δ⁽³⁾ W⁽³⁾ overflows to inf only at hidden units that are off for every row (a large negative bias): torch's
    relu backward gives 0 there and every gradient stays finite. The plain pass's float mask would give
    inf · 0 = NaN; its one check at the end sees it and the general loop gives torch's select."""
    torch.manual_seed(0)
    x = torch.randn(6, SIZES[0])
    layers = [t.detach() for t in _layers(torch.float32, bias=(True, True, True))]
    layers[3] = torch.full((SIZES[2],), -1e3)  # b⁽²⁾: every unit of the second layer off...
    layers[3][0] = 1e3  # ...but the first
    layers[4][:, 1:] = 3e37  # W⁽³⁾'s columns of the units that are off: Δ W overflows there
    layers = [leaf(t) for t in layers]
    target = torch.tensor([0, 2, 2, 1, 1, 0])
    scale = 1e6

    def fused_loss(x, *layers):
        if fused:
            loss = TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target)[0]
        else:
            loss = TF.cross_entropy(ours(x, *layers), target)
        return loss * scale

    def torch_loss(x, *layers):
        return F.cross_entropy(torch_mlp(x, *layers), target) * scale

    ours_grads = torch.autograd.grad(fused_loss(x, *layers), layers)
    torch_grads = torch.autograd.grad(torch_loss(x, *layers), layers)
    assert all(g.isfinite().all() for g in torch_grads)
    for a, b in zip(ours_grads, torch_grads):
        torch.testing.assert_close(a, b)
    assert plain_passes == [False]


@pytest.mark.parametrize("fused", [False, True], ids=["mlp", "mlp_cross_entropy"])
def test_a_nan_hidden_unit_gives_torch_s_gradients(fused, plain_passes):
    """A NaN in one input row makes every hidden unit of that row NaN. torch's relu backward passes the incoming
    gradient at a NaN unit (its select asks ``h <= 0``). Without the loss, the incoming gradient of that row is
    finite and so are the bias gradients: the plain pass's float mask must be 1 at NaN, and the pass completes. With
    the loss, that row's logits, softmax and every Δ are NaN: its check at the end hands the pass to the general
    loop."""
    torch.manual_seed(0)
    x = torch.randn(6, SIZES[0], dtype=torch.float64)
    x[0, 1] = float("nan")
    layers = [leaf(t.detach()) for t in _layers(bias=(True, True, True))]
    target = torch.tensor([0, 2, 2, 1, 1, 0])
    if fused:
        ours_out = TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target)[0]
        torch_out = F.cross_entropy(torch_mlp(x, *layers), target)
        grad = None
    else:
        ours_out, torch_out = ours(x, *layers), torch_mlp(x, *layers)
        grad = torch.randn_like(torch_out)
    ours_grads = torch.autograd.grad(ours_out, layers, grad)
    torch_grads = torch.autograd.grad(torch_out, layers, grad)
    if not fused:  # what a mask of 0 at the NaN units would change: the hidden layers' bias gradients
        assert torch_grads[1].isfinite().all() and torch_grads[3].isfinite().all()
    for a, b in zip(ours_grads, torch_grads):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert plain_passes == [not fused]


def test_a_plain_pass_leaves_what_it_saved_untouched():
    """The plain pass works in place on buffers it owns; a second backward (retain_graph) gives the same."""
    x = torch.randn(6, SIZES[0])
    layers = _layers(torch.float32)
    params = [t for t in layers if t is not None]
    target = torch.tensor([0, 2, 2, 1, 1, 0])
    loss = TF.mlp_cross_entropy(x, list(layers[::2]), list(layers[1::2]), target)[0]
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    ref = torch.autograd.grad(F.cross_entropy(torch_mlp(x, *layers), target), params)
    for a, b, r in zip(first, second, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r)

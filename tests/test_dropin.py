"""Drop-in behaviour around the arithmetic: devices autocast does not know, torch's argument forms."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_parity

import torchderiv.functional as TF
import torchderiv.nn as tdnn


def test_meta_device_like_torch():
    # shape inference and meta-device initialisation, as nn.Linear: no "unknown device type for autocast"
    x = torch.empty(2, 5, 4, device="meta")
    for ours, theirs in [
        (tdnn.Linear(4, 3, device="meta"), torch.nn.Linear(4, 3, device="meta")),
        (tdnn.Dense(4, 3, "gelu", device="meta"), torch.nn.Linear(4, 3, device="meta")),
        (tdnn.MLP([4, 6, 3], device="meta"), torch.nn.Linear(4, 3, device="meta")),
    ]:
        out = ours(x)
        assert out.device.type == "meta" and out.shape == theirs(x).shape
    mlp = tdnn.MLP([4, 6, 3], device="meta")
    loss, logits = mlp.cross_entropy(torch.empty(2, 4, device="meta"), torch.empty(2, dtype=torch.long, device="meta"))
    assert loss.device.type == logits.device.type == "meta" and logits.shape == (2, 3)
    for fn in (TF.relu, TF.gelu, TF.sigmoid, TF.softplus):
        assert fn(x).device.type == "meta"
    z, y = torch.empty(5, 3, device="meta"), torch.empty(5, dtype=torch.long, device="meta")
    assert TF.cross_entropy(z, y).device.type == "meta"
    assert TF.mse_loss(z, z).device.type == "meta"
    w = torch.empty(3, 4, device="meta")
    assert TF.linear_cross_entropy(torch.empty(5, 4, device="meta"), w, y).device.type == "meta"
    # to_empty: materialise a meta-initialised model, then it computes
    real = mlp.to_empty(device="cpu")
    assert real(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_takes_a_1d_weight_like_torch(lead, bias):
    x = torch.randn(*lead, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True) if bias else None
    if bias and len(lead) == 1:
        # torch's own F.linear fails here (addmm wants a matrix); ours gives the value of x·w + b
        out = TF.linear(x, w, b)
        torch.testing.assert_close(out, x @ w + b)
        return
    check_parity(TF.linear, F.linear, [x, w, b])


def test_linear_1d_weight_rejects_a_1d_bias():
    with pytest.raises(
        RuntimeError, match=r"with a 1-D weight of shape \(4,\) expected a 0-D bias or None, got \(1,\)"
    ):
        TF.linear(torch.randn(2, 4), torch.randn(4), torch.randn(1))


def test_linear_cross_entropy_takes_torchs_options():
    x, w = torch.randn(10, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    y = torch.randint(0, 7, (10,))
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    # the same call as F.linear_cross_entropy's, unchanged
    check_parity(
        lambda x, w: TF.linear_cross_entropy(x, w, y, options=options),
        lambda x, w: F.linear_cross_entropy(x, w, y, options=options),
        [x, w],
    )


# --- MLP behaves like the nn.Sequential of its children -------------------------------------------------


def _mlp_and_sequential(activation="tanh"):
    torch.manual_seed(3)
    mlp = tdnn.MLP([4, 6, 5, 3], activation, dtype=torch.float64)
    act = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[activation]
    seq = torch.nn.Sequential(mlp.layers[0], act(), mlp.layers[1], act(), mlp.layers[2])  # the same children
    return mlp, seq


def _same_values_and_grads(mlp, seq, via_ce=False):
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    if via_ce:
        loss, out = mlp.cross_entropy(x, y)
    else:
        out = mlp(x)
        loss = F.cross_entropy(out, y)
    params = [p for p in mlp.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss, params)
    ref_out = seq(x)
    theirs = torch.autograd.grad(F.cross_entropy(ref_out, y), params)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("via_ce", [False, True], ids=["forward", "cross_entropy"])
def test_mlp_child_hooks_fire(via_ce):
    mlp, seq = _mlp_and_sequential()
    calls = []
    layer = mlp.layers[1]
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: calls.append("pre")),
        layer.register_forward_hook(lambda m, a, o: calls.append("forward")),
        layer.register_full_backward_hook(lambda m, gi, go: calls.append("backward")),
    ]
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = mlp.cross_entropy(x, torch.tensor([0, 2]))[0] if via_ce else mlp(x).sum()
    out.backward()
    assert calls == ["pre", "forward", "backward"]
    # the hook may change the output, as in nn.Sequential
    calls.clear()
    hooks.append(layer.register_forward_hook(lambda m, a, o: o * 2))
    _same_values_and_grads(mlp, seq, via_ce)
    for h in hooks:
        h.remove()
    _same_values_and_grads(mlp, seq, via_ce)  # and back on the one-Function path


def test_mlp_global_hooks_fire():
    mlp, _ = _mlp_and_sequential()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        mlp(torch.randn(2, 4, dtype=torch.float64))
    finally:
        handle.remove()
    assert seen.count("Linear") == 3


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune", "replaced"])
@pytest.mark.parametrize("via_ce", [False, True], ids=["forward", "cross_entropy"])
def test_mlp_parametrized_pruned_or_replaced_child(kind, via_ce):
    from torch.nn.utils import parametrizations, prune

    mlp, seq = _mlp_and_sequential("relu")
    if kind == "weight_norm":
        parametrizations.weight_norm(mlp.layers[1])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(mlp.layers[1])
        mlp.eval()  # no power iteration between the two runs
    elif kind == "prune":
        prune.l1_unstructured(mlp.layers[0], "weight", amount=0.5)
    else:  # a LoRA-style wrapper in place of a child

        class Scaled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

            def forward(self, x):
                return self.inner(x) * self.scale

        mlp.layers[2] = Scaled(mlp.layers[2])
    seq = torch.nn.Sequential(mlp.layers[0], seq[1], mlp.layers[1], seq[3], mlp.layers[2])
    _same_values_and_grads(mlp, seq, via_ce)


# --- in place means one buffer, as in torch ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.ReLU(inplace=True),
        lambda: torch.nn.LeakyReLU(0.1, inplace=True),
        lambda: torch.nn.ELU(inplace=True),
    ],
    ids=["relu", "leaky_relu", "elu"],
)
def test_inplace_activation_saves_no_more_than_torch(make):
    import copy

    from torchderiv import convert
    from torchderiv.testing import saved_bytes

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(256, 1024), make(), torch.nn.Linear(1024, 8))
    ours = convert(copy.deepcopy(theirs))
    assert type(ours[1]).__module__.startswith("torchderiv")
    x = torch.randn(512, 256)
    params = list(ours.parameters()) + list(theirs.parameters())
    ours_bytes = saved_bytes(lambda: ours(x).sum(), params)
    theirs_bytes = saved_bytes(lambda: theirs(x).sum(), params)
    assert ours_bytes <= theirs_bytes, (ours_bytes, theirs_bytes)
    check_parity(lambda x: ours(x), lambda x: theirs(x), [x.requires_grad_()])


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu"])
def test_inplace_functional_returns_the_input_with_torchs_gradients(name):
    ours = getattr(TF, name)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = x.clone()
    assert ours(y, inplace=True) is y
    torch.testing.assert_close(y, getattr(F, name)(x))
    f = lambda x: ours(x.clone(), inplace=True)
    # NOTE: forward AD under vmap (check_batched_forward_grad) is not claimed for the in-place Functions:
    # functorch does not see their tangent updated in place.
    assert torch.autograd.gradcheck(f, (x.requires_grad_(),), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x,), check_batched_grad=True, check_fwd_over_rev=True)
    check_parity(lambda x: ours(x * 1, inplace=True), lambda x: getattr(F, name)(x * 1, inplace=True), [x])


# --- NaN like torch ---------------------------------------------------------------------------------------


def _grads(f, x, g):
    x = x.detach().clone().requires_grad_()
    f(x).backward(g)
    return x.grad


@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
def test_relu_gives_zero_for_inf_nan_gradients_where_h_is_zero(create_graph):
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan"), -3.0])
    g = torch.tensor([float("inf"), float("nan"), 1.0, 3.0, -float("inf")])
    for ours in (TF.relu, tdnn.ReLU(), lambda x: TF.relu(x * 1, inplace=True)):
        a = x.detach().clone().requires_grad_()
        (ga,) = torch.autograd.grad(ours(a), a, g, create_graph=create_graph)
        torch.testing.assert_close(ga, _grads(F.relu, x, g), equal_nan=True)


@pytest.mark.parametrize(
    "kw", [{}, {"weight": torch.tensor([1.0, 2.0, 3.0]), "label_smoothing": 0.1}], ids=["plain", "weighted"]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ignored_rows_like_torch(reduction, kw):
    y = torch.tensor([0, -100, 2, -100])
    # an ignored row with inf logits (torch: NaN, from log_softmax's backward) and one with an inf/NaN
    # incoming gradient (torch: 0, nll_loss's backward selects)
    x = torch.tensor([[1.0, 2.0, 3.0], [float("inf"), 0.0, 1.0], [0.5, 0.3, 1.0], [0.1, 0.2, 0.3]])
    g = torch.tensor([1.0, 1.0, 2.0, float("nan")]) if reduction == "none" else torch.tensor(1.0)
    ours = _grads(lambda z: TF.cross_entropy(z, y, reduction=reduction, **kw), x, g)
    theirs = _grads(lambda z: F.cross_entropy(z, y, reduction=reduction, **kw), x, g)
    torch.testing.assert_close(ours, theirs, equal_nan=True)

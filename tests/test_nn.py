"""Drop-in modules, MLP and convert(): same parameters, state_dict and numbers as torch.nn."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.nn as tnn


def graph_functions(t: torch.Tensor) -> set[str]:
    """Names of every autograd node reachable from ``t.grad_fn``."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _same_outputs_and_grads(ours: nn.Module, theirs: nn.Module, *inputs, seed=0):
    torch.manual_seed(seed)
    out_a = ours(*inputs)
    torch.manual_seed(seed)
    out_b = theirs(*inputs)
    assert_close(out_a, out_b)
    g = torch.randn_like(out_b)
    ga = torch.autograd.grad(out_a, list(ours.parameters()), g)
    gb = torch.autograd.grad(out_b, list(theirs.parameters()), g)
    for a, b in zip(ga, gb):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    return out_a


def test_linear_is_a_torch_linear():
    torch.manual_seed(0)
    ours = tnn.Linear(5, 3)
    torch.manual_seed(0)
    theirs = nn.Linear(5, 3)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k in theirs.state_dict():
        assert_close(ours.state_dict()[k], theirs.state_dict()[k], rtol=0, atol=0)  # same init
    assert repr(ours) == "torchderiv." + repr(theirs)  # the same extra_repr; the name says whose it is
    out = _same_outputs_and_grads(ours, theirs, torch.randn(2, 4, 5))
    assert "LinearFunctionBackward" in graph_functions(out)
    no_bias = tnn.Linear(5, 3, bias=False)
    assert no_bias.bias is None and no_bias(torch.randn(4, 5)).shape == (4, 3)


def test_dense_matches_linear_then_activation():
    torch.manual_seed(0)
    ours = tnn.Dense(5, 3, activation="silu")
    theirs = nn.Sequential(nn.Linear(5, 3), nn.SiLU())
    theirs[0].load_state_dict(ours.state_dict())
    out = _same_outputs_and_grads(ours, theirs, torch.randn(7, 5))
    assert "DenseFunctionBackward" in graph_functions(out)
    assert "activation='silu'" in repr(ours)
    with pytest.raises(ValueError, match="unknown activation"):
        tnn.Dense(5, 3, activation="swish")


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "sigmoid"])
def test_mlp_matches_sequential(activation):
    sizes = [6, 8, 7, 3]
    torch.manual_seed(0)
    ours = tnn.MLP(sizes, activation=activation)
    assert list(ours.state_dict()) == [f"layers.{k}.{p}" for k in range(3) for p in ("weight", "bias")]
    assert all(type(m) is tnn.Linear for m in ours.layers)
    assert len(list(ours.parameters())) == 6
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}[activation]
    theirs = nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 7), act(), nn.Linear(7, 3))
    for k, idx in enumerate([0, 2, 4]):
        theirs[idx].load_state_dict(ours.layers[k].state_dict())
    out = _same_outputs_and_grads(ours, theirs, torch.randn(10, 6))
    assert graph_functions(out) == {"MLPFunctionBackward", "AccumulateGrad"}  # one Function, whole network


def test_mlp_cross_entropy_is_one_node_with_torch_numbers():
    """MLP.cross_entropy: the loss of F.cross_entropy(MLP(x)) and its logits, from a single Function."""
    torch.manual_seed(0)
    ours = tnn.MLP([6, 8, 7, 3], activation="relu")
    x, y = torch.randn(10, 6), torch.tensor([0, 1, 2, -100, 1, 0, 2, 2, 1, 0])
    loss, logits = ours.cross_entropy(x, y, label_smoothing=0.1)
    assert graph_functions(loss) == {"MLPFunctionBackward", "AccumulateGrad"}
    ref_logits = ours(x)
    ref = torch.nn.functional.cross_entropy(ref_logits, y, label_smoothing=0.1)
    assert_close(logits, ref_logits)
    assert_close(loss, ref)
    params = list(ours.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert_close(a, b)


def test_mlp_bad_sizes():
    with pytest.raises(ValueError, match=r"at least two positive widths, got \[4\]"):
        tnn.MLP([4])
    with pytest.raises(ValueError, match="unknown activation"):
        tnn.MLP([4, 2], activation="nope")


ACTIVATION_MODULES = [
    (tnn.ReLU, nn.ReLU, {}),
    (tnn.Sigmoid, nn.Sigmoid, {}),
    (tnn.Tanh, nn.Tanh, {}),
    (tnn.LeakyReLU, nn.LeakyReLU, {"negative_slope": 0.2}),
    (tnn.ELU, nn.ELU, {"alpha": 0.7}),
    (tnn.Softplus, nn.Softplus, {"beta": 2.0, "threshold": 5.0}),
    (tnn.GELU, nn.GELU, {"approximate": "tanh"}),
    (tnn.SiLU, nn.SiLU, {}),
]


@pytest.mark.parametrize(
    "ours_cls, theirs_cls, kw", ACTIVATION_MODULES, ids=[c[1].__name__ for c in ACTIVATION_MODULES]
)
def test_activation_modules(ours_cls, theirs_cls, kw):
    ours, theirs = ours_cls(**kw), theirs_cls(**kw)
    assert isinstance(ours, theirs_cls) and repr(ours) == "torchderiv." + repr(theirs)
    x = torch.randn(4, 5, requires_grad=True)
    assert_close(ours(x), theirs(x))
    (ga,) = torch.autograd.grad(ours(x).sum(), x)
    (gb,) = torch.autograd.grad(theirs(x).sum(), x)
    assert_close(ga, gb)


def test_loss_modules():
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(6, 4)
    t = torch.randint(0, 4, (6,))
    w = torch.rand(4)
    pairs = [
        (tnn.MSELoss(reduction="sum"), nn.MSELoss(reduction="sum"), y),
        (tnn.HuberLoss(delta=0.5), nn.HuberLoss(delta=0.5), y),
        (tnn.BCEWithLogitsLoss(pos_weight=w), nn.BCEWithLogitsLoss(pos_weight=w), y.sigmoid()),
        (
            tnn.CrossEntropyLoss(weight=w, label_smoothing=0.1, ignore_index=2),
            nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, ignore_index=2),
            t,
        ),
    ]
    for ours, theirs, target in pairs:
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert_close(ours(x, target), theirs(x, target))
        (ga,) = torch.autograd.grad(ours(x, target), x)
        (gb,) = torch.autograd.grad(theirs(x, target), x)
        assert_close(ga, gb)


def test_convert_sequential_shares_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2), nn.Tanh())
    reference = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert torchderiv.convert(model) is model
    assert [id(p) for p in model.parameters()] == params_before
    assert [type(m) for m in model] == [tnn.Linear, tnn.ReLU, tnn.Linear, tnn.GELU, tnn.Linear, tnn.Tanh]
    x = torch.randn(5, 6)
    out = _same_outputs_and_grads(model, reference, x)
    names = graph_functions(out)
    assert {"LinearFunctionBackward", "ReluFunctionBackward", "GeluFunctionBackward", "TanhFunctionBackward"} <= names
    assert not any(n.startswith(("AddmmBackward", "ReluBackward", "GeluBackward")) for n in names)
    model(x).sum().backward()  # the optimizer created before convert still steps the same tensors
    optimizer.step()


def test_convert_transformer_encoder_layer_in_train_mode():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
    reference = copy.deepcopy(layer)
    layer.train(), reference.train()
    torchderiv.convert(layer)
    assert type(layer.linear1) is tnn.Linear and type(layer.linear2) is tnn.Linear
    # attention's twin computes out_proj's parameters itself: the module keeps its class and state_dict key
    assert type(layer.self_attn) is tnn.MultiheadAttention
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert layer.activation is torchderiv.functional.relu
    x = torch.randn(3, 4, 8)
    out = _same_outputs_and_grads(layer, reference, x, seed=5)
    names = graph_functions(out)
    assert "LinearFunctionBackward" in names and "ReluFunctionBackward" in names


def test_convert_filter_fn():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torchderiv.convert(model, filter_fn=lambda module, name: name != "2")
    assert type(model[0]) is tnn.Linear and type(model[1]) is tnn.ReLU and type(model[2]) is nn.Linear


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="expected an nn.Module, got function"):
        torchderiv.convert(lambda x: x)


def test_convert_reports_what_it_changed_and_what_it_left(caplog):
    import logging

    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.LayerNorm(8),
        nn.LazyLinear(3),
        nn.TransformerEncoderLayer(8, 2),
        nn.InstanceNorm1d(8, affine=True),
        nn.MultiheadAttention(8, 2, add_bias_kv=True),
    )
    with caplog.at_level(logging.INFO, logger="torchderiv"):
        assert torchderiv.convert(model) is model
    report = model.torchderiv_conversion
    assert ("0", "nn.Linear -> torchderiv.Linear") in report.converted
    assert ("4.linear1", "nn.Linear -> torchderiv.Linear") in report.converted
    assert any(name == "4.activation" for name, _ in report.converted)
    left = {name: (kind, why) for name, kind, why in report.left}
    assert left["3"][0] == "LazyLinear" and "not yet initialised" in left["3"][1]
    assert ("4.self_attn", "nn.MultiheadAttention -> torchderiv.MultiheadAttention") in report.converted
    assert "4.self_attn.out_proj" not in left  # run by its converted parent
    assert left["6"] == ("MultiheadAttention", "add_bias_kv: not supported by torchderiv's attention")
    assert "subclass of nn.Linear" in left["6.out_proj"][1]
    assert ("2", "nn.LayerNorm -> torchderiv.LayerNorm") in report.converted
    assert ("4.norm1", "nn.LayerNorm -> torchderiv.LayerNorm") in report.converted
    assert left["5"] == ("InstanceNorm1d", "no torchderiv twin for this layer")
    text = str(report)
    assert text.startswith("torchderiv.convert: 9 converted, 4 left on torch") and text in caplog.text
    # print(model) says which layers are torchderiv's
    shown = repr(model)
    assert "(0): torchderiv.Linear(in_features=4, out_features=8, bias=True)" in shown
    assert "(1): torchderiv.ReLU()" in shown and "(2): torchderiv.LayerNorm(" in shown
    assert "(5): InstanceNorm1d(" in shown


def test_convert_report_names_what_filter_fn_excluded():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torchderiv.convert(model, filter_fn=lambda module, name: name != "1")
    assert model.torchderiv_conversion.left == [("1", "Linear", "excluded by filter_fn")]

"""torchderiv.per_sample: each example's gradient norm, clipped gradient and grad_sample, against ground truth.

Ground truth (independent of torchderiv's backward): the same network built from torch's own modules,
and for each example i one autograd backward of the batch loss in which every other example's output
is detached — the gradient of example i's own term, the batch's divisor unchanged — times B for "mean".
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

import torchderiv
import torchderiv.functional as TF
import torchderiv.nn as tdnn
from torchderiv.functional import _per_sample

B, N_IN, N_OUT, T = 6, 5, 3, 5


def _seq_net():
    return nn.Sequential(nn.Linear(N_IN, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, N_OUT))


def _mlp_net():
    return nn.Sequential(
        nn.Linear(N_IN, 7), nn.GELU(), nn.Linear(7, 6), nn.SiLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, N_OUT)
    )


# name -> (torchderiv model, torch reference); built under the same seed, so the parameters agree.
MODELS = {
    "mlp": (
        lambda: tdnn.MLP([N_IN, 7, 6, N_OUT], "tanh"),
        lambda: nn.Sequential(nn.Linear(N_IN, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, N_OUT)),
    ),
    "mlp_gelu_nobias": (
        lambda: tdnn.MLP([N_IN, 7, N_OUT], "gelu", bias=False),
        lambda: nn.Sequential(nn.Linear(N_IN, 7, bias=False), nn.GELU(), nn.Linear(7, N_OUT, bias=False)),
    ),
    "linear_stack": (
        lambda: nn.Sequential(tdnn.Linear(N_IN, 7), tdnn.ReLU(), tdnn.Linear(7, N_OUT, bias=False)),
        lambda: nn.Sequential(nn.Linear(N_IN, 7), nn.ReLU(), nn.Linear(7, N_OUT, bias=False)),
    ),
    "dense": (
        lambda: nn.Sequential(tdnn.Dense(N_IN, 7, "silu"), tdnn.Linear(7, N_OUT)),
        lambda: nn.Sequential(nn.Linear(N_IN, 7), nn.SiLU(), nn.Linear(7, N_OUT)),
    ),
    # Separate Functions on 2-D inputs: the gelu's and silu's outputs are made again from their inputs for the
    # deferred GEMMs (and scaled there by cᵢ), the relu's output is held
    "converted_mlp": (lambda: torchderiv.convert(_mlp_net()), _mlp_net),
    # Sequences (B, T, n): the Gram form (2T² < n_in n_out) for the first two layers, the explicit
    # Δᵢᵀ Hᵢ for the last (2T² = 50 ≥ 16·3).
    "converted_seq": (lambda: torchderiv.convert(_seq_net()), _seq_net),
}
SEQUENCE = {"converted_seq"}


# name -> (loss(z, y) on logits (*, C), target maker, reduction)
def _ce(**kw):
    return lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), **kw)


def _class_targets(shape, ignore=False):
    y = torch.randint(0, N_OUT, shape)
    if ignore:
        y.view(-1)[::3] = -100  # every third row is ignored: a zero-gradient example when all its rows are
    return y


LOSSES = {
    "ce_mean": (_ce(), lambda s: _class_targets(s), "mean"),
    "ce_sum": (_ce(reduction="sum"), lambda s: _class_targets(s), "sum"),
    "ce_ignore": (_ce(), lambda s: _class_targets(s, ignore=True), "mean"),
    "ce_weight_smooth": (
        _ce(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), label_smoothing=0.1),
        lambda s: _class_targets(s),
        "mean",
    ),
    "mse_mean": (lambda z, y: F.mse_loss(z, y), lambda s: torch.randn(*s, N_OUT, dtype=torch.float64), "mean"),
    "bce_sum": (
        lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum"),
        lambda s: torch.rand(*s, N_OUT, dtype=torch.float64),
        "sum",
    ),
}

# torchderiv's twin of each loss above, as used inside the context
TD_LOSSES = {
    "ce_mean": lambda z, y: TF.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)),
    "ce_sum": lambda z, y: TF.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum"),
    "ce_ignore": lambda z, y: TF.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)),
    "ce_weight_smooth": lambda z, y: TF.cross_entropy(
        z.reshape(-1, z.shape[-1]),
        y.reshape(-1),
        weight=torch.tensor([0.5, 2.0, 1.0], dtype=z.dtype),
        label_smoothing=0.1,
    ),
    "mse_mean": lambda z, y: TF.mse_loss(z, y),
    "bce_sum": lambda z, y: TF.binary_cross_entropy_with_logits(z, y, reduction="sum"),
}


def build(name, dtype):
    ours_fn, ref_fn = MODELS[name]
    torch.manual_seed(1)
    ours = ours_fn().to(dtype)
    torch.manual_seed(1)
    ref = ref_fn().to(dtype)
    for (a, pa), (b, pb) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(pa, pb, rtol=0, atol=0, msg=f"{a} vs {b}: the two builds must start equal")
    return ours, ref


def ground_truth(ref, x, y, loss_fn, reduction):
    """Each example's gradient ``(B, *p.shape)`` per trainable parameter of ``ref``, by one backward each."""
    params = [p for p in ref.parameters() if p.requires_grad]
    z = ref(x)
    rows = torch.arange(x.shape[0]).reshape(-1, *([1] * (z.dim() - 1)))
    per = [[] for _ in params]
    for i in range(x.shape[0]):
        zi = torch.where(rows == i, z, z.detach())
        grads = torch.autograd.grad(loss_fn(zi, y), params, retain_graph=True, allow_unused=True)
        for k, (g, p) in enumerate(zip(grads, params)):
            g = torch.zeros_like(p) if g is None else g
            per[k].append(g * (x.shape[0] if reduction == "mean" else 1))
    return [torch.stack(g) if g else torch.zeros(0, *p.shape, dtype=p.dtype) for g, p in zip(per, params)]


def clipped_sum(per, norms, max_norm, reduction):
    c = (max_norm / (norms + 1e-6)).clamp(max=1)
    n = norms.shape[0]
    return [(g * c.reshape(-1, *([1] * (g.dim() - 1)))).sum(0) / (n if reduction == "mean" else 1) for g in per]


def _scale_of(loss_scale):
    """S as a float: 1 without one, a GradScaler's current scale."""
    if loss_scale is None:
        return 1.0
    return loss_scale.get_scale() if hasattr(loss_scale, "get_scale") else float(loss_scale)


def _inputs(name, dtype, batch=B):
    lead = (batch, T) if name in SEQUENCE else (batch,)
    return torch.randn(*lead, N_IN, dtype=dtype), lead


def run_case(
    model_name,
    loss_name,
    dtype,
    *,
    max_norm=0.7,
    frozen=(),
    via_mlp_ce=False,
    batch=B,
    grad_sample=False,
    forward=None,
    loss_scale=None,
):
    ours, ref = build(model_name, dtype)
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if n in frozen:
            p.requires_grad_(False)
            q.requires_grad_(False)
    x, lead = _inputs(model_name, dtype, batch)
    loss_fn, make_target, reduction = LOSSES[loss_name]
    y = make_target(lead)
    if y.is_floating_point():
        y = y.to(dtype)
    per = ground_truth(ref, x, y, loss_fn, reduction)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))

    # a scaled loss (mixed precision): the backward sees S × the loss; .grad keeps S, norms and grad_sample do not
    s = _scale_of(loss_scale)
    with torchderiv.per_sample(
        ours, max_norm=max_norm, grad_sample=grad_sample, loss_reduction=reduction, loss_scale=loss_scale
    ) as ps:
        if via_mlp_ce:
            kw = (
                {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=dtype), "label_smoothing": 0.1}
                if (loss_name == "ce_weight_smooth")
                else {}
            )
            loss, _ = ours.cross_entropy(x, y, reduction=reduction, **kw)
        else:
            loss = TD_LOSSES[loss_name](ours(x) if forward is None else forward(ours, x), y)
        (loss if loss_scale is None else loss * s).backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert ps.norms.shape == (batch,)
    assert_close(ps.norms, norms, **tol)
    expected = (
        clipped_sum(per, norms, max_norm, reduction)
        if max_norm is not None
        else [g.sum(0) / (batch if reduction == "mean" else 1) for g in per]
    )
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == len(per)
    for (n, p), g, gs in zip(trainable, expected, per):
        assert p.grad is not None, n
        assert_close(p.grad, g * s, msg=lambda m, n=n: f"{n}.grad: {m}", **tol)
        if grad_sample:
            assert_close(p.grad_sample, gs, msg=lambda m, n=n: f"{n}.grad_sample: {m}", **tol)
        else:
            assert not hasattr(p, "grad_sample"), n
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and not hasattr(p, "grad_sample"), n
    return ps


@pytest.mark.parametrize("grad_sample", [False, True], ids=["norms", "grad_sample"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_matches_ground_truth_float64(model_name, loss_name, grad_sample):
    run_case(model_name, loss_name, torch.float64, grad_sample=grad_sample)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_matches_ground_truth_float32(model_name):
    run_case(model_name, "ce_mean", torch.float32)
    run_case(model_name, "mse_mean", torch.float32, max_norm=None, grad_sample=True)


@pytest.mark.parametrize("loss_name", ["ce_mean", "ce_sum", "ce_ignore", "ce_weight_smooth"])
def test_mlp_cross_entropy_one_function(loss_name):
    run_case("mlp", loss_name, torch.float64, via_mlp_ce=True, grad_sample=True)
    run_case("mlp_gelu_nobias", loss_name, torch.float64, via_mlp_ce=True, max_norm=None)


def test_norms_only_leaves_ordinary_gradient():
    # max_norm=None: .grad is exactly the ordinary batch gradient (checked in run_case) and norms are set.
    ps = run_case("linear_stack", "ce_mean", torch.float64, max_norm=None)
    assert ps.norms.dtype == torch.float64


@pytest.mark.parametrize("model_name", ["mlp", "linear_stack", "converted_mlp", "converted_seq"])
def test_frozen_parameters_excluded(model_name):
    ours, _ = build(model_name, torch.float64)
    first = next(n for n, _ in ours.named_parameters())
    run_case(model_name, "ce_mean", torch.float64, frozen=(first,))


def test_ignored_example_has_zero_norm():
    ours, _ = build("mlp", torch.float64)
    x, y = torch.randn(4, N_IN, dtype=torch.float64), torch.tensor([1, -100, 2, 0])
    with torchderiv.per_sample(ours, max_norm=1.0) as ps:
        ours.cross_entropy(x, y)[0].backward()
    assert ps.norms[1] == 0 and (ps.norms[[0, 2, 3]] > 0).all()


@pytest.mark.parametrize("model_name", ["mlp", "converted_seq"])
def test_empty_batch(model_name):
    run_case(model_name, "ce_sum", torch.float64, batch=0)


# How the layer's input H was made: "data" (no grad), "leaf" (a tensor requiring grad, which nothing else
# keeps), "tanh" (torchderiv's tanh, whose node keeps H until its backward), "gelu" (torchderiv's gelu, whose
# node keeps Z, from which H is made again at the end).
def _layer_input(maker, shape):
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=maker != "data")
    return {"data": lambda: z, "leaf": lambda: z, "tanh": lambda: TF.tanh(z), "gelu": lambda: TF.gelu(z)}[maker]()


@pytest.mark.parametrize(
    "t, n_in, n_out, maker, path",
    [
        (1, 5, 4, "data", "rows"),  # ‖δᵢ‖² ‖hᵢ‖²
        (1, 5, 4, "gelu", "rows"),
        (6, 16, 16, "data", "gram"),  # Δᵢᵀ Hᵢ larger than Δ and H: two T×T Grams, Δ and H held
        (6, 16, 16, "gelu", "gram"),  # the same, holding the gelu's input Z instead of H
        (8, 18, 18, "data", "norms"),  # larger than Δ and H but ≤ 1.25× the Grams' cost: its norm, Δ and H held
        (8, 18, 18, "gelu", "norms"),
        (5, 4, 3, "data", "product"),  # Δᵢᵀ Hᵢ no larger than Δ and H: made now, Δ and H let go
        (5, 8, 3, "leaf", "product"),
        (5, 8, 3, "tanh", "later"),  # the same sizes, but H's maker keeps H through its own backward: made after
        (5, 8, 3, "gelu", "later"),
        (5, 16, 3, "gelu", "later"),
    ],
)
@pytest.mark.parametrize("chunk_floats", [None, 1], ids=["one-piece", "one-example-a-time"])
@pytest.mark.parametrize("max_norm", [1.0, None], ids=["clipping", "norms-only"])
def test_each_norm_path_equals_the_explicit_product(t, n_in, n_out, maker, path, chunk_floats, max_norm, monkeypatch):
    # with clipping the products are kept for Σᵢ cᵢ gᵢ; for norms alone only their sum is (made part by part)
    if chunk_floats is not None:  # the bounded-temporary loops, one example per piece
        monkeypatch.setattr(_per_sample, "_GRAM_FLOATS", chunk_floats)
    rec = _per_sample.Recorder({}, max_norm, False, "sum")
    kept = path in ("product", "later") and max_norm is not None
    if path == "later" and not kept:
        path = "product"  # norms only: the product is summed a part at a time, never kept, so it is made at once
    w, b = torch.zeros(n_out, n_in, dtype=torch.float64), torch.zeros(n_out, dtype=torch.float64)
    d = torch.randn(B, t, n_out, dtype=torch.float64)
    h = _layer_input(maker, (B, n_in) if t == 1 else (B, t, n_in))
    norms_from_products = []
    product = _per_sample._product
    monkeypatch.setattr(
        _per_sample, "_product", lambda *a, keep=True: norms_from_products.append(not keep) or product(*a, keep=keep)
    )
    with torch.no_grad():  # as inside a backward
        layer = rec._factors(w, b, d.squeeze(1) if t == 1 else d, h)
    assert any(norms_from_products) == (path == "norms")
    assert (layer.product is not None) == (path == "product" and kept)
    assert (layer.summed is not None) == (path == "product" and not kept)
    assert (layer.delta is None) == (path == "product")
    assert layer.waiting == (path == "later")
    if path != "product":  # what the layer holds: H, or the gelu's input Z to make H again (bit for bit)
        assert (layer.remake is not None) == (maker == "gelu") and (layer.input is None) == (maker == "gelu")
        held = layer.input if layer.remake is None else layer.remake[1](layer.remake[0])
        assert torch.equal(held.reshape(h.shape), h.detach())
    g = torch.einsum("bto,bti->boi", d, h.detach().reshape(B, t, n_in))
    bias_sq = d.sum(1).square().sum(1)
    if path == "later":  # only the bias's share so far; the product comes at the next layer or at the end
        assert_close(layer.sq, bias_sq, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            rec._settle([layer])
        assert (layer.product is not None) == kept and (layer.summed is not None) == (not kept)
        assert layer.delta is None and layer.input is None and layer.remake is None
    assert_close(layer.sq, g.flatten(1).square().sum(1) + bias_sq, rtol=1e-12, atol=1e-12)
    if layer.product is not None:
        assert_close(layer.product, g, rtol=1e-12, atol=1e-12)
    if layer.summed is not None:
        assert_close(layer.summed, g.sum(0), rtol=1e-12, atol=1e-12)
    gw, gb = layer.clipped(None)  # the unclipped gradient, from whichever the layer holds
    assert_close(gw, g.sum(0), rtol=1e-12, atol=1e-12)
    assert_close(gb, d.sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_product_made_at_the_end_of_the_pass(monkeypatch):
    # The first tracked layer's input made by a gelu (a frozen layer before it, an input that requires grad):
    # its product waits for the gelu's backward, and no tracked layer comes after it: finish makes it.
    settled = []
    original = _per_sample.Recorder._settle

    def spy(self, pending=None):
        settled.append(any(layer.waiting for layer in (self.pending if pending is None else pending)))
        return original(self, pending)

    monkeypatch.setattr(_per_sample.Recorder, "_settle", spy)

    def net():
        return nn.Sequential(nn.Linear(N_IN, 8), nn.GELU(), nn.Linear(8, N_OUT))

    torch.manual_seed(3)
    ours = torchderiv.convert(net()).double()
    torch.manual_seed(3)
    ref = net().double()
    for m in (ours, ref):
        m[0].requires_grad_(False)
    x = torch.randn(B, T, N_IN, dtype=torch.float64, requires_grad=True)
    y = _class_targets((B, T))
    per = ground_truth(ref, x, y, LOSSES["ce_mean"][0], "mean")
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    with torchderiv.per_sample(ours, max_norm=0.7) as ps:
        TD_LOSSES["ce_mean"](ours(x), y).backward()
    assert settled == [False, True]  # at the layer's own take nothing waits; finish finds it waiting
    assert_close(ps.norms, norms, rtol=1e-10, atol=1e-12)
    for p, g in zip(ours[2].parameters(), clipped_sum(per, norms, 0.7, "mean")):
        assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert x.grad is not None  # the input's own gradient is untouched by the context


def test_accumulates_over_backward_calls():
    ours, _ = build("linear_stack", torch.float64)
    x, y = torch.randn(B, N_IN, dtype=torch.float64), _class_targets((B,))
    with torchderiv.per_sample(ours, max_norm=0.5) as ps:
        TF.cross_entropy(ours(x[:3]), y[:3]).backward()
        first = [p.grad.clone() for p in ours.parameters()]
        TF.cross_entropy(ours(x[3:]), y[3:]).backward()
    assert ps.norms.shape == (3,)
    ours2, _ = build("linear_stack", torch.float64)
    with torchderiv.per_sample(ours2, max_norm=0.5):
        TF.cross_entropy(ours2(x[3:]), y[3:]).backward()
    for p, f, q in zip(ours.parameters(), first, ours2.parameters()):
        assert_close(p.grad, f + q.grad, rtol=1e-12, atol=1e-14)


def test_outside_the_context_nothing_changes():
    ours, ref = build("mlp", torch.float64)
    x, y = torch.randn(B, N_IN, dtype=torch.float64), _class_targets((B,))
    with torchderiv.per_sample(ours, max_norm=0.1):
        TF.cross_entropy(ours(x), y).backward()
    assert _per_sample.current is None
    ours.zero_grad(set_to_none=True)
    TF.cross_entropy(ours(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    # the foreign-gradient hooks are gone: a direct use of a parameter is ordinary again
    (ours.layers[0].weight.sum() + TF.cross_entropy(ours(x), y)).backward()


@pytest.mark.parametrize("grad_sample", [False, True], ids=["clipped", "grad_sample"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_context_leaves_no_reference_cycle(model_name, grad_sample):
    """Entering the context, a backward pass and leaving it free everything by reference counting: a cycle (the
    context and its recorder, a nested function that calls itself) would keep each step's objects until the garbage
    collector next runs."""
    import gc

    ours, _ = build(model_name, torch.float64)
    x, lead = _inputs(model_name, torch.float64)
    y = _class_targets(lead)
    for _ in range(2):  # the second step: what a training loop repeats
        gc.collect()
        gc.disable()
        try:
            with torchderiv.per_sample(ours, max_norm=0.1, grad_sample=grad_sample):
                TF.cross_entropy(ours(x).flatten(0, -2), y.flatten()).backward()
            unreachable = gc.collect()
        finally:
            gc.enable()
    assert unreachable == 0


def test_autocast_norms_in_float32():
    ours, ref = build("mlp", torch.float32)
    x, y = torch.randn(B, N_IN), _class_targets((B,))
    per = ground_truth(ref, x, y, LOSSES["ce_mean"][0], "mean")
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    with torch.autocast("cpu", dtype=torch.bfloat16), torchderiv.per_sample(ours, max_norm=0.5) as ps:
        loss, logits = ours.cross_entropy(x, y)
        assert logits.dtype == torch.bfloat16
        loss.backward()
    assert ps.norms.dtype == torch.float32
    # bf16 GEMMs: ~3 significant digits
    assert_close(ps.norms, norms, rtol=3e-2, atol=1e-3)
    for p, g in zip(ours.parameters(), clipped_sum(per, norms, 0.5, "mean")):
        assert p.grad.dtype == torch.float32
        assert_close(p.grad, g, rtol=5e-2, atol=5e-3)


def test_autocast_sequence_layers_remade(monkeypatch):
    # Under autocast the gelu runs in bfloat16 and its output reaches the next Linear uncast: the recorder holds
    # the gelu's input and makes its output again at the end, with autocast off as in the forward (a float32
    # remake would not even multiply with the bfloat16 Δ)
    remade = []
    original = _per_sample._remake

    def spy(h):
        found = original(h)
        remade.append(found is not None and found[1] is not None)
        return found

    monkeypatch.setattr(_per_sample, "_remake", spy)
    ours, ref = build("converted_seq", torch.float32)
    x, y = torch.randn(B, T, N_IN), _class_targets((B, T))
    per = ground_truth(ref, x, y, LOSSES["ce_mean"][0], "mean")
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    with torch.autocast("cpu", dtype=torch.bfloat16), torchderiv.per_sample(ours, max_norm=0.5) as ps:
        out = ours(x)
        assert out.dtype == torch.bfloat16
        TD_LOSSES["ce_mean"](out.float(), y).backward()
    assert True in remade
    assert ps.norms.dtype == torch.float32
    assert_close(ps.norms, norms, rtol=3e-2, atol=1e-3)
    for p, g in zip(ours.parameters(), clipped_sum(per, norms, 0.5, "mean")):
        assert p.grad.dtype == torch.float32
        assert_close(p.grad, g, rtol=5e-2, atol=5e-3)


# --- what it refuses ---------------------------------------------------------------------------------


def _refuses(model, match, x=None, loss=None):
    x = torch.randn(B, N_IN) if x is None else x
    with pytest.raises(RuntimeError, match=match):
        with torchderiv.per_sample(model):
            out = model(x)
            (out.sum() if loss is None else loss(out)).backward()


def test_refuses_unconverted_linear():
    _refuses(nn.Sequential(nn.Linear(N_IN, 3)), r"parameters 0\.weight, 0\.bias of Linear: .*torchderiv\.convert")


def test_refuses_other_trainable_parameters_unless_frozen():
    model = nn.Sequential(tdnn.Linear(N_IN, 4), nn.LayerNorm(4), tdnn.Linear(4, 2))
    _refuses(model, r"parameters 1\.weight, 1\.bias of LayerNorm: not computed")
    model[1].requires_grad_(False)
    with torchderiv.per_sample(model) as ps:
        model(torch.randn(B, N_IN)).sum().backward()
    assert ps.norms.shape == (B,)


def test_refuses_batchnorm_in_training():
    model = nn.Sequential(tdnn.Linear(N_IN, 4), nn.BatchNorm1d(4, affine=False))
    _refuses(model, r"1 \(BatchNorm1d\) is in training mode")
    model.eval()
    with torchderiv.per_sample(model):
        model(torch.randn(B, N_IN)).sum().backward()


@pytest.mark.parametrize("model_name", ["mlp", "converted_seq"])
def test_refuses_a_model_changed_since_the_context_began(model_name):
    # The context spans several passes (gradient accumulation, a whole epoch): a parameter unfrozen meanwhile is
    # not tracked, and got an ordinary, unclipped gradient missing from every norm; BatchNorm set to training
    # would mix the examples. Checked once per pass.
    ours, _ = build(model_name, torch.float64)
    x, lead = _inputs(model_name, torch.float64)
    y = _class_targets(lead)
    name, first = next(iter(ours.named_parameters()))
    first.requires_grad_(False)
    with torchderiv.per_sample(ours, max_norm=0.5):
        TD_LOSSES["ce_mean"](ours(x), y).backward()
        assert first.grad is None
        first.requires_grad_(True)
        with pytest.raises(RuntimeError, match=rf"parameter\(s\) {name} require grad now but did not"):
            TD_LOSSES["ce_mean"](ours(x), y).backward()
    model = nn.Sequential(tdnn.Linear(N_IN, 4), nn.BatchNorm1d(4, affine=False)).eval()
    with torchderiv.per_sample(model):
        model(torch.randn(B, N_IN)).sum().backward()
        model.train()
        with pytest.raises(RuntimeError, match=r"1 \(BatchNorm1d\) is in training mode"):
            model(torch.randn(B, N_IN)).sum().backward()


def test_refuses_tied_weights():
    a, b = tdnn.Linear(N_IN, N_IN), tdnn.Linear(N_IN, N_IN)
    b.weight = a.weight
    _refuses(nn.Sequential(a, b), r"parameter 1\.weight is also 0\.weight \(tied weights\)")


def test_refuses_module_called_twice():
    layer = tdnn.Linear(N_IN, N_IN)
    with pytest.raises(RuntimeError, match=r"parameter weight was used more than once"):
        with torchderiv.per_sample(layer):
            layer(layer(torch.randn(B, N_IN))).sum().backward()


def test_refuses_foreign_use_of_a_parameter():
    layer = tdnn.Linear(N_IN, 3)
    with pytest.raises(RuntimeError, match=r"parameter weight received a gradient from an op"):
        with torchderiv.per_sample(layer):
            (layer(torch.randn(B, N_IN)).sum() + layer.weight.square().sum()).backward()


def test_refuses_create_graph_and_transforms():
    layer = tdnn.Linear(N_IN, 3)
    with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
        with torchderiv.per_sample(layer):
            layer(torch.randn(B, N_IN)).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        with torchderiv.per_sample(layer):
            torch.func.vmap(layer)(torch.randn(2, B, N_IN))


@pytest.mark.parametrize("model_name", ["mlp", "converted_seq"])
def test_refuses_a_pass_that_does_not_accumulate_into_grad(model_name):
    # torch.autograd.grad (and backward(inputs=...) leaving a tracked parameter out) accumulates nothing into
    # that .grad: the clipped gradient would land there anyway and the norms would count it. Refused, and the
    # context still works afterwards.
    ours, _ = build(model_name, torch.float64)
    x, _ = _inputs(model_name, torch.float64)
    params = list(ours.parameters())
    match = r"does not accumulate into parameter .*\.grad \(torch\.autograd\.grad"
    with torchderiv.per_sample(ours, max_norm=0.5) as ps:
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(ours(x).sum(), params, allow_unused=True)
        with pytest.raises(RuntimeError, match=match):
            ours(x).sum().backward(inputs=params[:1])
        assert ps.norms is None and all(p.grad is None for p in params)
        ours(x).sum().backward(inputs=params)  # every tracked parameter: as a plain backward
    assert ps.norms.shape == (B,) and all(p.grad is not None for p in params)


def test_torch_compile_in_and_out_of_the_context():
    # One compiled model used for plain steps and per_sample steps in turn: each gives what the eager model gives
    # (norms and clipped gradients inside, the ordinary gradient outside), whichever came first.
    ours, _ = build("linear_stack", torch.float64)
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours)
    x, y = torch.randn(B, N_IN, dtype=torch.float64), _class_targets((B,))

    def step(model, run, private):
        model.zero_grad(set_to_none=True)
        with torchderiv.per_sample(model, max_norm=0.5) if private else contextlib.nullcontext() as ps:
            F.cross_entropy(run(x), y).backward()
        return (ps.norms if private else None), [p.grad for p in model.parameters()]

    for private in (False, True, False, True):
        norms, grads = step(ours, compiled, private)
        norms_e, grads_e = step(eager, eager, private)
        if private:
            assert_close(norms, norms_e, rtol=1e-12, atol=0)
        for g, ge in zip(grads, grads_e):
            assert_close(g, ge, rtol=1e-12, atol=1e-15)


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True], ids=["default", "find_unused_parameters"])
@pytest.mark.parametrize("model_name", ["mlp", "converted_seq"])
def test_distributed_data_parallel_only_under_no_sync(one_process_group, model_name, find_unused):
    # DDP's reducer all-reduces .grad as each parameter's accumulator runs, before the clipped gradients exist,
    # and wrote its result over them: zeros (found: every .grad was 0), or with find_unused_parameters each
    # process's own. Refused at DDP's forward inside the context; under no_sync the context works as without DDP.
    ours, _ = build(model_name, torch.float64)
    twin = copy.deepcopy(ours)
    ddp = nn.parallel.DistributedDataParallel(ours, find_unused_parameters=find_unused)
    x, lead = _inputs(model_name, torch.float64)
    y = _class_targets(lead)
    with pytest.raises(RuntimeError, match=r"DistributedDataParallel .* ddp\.no_sync\(\)"):
        with torchderiv.per_sample(ddp, max_norm=0.7):
            ddp(x)
    with torchderiv.per_sample(ddp, max_norm=0.7) as ps, ddp.no_sync():
        TD_LOSSES["ce_mean"](ddp(x), y).backward()
    with torchderiv.per_sample(twin, max_norm=0.7) as expected:
        TD_LOSSES["ce_mean"](twin(x), y).backward()
    assert_close(ps.norms, expected.norms, rtol=1e-12, atol=0)
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert p.grad.abs().sum() > 0
        assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    # outside the context DDP is untouched: its usual all-reduced (here: one process's) gradient
    ours.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    TD_LOSSES["ce_mean"](ddp(x), y).backward()
    TD_LOSSES["ce_mean"](twin(x), y).backward()
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


# --- a scaled loss (mixed precision's GradScaler) --------------------------------------------------------------

SCALES = {
    "float": lambda: 1024.0,
    "tensor": lambda: torch.tensor(2.0**-3),
    "grad_scaler": lambda: torch.amp.GradScaler("cpu", init_scale=2.0**12),
}


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_scaled_loss_clips_the_unscaled_examples(model_name, scale):
    # Without loss_scale the backward's factors carry S and every norm came out S times too large: clipped S
    # times too strongly (a silent error, found when the GradScaler was tried inside the context)
    run_case(model_name, "ce_mean", torch.float64, grad_sample=True, loss_scale=SCALES[scale]())
    run_case(model_name, "mse_mean", torch.float64, max_norm=None, loss_scale=SCALES[scale]())


@pytest.mark.parametrize("scale", list(SCALES))
def test_scaled_loss_fused_head_and_one_function(scale):
    run_head_case("mean", True, True, torch.float64, loss_scale=SCALES[scale]())
    run_case("mlp", "ce_weight_smooth", torch.float64, via_mlp_ce=True, grad_sample=True, loss_scale=SCALES[scale]())


def _grad_scaler_step(model, x, y, scaler):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torchderiv.per_sample(model, max_norm=0.3, loss_scale=scaler) as ps:
        scaler.scale(TF.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    return ps.norms


def test_grad_scaler_step_equals_the_unscaled_step():
    ours, _ = build("converted_mlp", torch.float32)
    twin = copy.deepcopy(ours)
    x, y = torch.randn(B, N_IN), _class_targets((B,))
    with torchderiv.per_sample(twin, max_norm=0.3) as ps:
        TF.cross_entropy(twin(x), y).backward()
    torch.optim.SGD(twin.parameters(), lr=0.5).step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    norms = _grad_scaler_step(ours, x, y, scaler)
    assert_close(norms, ps.norms, rtol=1e-6, atol=0)
    assert (norms > 0.3).any()  # some example was clipped
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert_close(p, q, rtol=1e-6, atol=1e-7)
    # An overflow: the clipped sum is not finite either (cᵢ = 0 times inf), so the scaler skips the step and
    # lowers its scale, as without the context
    before = [p.detach().clone() for p in ours.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    _grad_scaler_step(ours, x * 1e3, y, scaler)
    assert scaler.get_scale() == 2.0**126
    for p, p0 in zip(ours.parameters(), before):
        assert torch.equal(p.detach(), p0)


def test_refuses_unbatched_input_and_nesting_and_bad_arguments():
    layer = tdnn.Linear(N_IN, 3)
    _refuses(layer, r"shape \(5,\), which holds no batch of examples", x=torch.randn(N_IN))
    with torchderiv.per_sample(layer):
        with pytest.raises(RuntimeError, match="do not nest"):
            torchderiv.per_sample(copy.deepcopy(layer)).__enter__()
    with pytest.raises(ValueError, match="max_norm"):
        torchderiv.per_sample(layer, max_norm=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        torchderiv.per_sample(layer, loss_reduction="none")
    for bad, what in [(0.0, "0.0"), (-2, "-2"), (float("inf"), "inf"), (True, "True"), ("1", "'1'")]:
        with pytest.raises(ValueError, match=f"expected loss_scale .* got {what}$"):
            torchderiv.per_sample(layer, loss_scale=bad)
    with pytest.raises(ValueError, match=r"got a tensor of shape \(2,\) and dtype torch.float32"):
        torchderiv.per_sample(layer, loss_scale=torch.ones(2))


# --- against Opacus, the library DP-SGD users run today -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_opacus(mode, reduction):
    pytest.importorskip("opacus")
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    max_norm = 0.8
    ours, ref = build("mlp", torch.float32)
    x, y = torch.randn(B, N_IN), _class_targets((B,))
    kw = dict(noise_multiplier=0.0, max_grad_norm=max_norm, expected_batch_size=B, loss_reduction=reduction)
    if mode == "hooks":
        gsm = GradSampleModule(ref, loss_reduction=reduction)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), **kw)
        F.cross_entropy(gsm(x), y, reduction=reduction).backward()
        per = [p.grad_sample for p in gsm.parameters()]
    else:
        gsm = GradSampleModuleFastGradientClipping(ref, max_grad_norm=max_norm, loss_reduction=reduction)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=0.0), **kw)
        crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction=reduction), reduction)
        crit(gsm(x), y).backward()
        per = None
    opt.pre_step()  # clip, sum, add (zero) noise, scale by the expected batch size for "mean"
    with torchderiv.per_sample(ours, max_norm=max_norm, grad_sample=True, loss_reduction=reduction) as ps:
        TF.cross_entropy(ours(x), y, reduction=reduction).backward()
    for p, q in zip(ours.parameters(), gsm.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    if per is not None:
        assert_close(ps.norms, torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per)), rtol=1e-5, atol=1e-6)
        for p, g in zip(ours.parameters(), per):
            assert_close(p.grad_sample, g, rtol=1e-5, atol=1e-6)


def _tanh_seq():
    # T = 5: the last layer's product (8 x 3) is no larger than its Δ and H, and waits for the tanh's backward
    return torchderiv.convert(nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, 3)))


@pytest.mark.parametrize(
    "make, lead",
    [(lambda: tdnn.Linear(N_IN, 3), (B,)), (_tanh_seq, (B, T))],
    ids=["linear", "a-product-waiting"],
)
def test_a_failed_backward_leaves_nothing_behind(make, lead):
    # an error inside one backward pass (here a foreign gradient) must not leave deferred layers (or products
    # waiting to be made) that a later pass would finish with its own, nor stop the later pass from finishing
    torch.manual_seed(0)
    layer = make().double()
    first = next(layer.parameters())
    x = torch.randn(*lead, N_IN, dtype=torch.float64)
    with torchderiv.per_sample(layer, max_norm=0.5) as ps:
        with pytest.raises(RuntimeError, match="received a gradient from an op"):
            (layer(x).sum() + first.sum()).backward()
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    assert ps.norms.shape == (B,)
    ref = make().double()
    ref.load_state_dict(layer.state_dict())
    with torchderiv.per_sample(ref, max_norm=0.5):
        ref(x).sum().backward()
    for p, q in zip(layer.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, rtol=0, atol=0)


# --- memory-saving forwards: saved-tensor hooks and activation checkpointing -------------------------------
# Under saved-tensor hooks a Function's saved tensors come back in backward as other tensors (copies from the
# CPU, recomputations), so a tracked parameter cannot be known by what backward unpacks (it is marked at
# forward), and an activation's saved Z or H is not unpacked early to make H again (a checkpoint's may be
# unpacked only once). A reentrant checkpoint runs its layers' backward as a pass of its own, nested in the
# outer one: the norms are finished once, at the end of the outer pass, with every layer in them.


def _save_on_cpu(model, *args):
    with torch.autograd.graph.save_on_cpu():
        return model(*args)


def _checkpointed(reentrant):
    def forward(model, x, *rest):
        # the reentrant form needs an input requiring grad, or no gradient reaches the checkpointed parameters
        return checkpoint(model, x.detach().requires_grad_() if reentrant else x, *rest, use_reentrant=reentrant)

    return forward


HOW = {"save_on_cpu": _save_on_cpu, "checkpoint": _checkpointed(False), "checkpoint_reentrant": _checkpointed(True)}


@pytest.mark.parametrize("how", list(HOW))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_saved_tensor_hooks_and_checkpointing(model_name, how):
    run_case(model_name, "ce_mean", torch.float64, grad_sample=True, forward=HOW[how])


@pytest.mark.parametrize("reentrant", [False, True], ids=["checkpoint", "checkpoint_reentrant"])
@pytest.mark.parametrize("segment", [(0, 2), (2, 4), (4, None)], ids=["first", "middle", "last"])
@pytest.mark.parametrize("model_name", ["converted_seq", "converted_mlp"])
def test_one_segment_checkpointed(model_name, segment, reentrant):
    # One segment of the Sequential checkpointed, the rest plain. "first" and "middle" end with an activation
    # whose output feeds a plain layer (its saved Z or H is hooked); with reentrant=True the segment's layers
    # come in a nested pass: before the outer pass's layers ("last"), after them ("first"), or between.
    a, b = segment

    def forward(model, x):
        head, seg, tail = model[:a], model[a:b], model[b:] if b is not None else nn.Sequential()
        h = head(x)
        if reentrant and not h.requires_grad:
            h = h.detach().requires_grad_()
        return tail(checkpoint(seg, h, use_reentrant=reentrant))

    run_case(model_name, "ce_mean", torch.float64, forward=forward)


@pytest.mark.parametrize("how", list(HOW))
def test_linear_cross_entropy_head_under_hooks_and_checkpointing(how):
    def forward(model, x, y):
        return HOW[how](lambda x, y: model.head(model.body(x), y), x, y)

    run_head_case("mean", True, True, torch.float64, forward=forward)


def test_a_failed_pass_around_a_reentrant_checkpoint_leaves_nothing_behind():
    # The failed pass ran a nested pass first (its layers are pending, finish waits on the outer pass, which
    # then raises): the next pass must neither finish with those layers nor take itself for a nested pass.
    torch.manual_seed(0)
    model = _tanh_seq().double()
    clean = copy.deepcopy(model)
    x = torch.randn(B, T, N_IN, dtype=torch.float64)

    def forward(m):
        return m[2:](checkpoint(m[:2], x.detach().requires_grad_(), use_reentrant=True)).sum()

    with torchderiv.per_sample(model, max_norm=0.5) as ps:
        with pytest.raises(RuntimeError, match="received a gradient from an op"):
            # the direct use is made first, so its gradient (the error) comes after the checkpoint's backward
            (model[0].weight.sum() + forward(model)).backward()
        assert ps._recorder.pending and ps._recorder.host is not None  # the nested pass did run
        model.zero_grad(set_to_none=True)
        forward(model).backward()
    with torchderiv.per_sample(clean, max_norm=0.5) as ps_clean:
        forward(clean).backward()
    assert_close(ps.norms, ps_clean.norms, rtol=0, atol=0)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert_close(p.grad, q.grad, rtol=0, atol=0)


# --- the fused linear + cross-entropy head (LinearCrossEntropyLoss): its Δ is recomputed, never held ---------

LCE_CASES = {  # name -> (LinearCrossEntropyLoss keyword arguments, F.cross_entropy's, with ignored rows)
    "mean": ({}, {}, False),
    "sum": ({"reduction": "sum"}, {"reduction": "sum"}, False),
    "ignore": ({}, {}, True),
    "weight_smooth": (
        {"weight": torch.tensor([0.5, 2.0, 1.0]), "label_smoothing": 0.1},
        {"weight": torch.tensor([0.5, 2.0, 1.0]), "label_smoothing": 0.1},
        False,
    ),
}


class _HeadNet(nn.Module):
    """A hidden torchderiv layer, then a head: torchderiv's fused loss, or torch's Linear for the reference."""

    def __init__(self, fused: bool, bias: bool, dtype, chunk_size=None, **loss_kw):
        super().__init__()
        self.body = tdnn.Dense(N_IN, 7, "tanh") if fused else nn.Sequential(nn.Linear(N_IN, 7), nn.Tanh())
        if fused:
            kw = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in loss_kw.items()}
            self.head = tdnn.LinearCrossEntropyLoss(7, N_OUT, bias=bias, chunk_size=chunk_size, **kw)
        else:
            self.head = nn.Linear(7, N_OUT, bias=bias)
        self.to(dtype)


@pytest.mark.parametrize("grad_sample", [False, True], ids=["norms", "grad_sample"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(LCE_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_linear_cross_entropy_head_matches_ground_truth(case, bias, grad_sample, dtype):
    run_head_case(case, bias, grad_sample, dtype)


def run_head_case(case, bias, grad_sample, dtype, forward=None, loss_scale=None):
    loss_kw, ce_kw, ignore = LCE_CASES[case]
    reduction = ce_kw.get("reduction", "mean")
    torch.manual_seed(3)
    ours = _HeadNet(True, bias, dtype, chunk_size=2, **loss_kw)  # 2 rows a chunk: several chunks per batch
    ref = _HeadNet(False, bias, dtype)
    ref.load_state_dict(
        {
            k.replace("head.linear.", "head.").replace("body.", "body.0."): v
            for k, v in ours.state_dict().items()
            if k != "head.weight"
        }
    )
    x, y = torch.randn(B, N_IN, dtype=dtype), _class_targets((B,), ignore=ignore)
    ce_kw = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in ce_kw.items()}
    per = ground_truth(nn.Sequential(ref.body, ref.head), x, y, lambda z, t: F.cross_entropy(z, t, **ce_kw), reduction)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    s = _scale_of(loss_scale)
    with torchderiv.per_sample(
        ours, max_norm=0.7, grad_sample=grad_sample, loss_reduction=reduction, loss_scale=loss_scale
    ) as ps:
        loss = ours.head(ours.body(x), y) if forward is None else forward(ours, x, y)
        (loss if loss_scale is None else loss * s).backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_close(ps.norms, norms, **tol)
    params = [p for p in ours.parameters() if p.requires_grad]
    assert len(params) == len(per)
    for p, g, gs in zip(params, clipped_sum(per, norms, 0.7, reduction), per):
        assert_close(p.grad, g * s, **tol)
        if grad_sample:
            assert_close(p.grad_sample, gs, **tol)
    if ignore:
        assert torch.all(ps.norms[::3] == 0)  # an ignored row: a zero-gradient example


def test_linear_cross_entropy_head_frozen_or_refused():
    torch.manual_seed(0)
    ours = _HeadNet(True, True, torch.float64)
    x, y = torch.randn(B, N_IN, dtype=torch.float64), _class_targets((B,))
    # frozen head: only the body is tracked, and the head's (ordinary) backward still feeds it
    ours.head.requires_grad_(False)
    with torchderiv.per_sample(ours, max_norm=None) as ps:
        ours.head(ours.body(x), y).backward()
    assert ps.norms.shape == (B,) and ours.body.weight.grad is not None and ours.head.linear.weight.grad is None
    ours.head.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"expected examples along dim 0, i.e. an input of shape \(B, 7\)"):
        with torchderiv.per_sample(ours):
            ours.head(ours.body(x)[0], y[0]).backward()
    # a K-dimensional head reshapes its weight: the fused path is not taken, and the context says so
    k_dim = tdnn.LinearCrossEntropyLoss(7, N_OUT, out_features=(2,)).double()
    with pytest.raises(RuntimeError, match=r"parameter linear\.weight of Linear: not computed .*K-dimensional"):
        torchderiv.per_sample(k_dim).__enter__()


# --- CUDA (skipped without a GPU; experiments/device_check.sh runs these by name) ---------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("how", [None, *HOW])
@pytest.mark.parametrize("model_name", ["mlp", "converted_mlp", "converted_seq"])
def test_cuda_matches_the_cpu_ground_truth(model_name, how):
    # The same network on the GPU: norms and clipped gradients equal the ground truth computed on the CPU
    # (float64 on both: any difference is the device's arithmetic, not round-off of float32). Also under
    # save_on_cpu and checkpointing: on CUDA the backward runs on the device's own thread, a reentrant
    # checkpoint's nested pass too.
    ours, ref = build(model_name, torch.float64)
    x, lead = _inputs(model_name, torch.float64)
    y = _class_targets(lead)
    per = ground_truth(ref, x, y, LOSSES["ce_mean"][0], "mean")
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    ours = ours.cuda()
    with torchderiv.per_sample(ours, max_norm=0.7, grad_sample=True) as ps:
        z = ours(x.cuda()) if how is None else HOW[how](ours, x.cuda())
        TD_LOSSES["ce_mean"](z, y.cuda()).backward()
    assert ps.norms.device.type == "cuda"
    assert_close(ps.norms.cpu(), norms, rtol=1e-10, atol=1e-12)
    for p, g, gs in zip(ours.parameters(), clipped_sum(per, norms, 0.7, "mean"), per):
        assert_close(p.grad.cpu(), g, rtol=1e-10, atol=1e-12)
        assert_close(p.grad_sample.cpu(), gs, rtol=1e-10, atol=1e-12)


@CUDA
def test_cuda_linear_cross_entropy_head_and_autocast():
    torch.manual_seed(3)
    ours = _HeadNet(True, True, torch.float32, chunk_size=2)
    x, y = torch.randn(B, N_IN), _class_targets((B,))
    with torchderiv.per_sample(ours, max_norm=0.7) as ps:
        ours.head(ours.body(x), y).backward()
    norms, grads = ps.norms.clone(), [p.grad.clone() for p in ours.parameters()]
    ours.cuda().zero_grad(set_to_none=True)
    with torchderiv.per_sample(ours, max_norm=0.7) as ps:
        ours.head(ours.body(x.cuda()), y.cuda()).backward()
    assert_close(ps.norms.cpu(), norms, rtol=1e-5, atol=1e-6)
    for p, g in zip(ours.parameters(), grads):
        assert_close(p.grad.cpu(), g, rtol=1e-5, atol=1e-6)
    ours.zero_grad(set_to_none=True)
    with torchderiv.per_sample(ours, max_norm=0.7) as ps:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ours.head(ours.body(x.cuda()), y.cuda())
        loss.backward()
    assert ps.norms.dtype == torch.float32  # norms in float32 under autocast
    assert_close(ps.norms.cpu(), norms, rtol=2e-2, atol=1e-3)  # bfloat16's 8 bits of mantissa


@CUDA
def test_cuda_fp16_autocast_with_a_grad_scaler():
    # The real use of loss_scale: fp16 autocast on a GPU, the scaler's default S = 2¹⁶. The norms are those of
    # the float32 run on the CPU to fp16's precision, not 2¹⁶ times them; the clipped step matches too.
    ours, _ = build("converted_seq", torch.float32)
    twin = copy.deepcopy(ours)
    x, lead = _inputs("converted_seq", torch.float32)
    y = _class_targets(lead)
    with torchderiv.per_sample(twin, max_norm=0.3) as ps:
        TD_LOSSES["ce_mean"](twin(x), y).backward()
    ours.cuda()
    scaler = torch.amp.GradScaler("cuda")
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    with torchderiv.per_sample(ours, max_norm=0.3, loss_scale=scaler) as ps16:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = TD_LOSSES["ce_mean"](ours(x.cuda()), y.cuda())
        scaler.scale(loss).backward()
    assert ps16.norms.dtype == torch.float32
    assert_close(ps16.norms.cpu(), ps.norms, rtol=1e-2, atol=1e-4)  # fp16's 11 bits of mantissa
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert_close(p.grad.cpu() / scaler.get_scale(), q.grad, rtol=2e-2, atol=1e-4)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**16  # no overflow: the step was taken

"""Convolution as the dense layer over patches: values, gradients, jvp and double backward against torch and finite
differences; the modules and convert; per-example norms, clipping and grad_sample against per-example autograd."""

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import check_clipping_against_per_example_autograd
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.functional as TF

OPTIONS = [
    dict(),
    dict(stride=2, padding=1),
    dict(padding="same", dilation=2),
    dict(padding="valid"),
    dict(groups=2, padding=1),
    dict(stride=2, groups=2, dilation=2, padding=2),
]
IDS = ["plain", "stride-pad", "same-dilated", "valid", "groups", "everything"]


def _args(n, kw, dtype=torch.float64, batch=3, kernel=3):
    g = kw.get("groups", 1)
    x = torch.randn(batch, 4, *(9, 7)[:n], dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4 // g, *([kernel] * n), dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    return x, w, b


CONV = importlib.import_module("torchderiv.functional.conv")


@pytest.fixture(params=["patches", "convolution"])
def weight_gradient_form(request, monkeypatch):
    """Both forms of ∂J/∂W = Σ Δᵀ P (and, inside per_sample, of each example's Δᵢᵀ Pᵢ): the GEMMs over patches (small
    kernels) and the correlation of H with Δ as torch's forward convolution (kernels of many taps), each forced for
    every kernel."""
    by_convolution = request.param == "convolution"
    monkeypatch.setattr(CONV, "_summed_by_convolution", lambda kernel, stride, per_in, positions: by_convolution)
    monkeypatch.setattr(CONV, "_per_example_by_convolution", lambda kernel, per_in: by_convolution)
    return request.param


@pytest.mark.parametrize("kw", OPTIONS, ids=IDS)
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_equal_torchs(n, kw, dtype, weight_gradient_form):
    ours, theirs = (TF.conv1d, F.conv1d) if n == 1 else (TF.conv2d, F.conv2d)
    x, w, b = _args(n, kw, dtype)
    out, ref = ours(x, w, b, **kw), theirs(x, w, b, **kw)
    tol = dict(rtol=0, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, c in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        assert_close(a, c, **tol)


# (size, kernel, stride, padding, dilation) where the stride skips input rows at the far edge (their gradient is 0,
# or from taps that the padding's crop would cut): conv_backward's output_padding case, each dim its own.
FAR_EDGE = [
    ((10, 8), 3, 2, 0, 1, 1),
    ((10, 9), 3, 2, 1, 1, 2),
    ((13, 12), 4, 2, 0, 1, 1),
    ((12, 11), 3, 3, 2, 2, 2),
    ((1, 2), 1, 5, 2, 1, 1),  # a padding wider than the one tap's reach: the input gets no row of the full result
]


@pytest.mark.parametrize("size, kernel, stride, padding, dilation, groups", FAR_EDGE, ids=str)
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "an-example-a-time"])
def test_input_gradient_where_the_stride_skips_the_far_edge(
    n, size, kernel, stride, padding, dilation, groups, chunked, monkeypatch
):
    if chunked:
        monkeypatch.setattr(CONV, "_CORRELATION_FLOATS", 1)
    ours, theirs = (TF.conv1d, F.conv1d) if n == 1 else (TF.conv2d, F.conv2d)
    x = torch.randn(3, 4, *size[:n], dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, *[kernel] * n, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out, ref = ours(x, w, None, **kw), theirs(x, w, None, **kw)
    g = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: ours(x, w, None, **kw), (x, w), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: ours(x, w, None, **kw), (x, w))


# (kernel, stride, padding) of strided convolutions without dilation, whose input gradient is one forward convolution
# per phase of the stride: taps in every phase or not (a kernel narrower than the stride), paddings up to the kernel's
# width, rows no tap reaches at either edge.
PHASES = [(k, s, p) for k in (1, 2, 3, 4) for s in (2, 3) for p in range(k + 1)]


@pytest.mark.parametrize("kernel, stride, padding", PHASES, ids=str)
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
def test_strided_input_gradient_by_phases(n, kernel, stride, padding, monkeypatch):
    """Each phase's convolution written into its rows, whole and an example at a time, for two sizes and two groups:
    torch's input gradient to 1e-12 (the batch size may change the convolution's order of summation by an ulp)."""
    ours, theirs = (TF.conv1d, F.conv1d) if n == 1 else (TF.conv2d, F.conv2d)
    for size, groups in ((7, 1), (8, 2)):
        x = torch.randn(3, 4, *[size] * n, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 4 // groups, *[kernel] * n, dtype=torch.float64)
        kw = dict(stride=stride, padding=padding, groups=groups)
        ref = theirs(x, w, None, **kw)
        g = torch.randn_like(ref)
        (expected,) = torch.autograd.grad(ref, x, g)
        (whole,) = torch.autograd.grad(ours(x, w, None, **kw), x, g)
        monkeypatch.setattr(CONV, "_CORRELATION_FLOATS", 1)
        (chunked,) = torch.autograd.grad(ours(x, w, None, **kw), x, g)
        monkeypatch.undo()
        assert_close(whole, expected, rtol=1e-12, atol=1e-12)
        assert_close(chunked, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, groups=2), dict(padding="same", dilation=2)], ids=IDS[4:6])
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
def test_gradcheck_forward_ad_double_backward(n, kw, weight_gradient_form):
    fn = TF.conv1d if n == 1 else TF.conv2d
    x, w, b = _args(n, kw, batch=2, kernel=2 if kw.get("padding") == "same" else 3)
    f = lambda x, w, b: fn(x, w, b, **kw)
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


def test_unbatched_input_and_meta_device():
    x, w, b = _args(2, {})
    assert_close(TF.conv2d(x[0], w, b, padding=1), F.conv2d(x[0], w, b, padding=1), rtol=0, atol=0)
    meta = TF.conv2d(torch.empty(5, 4, 16, 16, device="meta"), torch.empty(8, 4, 3, 3, device="meta"), stride=2)
    assert meta.shape == (5, 8, 7, 7) and meta.device.type == "meta"


def test_backward_uses_no_convolution_derivative_kernel():
    # torch's convolution_backward must not run: the weight gradient is the GEMM over patches, the input gradient a
    # transposed convolution (a forward op)
    x, w, b = _args(2, dict(padding=1))
    with torch.profiler.profile() as prof:
        TF.conv2d(x, w, b, padding=1).sum().backward()
    names = {e.name for e in prof.events()}
    assert not any("convolution_backward" in name for name in names), sorted(names)
    assert "aten::bmm" in names, sorted(names)  # the weight gradient: each example's Δᵢᵀ Pᵢ
    # an 8×8 kernel, or a strided 3×3 one: the weight gradient as torch's forward convolution
    for kernel, stride, padding in ((8, 1, 3), (3, 2, 1)):
        with torch.profiler.profile() as prof:
            weight = torch.randn(6, 4, kernel, kernel, dtype=x.dtype, requires_grad=True)
            TF.conv2d(x, weight, stride=stride, padding=padding).sum().backward()
        names = {e.name for e in prof.events()}
        assert not any("convolution_backward" in name for name in names), sorted(names)
        assert "aten::bmm" not in names and sum("convolution" in name for name in names) >= 2, sorted(names)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: TF.conv2d(torch.randn(2, 3, 8, 8), torch.randn(6, 4, 3, 3)), RuntimeError, r"expected input with 4"),
        (lambda: TF.conv2d(torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3)), RuntimeError, r"expected a 4-D weight"),
        (
            lambda: TF.conv2d(torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), padding="full"),
            ValueError,
            r"Invalid padding string 'full'",
        ),
        (
            lambda: TF.conv2d(torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), stride=2, padding="same"),
            ValueError,
            r"padding='same' is not supported for strided convolutions",
        ),
        (
            lambda: TF.conv1d(torch.randn(2, 4, 8), torch.randn(6, 4, 3), torch.randn(5)),
            RuntimeError,
            r"expected bias of shape \(6,\)",
        ),
    ],
    ids=["channels", "weight-dim", "padding-string", "same-strided", "bias"],
)
def test_bad_input_names_what_was_expected(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- the modules and convert -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_modules_are_torchs_with_torchderivs_backward(mode):
    torch.manual_seed(0)
    ref = nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    assert type(ours) is torchderiv.nn.Conv2d and isinstance(ours, nn.Conv2d)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    assert_close(ours(x), ref(x), rtol=0, atol=0)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    one = torchderiv.convert(nn.Conv1d(2, 3, 3, padding=1, padding_mode=mode))
    assert type(one) is torchderiv.nn.Conv1d and one(torch.randn(2, 2, 7)).shape == (2, 3, 7)


# --- per-example norms, clipping and grad_sample -----------------------------------------------------------------


def _cnn(mode="zeros", dtype=torch.float64):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    ).to(dtype)


@pytest.mark.parametrize("grad_sample", [False, True], ids=["clipped", "grad_sample"])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_equals_one_backward_per_example(mode, grad_sample, dtype, weight_gradient_form):
    torch.manual_seed(0)
    ref = _cnn(mode, dtype)
    ours = torchderiv.convert(copy.deepcopy(ref))
    x, y = torch.randn(7, 2, 8, 8, dtype=dtype), torch.randint(0, 5, (7,))
    c = check_clipping_against_per_example_autograd(ours, ref, x, y, 0.5, grad_sample)
    assert (c < 1).any()  # the clipping bites


@pytest.mark.parametrize("grad_sample", [False, True], ids=["clipped", "grad_sample"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kw", OPTIONS, ids=IDS)
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
def test_per_sample_of_every_option_equals_one_backward_per_example(
    n, kw, bias, dtype, grad_sample, weight_gradient_form
):
    # clipped: the sum Σᵢ cᵢ gᵢ made at the end of the pass (the deferred GEMM or correlation); grad_sample: from the
    # kept per-example products
    torch.manual_seed(0)
    conv = (nn.Conv1d if n == 1 else nn.Conv2d)(4, 6, 3, bias=bias, **kw).to(dtype)
    x = torch.randn(5, 4, *(9, 7)[:n], dtype=dtype)
    ref = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(conv(x[:1]).numel(), 3)).to(dtype)
    ours = torchderiv.convert(copy.deepcopy(ref))
    c = check_clipping_against_per_example_autograd(ours, ref, x, torch.randint(0, 3, (5,)), 0.3, grad_sample)
    assert (c < 1).any()


@pytest.mark.parametrize("grad_sample", [False, True], ids=["clipped", "grad_sample"])
@pytest.mark.parametrize("net", ["mnist", "digits"])
def test_per_sample_of_a_whole_cnn_with_pooling(net, grad_sample):
    # Opacus's MNIST example (8×8 stride-2 and 4×4 stride-2 convolutions, max-pooling) on 28×28 images, and the
    # shape of configs/digits_cnn.yaml's (3×3 convolutions, 2×2 pooling) on 8×8: every parameter clipped, in the
    # forms each layer takes by default
    torch.manual_seed(0)
    if net == "mnist":  # the very model experiments/dp_benchmark.py times
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
        import dp_benchmark

        ref = dp_benchmark._cnn("mnist")
        x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    else:
        ref = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
        x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    ref = ref.double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    y = torch.randint(0, 10, (len(x),))
    c = check_clipping_against_per_example_autograd(ours, ref, x, y, 0.05, grad_sample)
    assert (c < 1).any()


@pytest.mark.parametrize("grad_sample", [False, True], ids=["clipped", "grad_sample"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_per_sample_of_a_non_contiguous_input(layout, grad_sample, weight_gradient_form):
    # the patches and the correlation read the input through its own strides; GroupNorm between two convolutions
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 4),
    ).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(2, 3)
    assert not x.is_contiguous()
    c = check_clipping_against_per_example_autograd(ours, ref, x, torch.randint(0, 4, (6,)), 0.5, grad_sample)
    assert (c < 1).any()


@pytest.mark.parametrize(
    "c_in, kernel, stride, size, forms",
    [
        (1, 8, 2, 16, ("products", "sum")),  # many taps, one input channel: both as convolutions
        (16, 4, 2, 16, ("sum",)),  # many taps, 16 channels: the grouped convolution is the slower product
        (8, 3, 2, 16, ("sum",)),  # strided: the sum as the plain weight gradient takes it
        (8, 3, 1, 16, ()),  # few taps at stride 1: GEMMs over the patches for both
        (16, 3, 1, 16, ("sum",)),  # few taps at stride 1 on 16 channels, 14×14 positions: the sum as the plain step's
        (16, 3, 1, 20, ()),  # the same at 18×18 positions, more than 256: GEMMs over the patches
    ],
)
def test_per_sample_takes_each_convolution_form_where_it_was_measured_faster(
    c_in, kernel, stride, size, forms, monkeypatch
):
    # which of the rule's two products a convolution gives as torch's forward convolution (each example's Δᵢᵀ Pᵢ as
    # one grouped convolution, the clipped sum as the correlation of H with c ⊙ Δ) rather than GEMMs over patches
    from torchderiv.functional import _per_sample

    seen = []
    rule = _per_sample.Recorder.dense_rule

    def spy(self, w, b, delta, rows, dim=0):
        seen.append(rows)
        return rule(self, w, b, delta, rows, dim)

    monkeypatch.setattr(_per_sample.Recorder, "dense_rule", spy)
    model = torchderiv.convert(nn.Sequential(nn.Conv2d(c_in, 4, kernel, stride), nn.Flatten()))
    with torchderiv.per_sample(model, max_norm=1.0):
        model(torch.randn(3, c_in, size, size)).square().sum().backward()
    (rows,) = seen
    assert (rows.products is not None, rows.gemm is not None) == ("products" in forms, "sum" in forms)


def test_per_sample_clipped_sum_as_a_convolution_an_example_at_a_time(monkeypatch):
    # a layer in the Gram form (few positions, many weights) takes its clipped sum at the end of the pass as torch's
    # forward convolution of H with c ⊙ Δ, made a few examples at a time (here one): the same clipped gradient
    monkeypatch.setattr(CONV, "_CORRELATION_FLOATS", 1)
    monkeypatch.setattr(CONV, "_summed_by_convolution", lambda kernel, stride, per_in, positions: True)
    monkeypatch.setattr(CONV, "_per_example_by_convolution", lambda kernel, per_in: True)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(8, 32, 3, stride=3), nn.Flatten(), nn.Linear(32 * 16, 3)).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    x, y = torch.randn(5, 8, 12, 12, dtype=torch.float64), torch.randint(0, 3, (5,))
    c = check_clipping_against_per_example_autograd(ours, ref, x, y, 0.1, False)
    assert (c < 1).any()


@pytest.mark.parametrize("norm_form", ["grams", "products"])
def test_per_sample_with_the_gram_form_makes_the_patches_again(weight_gradient_form, norm_form, monkeypatch):
    # a layer with few output positions and many weights takes the Gram form: its patches are not held to the end
    # of the pass but made again from the input then, a few examples at a time (the same clipped gradient). Its
    # norms come from two Grams, or (a cost close to theirs) from each example's product over the patches with their
    # columns in tap order, not kept
    from torchderiv.functional import _per_sample

    monkeypatch.setattr(_per_sample, "_PRODUCT_MACS", 0.0 if norm_form == "grams" else 2.0)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(8, 32, 3, stride=3), nn.Flatten(), nn.Linear(32 * 16, 3)).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    x, y = torch.randn(5, 8, 12, 12, dtype=torch.float64), torch.randint(0, 3, (5,))
    held = []
    keep = _per_sample.Recorder.dense_rule

    def spy(self, *args, **kwargs):
        rule = keep(self, *args, **kwargs)
        held.append((rule.product, rule.input))  # what the rule holds until the end of the pass
        return rule

    _per_sample.Recorder.dense_rule = spy
    try:
        with torchderiv.per_sample(ours, max_norm=0.1, loss_reduction="sum"):
            F.cross_entropy(ours(x), y, reduction="sum").backward()
    finally:
        _per_sample.Recorder.dense_rule = keep
    # the Gram form, holding no product and no patches: they are made again from the input at the end
    assert held and held[0][0] is None and isinstance(held[0][1], _per_sample.MadeRows)
    per = [
        torch.autograd.grad(F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1], reduction="sum"), list(ref.parameters()))
        for i in range(5)
    ]
    norms = torch.stack([torch.sqrt(sum(t.square().sum() for t in g)) for g in per])
    c = (0.1 / (norms + 1e-6)).clamp(max=1)
    for k, p in enumerate(ours.parameters()):
        assert_close(p.grad, sum(c[i] * per[i][k] for i in range(5)), rtol=1e-10, atol=1e-12)


def test_per_sample_with_an_empty_batch():
    # Poisson sampling gives empty batches: no example, every gradient 0
    model = torchderiv.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 3)))
    with torchderiv.per_sample(model, max_norm=1.0, clipped_sum=True) as ps:
        F.cross_entropy(model(torch.randn(0, 1, 8, 8)), torch.randint(0, 3, (0,))).backward()
    assert ps.norms.shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((3, 4, 9, 8), (3, 2), (2, 1), (1, 0), (1, 2)),
        ((2, 3, 11), (3,), (2,), (1,), (2,)),
        ((5, 16, 13, 13), (4, 4), (2, 2), (0, 0), (1, 1)),
    ],
    ids=str,
)
def test_patches_by_tap_are_the_patches_with_their_columns_reordered(shape, kernel, stride, padding, dilation):
    # The per-example Grams take the patches in tap-then-channel order: every row must be the same row of the
    # patches, its columns moved by one permutation shared by all rows (then each Gram PᵢPᵢᵀ is unchanged).
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ordered = CONV.patches(x, kernel, stride, padding, dilation)
        by_tap = CONV.patches(x, kernel, stride, padding, dilation, by_tap=True)
    assert by_tap.shape == ordered.shape
    channels, taps = shape[1], ordered.shape[2] // shape[1]
    column = torch.arange(ordered.shape[2]).reshape(channels, taps).t().reshape(-1)  # (tap, channel) -> (c, tap)
    assert_close(by_tap, ordered[..., column], rtol=0, atol=0)
    assert_close(by_tap @ by_tap.mT, ordered @ ordered.mT)


@pytest.mark.parametrize("limit", ["_CORRELATION_FLOATS", "_KERNEL_FLOATS"])
def test_weight_gradient_in_chunks_of_examples(monkeypatch, weight_gradient_form, limit):
    # the patches (or the convolution's copy of H, or of Δ as its kernel) are made a few examples at a time; the sum
    # over chunks is the whole batch's gradient
    from torchderiv.functional import conv

    monkeypatch.setattr(conv, "_CHUNK_FLOATS", 1)  # one example a chunk
    monkeypatch.setattr(conv, limit, 1)
    x, w, b = _args(2, dict(groups=2), batch=5)
    out, ref = TF.conv2d(x, w, b, groups=2, padding=1), F.conv2d(x, w, b, groups=2, padding=1)
    g = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda w: TF.conv2d(x.detach(), w, None, groups=2), (w,))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "every_other_channel"])
def test_gradients_of_non_contiguous_inputs(layout, weight_gradient_form):
    # the patches are read through a strided view of the input: its own strides, whatever its layout
    torch.manual_seed(0)
    if layout == "channels_last":
        x = torch.randn(5, 4, 9, 11, dtype=torch.float64).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(5, 4, 11, 9, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(5, 8, 9, 11, dtype=torch.float64)[:, ::2]
    x.requires_grad_()
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    for kw in (dict(stride=2, padding=1), dict(dilation=2)):
        g = torch.randn_like(F.conv2d(x, w, **kw))
        for a, c in zip(
            torch.autograd.grad(TF.conv2d(x, w, **kw), (x, w), g), torch.autograd.grad(F.conv2d(x, w, **kw), (x, w), g)
        ):
            assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_per_sample_leaves_the_input_alone_when_its_patches_are_the_input_itself():
    # a 1×1 kernel at stride 1 has the input itself for patches (a view, no copy); in the Gram form the clipped sum
    # at the end of the pass must scale Δ's rows, never the patches in place (that would scale the input)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16 * 4, 3)).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    x, y = torch.randn(6, 16, 2, 2, dtype=torch.float64), torch.randint(0, 3, (6,))
    kept = x.clone()
    c = check_clipping_against_per_example_autograd(ours, ref, x, y, 0.05)
    assert (c < 1).all()  # every example clipped: a write into the input would show
    assert torch.equal(x, kept)

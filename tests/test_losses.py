"""Losses on logits: every torch argument, finite differences, extreme logits, empty batches, bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_parity, full_check, leaf

import torchderiv.functional as TF

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.float64]


def _elementwise_cases(dtype):
    """(id, ours, theirs, inputs) over every argument of the three elementwise losses."""
    x = leaf(torch.randn(4, 5, dtype=dtype))
    y = leaf(torch.randn(4, 5, dtype=dtype))
    p = leaf(torch.rand(4, 5, dtype=dtype))
    w = leaf(torch.rand(4, 5, dtype=dtype))
    w_frozen = torch.rand(4, 5, dtype=dtype)
    pw = torch.rand(5, dtype=dtype) * 2
    cases = []
    for r in REDUCTIONS:
        cases += [
            (
                f"mse-{r}",
                lambda a, b, r=r: TF.mse_loss(a, b, reduction=r),
                lambda a, b, r=r: F.mse_loss(a, b, reduction=r),
                [x, y],
            ),
            (
                f"mse-weight-{r}",
                lambda a, b, c, r=r: TF.mse_loss(a, b, reduction=r, weight=c),
                lambda a, b, c, r=r: F.mse_loss(a, b, reduction=r, weight=c),
                [x, y, w],
            ),
            (
                f"mse-broadcast-{r}",
                lambda a, b, r=r: TF.mse_loss(a, b, reduction=r),
                lambda a, b, r=r: F.mse_loss(a, b, reduction=r),
                [x, leaf(torch.randn(5, dtype=dtype))],
            ),
            (
                f"huber-{r}",
                lambda a, b, r=r: TF.huber_loss(a, b, reduction=r, delta=0.6),
                lambda a, b, r=r: F.huber_loss(a, b, reduction=r, delta=0.6),
                [x, y],
            ),
            (
                f"huber-weight-{r}",
                lambda a, b, c, r=r: TF.huber_loss(a, b, reduction=r, delta=1.3, weight=c),
                lambda a, b, c, r=r: F.huber_loss(a, b, reduction=r, delta=1.3, weight=c),
                [x, y, w],
            ),
            (
                f"bce-{r}",
                lambda a, b, r=r: TF.binary_cross_entropy_with_logits(a, b, reduction=r),
                lambda a, b, r=r: F.binary_cross_entropy_with_logits(a, b, reduction=r),
                [x, p],
            ),
            (
                f"bce-weights-{r}",
                lambda a, b, r=r: TF.binary_cross_entropy_with_logits(a, b, w_frozen[:1], reduction=r, pos_weight=pw),
                lambda a, b, r=r: F.binary_cross_entropy_with_logits(a, b, w_frozen[:1], reduction=r, pos_weight=pw),
                [x, p],
            ),
            (
                f"bce-weight-full-{r}",
                lambda a, b, r=r: TF.binary_cross_entropy_with_logits(a, b, w_frozen, reduction=r),
                lambda a, b, r=r: F.binary_cross_entropy_with_logits(a, b, w_frozen, reduction=r),
                [x, p],
            ),
        ]
    return cases


ELEMENTWISE_IDS = [c[0] for c in _elementwise_cases(torch.float64)]


@pytest.mark.parametrize("index", range(len(ELEMENTWISE_IDS)), ids=ELEMENTWISE_IDS)
def test_elementwise_gradcheck(index):
    _, ours, _, inputs = _elementwise_cases(torch.float64)[index]
    full_check(ours, tuple(inputs))


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(ELEMENTWISE_IDS)), ids=ELEMENTWISE_IDS)
def test_elementwise_matches_torch(index, dtype):
    _, ours, theirs, inputs = _elementwise_cases(dtype)[index]
    check_parity(ours, theirs, inputs, grad_layout="strided")


def _ce_cases(dtype):
    cases = []
    w = torch.rand(5, dtype=dtype) + 0.1
    for r in REDUCTIONS:
        for ls in (0.0, 0.2):
            for weight in (None, w):
                wid = "w" if weight is not None else "now"
                idx = torch.tensor([0, 4, -100, 2, 1, 3])
                cases.append(
                    (f"index-{r}-ls{ls}-{wid}", leaf(torch.randn(6, 5, dtype=dtype)), idx, weight, r, ls, -100)
                )
                cases.append(
                    (
                        f"ignore1-{r}-ls{ls}-{wid}",
                        leaf(torch.randn(6, 5, dtype=dtype)),
                        idx.clamp_min(0),
                        weight,
                        r,
                        ls,
                        1,
                    )
                )
                probs = leaf(torch.randn(6, 5, dtype=dtype).softmax(1))
                cases.append(
                    (f"probs-{r}-ls{ls}-{wid}", leaf(torch.randn(6, 5, dtype=dtype)), probs, weight, r, ls, -100)
                )
                kd = torch.randint(0, 5, (2, 3, 2))
                cases.append(
                    (f"kdim-{r}-ls{ls}-{wid}", leaf(torch.randn(2, 5, 3, 2, dtype=dtype)), kd, weight, r, ls, -100)
                )
                kdp = leaf(torch.randn(2, 5, 3, dtype=dtype).softmax(1))
                cases.append(
                    (f"kdim-probs-{r}-ls{ls}-{wid}", leaf(torch.randn(2, 5, 3, dtype=dtype)), kdp, weight, r, ls, -100)
                )
                cases.append(
                    (
                        f"unbatched-{r}-ls{ls}-{wid}",
                        leaf(torch.randn(5, dtype=dtype)),
                        torch.tensor(3),
                        weight,
                        r,
                        ls,
                        -100,
                    )
                )
                up = leaf(torch.rand(5, dtype=dtype).softmax(0))
                cases.append(
                    (f"unbatched-probs-{r}-ls{ls}-{wid}", leaf(torch.randn(5, dtype=dtype)), up, weight, r, ls, -100)
                )
    return cases


CE_IDS = [c[0] for c in _ce_cases(torch.float64)]


def _ce(fn):
    def call(x, t, w, r, ls, ii):
        return fn(x, t, weight=w, reduction=r, label_smoothing=ls, ignore_index=ii)

    return call


@pytest.mark.parametrize("index", range(len(CE_IDS)), ids=CE_IDS)
def test_cross_entropy_gradcheck(index):
    _, x, t, w, r, ls, ii = _ce_cases(torch.float64)[index]
    if t.is_floating_point():
        full_check(lambda x, t: _ce(TF.cross_entropy)(x, t, w, r, ls, ii), (x, t))
    else:
        full_check(lambda x: _ce(TF.cross_entropy)(x, t, w, r, ls, ii), (x,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(CE_IDS)), ids=CE_IDS)
def test_cross_entropy_matches_torch(index, dtype):
    _, x, t, w, r, ls, ii = _ce_cases(dtype)[index]
    check_parity(_ce(TF.cross_entropy), _ce(F.cross_entropy), [x, t, w, r, ls, ii], grad_layout="permuted")


def test_cross_entropy_byte_targets():
    x = leaf(torch.randn(4, 3))
    t = torch.tensor([0, 2, 1, 1], dtype=torch.uint8)
    check_parity(TF.cross_entropy, F.cross_entropy, [x, t])


EXTREME = 1e4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(dtype):
    """Logits of ±1e4 give finite losses and gradients equal to torch's (log-sum-exp, logsigmoid)."""
    z = leaf(torch.tensor([[EXTREME, -EXTREME, 0.0], [-EXTREME, EXTREME, 1.0]], dtype=dtype))
    cases = [
        (TF.cross_entropy, F.cross_entropy, [z, torch.tensor([1, 1])]),
        (TF.cross_entropy, F.cross_entropy, [z, leaf(torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=dtype))]),
        (
            lambda a, b: TF.cross_entropy(a, b, label_smoothing=0.1),
            lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1),
            [z, torch.tensor([0, 2])],
        ),
        (
            TF.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            [z, leaf(torch.rand(2, 3, dtype=dtype))],
        ),
        (
            lambda a, b: TF.binary_cross_entropy_with_logits(a, b, pos_weight=torch.full((3,), 3.0, dtype=dtype)),
            lambda a, b: F.binary_cross_entropy_with_logits(a, b, pos_weight=torch.full((3,), 3.0, dtype=dtype)),
            [z, leaf(torch.rand(2, 3, dtype=dtype))],
        ),
    ]
    for ours, theirs, inputs in cases:
        out = check_parity(ours, theirs, inputs)
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(ours(*inputs), inputs[0])
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batches_match_torch(reduction):
    """N = 0: torch's 'mean' is 0/0 = NaN, 'sum' is 0, 'none' is empty; gradients are empty."""
    x = leaf(torch.randn(0, 4))
    cases = [
        (TF.cross_entropy, F.cross_entropy, [x, torch.zeros(0, dtype=torch.long)]),
        (TF.cross_entropy, F.cross_entropy, [x, leaf(torch.rand(0, 4))]),
        (TF.mse_loss, F.mse_loss, [x, leaf(torch.randn(0, 4))]),
        (TF.huber_loss, F.huber_loss, [x, leaf(torch.randn(0, 4))]),
        (TF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, leaf(torch.rand(0, 4))]),
    ]
    for ours, theirs, inputs in cases:
        check_parity(
            lambda *a, ours=ours: ours(*a, reduction=reduction),
            lambda *a, theirs=theirs: theirs(*a, reduction=reduction),
            inputs,
        )


def test_all_ignored_mean_is_nan_like_torch():
    x = leaf(torch.randn(3, 4))
    t = torch.full((3,), -100)
    check_parity(TF.cross_entropy, F.cross_entropy, [x, t])
    # forward mode: the tangent of 0/0 is NaN too (backward's gradient is 0, as torch's)
    v = torch.randn(3, 4)
    ours = torch.func.jvp(lambda a: TF.cross_entropy(a, t), (x.detach(),), (v,))
    theirs = torch.func.jvp(lambda a: F.cross_entropy(a, t), (x.detach(),), (v,))
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("legacy", [dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)])
def test_legacy_reduction_arguments(legacy):
    x, y = leaf(torch.randn(3, 4)), torch.randn(3, 4)
    check_parity(lambda a, b: TF.mse_loss(a, b, **legacy), lambda a, b: F.mse_loss(a, b, **legacy), [x, y])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: TF.mse_loss(torch.randn(3), torch.randn(3), reduction="avg"),
            ValueError,
            "avg is not a valid value for reduction",
        ),
        (
            lambda: TF.mse_loss(torch.randn(3), torch.randn(4)),
            RuntimeError,
            r"broadcastable to the input's shape \(3,\), got shape \(4,\)",
        ),
        (
            lambda: TF.mse_loss(torch.randn(3), torch.randn(3), weight=torch.rand(2)),
            ValueError,
            r"expected weight of shape \(3,\), got \(2,\)",
        ),
        (lambda: TF.huber_loss(torch.randn(3), torch.randn(3), delta=0), RuntimeError, "non-positive values for delta"),
        (
            lambda: TF.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(2)),
            ValueError,
            r"Target size \(torch.Size\(\[2\]\)\) must be the same as input size",
        ),
        (
            lambda: TF.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3), pos_weight=torch.rand(2)),
            RuntimeError,
            r"expected pos_weight broadcastable",
        ),
        (
            lambda: TF.binary_cross_entropy_with_logits(
                torch.randn(3), torch.rand(3), torch.rand(3, requires_grad=True)
            ),
            RuntimeError,
            "not differentiable with respect to weight",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1])),
            ValueError,  # torch's type for a batch-size mismatch
            r"Expected input batch_size \(3\) to match target batch_size \(2\)\. cross_entropy: input of shape",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2], dtype=torch.int32)),
            RuntimeError,
            "expected target dtype to be Long or Byte, but got torch.int32",
        ),
        (
            # float class labels: torch's dtype error, and what each target form needs
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0])),
            RuntimeError,
            r"expected target dtype to be Long or Byte, but got torch.float32: class indices of shape \(3,\) must be "
            r"integers \(target.long\(\)\); class probabilities have the input's shape \(3, 4\)",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.rand(3, 5)),
            RuntimeError,
            r"class-probability target of the input's shape \(3, 4\), got shape \(3, 5\)",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.rand(3, 4), ignore_index=1),
            RuntimeError,
            "ignore_index is not supported for floating point target",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=torch.rand(3)),
            RuntimeError,
            r"expected weight of shape \(4,\) \(one per class\), got shape \(3,\)",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=1.5),
            RuntimeError,  # torch's type
            r"label_smoothing must be between 0.0 and 1.0, got 1.5",
        ),
        (
            lambda: TF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 7])),
            (RuntimeError, IndexError),
            "out of bounds",
        ),
        (lambda: TF.cross_entropy(torch.tensor(1.0), torch.tensor(0)), RuntimeError, "got a 0-D tensor"),
    ],
    ids=[
        "reduction",
        "mse-shape",
        "mse-weight",
        "huber-delta",
        "bce-shape",
        "bce-pos-weight",
        "bce-weight-grad",
        "ce-target-shape",
        "ce-target-dtype",
        "ce-float-labels",
        "ce-probs-shape",
        "ce-probs-ignore",
        "ce-weight",
        "ce-smoothing",
        "ce-out-of-range",
        "ce-0d",
    ],
)
def test_bad_input_messages(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("target", [[0, 4, 2, 1], [0, -100, 2, 1]], ids=["none-ignored", "ignored"])
def test_cross_entropy_backward_twice_with_retain_graph(target):
    """Both backward paths (no row ignored, and the general one) leave the saved logits untouched."""
    x = leaf(torch.randn(4, 5))
    t = torch.tensor(target)
    loss = TF.cross_entropy(x, t)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    (ref,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, ref)

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

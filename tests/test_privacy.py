"""Private training: torchderiv's clipping with Opacus's optimizer equals Opacus's own make_private."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import torchderiv

opacus = pytest.importorskip("opacus")
from opacus import PrivacyEngine  # noqa: E402
from opacus.optimizers import DPOptimizerFastGradientClipping  # noqa: E402

EXPECTED = 8  # the loader's batch size: Opacus divides the clipped sum by it for "mean"


def _models():
    torch.manual_seed(0)
    ours = torchderiv.nn.MLP([6, 9, 4], "tanh")
    ref = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    ref.load_state_dict({k.replace("layers.1", "2").replace("layers.0", "0"): v for k, v in ours.state_dict().items()})
    return ours, ref


def _opacus_step(ref, mode, reduction, x, y, max_norm):
    data = DataLoader(TensorDataset(torch.randn(32, 6), torch.randint(0, 4, (32,))), batch_size=EXPECTED)
    engine = PrivacyEngine()
    kw = dict(noise_multiplier=0.0, max_grad_norm=max_norm, poisson_sampling=False, loss_reduction=reduction)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    if mode == "ghost":
        criterion = nn.CrossEntropyLoss(reduction=reduction)
        model, opt, criterion, _ = engine.make_private(
            module=ref, optimizer=opt, data_loader=data, criterion=criterion, grad_sample_mode="ghost", **kw
        )
        loss = criterion(model(x), y)
    else:
        model, opt, _ = engine.make_private(module=ref, optimizer=opt, data_loader=data, grad_sample_mode="hooks", **kw)
        loss = F.cross_entropy(model(x), y, reduction=reduction)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in ref.parameters()]


def _our_step(ours, reduction, x, y, max_norm):
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(ours.parameters(), lr=0.5),
        noise_multiplier=0.0,
        max_grad_norm=max_norm,
        expected_batch_size=EXPECTED,
        loss_reduction=reduction,
    )
    opt.zero_grad()
    with torchderiv.per_sample(ours, max_norm=max_norm, loss_reduction=reduction, clipped_sum=True):
        F.cross_entropy(ours(x), y, reduction=reduction).backward()
    opt.step()
    return [p.detach().clone() for p in ours.parameters()]


@pytest.mark.parametrize("batch", [EXPECTED, 5], ids=["expected-size", "smaller-batch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_one_step_equals_opacus_make_private(mode, reduction, batch):
    # σ = 0 and the same batch: the same parameters after the step, to fp32 round-off. A batch smaller than
    # the expected size checks the division by the expected, not the actual, batch size.
    ours, ref = _models()
    x, y = torch.randn(batch, 6) * 3, torch.randint(0, 4, (batch,))
    max_norm = 0.5
    theirs = _opacus_step(ref, mode, reduction, x, y, max_norm)
    mine = _our_step(ours, reduction, x, y, max_norm)
    moved = False
    for a, b, p0 in zip(mine, theirs, _models()[0].parameters()):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = moved or not torch.equal(a, p0.detach())
    assert moved  # the step did something


def test_clipped_sum_is_batch_size_times_the_clipped_mean():
    ours, _ = _models()
    twin = copy.deepcopy(ours)
    x, y = torch.randn(7, 6) * 3, torch.randint(0, 4, (7,))
    with torchderiv.per_sample(ours, max_norm=0.3):
        F.cross_entropy(ours(x), y).backward()
    with torchderiv.per_sample(twin, max_norm=0.3, clipped_sum=True):
        F.cross_entropy(twin(x), y).backward()
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert_close(q.grad, 7 * p.grad, rtol=1e-5, atol=1e-7)


def test_recipe_script_trains_privately():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from dp_loop import train

    acc, eps = train(sigma=1.0, epochs=3, lr=0.5)
    assert 0 < eps < 10 and acc > 0.5

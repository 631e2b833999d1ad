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


# --- Lightning: MLPModule(privacy=...) ----------------------------------------------------------------------

import lightning as L  # noqa: E402

from torchderiv.lightning import DigitsDataModule, MLPModule, Privacy, StudentDataModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path, epochs, ckpt_path=None, dm=None, privacy=None, **trainer_kw):
    L.seed_everything(0)
    model = MLPModule(
        [64, 16, 10],
        optimizer="sgd",
        lr=0.5,
        privacy=privacy or Privacy(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5),
    )
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, filename="{epoch}")
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **trainer_kw,
    )
    trainer.fit(model, dm or DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return trainer, model


def test_private_fit_logs_epsilon_with_poisson_batches(tmp_path):
    from opacus.data_loader import DPDataLoader

    trainer, model = _fit(tmp_path, 2)
    assert isinstance(trainer.train_dataloader, DPDataLoader)
    eps = float(trainer.callback_metrics["privacy/epsilon"])
    assert 0 < eps == pytest.approx(model._private.epsilon())
    assert len(model._private.accountant.history) > 0
    assert float(trainer.callback_metrics["privacy/sigma"]) == pytest.approx(1.2)


def test_resume_restores_the_accountant(tmp_path):
    straight, _ = _fit(tmp_path / "a", 3)
    _fit(tmp_path / "b", 2)
    resumed, _ = _fit(tmp_path / "b", 3, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert float(resumed.callback_metrics["privacy/epsilon"]) == pytest.approx(
        float(straight.callback_metrics["privacy/epsilon"]), rel=1e-9
    )


def test_privacy_needs_exactly_one_of_sigma_and_epsilon():
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        Privacy(noise_multiplier=1.0, target_epsilon=2.0)


def test_target_epsilon_spent_over_max_epochs(tmp_path):
    trainer, model = _fit(tmp_path, 2, privacy=Privacy(target_epsilon=2.0, delta=1e-5))
    assert float(trainer.callback_metrics["privacy/epsilon"]) == pytest.approx(2.0, abs=0.05)


def test_empty_poisson_batches_train(tmp_path):
    # 4 examples a batch expected out of ~300: many Poisson batches are small, some empty
    dm = StudentDataModule(n_samples=40, batch_size=1)
    L.seed_everything(0)
    model = MLPModule([4, 3, 1], task="binary", optimizer="sgd", lr=0.1, privacy=Privacy(noise_multiplier=1.0))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(trainer.callback_metrics["privacy/epsilon"]) > 0


def test_privacy_refuses_what_breaks_the_guarantee():
    with pytest.raises(ValueError, match="privacy needs impl='torchderiv'"):
        MLPModule([4, 2], impl="autograd", privacy=Privacy(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        Privacy(noise_multiplier=1.0, max_grad_norm=0)
    model = MLPModule([64, 10], privacy=Privacy(noise_multiplier=1.0))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    with pytest.raises(RuntimeError, match="privacy: needs a data module"):
        trainer.fit(model, train_dataloaders=loader)


@pytest.mark.slow
def test_ddp_with_privacy_is_refused(tmp_path):
    import subprocess

    script = Path(sys.executable).with_name("torchderiv")
    out = subprocess.run(
        [
            str(script),
            "fit",
            "--config",
            str(ROOT / "configs/digits_dp.yaml"),
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.max_epochs=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "privacy: training on 2 processes is not supported" in out.stdout + out.stderr


@pytest.mark.slow
def test_digits_dp_config_meets_its_targets(tmp_path, monkeypatch):
    # The documented job: epsilon <= 4 at delta = 1e-5 and test accuracy >= 0.85 (train.main: fit, then test
    # the best checkpoint).
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    results = main([str(ROOT / "configs/digits_dp.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert results["test/acc"] >= 0.85
    assert 0 < results["privacy/epsilon"] <= 4.0

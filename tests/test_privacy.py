"""Private training: torchderiv's clipping with Opacus's optimizer equals Opacus's own make_private."""

import contextlib
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


# --- torchderiv.privacy.private_optimizer: the checks before the noise --------------------------------------

from torchderiv.privacy import private_optimizer  # noqa: E402


def _private(model, lr=0.5, **kw):
    kw = dict(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=EXPECTED) | kw
    return private_optimizer(model, torch.optim.SGD(model.parameters(), lr=lr), **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_private_optimizer_with_its_clipping_equals_opacus_make_private(reduction):
    ours, ref = _models()
    x, y = torch.randn(5, 6) * 3, torch.randint(0, 4, (5,))
    theirs = _opacus_step(ref, "hooks", reduction, x, y, 0.5)
    opt = _private(ours, loss_reduction=reduction)
    opt.zero_grad()
    with opt.clipping():
        F.cross_entropy(ours(x), y, reduction=reduction).backward()
    opt.step()
    for a, b in zip(ours.parameters(), theirs):
        assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


def test_private_optimizer_passes_batch_first_to_its_clipping():
    # sequence-first inputs (T, B, n): the optimizer's clipping reads the examples along dim 1, as told
    torch.manual_seed(0)
    ours = torchderiv.nn.MLP([6, 8, 4]).double()
    twin = copy.deepcopy(ours)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    opt = _private(ours, batch_first=False)
    opt.zero_grad()
    with opt.clipping() as ps:
        ours(x).square().sum().backward()
    assert ps.batch_first is False and ps.norms.shape == (5,)
    with torchderiv.per_sample(twin, max_norm=0.5, clipped_sum=True, batch_first=False) as ref:
        twin(x).square().sum().backward()
    assert_close(ps.norms, ref.norms, rtol=1e-12, atol=0)
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    assert _private(ours).clipping().batch_first is True  # per_sample's default, as Opacus's


def test_private_optimizer_with_a_grad_scaler_equals_opacus_make_private():
    # fp16 recipe: the clipping told the scaler's S clips the unscaled examples; scaler.step unscales .grad,
    # then the optimizer adds the noise and steps (and the accountant counts the step)
    ours, ref = _models()
    x, y = torch.randn(5, 6) * 3, torch.randint(0, 4, (5,))
    theirs = _opacus_step(ref, "hooks", "mean", x, y, 0.5)
    opt = _private(ours)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.zero_grad()
    with opt.clipping(loss_scale=scaler):
        scaler.scale(F.cross_entropy(ours(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**8
    for a, b in zip(ours.parameters(), theirs):
        assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


def test_private_optimizer_with_opacus_batch_memory_manager():
    # Opacus's virtual steps: each logical batch of 16 runs as physical batches of at most 5 (the optimizer skips
    # the step until the last, summing the clipped sums); the same parameters as one clipped step per batch of 16
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    ours, _ = _models()
    twin = copy.deepcopy(ours)
    loader = DataLoader(TensorDataset(torch.randn(64, 6) * 3, torch.randint(0, 4, (64,))), batch_size=16)
    physical = 0
    for model, batches in ((ours, 5), (twin, None)):
        opt = _private(model, expected_batch_size=16)
        manager = (
            BatchMemoryManager(data_loader=loader, max_physical_batch_size=batches, optimizer=opt)
            if batches
            else contextlib.nullcontext(loader)
        )
        with manager as data:
            for x, y in data:
                opt.zero_grad()
                with opt.clipping():
                    F.cross_entropy(model(x), y).backward()
                opt.step()
                physical += batches is not None
    assert physical == 16  # 4 batches of 16 in physical batches of 5, 5, 5, 1
    moved = False
    for a, b, p0 in zip(ours.parameters(), twin.parameters(), _models()[0].parameters()):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = moved or not torch.equal(a, p0)
    assert moved


def test_private_optimizer_must_be_over_the_models_parameters():
    ours, _ = _models()
    with pytest.raises(ValueError, match=r"does not hold the model's trainable parameter\(s\) layers.1.weight"):
        private_optimizer(
            ours,
            torch.optim.SGD([ours.layers[0].weight, ours.layers[0].bias, ours.layers[1].bias], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=8,
        )
    with pytest.raises(ValueError, match=r"holds a tensor of shape \(3,\) that is not a trainable parameter"):
        private_optimizer(
            ours,
            torch.optim.SGD([*ours.parameters(), torch.zeros(3, requires_grad=True)], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=8,
        )
    ours.layers[1].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="parameter layers.1.bias of the model, which is frozen"):
        _private(ours)
    with pytest.raises(RuntimeError, match=r"parameters 0\.weight, 0\.bias of Linear: not computed"):
        _private(nn.Sequential(nn.Linear(3, 2)))


def _backward(model, x, y, **ps):
    with torchderiv.per_sample(model, **ps):
        F.cross_entropy(model(x), y, reduction=ps.get("loss_reduction", "mean")).backward()


@pytest.mark.parametrize(
    "how, message",
    [
        ("unclipped", "was not made by a clipped backward"),
        ("norms-only", "was not made by a clipped backward"),
        ("other-max-norm", r"clipped with max_norm=1.0, .* noise for max_grad_norm=0.5"),
        ("other-reduction", r"loss_reduction='sum', .* loss_reduction='mean'"),
        ("not-clipped-sum", "clipped_sum=False"),
        ("changed-after", "was not made by a clipped backward \\(or was changed after it\\)"),
        ("then-unclipped", "was not made by a clipped backward"),
    ],
)
def test_private_optimizer_refuses_a_gradient_its_noise_does_not_cover(how, message):
    ours, _ = _models()
    opt = _private(ours)
    before = [p.detach().clone() for p in ours.parameters()]
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    opt.zero_grad()
    if how == "unclipped":
        F.cross_entropy(ours(x), y).backward()
    else:
        ps = dict(max_norm=0.5, clipped_sum=True)
        ps |= {
            "norms-only": dict(max_norm=None),
            "other-max-norm": dict(max_norm=1.0),
            "other-reduction": dict(loss_reduction="sum"),
            "not-clipped-sum": dict(clipped_sum=False),
        }.get(how, {})
        _backward(ours, x, y, **ps)
        if how == "changed-after":
            ours.layers[0].weight.grad.mul_(10)
        if how == "then-unclipped":
            F.cross_entropy(ours(x), y).backward()
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    for p, p0 in zip(ours.parameters(), before):
        assert torch.equal(p.detach(), p0)  # refused before the update


def test_recipe_script_trains_privately():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from dp_loop import train

    acc, eps = train(sigma=1.0, epochs=3, lr=0.5)
    assert 0 < eps < 10 and acc > 0.5


# --- Lightning: MLPModule(privacy=...) ----------------------------------------------------------------------

import lightning as L  # noqa: E402

from torchderiv.lightning import DigitsDataModule, MLPModule, Privacy, StudentDataModule  # noqa: E402
from torchderiv.privacy import PrivateTraining  # noqa: E402

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
    trainer.fit(model, dm or DigitsDataModule(batch_size=64, preprocessing="fixed"), ckpt_path=ckpt_path)
    return trainer, model


def test_private_fit_logs_epsilon_with_poisson_batches(tmp_path):
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    trainer, model = _fit(tmp_path, 2)
    assert isinstance(trainer.train_dataloader.dp_loader, DPDataLoader)
    assert isinstance(trainer.train_dataloader._loader.batch_sampler.batch_sampler, UniformWithReplacementSampler)
    eps = float(trainer.callback_metrics["privacy/epsilon"])
    assert 0 < eps == pytest.approx(model._private.epsilon())
    assert len(model._private.accountant.history) > 0
    assert float(trainer.callback_metrics["privacy/sigma"]) == pytest.approx(1.2)


def test_resume_restores_the_accountant_and_the_random_streams(tmp_path):
    straight, model_a = _fit(tmp_path / "a", 3)
    _, model_b2 = _fit(tmp_path / "b", 2)
    resumed, model_b = _fit(tmp_path / "b", 3, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert float(resumed.callback_metrics["privacy/epsilon"]) == pytest.approx(
        float(straight.callback_metrics["privacy/epsilon"]), rel=1e-9
    )
    # The sampling and noise streams continue where they stopped: the resumed run draws the batches and the
    # noise of epoch 3, not those of epoch 1 again (repeated noise would not be accounted for), so it ends
    # where the uninterrupted run does.
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(model_b2.net.layers[0].weight, model_b.net.layers[0].weight)


def test_a_second_fit_with_the_same_data_module_samples_its_training_set_again(tmp_path):
    dm = DigitsDataModule(batch_size=64, preprocessing="fixed")
    first, _ = _fit(tmp_path / "a", 1, dm=dm)
    second, model = _fit(tmp_path / "b", 1, dm=dm)
    # the Poisson loader is built over the data module's own training loader, not over the first fit's
    assert second.train_dataloader.dataset is dm.splits["train"]
    assert len(second.train_dataloader) == len(first.train_dataloader)
    assert float(second.callback_metrics["privacy/epsilon"]) == pytest.approx(
        float(first.callback_metrics["privacy/epsilon"])
    )


def test_epsilon_is_the_accountants_own():
    # PrivateTraining keeps each (σ, q)'s one-step RDP curve; ε must still be exactly the accountant's
    from torchderiv.privacy import PrivateTraining

    for accountant in ("rdp", "prv"):
        run = PrivateTraining(Privacy(noise_multiplier=1.3, delta=1e-5, accountant=accountant))
        assert run.epsilon() == 0.0
        for sigma, q, steps in [(1.3, 0.05, 40), (0.9, 0.02, 7), (1.3, 0.05, 3)]:
            for _ in range(steps):
                run.accountant.step(noise_multiplier=sigma, sample_rate=q)
            assert run.epsilon() == float(run.accountant.get_epsilon(delta=1e-5)), accountant


def test_privacy_needs_exactly_one_of_sigma_and_epsilon():
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        Privacy(noise_multiplier=1.0, target_epsilon=2.0)


def test_target_epsilon_spent_over_max_epochs(tmp_path):
    trainer, model = _fit(tmp_path, 2, privacy=Privacy(target_epsilon=2.0, delta=1e-5))
    assert float(trainer.callback_metrics["privacy/epsilon"]) == pytest.approx(2.0, abs=0.05)


def test_empty_poisson_batches_train(tmp_path):
    # 4 examples a batch expected out of ~300: many Poisson batches are small, some empty
    dm = StudentDataModule(n_samples=40, batch_size=1, preprocessing="fixed")
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


def test_private_fit_under_fp16_loss_scaling_equals_the_unscaled_run(tmp_path):
    # precision="16-mixed" scales the loss by its GradScaler's S before the backward and unscales .grad in
    # opt.step(). Here the scaling alone (autocast left off, so the arithmetic is float32 in both runs and S a
    # power of two): the run must end where the unscaled one does. Clipped at S‖gᵢ‖ instead (the scale not
    # passed to per_sample), every example would count ~2¹⁰ times too little.
    from lightning.pytorch.plugins.precision import MixedPrecision

    class LossScalingOnly(MixedPrecision):
        def autocast_context_manager(self):
            return contextlib.nullcontext()

    _, plain = _fit(tmp_path / "a", 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, scaled = _fit(tmp_path / "b", 1, plugins=[LossScalingOnly("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() == 2.0**10  # no step was skipped
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert_close(a, b, rtol=0, atol=1e-5)


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
def test_ddp_private_run_equals_the_single_process_run(tmp_path):
    # Two processes (DDP, gloo on CPU) each take their share of the same Poisson batches; Opacus's distributed
    # optimizer all-reduces the clipped sums and adds the noise on rank 0 only. With the same seed the run
    # must end where the one-process run ends, noise included: each step's noise moves a weight by about
    # lr·σ·C / E = 0.5 · 1 · 1 / 62 ≈ 8e-3, so noise added on both ranks (or on none), a share counted twice or a
    # divisor off by the world size would each show far above the 1e-6 round-off allowed.
    import subprocess

    script = Path(sys.executable).with_name("torchderiv")
    runs = {}
    for devices in (1, 2):
        strategy = ["--trainer.strategy=ddp"] if devices == 2 else []
        out = subprocess.run(
            [
                str(script),
                "fit",
                "--config",
                str(ROOT / "configs/digits_dp.yaml"),
                *strategy,
                f"--trainer.devices={devices}",
                "--trainer.max_epochs=2",
                "--model.privacy.target_epsilon=null",
                "--model.privacy.noise_multiplier=1.0",
                f"--trainer.logger.init_args.save_dir={tmp_path / str(devices)}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        (ckpt,) = (tmp_path / str(devices)).rglob("last.ckpt")
        runs[devices] = torch.load(ckpt, weights_only=True)
    one, two = runs[1], runs[2]
    assert set(one["state_dict"]) == set(two["state_dict"])
    for name, value in one["state_dict"].items():
        assert_close(two["state_dict"][name], value, rtol=0, atol=1e-6)
    assert one["privacy"]["accountant"]["history"] == two["privacy"]["accountant"]["history"]


@pytest.mark.slow
def test_digits_dp_config_meets_its_targets(tmp_path, monkeypatch):
    # The documented job: epsilon <= 4 at delta = 1e-5 and test accuracy >= 0.85 (train.main: fit, then test
    # the best checkpoint).
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    results = main([str(ROOT / "configs/digits_dp.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert results["test/acc"] >= 0.85
    assert 0 < results["privacy/epsilon"] <= 4.0


def test_digits_transformer_dp_config_meets_its_targets(tmp_path, monkeypatch):
    # The private transformer: every parameter clipped per example; epsilon <= 4 at delta = 1e-5, test acc >= 0.85.
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    results = main(
        [str(ROOT / "configs/digits_transformer_dp.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    assert results["test/acc"] >= 0.85
    assert 0 < results["privacy/epsilon"] <= 4.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_private_step_noise_on_the_device():
    # The noise generator lives on the parameters' device (a CPU generator cannot draw CUDA noise), and σ = 0
    # gives Opacus's own step, as on the CPU.
    from torchderiv.privacy import PrivateTraining

    ours, ref = _models()
    x, y = torch.randn(5, 6) * 3, torch.randint(0, 4, (5,))
    theirs = _opacus_step(ref, "hooks", "mean", x, y, 0.5)
    ours.cuda()
    opt = _private(ours)
    opt.zero_grad()
    with opt.clipping():
        F.cross_entropy(ours(x.cuda()), y.cuda()).backward()
    opt.step()
    for a, b in zip(ours.parameters(), theirs):
        assert_close(a.detach().cpu(), b, rtol=1e-5, atol=1e-6)
    run = PrivateTraining(Privacy(noise_multiplier=1.0))
    run.sample_rate, run.expected_batch_size = 0.1, 8.0
    dp = run.optimizer(ours, torch.optim.SGD(ours.parameters(), lr=0.1))
    assert run.noise_generator.device.type == "cuda"
    dp.zero_grad()
    with dp.clipping():
        F.cross_entropy(ours(x.cuda()), y.cuda()).backward()
    dp.step()
    assert all(torch.isfinite(p).all() for p in ours.parameters())


# --- what a private fit states at its end, and the ε of what is released ----------------------------------------


def test_fit_end_states_the_privacy_spent_in_the_log_hparams_and_every_kept_checkpoint(tmp_path):
    L.seed_everything(0)
    model = MLPModule([64, 16, 10], optimizer="sgd", lr=0.5, privacy=Privacy(noise_multiplier=1.2, delta=1e-5))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, filename="{epoch}")
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=logger, callbacks=[ckpt], enable_progress_bar=False, deterministic=True
    )
    trainer.fit(model, DigitsDataModule(batch_size=64, preprocessing="fixed"))
    run_epsilon = model._private.epsilon()
    import yaml

    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["privacy"]["noise_multiplier"] == 1.2  # the configured block
    spent = hparams["privacy_spent"]
    assert spent["epsilon"] == pytest.approx(run_epsilon)
    assert spent["steps"] == trainer.global_step and spent["steps"] > 0
    assert spent["delta"] == 1e-5 and spent["noise_multiplier"] == 1.2 and spent["max_grad_norm"] == 1.0
    assert spent["accountant"] == "rdp" and spent["sampling"] == "poisson"
    assert spent["sample_rate"] == pytest.approx(model._private.sample_rate)
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) == 4  # epoch=0,1,2 and last
    for path in files:
        saved = torch.load(path, weights_only=True)
        assert saved["privacy_release"] == spent  # the whole run's ε, whichever epoch the file holds


def test_testing_a_checkpoint_chosen_by_validation_reports_the_whole_runs_epsilon(tmp_path, caplog):
    import logging

    trainer, model = _fit(tmp_path, 3)
    run_epsilon = model._private.epsilon()
    first = tmp_path / "epoch=0.ckpt"
    epoch0_epsilon = PrivateTraining(model.privacy)
    epoch0_epsilon.load_state_dict(torch.load(first, weights_only=True)["privacy"])
    assert epoch0_epsilon.epsilon() < run_epsilon  # what this test would have printed before: the epoch's ε
    with caplog.at_level(logging.INFO):
        results = trainer.test(
            model, DigitsDataModule(batch_size=64, preprocessing="fixed"), ckpt_path=str(first), verbose=False
        )[0]
    assert results["privacy/epsilon"] == pytest.approx(run_epsilon, rel=1e-6)
    assert "the whole fit that kept this checkpoint" in caplog.text

    # a checkpoint from a fit that did not finish carries no release: its own steps' ε, said to be a lower figure
    saved = torch.load(first, weights_only=True)
    del saved["privacy_release"]
    torch.save(saved, tmp_path / "unfinished.ckpt")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        results = trainer.test(
            model, DigitsDataModule(batch_size=64, preprocessing="fixed"), ckpt_path=str(tmp_path / "unfinished.ckpt")
        )[0]
    assert results["privacy/epsilon"] == pytest.approx(epoch0_epsilon.epsilon(), rel=1e-6)
    assert "did not finish" in caplog.text


def test_training_batch_metrics_under_privacy_are_named_non_private(tmp_path):
    trainer, _ = _fit(tmp_path, 1)
    assert "train_nonprivate/acc" in trainer.callback_metrics and "train_nonprivate/loss" in trainer.callback_metrics
    assert not any(k.startswith("train/") for k in trainer.callback_metrics)


def test_trainer_options_a_private_run_cannot_take_are_refused_in_privacy_terms(tmp_path):
    with pytest.raises(ValueError, match="accumulate_grad_batches=2.*gradient_clip_val=0.5.*max_grad_norm"):
        _fit(tmp_path, 1, accumulate_grad_batches=2, gradient_clip_val=0.5)
    with pytest.raises(ValueError, match="privacy: not supported .*gradient_clip_val=1.0"):
        _fit(tmp_path, 1, gradient_clip_val=1.0)


# --- private-safe data: no statistics of the training split -------------------------------------------------------


def test_private_fit_refuses_features_standardised_with_training_statistics(tmp_path):
    with pytest.raises(ValueError, match=r"standardises its features .*preprocessing='fixed'"):
        _fit(tmp_path, 1, dm=DigitsDataModule(batch_size=64))


@pytest.mark.parametrize("cls", [DigitsDataModule, StudentDataModule, "breast_cancer"])
def test_fixed_preprocessing_depends_on_no_data(cls):
    # A statistic of the training split changes when the split does; a fixed scaling gives every example the same
    # features whichever examples it is trained with.
    if cls == "breast_cancer":
        from torchderiv.lightning import BreastCancerDataModule as cls

    def features_by_example(seed, preprocessing):
        dm = cls(seed=seed, preprocessing=preprocessing)
        dm.setup()
        rows = torch.cat([dm.splits[s].tensors[0] for s in ("train", "val", "test")])
        return sorted(tuple(r.tolist()) for r in rows)

    assert features_by_example(0, "fixed") == features_by_example(1, "fixed")
    assert features_by_example(0, "standardise") != features_by_example(1, "standardise")
    assert not cls(preprocessing="fixed").uses_training_statistics and cls().uses_training_statistics
    if cls is DigitsDataModule:
        dm = DigitsDataModule(preprocessing="fixed")
        dm.setup()
        x = dm.splits["train"].tensors[0]
        assert x.min() == 0 and x.max() == 1 and torch.equal(x * 16, (x * 16).round())


def test_digits_cnn_dp_config_meets_its_targets(tmp_path, monkeypatch):
    # The private CNN: both convolutions and both dense layers clipped per example; epsilon <= 4, test acc >= 0.90.
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    results = main([str(ROOT / "configs/digits_cnn_dp.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert results["test/acc"] >= 0.90
    assert 0 < results["privacy/epsilon"] <= 4.0

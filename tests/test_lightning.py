"""Lightning: data modules, MLPModule on torchderiv and on autograd, resume, the CLI, DDP."""

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from torchderiv.cli import CLI
from torchderiv.lightning import (
    BreastCancerDataModule,
    DigitsDataModule,
    EpochShuffleSampler,
    MLPModule,
    StudentDataModule,
)
from torchderiv.lightning.data import generate_students
from torchderiv.lightning.plot import plot_curves, read_metrics

ROOT = Path(__file__).resolve().parent.parent


def _trainer(tmp_path, **kw):
    defaults = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


# --- data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dm_cls, n_features, target_dtype",
    [
        (DigitsDataModule, 64, torch.long),
        (BreastCancerDataModule, 30, torch.float32),
        (StudentDataModule, 4, torch.float32),
    ],
)
def test_data_modules_split_and_standardise(dm_cls, n_features, target_dtype):
    dm = dm_cls(batch_size=16, seed=3)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    total = sum(sizes.values())
    assert sizes["test"] == round(total * 0.15) and sizes["val"] == round(total * 0.15)
    x_train, y_train = dm.splits["train"].tensors
    assert x_train.shape[1] == n_features and y_train.dtype == target_dtype
    assert torch.isfinite(x_train).all()
    assert x_train.mean(0).abs().max() < 1e-4  # centred with the training statistics
    varying = x_train.std(0) > 0
    assert torch.allclose(x_train.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-3)
    again = dm_cls(batch_size=16, seed=3)
    again.setup("fit")
    for k in dm.splits:
        assert torch.equal(dm.splits[k].tensors[0], again.splits[k].tensors[0])
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (16, n_features)


def test_digits_constant_pixels_are_centred_not_nan():
    dm = DigitsDataModule()
    dm.setup()
    assert (dm.std == 1.0).any()  # digits has pixels that are always 0 in the training split
    assert all(torch.isfinite(s.tensors[0]).all() for s in dm.splits.values())


def test_shuffle_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(a) == list(range(50))


def test_student_generator_follows_its_model():
    x, y = generate_students(4000, seed=0)
    assert x.shape == (4000, 4) and set(np.unique(y)) == {0.0, 1.0}
    c = np.corrcoef(x.T)
    assert c[0, 1] > 0.5 and c[2, 3] < -0.5  # GPA~IQ load on intelligence, BMI~sleep on health
    assert abs(c[0, 2]) < 0.1  # the two factors are independent
    assert np.array_equal(generate_students(10, 5)[0], generate_students(10, 5)[0])


def test_bad_data_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)


# --- module ----------------------------------------------------------------------------------------


def test_impls_share_initial_weights_and_keys():
    torch.manual_seed(0)
    a = MLPModule([64, 32, 10], impl="torchderiv")
    torch.manual_seed(0)
    b = MLPModule([64, 32, 10], impl="autograd")
    assert list(a.state_dict()) == list(b.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    b.load_state_dict(a.state_dict())  # checkpoints load into either


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sizes=[4, 3], task="binary"), "needs one output node"),
        (dict(sizes=[4, 1], activation="rleu"), "unknown activation 'rleu'"),
        (dict(sizes=[4, 1], impl="jax"), "impl must be"),
        (dict(sizes=[4, 1], optimizer="lbfgs"), "optimizer must be"),
        (dict(sizes=[4, 1], task="ranking"), "task must be"),
    ],
)
def test_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLPModule(**kwargs)


@pytest.mark.parametrize(
    "dm, sizes, task, epochs",
    [
        (lambda: DigitsDataModule(batch_size=64), [64, 16, 10], "multiclass", 2),
        (lambda: BreastCancerDataModule(batch_size=64), [30, 8, 1], "binary", 2),
        (lambda: StudentDataModule(n_samples=600, batch_size=16), [4, 2, 1], "binary", 4),
    ],
    ids=["digits", "breast_cancer", "student"],
)
def test_short_fit_test_predict(tmp_path, dm, sizes, task, epochs):
    L.seed_everything(0)
    model = MLPModule(sizes, task=task, optimizer="sgd", lr=0.5 if sizes[1] == 2 else 0.1)
    data = dm()
    trainer = _trainer(tmp_path, max_epochs=epochs)
    trainer.fit(model, data)
    results = trainer.test(model, data, verbose=False)[0]
    assert results["test/acc"] > 0.6
    if task == "binary":
        assert "test/f1" in results
    preds = torch.cat(trainer.predict(model, data))
    assert preds.shape == (len(data.splits["test"]),)


def test_regression_task_logs_mse_and_r2(tmp_path):
    class Regression(StudentDataModule):
        task = "regression"

        def load(self):
            x, _ = generate_students(400, 0)
            return x, x[:, 0] * 0.5 + x[:, 3]

    model = MLPModule([4, 8, 1], task="regression", lr=0.01)
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, Regression(batch_size=32))
    results = trainer.test(model, Regression(batch_size=32), verbose=False)[0]
    assert {"test/mse", "test/r2", "test/loss"} <= set(results)


def _params_after(impl, steps=30):
    L.seed_everything(0)
    model = MLPModule([64, 32, 10], impl=impl, optimizer="sgd", lr=0.1, momentum=0.9)
    trainer = _trainer(None, max_steps=steps, max_epochs=-1, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return [p.detach().clone() for p in model.parameters()]


def test_torchderiv_and_autograd_train_identically():
    ours, reference = _params_after("torchderiv"), _params_after("autograd")
    largest = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert largest < 1e-5, largest


def test_resume_from_last_checkpoint_matches_uninterrupted(tmp_path):
    def run(max_epochs, root, ckpt_path=None):
        L.seed_everything(0)
        model = MLPModule([64, 16, 10], optimizer="adam", lr=0.003)
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)
        trainer = _trainer(root, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[ckpt])
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return model

    full = run(4, tmp_path / "full")
    run(2, tmp_path / "part")
    resumed = run(4, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_non_finite_loss_stops_training_naming_the_step(tmp_path):
    class Poisoned(DigitsDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.splits["train"].tensors[0][5:, 3] = float("nan")

    model = MLPModule([64, 16, 10])
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at step \d+ \(epoch 0\)"):
        _trainer(tmp_path).fit(model, Poisoned(batch_size=8))


def test_bf16_mixed_on_cpu(tmp_path):
    model = MLPModule([64, 16, 10])
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_epochs=1)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert trainer.callback_metrics["train/loss"].isfinite()
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- CLI ---------------------------------------------------------------------------------------------


def _cli_args(tmp_path, *extra):
    return [
        "--config",
        str(ROOT / "configs/digits.yaml"),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        *extra,
    ]


def test_cli_fit_then_test_from_checkpoint(tmp_path, capsys):
    CLI(args=["fit", *_cli_args(tmp_path, "--trainer.max_epochs=2")])
    version = tmp_path / "digits" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").exists() and (version / "checkpoints" / "best.ckpt").exists()
    assert (version / "config.yaml").exists()
    # the configs' RunReport: final metrics printed, curves (train and val, checkpoint marked) in the log dir
    out = capsys.readouterr().out
    assert "fit:   " in out and "val/acc = " in out and "train/acc = " in out
    assert re.search(r"best:  .*best\.ckpt \(val/acc = [0-9.]+\), epoch [01]", out)
    assert (version / "curves.png").exists() and f"curves: {version / 'curves.png'}" in out
    assert {"train/acc", "val/acc", "train/loss", "val/loss"} <= set(read_metrics(version))
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["trainer"]["enable_progress_bar"] is None  # not this terminal's answer
    assert plot_curves(version, best_epoch=1).exists()
    cli = CLI(args=["test", *_cli_args(tmp_path), f"--ckpt_path={version / 'checkpoints' / 'best.ckpt'}"])
    assert "test/acc" in cli.trainer.callback_metrics
    assert re.search(r"test:  test/acc = [0-9.]+", capsys.readouterr().out)
    # the test run logs into the fit's folder, under test/, and leaves the fit's own logs whole
    assert (version / "test" / "metrics.csv").exists() and not (tmp_path / "digits" / "version_1").exists()
    assert {"train/acc", "val/acc", "train/loss", "val/loss"} <= set(read_metrics(version))


def test_cli_print_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        CLI(args=["fit", *_cli_args(tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["sizes"] == [64, 128, 10]  # MLPModule's arguments directly under model:
    assert printed["trainer"]["enable_progress_bar"] is None
    assert printed["data"]["class_path"] == "torchderiv.lightning.DigitsDataModule"


@pytest.mark.parametrize(
    "override, named",
    [
        ("--model.activation=rleu", "rleu"),
        ("--model.lr=fast", "model.lr"),
        ("--model.sizez=[1,2]", "sizez"),
    ],
    ids=["unknown-activation", "wrong-type", "unknown-key"],
)
def test_cli_bad_config_fails_before_training(tmp_path, capsys, override, named):
    with pytest.raises(SystemExit) as exit_info:
        CLI(args=["fit", *_cli_args(tmp_path), override])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err
    assert not (tmp_path / "digits").exists()  # nothing written


def test_cli_unknown_key_in_config_file(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())
    config["model"]["hidden"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        CLI(args=["fit", "--config", str(bad), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert "hidden" in capsys.readouterr().err
    assert not (tmp_path / "digits").exists()


@pytest.mark.parametrize(
    "name",
    [
        "digits",
        "digits_autograd",
        "breast_cancer",
        "student",
        "ddp_cpu",
        "digits_dp",
        "breast_cancer_dp",
        "digits_transformer",
        "digits_transformer_dp",
        "digits_cnn",
        "digits_cnn_dp",
    ],
)
def test_every_config_parses_and_comments_every_value(name, capsys):
    path = ROOT / "configs" / f"{name}.yaml"
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":") and ":" in stripped:
            assert "#" in stripped, f"{name}.yaml: no comment on {stripped!r}"
    with pytest.raises(SystemExit):
        CLI(args=["fit", "--config", str(path), "--print_config"])
    assert "model:" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torchderiv",
        "fit",
        "--config",
        str(ROOT / "configs/ddp_cpu.yaml"),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert (tmp_path / "ddp_cpu" / "version_0" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_on_gpu(tmp_path, precision):
    L.seed_everything(0)
    model = MLPModule([64, 32, 10])
    trainer = _trainer(tmp_path, accelerator="gpu", devices=1, precision=precision, max_epochs=2)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert trainer.test(model, DigitsDataModule(batch_size=64), verbose=False)[0]["test/acc"] > 0.8


def test_device_check_script_dry_run():
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments/device_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "PY": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: ready" in proc.stdout


# --- any torch model: ModelModule, the token transformer, digits as tokens -------------------------------------


def test_digits_as_tokens_use_no_statistics_of_the_data():
    dm = DigitsDataModule(tokens=True)
    dm.setup()
    x, _ = dm.splits["train"][:]
    assert x.dtype == torch.long and x.shape[1] == 64 and x.min() == 0 and x.max() == 16
    assert not hasattr(dm, "mean") and not hasattr(dm, "std")  # no statistics of the training set computed


def test_model_module_converts_and_reports(caplog):
    import logging

    from torchderiv.lightning import ModelModule, TokenTransformer

    net = TokenTransformer(d_model=8, nhead=2, dim_feedforward=16, num_layers=1)
    with caplog.at_level(logging.INFO):
        module = ModelModule(net, num_outputs=10)
    assert module.net is net and type(net.encoder.layers[0].self_attn).__module__ == "torchderiv.nn.modules"
    assert "torchderiv.convert: " in caplog.text and "0 left on torch" in caplog.text
    assert "model" not in module.hparams and module.hparams["num_outputs"] == 10
    torchderiv_free = ModelModule(TokenTransformer(d_model=8, nhead=2, num_layers=1), 10, convert=False)
    assert type(torchderiv_free.net.embedding) is torch.nn.Embedding


def test_model_module_refuses_what_per_sample_cannot_clip_before_training(tmp_path):
    from torchderiv.lightning import ModelModule

    class WithPReLU(torch.nn.Module):  # a layer without a torchderiv twin
        def __init__(self):
            super().__init__()
            self.act = torch.nn.PReLU()
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.act(x))

    module = ModelModule(WithPReLU(), 10, privacy={"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    trainer = _trainer(tmp_path, max_epochs=1)
    with pytest.raises(RuntimeError, match=r"parameter act\.weight of PReLU: not computed"):
        trainer.fit(module, DigitsDataModule(batch_size=64))


def test_digits_transformer_config_meets_its_target(tmp_path, monkeypatch):
    # The documented job: test accuracy >= 0.97 (train.main: fit, then test the best checkpoint).
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    results = main([str(ROOT / "configs/digits_transformer.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert results["test/acc"] >= 0.97


def test_digits_cnn_config_meets_its_target(tmp_path, monkeypatch):
    # The documented CNN job: test accuracy >= 0.97 (convolutions on torchderiv's Functions after convert).
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    results = main([str(ROOT / "configs/digits_cnn.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert results["test/acc"] >= 0.97

"""LightningModules: ``MLPModule`` (the seed's network and loss, on torchderiv or on torch autograd) and
``ModelModule`` (any torch model, converted to torchderiv's Functions); both train privately from a ``privacy``
block."""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
import torchmetrics
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .. import functional as TF
from ..clipping import check_model, per_sample
from ..nn import MLP
from ..nn import convert as convert_model
from ..privacy import Privacy, PrivateTraining, derived_seed

__all__ = ["MLPModule", "ModelModule", "AutogradMLP"]

Activation = Literal["relu", "sigmoid", "tanh", "leaky_relu", "elu", "softplus", "gelu", "silu"]
Task = Literal["multiclass", "binary", "regression"]
Optimizer = Literal["sgd", "adam", "adamw"]

_TORCH_ACTIVATIONS = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "silu": F.silu,
}


class AutogradMLP(nn.Module):
    """The same network as :class:`torchderiv.nn.MLP`, built from ``torch.nn`` and differentiated by autograd.

    Layers are created in the same order with the same initialisation, and held under the same names
    (``layers.{k}.weight``), so one seed gives identical weights and checkpoints load into either.
    """

    def __init__(self, sizes, activation: str = "relu", bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.sizes, self.activation = list(sizes), activation
        self.act = _TORCH_ACTIVATIONS[activation]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias, device=device, dtype=dtype) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class TrainModule(LightningModule):
    """What every module here shares: the loss and metrics of its task, the optimizer, and private training
    (clipping in torchderiv's backward, Opacus's noise, accountant and Poisson sampling). Subclasses build
    ``self.net`` and save their hyperparameters."""

    def __init__(
        self,
        net: nn.Module,
        task: str,
        n_out: int,
        impl: str,
        optimizer: str,
        lr: float,
        momentum: float,
        weight_decay: float,
        privacy,
        batch_first: bool = True,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        if task not in ("multiclass", "binary", "regression"):
            raise ValueError(f"task must be 'multiclass', 'binary' or 'regression', got {task!r}")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if task == "binary" and n_out != 1:
            raise ValueError(f"task='binary' needs one output node, got {n_out}")
        if isinstance(privacy, dict):
            privacy = Privacy(**privacy)
        if privacy is not None and impl != "torchderiv":
            raise ValueError(
                "privacy needs impl='torchderiv': each example's gradient is clipped inside torchderiv's backward"
            )
        self.task, self.n_out, self.impl, self.batch_first = task, n_out, impl, batch_first
        self.opt_config = (optimizer, lr, momentum, weight_decay, lr_schedule)
        self.privacy = privacy
        self._private: PrivateTraining | None = None
        # The private step runs its own backward inside torchderiv.per_sample, then Opacus's optimizer.
        self.automatic_optimization = privacy is None
        self.net = net
        # One metric object per stage (Lightning syncs each under DDP); "train" cannot be a ModuleDict key (it is a
        # Module method).
        self.metrics = nn.ModuleDict({f"{s}_metrics": self._metrics(task, n_out) for s in ("train", "val", "test")})

    def _save_privacy(self) -> None:
        # The privacy block is kept as a plain dict: checkpoints then load with torch.load(weights_only=True).
        self.hparams["privacy"] = None if self.privacy is None else dataclasses.asdict(self.privacy)
        # and into the copy Lightning's loggers write to hparams.yaml (taken by save_hyperparameters, before this)
        self._hparams_initial["privacy"] = self.hparams["privacy"]

    @staticmethod
    def _metrics(task: str, n_out: int) -> torchmetrics.MetricCollection:
        if task == "multiclass":
            return torchmetrics.MetricCollection(
                {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=n_out, average="micro")}
            )
        if task == "binary":
            return torchmetrics.MetricCollection(
                {"acc": torchmetrics.classification.BinaryAccuracy(), "f1": torchmetrics.classification.BinaryF1Score()}
            )
        return torchmetrics.MetricCollection({"mse": torchmetrics.MeanSquaredError(), "r2": torchmetrics.R2Score()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.task != "multiclass" and self.n_out == 1 else out

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lib = TF if self.impl == "torchderiv" else F
        if self.task == "multiclass":
            return lib.cross_entropy(logits, y)
        if self.task == "binary":
            return lib.binary_cross_entropy_with_logits(logits, y)
        return lib.mse_loss(logits, y)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        if isinstance(self.net, MLP) and self.task == "multiclass":
            # Network and loss in one Function: one backward node per step instead of two.
            loss, logits = self.net.cross_entropy(x, y)
        else:
            logits = self(x)
            loss = self.loss(logits, y)
        if len(x) == 0:
            # An empty Poisson batch (private training): nothing to measure; the step still runs (its noise
            # is part of the guarantee) and every gradient of the empty mean is 0.
            return loss
        if stage == "train" and not torch.isfinite(loss):
            # An explicit check (detect_anomaly is far too slow to leave on) so a diverging run stops at once.
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower the learning rate or check the data"
            )
        # Under privacy the training batches' loss and metrics are computed without noise: statistics of private
        # data that the accountant's ε does not cover, named so.
        prefix = "train_nonprivate" if stage == "train" and self.privacy is not None else stage
        preds = logits.detach().float()
        if self.task == "binary":
            preds = torch.sigmoid(preds)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(preds, y)
        self.log(
            f"{prefix}/loss",
            loss,
            prog_bar=stage != "test",
            on_step=False,
            on_epoch=True,
            batch_size=len(x),
            sync_dist=True,
        )
        self.log_dict(
            {f"{prefix}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True, prog_bar=stage != "train"
        )
        return loss

    def training_step(self, batch, batch_idx):
        if self.privacy is None:
            return self._step(batch, "train")
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)  # the clipped sum then becomes .grad, not added to zeros
        # Under DDP the gradients are not all-reduced by the backward (its hooks would see no gradient: the
        # clipped ones land in .grad at the end of the pass) but by Opacus's distributed optimizer, after the
        # noise, which it adds on rank 0 only.
        # Under fp16 mixed precision the backward runs on the loss times the GradScaler's scale: per_sample
        # clips the unscaled examples and leaves .grad scaled, for the scaler's unscale_ inside opt.step().
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        with per_sample(
            self.net,
            max_norm=self.privacy.max_grad_norm,
            clipped_sum=True,
            loss_scale=scaler,
            batch_first=self.batch_first,
        ):
            loss = self._step(batch, "train")
            strategy = self.trainer.strategy
            with strategy.block_backward_sync() if hasattr(strategy, "block_backward_sync") else nullcontext():
                self.manual_backward(loss)
        opt.step()  # Opacus: noise N(0, σ²C²) once, divided by the expected batch size; the step is accounted
        return loss

    # --- private training: Poisson sampling, accountant, checkpoints -------------------------------------

    def configure_callbacks(self):
        # Lightning calls this before it checks the trainer's options against manual optimisation: the options a
        # private run cannot take are refused here, in privacy's terms, all at once.
        if self.privacy is not None and self.trainer.state.fn == "fit":
            _check_private_trainer(self.trainer, self.privacy)
        return []

    def setup(self, stage: str) -> None:
        if self.privacy is None or stage != "fit":
            return
        trainer = self.trainer
        from lightning.pytorch.strategies import DDPStrategy

        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise RuntimeError(
                f"privacy: on {trainer.world_size} processes only DDP strategies are supported (clipped sums "
                f"all-reduced, noise added once), got {type(trainer.strategy).__name__}"
            )
        check_model(self.net)  # a parameter per_sample cannot compute fails here, before training
        dm = trainer.datamodule
        if dm is None:
            raise RuntimeError("privacy: needs a data module, whose training set is sampled by Poisson sampling")
        if getattr(dm, "uses_training_statistics", False):
            raise ValueError(
                f"privacy: {type(dm).__name__} standardises its features with the training split's mean and standard "
                "deviation, statistics of the private data that the privacy budget does not cover; give it "
                "preprocessing='fixed' (--data.init_args.preprocessing=fixed), a data-independent scaling"
            )
        if self.privacy.target_epsilon is not None and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError("privacy: target_epsilon needs trainer.max_epochs (σ is solved for that many epochs)")
        if self._private is None:
            self._private = PrivateTraining(self.privacy)
        # One sampling stream on every process (rank 0's seed): each takes its share of the same Poisson batch.
        seed = trainer.strategy.broadcast(derived_seed("sampling"), src=0)
        # The data module's own loader, also on a second fit with the same data module (whose train_dataloader
        # is then the Poisson loader made here before).
        original = dm.__dict__.get("_torchderiv_train_dataloader", dm.train_dataloader)
        dm._torchderiv_train_dataloader = original
        loader = self._private.prepare(
            original(),
            trainer.max_epochs or 1,
            seed=seed,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
        dm.train_dataloader = lambda: loader  # Poisson sampling on the training set only

    def on_train_start(self) -> None:
        if self.privacy is None:
            return
        from ..privacy import PoissonShare

        if not isinstance(self.trainer.train_dataloader, PoissonShare):
            raise RuntimeError(
                "privacy: the training loader is not Poisson-sampled (DPDataLoader), so the accountant's ε would "
                f"not hold; got {type(self.trainer.train_dataloader).__name__}"
            )

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization and self.lr_schedulers() is not None:
            self.lr_schedulers().step()  # manual optimisation (the private step): Lightning leaves it to us
        if self._private is not None:
            self.log("privacy/epsilon", self._private.epsilon(), prog_bar=True, sync_dist=True)
            self.log("privacy/sigma", float(self._private.noise_multiplier), sync_dist=True)

    def on_fit_start(self) -> None:
        self._loaded = None
        self._fit_started = time.time() - 1  # file times may be rounded to the second

    def on_fit_end(self) -> None:
        """What the fit spent, stated once in full: in the log, in ``hparams.yaml`` (``privacy_spent``), and in
        every checkpoint the run keeps (``privacy_release``). A checkpoint chosen by validation over the run is a
        function of the whole run, so each kept checkpoint carries the whole run's ε, not the ε at its epoch."""
        if self._private is None or not self._private.accountant.history:
            return
        spent = self._private.spent()
        rank_zero_info(f"privacy: {describe_spent(spent)}")
        for logger in self.loggers:
            logger.log_hyperparams({"privacy_spent": spent})
            logger.save()
        if self.trainer.is_global_zero:
            for callback in self.trainer.checkpoint_callbacks:
                for path in _kept_checkpoints(callback, self._fit_started):
                    _add_to_checkpoint(path, "privacy_release", spent)
        self.trainer.strategy.barrier("privacy_release")

    def on_test_epoch_end(self) -> None:
        epsilon, how = self._tested_epsilon()
        if epsilon is not None:
            self.log("privacy/epsilon", epsilon, sync_dist=True)
            rank_zero_info(f"privacy/epsilon = {epsilon:.4f}: {how}")

    def _tested_epsilon(self):
        """The ε of the weights under test, and which ε that is."""
        loaded = getattr(self, "_loaded", None)
        if loaded is not None and loaded.get("privacy_release"):
            spent = loaded["privacy_release"]
            return spent["epsilon"], (
                f"the whole fit that kept this checkpoint ({describe_spent(spent)}); a checkpoint chosen by validation "
                "depends on every epoch of the run"
            )
        if self._private is None or not self._private.accountant.history:
            return None, None
        steps = sum(n for _, _, n in self._private.accountant.history)
        if loaded is not None:
            return self._private.epsilon(), (
                f"after the {steps} steps before this checkpoint was saved, by a fit that did not finish: a checkpoint "
                "chosen among the epochs of a longer run spends that run's ε"
            )
        return self._private.epsilon(), f"the fit so far ({steps} steps), whose last weights are tested"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._private is not None:
            checkpoint["privacy"] = self._private.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._loaded = {"privacy_release": checkpoint.get("privacy_release")}
        if self.privacy is not None and "privacy" in checkpoint:
            if self._private is None:
                self._private = PrivateTraining(self.privacy)
            self._private.load_state_dict(checkpoint["privacy"])

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        logits = self(batch[0])
        if self.task == "multiclass":
            return logits.argmax(-1)
        if self.task == "binary":
            return (logits > 0).long()
        return logits

    def configure_optimizers(self):
        name, lr, momentum, weight_decay, schedule = self.opt_config
        params = [p for p in self.parameters() if p.requires_grad]
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if self._private is not None:
            opt = self._private.optimizer(self.net, opt)
        if schedule == "constant":
            return opt
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
            raise ValueError("lr_schedule='cosine' needs trainer.max_epochs (the learning rate reaches 0 there)")
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs),
        }


class MLPModule(TrainModule):
    """Train the seed's network: ``sizes = [n_0, …, n_L, n_out]``, g after every hidden layer, linear output.

    Args:
        sizes: layer widths, input first. ``task="binary"`` needs one output node (the seed's z).
        activation: g, the hidden layers' nonlinearity.
        task: ``multiclass`` (softmax + cross-entropy), ``binary`` (sigmoid + binary cross-entropy on one
            output node), ``regression`` (identity + mean squared error).
        impl: ``torchderiv`` (hand-derived Functions) or ``autograd`` (the same network and loss from
            torch.nn, as the reference).
        optimizer: ``sgd`` (the seed's update, §3.6, with optional momentum), ``adam`` or ``adamw``.
        lr: learning rate η.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty — the regularisation the seed's §1 asks for.
        bias: whether layers carry a bias (the seed's have none).
        privacy: train with DP-SGD (:class:`~torchderiv.privacy.Privacy`): each example's gradient
            clipped inside torchderiv's backward, Opacus's noise, accountant and Poisson sampling of the
            training set. ε is logged each epoch as ``privacy/epsilon``. Needs ``impl="torchderiv"`` and a data
            module; under DDP the clipped sums are all-reduced and the noise is added once (rank 0).
        lr_schedule: ``constant`` or ``cosine`` (annealed to 0 over ``trainer.max_epochs``).
    """

    def __init__(
        self,
        sizes: list[int],
        activation: Activation = "relu",
        task: Task = "multiclass",
        impl: Literal["torchderiv", "autograd"] = "torchderiv",
        optimizer: Optimizer = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        bias: bool = True,
        privacy: Privacy | None = None,
        lr_schedule: Literal["constant", "cosine"] = "constant",
    ) -> None:
        if impl not in ("torchderiv", "autograd"):
            raise ValueError(f"impl must be 'torchderiv' or 'autograd', got {impl!r}")
        if activation not in _TORCH_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(_TORCH_ACTIVATIONS)}")
        if task == "binary" and sizes[-1] != 1:
            raise ValueError(f"task='binary' needs one output node (sizes[-1] == 1), got sizes={list(sizes)}")
        net_cls = MLP if impl == "torchderiv" else AutogradMLP
        net = net_cls(sizes, activation=activation, bias=bias)
        super().__init__(net, task, sizes[-1], impl, optimizer, lr, momentum, weight_decay, privacy, True, lr_schedule)
        self.save_hyperparameters(ignore=["privacy"])
        self._save_privacy()


class ModelModule(TrainModule):
    """Train any torch model: converted in place to torchderiv's Functions (:func:`torchderiv.convert`, whose
    report is printed), with the loss and metrics of ``task``, and privately from a ``privacy`` block, where
    :func:`torchderiv.per_sample` clips every trainable parameter (a model it cannot clip is refused before
    training, naming every part at fault).

    In a config: ``model: {class_path: torchderiv.lightning.ModelModule, init_args: {model: {class_path: …}}}``.

    Args:
        model: the network, ``(B, …) -> (B, num_outputs)`` logits (or one output for binary and regression).
        num_outputs: its outputs (classes for ``multiclass``).
        task, optimizer, lr, momentum, weight_decay, privacy, lr_schedule: as :class:`MLPModule`.
        batch_first: where the examples are in the model's input, as :func:`torchderiv.per_sample` takes it.
        convert: convert the model (False: train it as given, on torch autograd; no privacy then).
    """

    def __init__(
        self,
        model: nn.Module,
        num_outputs: int,
        task: Task = "multiclass",
        optimizer: Optimizer = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        privacy: Privacy | None = None,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        batch_first: bool = True,
        convert: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelModule: expected model to be an nn.Module, got {type(model).__name__}")
        if convert:
            convert_model(model)
            rank_zero_info(str(model.torchderiv_conversion))
        impl = "torchderiv" if convert else "autograd"
        super().__init__(
            model, task, num_outputs, impl, optimizer, lr, momentum, weight_decay, privacy, batch_first, lr_schedule
        )
        # the model is saved with the weights; its config, by the CLI's config.yaml
        self.save_hyperparameters(ignore=["privacy", "model"])
        self._save_privacy()


def describe_spent(spent: dict) -> str:
    """One line: ε at δ and everything it depends on."""
    return (
        f"epsilon = {spent['epsilon']:.4f} at delta = {spent['delta']:g} ({spent['accountant']} accountant), "
        f"{spent['steps']} steps of Poisson sampling at rate {spent['sample_rate']:.4g} (expected batch "
        f"{spent['expected_batch_size']:g}), noise_multiplier = {spent['noise_multiplier']:.4f}, "
        f"max_grad_norm = {spent['max_grad_norm']:g}"
    )


def _check_private_trainer(trainer, privacy) -> None:
    problems = []
    if trainer.accumulate_grad_batches != 1:
        problems.append(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: each Poisson-sampled batch is one "
            "noisy step of the accountant; for larger steps raise data.batch_size (the expected batch size)"
        )
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        problems.append(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val}: each example's gradient is already clipped, to "
            f"model.privacy.max_grad_norm (now {privacy.max_grad_norm}); set that instead"
        )
    if problems:
        raise ValueError("privacy: not supported with a privacy block: " + "; ".join(problems))


def _kept_checkpoints(callback, since: float) -> list[str]:
    """The checkpoint files ``callback`` holds from this fit: those it names, and every file of its kind written in
    its directory since the fit started (without a monitor it names only the newest)."""
    from pathlib import Path

    paths = set(getattr(callback, "best_k_models", {}) or {})
    paths |= {getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")}
    dirpath, ext = getattr(callback, "dirpath", None), getattr(callback, "FILE_EXTENSION", ".ckpt")
    if dirpath and Path(dirpath).is_dir():
        paths |= {str(p) for p in Path(dirpath).glob(f"*{ext}") if p.stat().st_mtime >= since}
    return sorted(str(p) for p in paths if p and Path(p).is_file())


def _add_to_checkpoint(path: str, key: str, value) -> None:
    """``checkpoint[key] = value`` in the file at ``path``, replaced atomically (an interrupted write leaves the
    old file whole)."""
    import os

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint[key] = value
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)

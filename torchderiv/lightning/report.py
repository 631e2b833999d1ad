"""``RunReport``: the end of every ``torchderiv fit``/``test``: metrics printed, curves drawn in the log dir."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from .plot import plot_curves, read_metrics

__all__ = ["RunReport"]


class RunReport(L.Callback):
    """Print the final metrics and draw ``curves.png`` (training and validation, checkpoint marked).

    Named in each config's ``trainer.callbacks``, so any run made from a config gets it, not only
    ``make train``. Runs on global rank 0 only; needs a logger with a ``log_dir`` holding ``metrics.csv``
    (the configs' CSVLogger).

    Args:
        curves: draw ``curves.png`` after fit.
    """

    def __init__(self, curves: bool = True) -> None:
        self.curves = curves

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        print("fit:   " + "  ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))
        ckpt = trainer.checkpoint_callback
        best_epoch = None
        if isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path:
            best_epoch = self._best_epoch(trainer, ckpt)
            score = "" if ckpt.best_model_score is None else f" ({ckpt.monitor} = {float(ckpt.best_model_score):.4f})"
            where = "" if best_epoch is None else f", epoch {best_epoch}"
            print(f"best:  {ckpt.best_model_path}{score}{where}")
        log_dir = getattr(trainer.logger, "log_dir", None)
        if self.curves and log_dir and (Path(log_dir) / "metrics.csv").exists():
            print(f"curves: {plot_curves(log_dir, best_epoch=best_epoch)}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("test/", "privacy/"))}
            print("test:  " + "  ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))

    @staticmethod
    def _best_epoch(trainer, ckpt: ModelCheckpoint) -> int | None:
        """The epoch whose monitored value is the checkpoint's best score, read back from metrics.csv."""
        log_dir = getattr(trainer.logger, "log_dir", None)
        if not log_dir or ckpt.monitor is None or ckpt.best_model_score is None:
            return None
        path = Path(log_dir) / "metrics.csv"
        if not path.exists():
            return None
        trainer.logger.save()  # flush what the CSV logger still buffers
        best = float(ckpt.best_model_score)
        for epoch, value in read_metrics(log_dir).get(ckpt.monitor, []):
            if abs(value - best) <= 1e-6 * max(1.0, abs(best)):
                return epoch
        return None

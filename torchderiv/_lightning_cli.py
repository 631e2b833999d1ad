"""The LightningCLI behind ``torchderiv fit|validate|test|predict`` (imported only for those subcommands)."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from .lightning import ArrayDataModule, MLPModule

__all__ = ["CLI"]


class CLI(LightningCLI):
    """LightningCLI over :class:`MLPModule` and any :class:`ArrayDataModule` (chosen by ``data.class_path``)."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        super().__init__(
            MLPModule,
            ArrayDataModule,
            subclass_mode_data=True,
            args=args,
            run=run,
            seed_everything_default=0,
            trainer_defaults={
                # A progress bar only when a person is watching; CI logs stay readable.
                "enable_progress_bar": sys.stdout.isatty(),
            },
            **kwargs,
        )

"""The LightningCLI behind ``torchderiv fit|validate|test|predict`` (imported only for those subcommands)."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from .lightning import ArrayDataModule
from .lightning.module import _TrainModule

__all__ = ["CLI"]


class CLI(LightningCLI):
    """LightningCLI over torchderiv's modules (``model.class_path``: :class:`~torchderiv.lightning.MLPModule`, the
    default, whose arguments a config may give directly, or :class:`~torchderiv.lightning.ModelModule` for any torch
    model) and any :class:`ArrayDataModule` (chosen by ``data.class_path``)."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        super().__init__(
            _TrainModule,
            ArrayDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            seed_everything_default=0,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        # a config without model.class_path configures the seed's network, as before ModelModule existed
        parser.set_defaults({"model": {"class_path": "torchderiv.lightning.MLPModule"}})

    def instantiate_trainer(self, **kwargs):
        # A progress bar only when a person is watching (CI logs stay readable), decided here rather than
        # as a trainer default, so that --print_config and the saved config.yaml keep `null`, not the
        # answer for whichever terminal printed them.
        config = self._get(self.config_init, "trainer", default={})
        if config.get("enable_progress_bar") is None and "enable_progress_bar" not in kwargs:
            kwargs["enable_progress_bar"] = sys.stdout.isatty()
        return super().instantiate_trainer(**kwargs)

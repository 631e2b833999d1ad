"""The LightningCLI behind ``torchderiv fit|validate|test|predict`` (imported only for those subcommands)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from .lightning import ArrayDataModule, MLPModule
from .lightning.module import TrainModule

__all__ = ["CLI"]


class CLI(LightningCLI):
    """LightningCLI over :class:`~torchderiv.lightning.MLPModule` (a config's ``model:`` gives its arguments
    directly) or, when a config or argument names ``model.class_path``, over any of torchderiv's modules
    (:class:`~torchderiv.lightning.ModelModule` for any torch model); data: any :class:`ArrayDataModule`
    (chosen by ``data.class_path``)."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        # Subclass mode only where a class is named: it would change how MLPModule's arguments are given on the
        # command line (a nested --model.privacy.target_epsilon=null fails to parse there)
        named = _model_class_named(sys.argv[1:] if args is None else args)
        super().__init__(
            TrainModule if named else MLPModule,
            ArrayDataModule,
            subclass_mode_model=named,
            subclass_mode_data=True,
            args=args,
            run=run,
            seed_everything_default=0,
            **kwargs,
        )

    def instantiate_trainer(self, **kwargs):
        # A progress bar only when a person is watching (CI logs stay readable), decided here rather than
        # as a trainer default, so that --print_config and the saved config.yaml keep `null`, not the
        # answer for whichever terminal printed them.
        config = self._get(self.config_init, "trainer", default={})
        if config.get("enable_progress_bar") is None and "enable_progress_bar" not in kwargs:
            kwargs["enable_progress_bar"] = sys.stdout.isatty()
        return super().instantiate_trainer(**kwargs)


def _model_class_named(args) -> bool:
    """Whether the config files or arguments name ``model.class_path``."""
    args = [str(a) for a in (args or [])]
    for i, arg in enumerate(args):
        if arg == "--model" or arg.startswith(("--model=", "--model.class_path")):
            return True
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # LightningCLI reports an unreadable config itself
        if isinstance(config, dict) and isinstance(config.get("model"), dict) and "class_path" in config["model"]:
            return True
    return False

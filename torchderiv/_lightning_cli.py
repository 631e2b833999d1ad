"""The LightningCLI behind ``torchderiv fit|validate|test|predict`` (imported only for those subcommands)."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from .lightning import ArrayDataModule, MLPModule
from .lightning.module import TrainModule

__all__ = ["CLI"]

# What Lightning prints on every run that says nothing about the run: an advertisement, and a deprecation inside
# Lightning's own code (torch 2.13's pytree), which no config can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _handler in logging.getLogger("lightning.pytorch").handlers:
    _handler.addFilter(_NoTips())


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

    def before_instantiate_classes(self) -> None:
        # test/validate/predict of a checkpoint written by a fit: log into that run's folder, under the subcommand's
        # name (runs/digits/version_0/test), not into a new version_N. The checkpoint callback saves nothing here; its
        # warning that its directory differs from the one stored in the checkpoint says nothing about this run.
        if self.subcommand not in ("test", "validate", "predict"):
            return
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
        config = self.config[self.subcommand]
        run = re.search(r"(?:^|/)(version_\d+)/checkpoints/[^/]+$", str(config.get("ckpt_path") or ""))
        trainer = config.get("trainer")
        if not run or trainer is None:
            return
        init = getattr(trainer.get("logger"), "init_args", None)
        if init is not None and "version" in init and init.get("version") is None:
            init["version"] = f"{run.group(1)}/{self.subcommand}"

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

"""The ``torchderiv`` console script.

To run:
    torchderiv fit --config configs/digits.yaml            # train
    torchderiv test --config configs/digits.yaml --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    torchderiv fit --config configs/digits.yaml --print_config
    torchderiv check                                       # verify every built-in Function
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from .lightning import ArrayDataModule, MLPModule

__all__ = ["CLI", "main"]


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check":
        from .check import main as check_main

        sys.exit(check_main(argv[1:]))
    CLI(args=argv)


if __name__ == "__main__":
    main()

"""The ``torchderiv`` console script.

To run:
    torchderiv fit --config configs/digits.yaml            # train
    torchderiv test --config configs/digits.yaml --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    torchderiv fit --config configs/digits.yaml --print_config
    torchderiv check                                       # verify every built-in Function

Lightning is imported only for the Lightning subcommands: ``torchderiv --help`` and ``torchderiv check``
start in the time it takes to import torch.
"""

from __future__ import annotations

import sys

__all__ = ["CLI", "main"]  # noqa: F822 (CLI comes from __getattr__, lazily)

USAGE = """\
usage: torchderiv {fit,validate,test,predict,check} ...

torchderiv: PyTorch layers, activations and losses whose backward and jvp are the hand-derived formulas.

subcommands:
  fit         train a model from a YAML config (LightningCLI: torchderiv fit --config configs/digits.yaml)
  validate    run the validation set on a checkpoint (LightningCLI)
  test        run the test set on a checkpoint (LightningCLI)
  predict     predict with a checkpoint (LightningCLI)
  check       verify torchderiv's Functions, or your own (torchderiv check mypkg.ops:MyLinear --shapes "6,4 4,4")

Run `torchderiv SUBCOMMAND --help` for each one's options.
"""


def __getattr__(name: str):
    if name == "CLI":  # torchderiv.cli.CLI, without importing Lightning for everything else
        from ._lightning_cli import CLI

        return CLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "check":
        from .check import main as check_main

        sys.exit(check_main(args[1:]))
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if args else 2)
    from .extras import missing

    absent = missing("lightning")
    if absent:
        print(
            f"torchderiv {args[0]}: needs the 'lightning' extra ({', '.join(absent)} not installed): "
            "pip install 'torchderiv[lightning]' (or 'torchderiv[all]')",
            file=sys.stderr,
        )
        sys.exit(2)
    from ._lightning_cli import CLI

    # From the console script, LightningCLI reads sys.argv itself: passing it back in as `args` makes
    # Lightning warn that `args` is meant for calls from Python.
    CLI(args=argv)


if __name__ == "__main__":
    main()

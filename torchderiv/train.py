"""The main job behind ``make train``: fit, test the best checkpoint, draw the curves.

To run:
    python -m torchderiv.train                       # configs/digits.yaml
    python -m torchderiv.train configs/student.yaml  # any other config
"""

from __future__ import annotations

import sys
import time

from .cli import CLI
from .lightning import RunReport


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    config = argv[0] if argv else "configs/digits.yaml"
    start = time.perf_counter()
    cli = CLI(args=["--config", config, *argv[1:]], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    log_dir = cli.trainer.logger.log_dir
    elapsed = time.perf_counter() - start
    print(f"log dir: {log_dir}")  # curves.png there, drawn by the config's RunReport callback
    if not any(isinstance(c, RunReport) for c in cli.trainer.callbacks):  # RunReport printed the test line already
        print("  ".join(f"{k} = {v:.4f}" for k, v in sorted(results.items())))
    print(f"train + test: {elapsed:.1f} s")
    return results


if __name__ == "__main__":
    main()

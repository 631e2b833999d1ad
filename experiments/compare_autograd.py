"""The same run on torchderiv and on torch autograd, from the same seed.

To run:
    .venv/bin/python experiments/compare_autograd.py                      # configs/digits.yaml
    .venv/bin/python experiments/compare_autograd.py --config configs/breast_cancer.yaml --steps 200

Builds the model and data of a config twice (``impl=torchderiv`` and ``impl=autograd``), trains each for
``--steps`` optimizer steps, prints the largest parameter difference and both final validation metrics,
and plots both training-loss curves on one figure (experiments/out/compare_autograd.png). Exits non-zero
if the largest difference reaches 1e-4: the two must agree to float32 round-off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import yaml

from torchderiv.cli import CLI
from torchderiv.lightning.plot import read_metrics

OUT = Path(__file__).resolve().parent / "out"
LIMIT = 1e-4


def train(config: str, impl: str, steps: int, save_dir: Path):
    cli = CLI(
        args=[
            "--config",
            config,
            f"--model.impl={impl}",
            f"--trainer.max_steps={steps}",
            "--trainer.max_epochs=-1",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name={impl}",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return cli.model, metrics, cli.trainer.logger.log_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    save_dir = OUT / "compare_autograd"
    results = {}
    for impl in ("torchderiv", "autograd"):
        L.seed_everything(yaml.safe_load(Path(args.config).read_text()).get("seed_everything", 0))
        results[impl] = train(args.config, impl, args.steps, save_dir)
    (ours, our_metrics, our_dir), (ref, ref_metrics, ref_dir) = results["torchderiv"], results["autograd"]
    largest, where = 0.0, ""
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        diff = (p.detach() - q.detach()).abs().max().item()
        if diff >= largest:
            largest, where = diff, name
    print(f"after {args.steps} optimizer steps: largest parameter difference {largest:.3e} (in {where})")
    for impl, metrics in (("torchderiv", our_metrics), ("autograd", ref_metrics)):
        print(f"{impl:>10}: " + "  ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for impl, log_dir, style in (("torchderiv", our_dir, "-"), ("autograd", ref_dir, "--")):
        series = read_metrics(log_dir).get("train/loss", [])
        if series:
            ax.plot(*zip(*series), style, marker=".", label=impl)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train/loss")
    ax.set_title(f"{args.config}: torchderiv vs autograd")
    ax.legend()
    fig.tight_layout()
    png = OUT / "compare_autograd.png"
    fig.savefig(png, dpi=110)
    print(f"loss curves: {png}")
    if largest >= LIMIT:
        print(f"FAIL: parameters differ by {largest:.3e} >= {LIMIT}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

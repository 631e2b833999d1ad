"""Training curves from a CSVLogger's ``metrics.csv``, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

__all__ = ["read_metrics", "plot_curves"]

# train_nonprivate/: under privacy, the training batches' metrics, computed without noise (not private statistics)
STAGES = ("train/", "train_nonprivate/", "val/")


def read_metrics(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(epoch, value), …]}`` from ``log_dir/metrics.csv`` (rows without a value are skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if not epoch:
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                series[key].append((int(float(epoch)), float(value)))
    return dict(series)


def plot_curves(
    log_dir: str | Path, out: str | Path | None = None, title: str = "", best_epoch: int | None = None
) -> Path:
    """Loss and every other metric per epoch, training and validation on the same axes; returns the PNG's path.

    ``best_epoch`` (the checkpointed epoch) is marked on every panel with a dashed vertical line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(log_dir)
    names = ["loss"] + sorted(
        {k.split("/", 1)[1] for k in series if k.startswith(STAGES) and k.split("/", 1)[1] != "loss"}
    )
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for stage, color in (("train", "tab:blue"), ("train_nonprivate", "tab:blue"), ("val", "tab:orange")):
            key = f"{stage}/{name}"
            if key in series:
                epochs, values = zip(*series[key])
                ax.plot(epochs, values, marker=".", color=color, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"checkpoint (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out) if out else Path(log_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

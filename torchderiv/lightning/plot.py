"""Training curves from a CSVLogger's ``metrics.csv``, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

__all__ = ["read_metrics", "plot_curves"]


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


def plot_curves(log_dir: str | Path, out: str | Path | None = None, title: str = "") -> Path:
    """Loss (train and val) and every other validation metric per epoch; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(log_dir)
    others = sorted(k for k in series if k.startswith("val/") and k != "val/loss")
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(5 * (1 + len(others)), 3.6), squeeze=False)
    for key in ("train/loss", "val/loss"):
        if key in series:
            epochs, values = zip(*series[key])
            axes[0][0].plot(epochs, values, marker=".", label=key)
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    for ax, key in zip(axes[0][1:], others):
        epochs, values = zip(*series[key])
        ax.plot(epochs, values, marker=".", color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out) if out else Path(log_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

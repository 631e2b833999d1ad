"""Privacy against accuracy on digits, how many examples the clipping bites, and what privacy costs in time.

To run:
    .venv/bin/python experiments/dp_tradeoff.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python experiments/dp_tradeoff.py --quick    # fewer epochs and seeds, ~1 minute

Writes to experiments/out/:
* ``dp_tradeoff.png``: ε (δ = 1e-5) against test accuracy for several noise levels σ (30 epochs, batch 64,
  C = 1, the loop of ``dp_loop.py``), the non-private run as a line; and the same runs through Opacus's
  own hooks mode for a few seeds at σ = 1.5 (same accuracy expected within seed-to-seed spread);
* ``dp_norms.png``: the histogram of every training example's gradient norm at a few epochs of the σ = 1.5
  run, with C marked: the examples right of C are the ones the clipping scales down;
* ``dp_tradeoff.md``: the tables docs/privacy.md gives, with the Lightning epoch time private vs not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_loop import train, train_opacus_hooks  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]


def lightning_epoch_seconds(private: bool, epochs: int) -> float:
    """Seconds per epoch of configs/digits_dp.yaml through Lightning, with or without its privacy block."""
    import lightning as L

    from torchderiv.lightning import DigitsDataModule, MLPModule, Privacy

    L.seed_everything(0)
    privacy = Privacy(noise_multiplier=1.8, max_grad_norm=1.0) if private else None
    model = MLPModule([64, 128, 10], optimizer="sgd", lr=0.5, privacy=privacy)
    trainer = L.Trainer(
        max_epochs=epochs + 1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    times = []

    class Clock(L.Callback):
        def on_train_epoch_start(self, *_):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, *_):
            times.append(time.perf_counter() - self.t0)

    trainer.callbacks.append(Clock())
    trainer.fit(model, DigitsDataModule(batch_size=64, preprocessing="fixed"))
    return statistics.median(times[1:])  # the first epoch warms up


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows, opacus, norms, max_grad_norm, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    private = [r for r in rows if r["sigma"] > 0]
    ax.plot([r["epsilon"] for r in private], [r["acc"] for r in private], marker="o", label="torchderiv per_sample")
    for r in private:
        # above and right of its marker, on a white box: never over a marker or the line
        ax.annotate(
            f"σ={r['sigma']}",
            (r["epsilon"], r["acc"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8),
        )
    base = next(r["acc"] for r in rows if r["sigma"] == 0)
    ax.axhline(base, color="grey", linestyle="--", label=f"σ = 0: clipping, no noise ({base:.3f})")
    # The seeds share one ε (same σ, sampling rate and accountant): each implementation's seeds are drawn side by
    # side around it, one marker per seed, so that no two hide each other.
    for key, dx, marker, color, label in (
        ("torchderiv", -1, "o", "tab:blue", "torchderiv, σ=1.5, one point per seed"),
        ("opacus", 1, "s", "tab:red", "Opacus hooks, σ=1.5, one point per seed"),
    ):
        runs = opacus[key]
        eps = runs[0]["epsilon"]
        width = 0.04 * eps
        xs = [eps + dx * width * (1 + k) for k in range(len(runs))]
        ax.scatter(xs, [o["acc"] for o in runs], marker=marker, facecolors="none", edgecolors=color, s=36, label=label)
    top = max(r["epsilon"] for r in private)
    ax.set_xlim(0, top * 1.18)  # room for the labels right of the last marker
    accs = [r["acc"] for r in rows] + [o["acc"] for k in opacus for o in opacus[k]]
    ax.set_ylim(min(accs) - 0.02, max(accs) + 0.03)
    _save(fig, ax, "ε (δ = 1e-5)", "test accuracy", "digits, MLP 64-128-10, 30 epochs, C = 1", out / "dp_tradeoff.png")

    import numpy as np

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    floor = 1e-4  # norms below it are drawn at it (log axis)
    every = torch.cat(list(norms.values())).clamp_min(floor)
    bins = np.logspace(np.log10(every.min().item()), np.log10(every.max().item()), 50)  # shared, log-spaced
    last = max(norms)
    for epoch, n in sorted(norms.items()):
        frac = (n > max_grad_norm).float().mean().item()
        when = "before training" if epoch == 0 else f"after {epoch} epoch{'s' if epoch > 1 else ''}"
        tiny = int((n < floor).sum())
        extra = f", {tiny} below {floor:g}" if tiny else ""
        ax.hist(n.clamp_min(floor).numpy(), bins=bins, alpha=0.5, label=f"{when}: {100 * frac:.0f}% clipped{extra}")
    tiny = int((norms[last] < floor).sum())
    if tiny >= 20:  # a visible pile at the left edge: say what it is
        ax.annotate(
            f"{tiny} examples the network fits\n(softmax ≈ its label: ‖gᵢ‖ < {floor:g})",
            (floor, tiny),
            textcoords="offset points",
            xytext=(14, 24),
            fontsize=7,
            arrowprops=dict(arrowstyle="->", lw=0.6),
        )
    ax.set_xscale("log")
    ax.axvline(max_grad_norm, color="black", linestyle="--", label=f"C = {max_grad_norm}")
    _save(
        fig,
        ax,
        "per-example gradient norm ‖gᵢ‖",
        "examples",
        "σ = 1.5: how many examples the clipping scales down",
        out / "dp_norms.png",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = 5 if args.quick else 30
    sigmas = [0.0, 1.5] if args.quick else [0.0, 0.7, 1.0, 1.5, 2.5]
    seeds = [0, 1] if args.quick else [0, 1, 2]
    rows, norms = [], {}
    for sigma in sigmas:
        if sigma == 1.5:
            acc, eps, norms = train(sigma=sigma, epochs=epochs, norms_at=(0, 1, epochs))
        else:
            acc, eps = train(sigma=sigma, epochs=epochs)
        rows.append({"sigma": sigma, "acc": acc, "epsilon": eps})
        print(f"σ = {sigma}: test/acc {acc:.4f}, ε {eps:.2f}", flush=True)
    both = {"torchderiv": [], "opacus": []}
    for seed in seeds:
        acc, eps = train(sigma=1.5, epochs=epochs, seed=seed)
        both["torchderiv"].append({"seed": seed, "acc": acc, "epsilon": eps})
        acc, eps = train_opacus_hooks(sigma=1.5, epochs=epochs, seed=seed)
        both["opacus"].append({"seed": seed, "acc": acc, "epsilon": eps})
        print(f"seed {seed}: torchderiv {both['torchderiv'][-1]['acc']:.4f}, Opacus hooks {acc:.4f}", flush=True)
    n_epochs = 2 if args.quick else 5
    ratios = []
    for k in range(1 if args.quick else 7):
        # the two runs of a pair in alternating order, so a drift of the machine's speed does not favour one
        if k % 2:
            plain = lightning_epoch_seconds(False, n_epochs)
            private = lightning_epoch_seconds(True, n_epochs)
        else:
            private = lightning_epoch_seconds(True, n_epochs)
            plain = lightning_epoch_seconds(False, n_epochs)
        ratios.append(private / plain)
    epoch_ratio = statistics.median(ratios)
    print(f"Lightning epoch, private vs non-private: {epoch_ratio:.2f} ({', '.join(f'{r:.2f}' for r in ratios)})")
    plot(rows, both, norms, 1.0, out)

    lines = [
        f"digits, MLP 64-128-10, SGD lr 0.5, batch 64 (Poisson), C = 1, {epochs} epochs, δ = 1e-5",
        "",
        "| σ | ε | test accuracy |",
        "|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (clipping, no noise)" if r["sigma"] == 0 else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['sigma']} | {eps} | {r['acc']:.4f} |")
    lines += ["", "| seed | torchderiv per_sample | Opacus hooks | ε (both) |", "|---|---|---|---|"]
    for a, b in zip(both["torchderiv"], both["opacus"]):
        lines.append(f"| {a['seed']} | {a['acc']:.4f} | {b['acc']:.4f} | {a['epsilon']:.2f} / {b['epsilon']:.2f} |")
    ta = [a["acc"] for a in both["torchderiv"]]
    tb = [b["acc"] for b in both["opacus"]]
    lines.append(
        f"| mean ± sd | {statistics.mean(ta):.4f} ± {statistics.pstdev(ta):.4f} | "
        f"{statistics.mean(tb):.4f} ± {statistics.pstdev(tb):.4f} | |"
    )
    lines += [
        "",
        f"Lightning epoch (configs/digits_dp.yaml's model and data), private vs non-private: {epoch_ratio:.2f}× "
        f"(median of {len(ratios)} pairs: {', '.join(f'{r:.2f}' for r in ratios)})",
    ]
    frac = {e: (n > 1.0).float().mean().item() for e, n in sorted(norms.items())}
    lines += [
        "",
        "Share of examples clipped (‖gᵢ‖ > C) at σ = 1.5: "
        + ", ".join(
            f"after {e} epoch{'s' if e > 1 else ''}: {100 * f:.0f}%" if e else f"before training: {100 * f:.0f}%"
            for e, f in frac.items()
        ),
    ]
    md = "\n".join(lines) + "\n"
    (out / "dp_tradeoff.md").write_text(md)
    (out / "dp_tradeoff.json").write_text(json.dumps({"rows": rows, "seeds": both, "epoch_ratio": ratios}, indent=1))
    print(md)


if __name__ == "__main__":
    main()

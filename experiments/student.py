"""The seed's §1 example: does a network find "innate intelligence" and "physical health"?

To run:
    .venv/bin/python experiments/student.py            # ~10 s on 2 CPU cores

Trains the seed's network (4 inputs: GPA, IQ, BMI, sleep; 2 hidden sigmoid nodes; one output node z
with sigmoid + binary cross-entropy) with per-sample SGD, exactly the update of seed §3.6 (descending),
on the generated students of ``StudentDataModule``. Writes to experiments/out/:

* ``student_weights.png``: the first-layer weights W⁽¹⁾ as a heat map (rows: hidden nodes, columns:
  features). If the hidden units pick up the two latent factors, one row is large on GPA and IQ and
  small on BMI and sleep, the other the reverse.
* ``student_network.png``: the trained network drawn like the seed's Figure 1; edge width is |W|,
  colour its sign.

Prints the test accuracy, and for each hidden node the share of its weight mass on GPA + IQ.
"""

from __future__ import annotations

from pathlib import Path

import torch

import torchderiv.functional as TF
from torchderiv.lightning import StudentDataModule
from torchderiv.nn import MLP

OUT = Path(__file__).resolve().parent / "out"
FEATURES = ["GPA", "IQ", "BMI", "sleep"]


def train(epochs: int = 5, lr: float = 0.05, seed: int = 0):
    torch.manual_seed(seed)
    data = StudentDataModule(n_samples=2000, seed=seed)
    data.setup()
    x, y = data.splits["train"].tensors
    model = MLP([4, 2, 1], activation="sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # W ← W − η ∂Loss/∂W (erratum 6)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for t in torch.randperm(len(x), generator=g).tolist():  # x̄⁽ᵗ⁾: one random sample per step
            optimizer.zero_grad()
            TF.binary_cross_entropy_with_logits(model(x[t : t + 1]).squeeze(-1), y[t : t + 1]).backward()
            optimizer.step()
    xt, yt = data.splits["test"].tensors
    with torch.no_grad():
        accuracy = ((model(xt).squeeze(-1) > 0).float() == yt).float().mean().item()
    return model, accuracy


def plot_weights(model: MLP, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = model.layers[0].weight.detach()
    lim = w.abs().max().item()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    im = ax.imshow(w, cmap="coolwarm", vmin=-lim, vmax=lim)
    ax.set_xticks(range(4), FEATURES)
    ax.set_yticks(range(w.shape[0]), [f"h{i + 1}" for i in range(w.shape[0])])
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title("first-layer weights W⁽¹⁾")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_network(model: MLP, path: Path) -> None:
    """Input, hidden and output nodes in columns, as the seed's Figure 1; edges weighted by W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = model.sizes
    labels = [FEATURES, [f"h{i + 1}" for i in range(sizes[1])], ["z"]]
    pos = [[(k, (n - 1) / 2 - i) for i in range(n)] for k, n in enumerate(sizes)]
    weights = [layer.weight.detach() for layer in model.layers]
    top = max(w.abs().max().item() for w in weights)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, w in enumerate(weights):
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                (x0, y0), (x1, y1) = pos[k][j], pos[k + 1][i]
                value = w[i, j].item()
                ax.plot(
                    [x0, x1],
                    [y0, y1],
                    color="tab:red" if value > 0 else "tab:blue",
                    lw=0.5 + 5 * abs(value) / top,
                    alpha=0.8,
                    zorder=1,
                )
    for k, column in enumerate(pos):
        for (x, yv), label in zip(column, labels[k]):
            ax.scatter([x], [yv], s=900, color="white", edgecolors="black", zorder=2)
            ax.text(x, yv, label, ha="center", va="center", fontsize=8, zorder=3)
    ax.set_title("trained network (red: positive weight, blue: negative; width: |W|)")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    model, accuracy = train()
    print(f"test accuracy: {accuracy:.3f}")
    w = model.layers[0].weight.detach().abs()
    for i, row in enumerate(w):
        share = (row[:2].sum() / row.sum()).item()
        print(f"h{i + 1}: share of |W| on GPA + IQ = {share:.2f}  (1: intelligence, 0: health)")
    plot_weights(model, OUT / "student_weights.png")
    draw_network(model, OUT / "student_network.png")
    print(f"figures: {OUT / 'student_weights.png'}, {OUT / 'student_network.png'}")


if __name__ == "__main__":
    main()

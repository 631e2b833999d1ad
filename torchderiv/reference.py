"""The seed's derivation, written literally: per-node loops over Python floats.

This is the oracle the vectorised Functions are tested against. It shares no code with
:mod:`torchderiv.functional` and does not use torch at all: every quantity is a Python float,
indexed exactly as in the seed (``W[k][i][j]`` is the weight of the edge from node j of layer k−1
to node i of layer k), with the errata of ``docs/derivation.md`` applied:

* the forward sums run over the input index j (erratum 1);
* every layer may carry a bias, whose gradient is the node's error (erratum 7);
* the update descends, ``W ← W − η ∂Loss/∂W`` (erratum 6).

Networks have one output node (the seed's ``z = z_1^{(L+1)}``); ``k = 0`` is the input layer, so
``W[0]`` is unused and ``W[1] … W[L+1]`` are the layers. Lists are used rather than tensors so that
nothing here can share a bug with the batched code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["ACTIVATIONS", "LOSSES", "forward", "gradients", "sgd_step", "train", "Net"]


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


# g and g' for the seed's "thresholding function", one pair per name.
ACTIVATIONS: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "identity": (lambda z: z, lambda z: 1.0),
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z))),
    "tanh": (math.tanh, lambda z: 1.0 - math.tanh(z) ** 2),
    "relu": (lambda z: max(z, 0.0), lambda z: 1.0 if z > 0 else 0.0),
}

# Loss(g(z), y) and ∂Loss/∂g(z), the first factor of seed §3.1.
LOSSES: dict[str, tuple[Callable[[float, float], float], Callable[[float, float], float]]] = {
    "squared_error": (lambda o, y: (o - y) ** 2, lambda o, y: 2.0 * (o - y)),
    "binary_cross_entropy": (
        lambda o, y: -(y * math.log(o) + (1.0 - y) * math.log(1.0 - o)),
        lambda o, y: -(y / o - (1.0 - y) / (1.0 - o)),
    ),
}


class Net(NamedTuple):
    """``W[k][i][j]`` and ``b[k][i]`` for k = 1 … L+1 (index 0 unused); g for hidden layers and output."""

    W: list
    b: list
    g: str = "sigmoid"
    out_g: str = "sigmoid"


def forward(net: Net, x: list[float]):
    """Seed §2: ``z_i^{(k)} = Σ_j W_ij^{(k)} h_j^{(k−1)} + b_i^{(k)}``, ``h_i^{(k)} = g(z_i^{(k)})``.

    Returns ``(z, h)``: lists over layers of lists over nodes; ``h[0] = x``, and the last layer's
    ``h`` is the output ``g(z)``.
    """
    g = ACTIVATIONS[net.g][0]
    out_g = ACTIVATIONS[net.out_g][0]
    n_layers = len(net.W) - 1  # L + 1
    z: list[list[float]] = [[]]
    h: list[list[float]] = [list(x)]
    for k in range(1, n_layers + 1):
        zk = []
        for i in range(len(net.W[k])):
            s = net.b[k][i] if net.b is not None else 0.0
            for j in range(len(net.W[k][i])):
                s += net.W[k][i][j] * h[k - 1][j]
            zk.append(s)
        act = out_g if k == n_layers else g
        z.append(zk)
        h.append([act(v) for v in zk])
    return z, h


def gradients(net: Net, x: list[float], y: float, loss: str):
    """``∂Loss/∂W_ij^{(k)}`` and ``∂Loss/∂b_i^{(k)}`` for one sample, by seed §3.1–3.6.

    §3.1  ``∂Loss/∂z = ∂Loss/∂g(z) · g'(z)`` at the single output node;
    §3.2/3.3  ``∂Loss/∂W_ij^{(k)} = ∂Loss/∂z_i^{(k)} · h_j^{(k−1)}`` (``x_j`` for k = 1);
    §3.4/3.5  ``∂Loss/∂z_j^{(k)} = Σ_i ∂Loss/∂z_i^{(k+1)} · W_ij^{(k+1)} · g'(z_j^{(k)})``;
    bias (erratum 7)  ``∂Loss/∂b_i^{(k)} = ∂Loss/∂z_i^{(k)}``.
    """
    g_prime = ACTIVATIONS[net.g][1]
    out_g_prime = ACTIVATIONS[net.out_g][1]
    d_loss = LOSSES[loss][1]
    z, h = forward(net, x)
    n_layers = len(net.W) - 1
    dz: list[list[float]] = [[] for _ in range(n_layers + 1)]
    out = h[n_layers][0]
    dz[n_layers] = [d_loss(out, y) * out_g_prime(z[n_layers][0])]  # §3.1
    for k in range(n_layers - 1, 0, -1):  # §3.5, k = L … 1
        dz[k] = []
        for j in range(len(z[k])):
            s = 0.0
            for i in range(len(dz[k + 1])):
                s += dz[k + 1][i] * net.W[k + 1][i][j]
            dz[k].append(s * g_prime(z[k][j]))
    dW = [[]] + [
        [[dz[k][i] * h[k - 1][j] for j in range(len(net.W[k][i]))] for i in range(len(net.W[k]))]
        for k in range(1, n_layers + 1)
    ]
    db = [[]] + [list(dz[k]) for k in range(1, n_layers + 1)]
    return dW, db


def sgd_step(net: Net, dW, db, lr: float) -> Net:
    """Seed §3.6 with erratum 6: ``W_ij ← W_ij − η ∂Loss/∂W_ij`` (and the same for b)."""
    W = [[]] + [
        [[net.W[k][i][j] - lr * dW[k][i][j] for j in range(len(net.W[k][i]))] for i in range(len(net.W[k]))]
        for k in range(1, len(net.W))
    ]
    b = (
        None
        if net.b is None
        else [[]] + [[net.b[k][i] - lr * db[k][i] for i in range(len(net.b[k]))] for k in range(1, len(net.b))]
    )
    return net._replace(W=W, b=b)


def train(net: Net, xs, ys, loss: str, lr: float, steps: int) -> list[Net]:
    """Per-sample SGD (seed §3.6): at step t take sample ``t mod n``; returns the net after every step."""
    history = [net]
    for t in range(steps):
        i = t % len(xs)
        dW, db = gradients(net, xs[i], ys[i], loss)
        net = sgd_step(net, dW, db, lr)
        history.append(net)
    return history

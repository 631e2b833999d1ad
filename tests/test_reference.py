"""The seed's per-node derivation (torchderiv.reference) against the vectorised MLP and losses.

Agreement here is what shows that the batched Functions implement the derivation, errata applied.
"""

import math

import pytest
import torch

import torchderiv.functional as TF
from torchderiv import reference
from torchderiv.nn import MLP

CASES = [
    # hidden g, output g, loss in the seed's form, torchderiv loss on logits (the collapsed §3.1)
    ("sigmoid", "sigmoid", "binary_cross_entropy", TF.binary_cross_entropy_with_logits),
    ("tanh", "sigmoid", "binary_cross_entropy", TF.binary_cross_entropy_with_logits),
    ("relu", "identity", "squared_error", TF.mse_loss),
    ("tanh", "identity", "squared_error", TF.mse_loss),
]
IDS = [f"{g}-{o}-{loss}" for g, o, loss, _ in CASES]


def _net_to_lists(model: MLP, g: str, out_g: str) -> reference.Net:
    W = [[]] + [layer.weight.detach().tolist() for layer in model.layers]
    b = [[]] + [layer.bias.detach().tolist() for layer in model.layers]
    return reference.Net(W, b, g, out_g)


def _data(n=6, d=3, binary=True):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    y = (
        (torch.rand(n, dtype=torch.float64, generator=gen) > 0.5).double()
        if binary
        else torch.randn(n, dtype=torch.float64, generator=gen)
    )
    return x, y


@pytest.mark.parametrize("sizes", [[3, 1], [3, 4, 1], [3, 4, 5, 1]], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_gradient_equals_mean_of_seed_gradients(case, sizes):
    """J(θ) = 1/n Σ_i Loss(h(x⁽ⁱ⁾), y⁽ⁱ⁾) (erratum 11): its gradient is the mean of per-sample ones."""
    g, out_g, loss_name, loss_fn = case
    torch.manual_seed(0)
    model = MLP(sizes, activation=g, dtype=torch.float64)
    net = _net_to_lists(model, g, out_g)
    x, y = _data(binary=out_g == "sigmoid")
    loss = loss_fn(model(x).squeeze(-1), y)
    loss.backward()
    n = len(x)
    for k, layer in enumerate(model.layers, start=1):
        dW = [[0.0] * len(row) for row in net.W[k]]
        db = [0.0] * len(net.b[k])
        for s in range(n):
            gW, gb = reference.gradients(net, x[s].tolist(), y[s].item(), loss_name)
            for i in range(len(dW)):
                db[i] += gb[k][i] / n
                for j in range(len(dW[i])):
                    dW[i][j] += gW[k][i][j] / n
        torch.testing.assert_close(layer.weight.grad, torch.tensor(dW, dtype=torch.float64), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, torch.tensor(db, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_equals_seed(case):
    g, out_g, _, _ = case
    torch.manual_seed(1)
    model = MLP([3, 4, 2, 1], activation=g, dtype=torch.float64)
    net = _net_to_lists(model, g, out_g)
    x, _ = _data()
    z_out = model(x).squeeze(-1)
    for s in range(len(x)):
        z, h = reference.forward(net, x[s].tolist())
        assert math.isclose(z[-1][0], z_out[s].item(), rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sgd_trajectory_equals_seed(case):
    """Per-sample SGD with the corrected sign (erratum 6): 20 steps, same weights after every step."""
    g, out_g, loss_name, loss_fn = case
    torch.manual_seed(2)
    model = MLP([3, 4, 1], activation=g, dtype=torch.float64)
    net = _net_to_lists(model, g, out_g)
    x, y = _data(n=5, binary=out_g == "sigmoid")
    lr, steps = 0.1, 20
    history = reference.train(net, x.tolist(), y.tolist(), loss_name, lr, steps)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(steps):
        i = t % len(x)
        opt.zero_grad()
        loss_fn(model(x[i : i + 1]).squeeze(-1), y[i : i + 1]).backward()
        opt.step()
        expected = history[t + 1]
        for k, layer in enumerate(model.layers, start=1):
            torch.testing.assert_close(
                layer.weight.detach(), torch.tensor(expected.W[k], dtype=torch.float64), rtol=1e-9, atol=1e-12
            )
            torch.testing.assert_close(
                layer.bias.detach(), torch.tensor(expected.b[k], dtype=torch.float64), rtol=1e-9, atol=1e-12
            )


def test_sgd_descends():
    """The corrected update lowers the loss on a small step (the seed's '+' would raise it)."""
    torch.manual_seed(3)
    model = MLP([3, 4, 1], activation="sigmoid", dtype=torch.float64)
    net = _net_to_lists(model, "sigmoid", "sigmoid")
    x, y = _data(n=1)
    before = reference.LOSSES["binary_cross_entropy"][0](reference.forward(net, x[0].tolist())[1][-1][0], y[0].item())
    dW, db = reference.gradients(net, x[0].tolist(), y[0].item(), "binary_cross_entropy")
    after_net = reference.sgd_step(net, dW, db, 0.01)
    after = reference.LOSSES["binary_cross_entropy"][0](
        reference.forward(after_net, x[0].tolist())[1][-1][0], y[0].item()
    )
    assert after < before

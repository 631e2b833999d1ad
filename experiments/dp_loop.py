"""DP-SGD in your own loop: Opacus's noise, accountant and Poisson sampling; torchderiv's clipping.

To run:
    .venv/bin/python experiments/dp_loop.py                      # digits, σ = 1.5, C = 1, 30 epochs (~5 s)
    .venv/bin/python experiments/dp_loop.py --epochs 5 --sigma 1

An Opacus loop made with ``PrivacyEngine.make_private(..., grad_sample_mode="ghost")`` changes in three
places (marked ``# (1)``–``# (3)`` below):

1. the model stays a torchderiv model (``torchderiv.nn.MLP``, or ``torchderiv.convert(model)``): no
   ``GradSampleModule`` wrapper;
2. the optimizer is Opacus's ``DPOptimizerFastGradientClipping``, made by
   ``torchderiv.privacy.private_optimizer``: it takes a ``.grad`` that already holds the clipped sum
   ``Σᵢ cᵢ gᵢ``, adds ``N(0, σ²C²)`` once, and divides by the *expected* batch size (Poisson batches vary
   in size, empty ones included). Before it is made, it checks that it is over exactly the model's
   trainable parameters; at every ``step()``, that each ``.grad`` came from a backward clipped with its
   own C and loss reduction (else the noise would not cover it);
3. ``loss.backward()`` runs inside ``optimizer.clipping()`` (that is,
   ``torchderiv.per_sample(model, max_norm=C, clipped_sum=True)``): one backward pass computes every
   example's norm and leaves the clipped sum in ``.grad``.

Everything else — the accountant, Poisson sampling, ``get_noise_multiplier`` — is Opacus's, unchanged.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

import torchderiv
from torchderiv.lightning import DigitsDataModule


def digits(seed: int = 0):
    """``((x, y), (x_test, y_test))``: the split and scaling of configs/digits_dp.yaml (``DigitsDataModule``:
    70 / 15 / 15, pixels / 16: no statistics of the private training data)."""
    dm = DigitsDataModule(seed=seed, preprocessing="fixed")
    dm.setup()
    return dm.splits["train"].tensors, dm.splits["test"].tensors


def train(sigma=1.5, max_grad_norm=1.0, batch_size=64, epochs=30, lr=0.5, delta=1e-5, seed=0, norms_at=()):
    """The private loop; returns ``(test accuracy, ε)``. ``norms_at``: also return, for each epoch listed
    (0 = before training), every training example's gradient norm, ``{epoch: (N,) tensor}``."""
    torch.manual_seed(seed)
    (x, y), (x_test, y_test) = digits(seed)
    model = torchderiv.nn.MLP([64, 128, 10])  # (1) a torchderiv model
    loader = DPDataLoader.from_data_loader(  # Poisson sampling, Opacus's
        DataLoader(TensorDataset(x, y), batch_size=batch_size), generator=torch.Generator().manual_seed(seed)
    )
    sample_rate = 1 / len(loader)
    optimizer = torchderiv.privacy.private_optimizer(  # (2) Opacus's optimizer for a .grad that holds the clipped sum
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
    )
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    norms = {}
    for epoch in range(epochs + 1):
        if epoch in norms_at:
            norms[epoch] = example_norms(model, x, y)
        if epoch == epochs:
            break
        for xb, yb in loader:
            optimizer.zero_grad()
            with optimizer.clipping():  # (3) one backward: every example's norm, the clipped sum in .grad
                F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    eps = accountant.get_epsilon(delta) if sigma > 0 else float("inf")
    return (acc, eps, norms) if norms_at else (acc, eps)


def example_norms(model, x, y) -> torch.Tensor:
    """Every example's gradient norm (the quantity the clipping bounds), from one backward, no update."""
    with torchderiv.per_sample(model) as ps:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return ps.norms.detach().clone()


def train_opacus_hooks(sigma=1.5, max_grad_norm=1.0, batch_size=64, epochs=30, lr=0.5, delta=1e-5, seed=0):
    """The same run through Opacus's own ``make_private(grad_sample_mode="hooks")``, on torch.nn."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    (x, y), (x_test, y_test) = digits(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        grad_sample_mode="hooks",
    )
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return acc, engine.get_epsilon(delta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", type=float, default=1.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    acc, eps = train(sigma=args.sigma, max_grad_norm=args.max_grad_norm, epochs=args.epochs, seed=args.seed)
    print(f"test/acc = {acc:.4f}  epsilon = {eps:.2f} (delta = 1e-5)  {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

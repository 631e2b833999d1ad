"""The noise of a private step: equal to Opacus's at σ > 0 given the same generator, and measured.

A privacy bug never shows in accuracy (too little noise trains better), so the noise is checked directly: the
difference between a step at σ and the same step at σ = 0 (same weights, same batch) is the noise the optimizer
added, divided by the expected batch size E and multiplied by −lr. Its entries must look like N(0, (σC)²) once
rescaled: mean 0, standard deviation σ·C. With ~10⁴ entries the standard deviation's relative standard error is
~0.7%, so the 4% tolerance fails a noise scale off by 10% (checked on the measured noise itself, scaled), noise
added twice (×√2) or divided by the wrong batch size, and leaves a correct step 5 standard errors of room.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import torchderiv

pytest.importorskip("opacus")
import lightning as L  # noqa: E402
from opacus import PrivacyEngine as OpacusEngine  # noqa: E402

from torchderiv.lightning import DigitsDataModule, MLPModule, Privacy  # noqa: E402
from torchderiv.privacy import private_optimizer  # noqa: E402

SIZES = [64, 128, 10]  # 9,610 parameters: 9,610 draws of the noise per step
LR, C = 0.5, 0.8


def noise_problems(noise: torch.Tensor, std: float) -> list[str]:
    """What is wrong with ``noise`` as a sample of N(0, std²) (empty: nothing)."""
    noise = noise.double().flatten()
    n = noise.numel()
    problems = []
    if abs(noise.mean().item()) > 4 * std / math.sqrt(n):
        problems.append(f"mean {noise.mean().item():.3g}, expected 0 ± {4 * std / math.sqrt(n):.3g}")
    ratio = noise.std().item() / std
    if abs(ratio - 1) > 0.04:
        problems.append(f"standard deviation {ratio:.4f} × the expected σ·C = {std:.4g}")
    return problems


def _check(noise: torch.Tensor, std: float) -> None:
    assert noise_problems(noise, std) == []
    # the check has the power it claims: the same noise 10% too large or too small fails it
    assert noise_problems(noise * 1.1, std) and noise_problems(noise * 0.9, std)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- the loop recipe: private_optimizer ------------------------------------------------------------------------


def _batch(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, SIZES[0], generator=g, dtype=torch.float64) * 2, torch.randint(0, 10, (n,), generator=g)


def _our_step(sigma: float, x, y, expected: float, seed: int = 5, rank: int = 0, world: int = 1):
    """One private step from fixed weights; with ``world > 1`` (inside a process group) this rank's share of the
    batch, its share of the expected batch size, and Opacus's distributed optimizer."""
    torch.manual_seed(0)
    model = torchderiv.nn.MLP(SIZES).double()
    opt = private_optimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=expected / world,  # this process's share, as under Lightning's DDP
        generator=torch.Generator().manual_seed(seed),  # under DDP the same seed on every rank: twice would show
        distributed=world > 1,
    )
    opt.zero_grad()
    with opt.clipping():
        F.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
    opt.step()
    return model


def _opacus_step(ref, loader, sigma, generator, x, y):
    """One step of Opacus's own ``make_private`` (hooks) on ``ref`` with the noise stream ``generator``."""
    model, opt, _ = OpacusEngine().make_private(
        module=ref,
        optimizer=torch.optim.SGD(ref.parameters(), lr=LR),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=C,
        poisson_sampling=False,
        noise_generator=generator,
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def test_loop_recipe_step_at_sigma_equals_opacus_make_private():
    x, y = _batch()
    sigma = 1.3
    mine = _flat(_our_step(sigma, x, y, expected=40))
    torch.manual_seed(0)
    ours0 = torchderiv.nn.MLP(SIZES).double()
    ref = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).double()
    ref.load_state_dict({k.replace("layers.1", "2").replace("layers.0", "0"): v for k, v in ours0.state_dict().items()})
    _opacus_step(ref, DataLoader(TensorDataset(x, y), batch_size=40), sigma, torch.Generator().manual_seed(5), x, y)
    theirs = _flat(ref)
    assert_close(mine, theirs, rtol=0, atol=1e-6)
    # and the noise moved the step well beyond that tolerance (σ·C·lr / E ≈ 0.013 per entry)
    assert (mine - _flat(_our_step(0.0, x, y, expected=40))).abs().max() > 1e-2


@pytest.mark.parametrize("expected", [40, 25.5])
def test_loop_recipe_noise_is_sigma_c_over_the_expected_batch_size(expected):
    x, y = _batch()
    sigma = 1.1
    noise = (_flat(_our_step(sigma, x, y, expected)) - _flat(_our_step(0.0, x, y, expected))) * (-expected / LR)
    _check(noise, sigma * C)


# --- the Lightning path: MLPModule(privacy=...) ------------------------------------------------------------------


class _Record(L.Callback):
    """Keeps the first training batch and the noise stream's state before its step."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = [t.clone() for t in batch]
            self.noise_state = module._private.noise_generator.get_state()
            self.expected = module._private.expected_batch_size


def _lightning_step(tmp_path, sigma: float):
    L.seed_everything(0)
    module = MLPModule(SIZES, optimizer="sgd", lr=LR, privacy=Privacy(noise_multiplier=sigma, max_grad_norm=C))
    start = copy.deepcopy(module.net.state_dict())
    record = _Record()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        default_root_dir=tmp_path,
    )
    dm = DigitsDataModule(batch_size=64, preprocessing="fixed")
    trainer.fit(module, dm)
    return module, start, record, dm


def test_lightning_step_at_sigma_equals_opacus_make_private(tmp_path):
    sigma = 1.2
    module, start, record, dm = _lightning_step(tmp_path, sigma)
    x, y = record.batch
    assert 30 < len(x) < 100  # a Poisson batch around the expected 62
    from torchderiv.lightning.module import AutogradMLP

    ref = AutogradMLP(SIZES).double()
    ref.load_state_dict(start)
    # make_private's own expected batch size: from a loader of the training set with the data module's batch size
    loader = DataLoader(dm.splits["train"], batch_size=64)
    gen = torch.Generator()
    gen.set_state(record.noise_state)
    opt = _opacus_step(ref, loader, sigma, gen, x.double(), y)
    assert opt.expected_batch_size == record.expected
    assert_close(_flat(module.net), _flat(ref), rtol=0, atol=1e-6)


def test_lightning_noise_is_sigma_c_over_the_expected_batch_size(tmp_path):
    sigma = 0.9
    noisy, _, record, _ = _lightning_step(tmp_path / "a", sigma)
    clean, _, record0, _ = _lightning_step(tmp_path / "b", 0.0)
    assert torch.equal(record.batch[0], record0.batch[0])  # the same Poisson batch: only the noise differs
    noise = (_flat(noisy.net) - _flat(clean.net)) * (-record.expected / LR)
    _check(noise, sigma * C)


# --- two processes (DDP): the noise is added once, not once per rank -------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, sigma: float, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _batch(n=48)
        expected = 48.0
        params = [_flat(_our_step(s, x, y, expected, rank=rank, world=world)) for s in (sigma, 0.0)]
        if rank == 0:
            torch.save((params[0] - params[1]) * (-expected / LR), out)
        else:  # every rank ends at the same weights
            torch.save(params[0], out + ".rank1")
    finally:
        dist.destroy_process_group()


def test_ddp_noise_is_added_once(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "noise.pt")
    sigma = 1.0
    mp.spawn(_ddp_worker, args=(2, port, sigma, out), nprocs=2, join=True)
    noise = torch.load(out)
    _check(noise, sigma * C)
    # the single-process step on the whole batch draws the same noise and ends where both ranks end
    x, y = _batch(n=48)
    alone = _flat(_our_step(sigma, x, y, expected=48.0))
    assert_close(torch.load(out + ".rank1"), alone, rtol=0, atol=1e-9)

"""torchderiv.privacy.PrivacyEngine: Opacus's training loop with only the import changed ends where Opacus's does."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import torchderiv

pytest.importorskip("opacus")
from opacus import PrivacyEngine as OpacusEngine  # noqa: E402

from torchderiv.privacy import PrivacyEngine  # noqa: E402


def _net():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4))


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 6, generator=g, dtype=torch.float64) * 3, torch.randint(0, 4, (n,), generator=g)
    )


def _loop(engine_cls, sigma, poisson=False, steps=3, epsilon=False):
    """Opacus's example loop (zero_grad, forward, loss, backward, step), with the engine given."""
    torch.manual_seed(1)
    model = _net().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = DataLoader(_data(), batch_size=10)
    engine = engine_cls()
    common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=0.7, poisson_sampling=poisson)
    gen = torch.Generator().manual_seed(5)
    if epsilon:
        model, optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=3.0, target_delta=1e-5, epochs=2, noise_generator=gen
        )
    else:
        model, optimizer, loader = engine.make_private(**common, noise_multiplier=sigma, noise_generator=gen)
    criterion = nn.CrossEntropyLoss()
    done = 0
    torch.manual_seed(2)  # the Poisson sampler draws from the global generator, as in Opacus's make_private
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    if hasattr(model, "cleanup"):
        model.cleanup()
    return model, engine


@pytest.mark.parametrize("sigma", [0.0, 1.3], ids=["no-noise", "noise"])
def test_opacus_loop_with_the_import_changed_ends_where_opacus_does(sigma):
    ours, ours_engine = _loop(PrivacyEngine, sigma)
    theirs, their_engine = _loop(OpacusEngine, sigma)
    assert type(ours._module[0]) is torchderiv.nn.Linear  # converted in place
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the same `_module.` keys
    if sigma > 0:
        assert ours_engine.get_epsilon(1e-5) == pytest.approx(their_engine.get_epsilon(1e-5))


def test_with_epsilon_and_poisson_sampling():
    ours, ours_engine = _loop(PrivacyEngine, None, poisson=True, epsilon=True)
    theirs, their_engine = _loop(OpacusEngine, None, poisson=True, epsilon=True)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert ours_engine.get_epsilon(1e-5) == pytest.approx(
        their_engine.get_epsilon(1e-5)
    ) and 0 < ours_engine.get_epsilon(1e-5)


def test_ghost_mode_returns_the_criterion_and_refusals():
    model = _net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=10)
    out = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        criterion=nn.CrossEntropyLoss(),
    )
    assert len(out) == 4 and isinstance(out[2], nn.CrossEntropyLoss)
    with pytest.raises(NotImplementedError, match="clipping='per_layer'"):
        PrivacyEngine().make_private(
            module=_net(),
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            clipping="per_layer",
        )
    with pytest.raises(NotImplementedError, match="secure_mode"):
        PrivacyEngine(secure_mode=True)
    conv = nn.Sequential(nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 4))  # PReLU: no twin
    with pytest.raises(RuntimeError, match=r"1\.weight of PReLU"):
        PrivacyEngine().make_private(
            module=conv,
            optimizer=torch.optim.SGD(conv.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )

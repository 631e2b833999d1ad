"""What torchderiv does with torch alone (`pip install torchderiv`, no extras): layers, convert, per_sample,
testing.verify and `torchderiv check` work; every feature that needs an extra says which one.

CI runs this file in a venv with only torch and pytest installed (`make test-torch-only`, which sets
TORCHDERIV_TORCH_ONLY=1); in the full suite the extras are installed and their absence is simulated.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchderiv
from torchderiv import extras
from torchderiv.testing import verify

TORCH_ONLY = os.environ.get("TORCHDERIV_TORCH_ONLY") == "1"


@pytest.mark.skipif(not TORCH_ONLY, reason="the torch-only venv of `make test-torch-only`")
def test_this_environment_has_torch_alone():
    assert extras.missing("lightning") == list(extras.EXTRAS["lightning"])
    assert extras.missing("privacy") == ["opacus"]


def test_converted_model_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    ref = copy.deepcopy(model)
    torchderiv.convert(model)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    for m in (model, ref):
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_per_sample_norms_equal_one_backward_per_example():
    torch.manual_seed(0)
    model = torchderiv.nn.MLP([4, 6, 3]).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with torchderiv.per_sample(model, loss_reduction="sum") as ps:
        torchderiv.functional.cross_entropy(model(x), y, reduction="sum").backward()
    want = []
    for i in range(5):
        grads = torch.autograd.grad(
            torchderiv.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"),
            list(model.parameters()),
        )
        want.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    torch.testing.assert_close(ps.norms, torch.stack(want), rtol=1e-10, atol=0)


def test_verify_checks_a_function():
    report = verify(torchderiv.functional.linear, (torch.randn(3, 4), torch.randn(2, 4), torch.randn(2)))
    assert report.ok, str(report)


def test_check_command_runs_every_builtin_function():
    out = subprocess.run([sys.executable, "-m", "torchderiv", "check"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "0 failed" in out.stdout


def _without(monkeypatch, extra):
    if not TORCH_ONLY:  # the extras are installed here: their absence is simulated
        names = extras.EXTRAS[extra]
        monkeypatch.setattr(extras, "missing", lambda e: list(names) if e == extra else [])


def test_training_commands_name_the_extra_they_need(monkeypatch, capsys):
    _without(monkeypatch, "lightning")
    from torchderiv.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/digits.yaml"])
    assert stop.value.code == 2
    assert "pip install 'torchderiv[lightning]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"torchderiv.lightning needs the 'lightning' extra"):
        extras.require("lightning", "torchderiv.lightning")


def test_private_training_names_the_extra_it_needs(monkeypatch):
    _without(monkeypatch, "privacy")
    import torchderiv.privacy as privacy

    privacy._CLASSES.clear()
    model = torchderiv.nn.MLP([4, 3])
    with pytest.raises(ImportError, match=r"private_optimizer needs the 'privacy' extra .*torchderiv\[privacy\]"):
        privacy.private_optimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
    with pytest.raises(ImportError, match="the 'privacy' extra"):
        privacy.PrivacyEngine()

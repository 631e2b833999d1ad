"""The private torch APIs per-example clipping relies on sit behind one module whose self-test fails loudly when
torch changes them (torchderiv/functional/_torch_internals.py)."""

import re
from pathlib import Path

import pytest
import torch

import torchderiv
from torchderiv.functional import _torch_internals as internals

PACKAGE = Path(torchderiv.__file__).parent
PRIVATE = re.compile(
    r"torch\._C\b|_execution_engine|_raw_saved_tensors|_forward_cls|\._version\b|super\(torch\.autograd"
)


def test_self_test_passes_on_this_torch():
    assert internals.self_test() == []
    internals.require()


def test_no_other_module_touches_a_private_torch_name():
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_torch_internals.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert found == []


# Each planted change is one a torch release could make without raising: the self-test must name it.
PLANTED = {
    "graph_task_id": lambda: -1,
    "queue_callback": lambda fn: fn(),
    "will_execute": lambda node: True,
    "forward_class": lambda node: None,
    "saved_through_hooks": lambda node: False,
    "version": lambda t: 0,
    "transforms_active": lambda: False,
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_a_changed_internal_is_caught_and_per_sample_refuses_to_run(name, monkeypatch):
    monkeypatch.setattr(internals, name, PLANTED[name])
    monkeypatch.setattr(internals, "_verdict", None)
    problems = internals.self_test()
    assert problems, f"planting a changed {name} went unnoticed"
    layer = torchderiv.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match=rf"torch {re.escape(torch.__version__)} changed internals .*What changed"):
        with torchderiv.per_sample(layer, max_norm=1.0):
            pass


def test_a_tensor_left_by_a_finished_transform_is_taken_as_torch_takes_it():
    """A tensor saved inside ``torch.func.grad`` outlives the transform as a dead wrapper; Function.apply unwraps it
    (in Python before its C entry on torch 2.13, inside the C entry on 2.14), and so must torchderiv's apply."""

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    saved = []

    def f(x):
        saved.append(x)
        return (x * 2).sum()

    torch.func.grad(f)(torch.randn(3, 4, dtype=torch.float64))
    dead = saved[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    theirs = Twice.apply(dead)
    ours = torchderiv.functional.relu(dead)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(ours)
    assert ours.requires_grad == theirs.requires_grad and (ours.grad_fn is None) == (theirs.grad_fn is None)
    torch.testing.assert_close(ours, torch.relu(theirs / 2), rtol=0, atol=0)

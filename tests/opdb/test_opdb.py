"""Every sample PyTorch tests its own ops with (OpInfo ``op_db``) through torchderiv's twins.

Importing op_db calls ``torch.backends.disable_global_flags()``, which breaks
``lightning.Trainer(deterministic=True)`` later in the same process, so this file runs in its own
pytest invocation (see the Makefile).
"""

import pytest
import torch
from helpers import check_parity
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils.checkpoint import checkpoint

import torchderiv.functional as TF

TWINS = {
    "nn.functional.linear": TF.linear,
    "sigmoid": TF.sigmoid,
    "tanh": TF.tanh,
    "nn.functional.relu": TF.relu,
    "nn.functional.leaky_relu": TF.leaky_relu,
    "nn.functional.elu": TF.elu,
    "nn.functional.softplus": TF.softplus,
    "nn.functional.gelu": TF.gelu,
    "nn.functional.silu": TF.silu,
    "nn.functional.mse_loss": TF.mse_loss,
    "nn.functional.huber_loss": TF.huber_loss,
    "nn.functional.binary_cross_entropy_with_logits": TF.binary_cross_entropy_with_logits,
    "nn.functional.cross_entropy": TF.cross_entropy,
    "nn.functional.layer_norm": TF.layer_norm,
    "nn.functional.rms_norm": TF.rms_norm,
    "nn.functional.conv1d": TF.conv1d,
    "nn.functional.conv2d": TF.conv2d,
    "nn.functional.group_norm": TF.group_norm,
}


def _linear_cross_entropy(*args, options=None, **kwargs):
    # torch's `options` selects its chunked path; torchderiv's is always chunked, sized by chunk_size.
    if options is not None and kwargs.get("chunk_size") is None:
        kwargs["chunk_size"] = options.batch_chunk_size
    return TF.linear_cross_entropy(*args, **kwargs)


TWINS["nn.functional.linear_cross_entropy"] = _linear_cross_entropy
# op_db's embedding entry takes the weight first (its samples' input), the indices second
TWINS["nn.functional.embedding"] = lambda weight, indices, **kwargs: TF.embedding(indices, weight, **kwargs)
# Every variant of linear_cross_entropy ('', 'chunked', 'chunked_none'); the default one of the others.
OPS = [op for op in op_db if op.name in TWINS and (op.variant_test_name == "" or "linear_cross" in op.name)]
assert {op.name for op in OPS} == set(TWINS), "an op_db entry this file relies on is missing"
IDS = [
    op.name.removeprefix("nn.functional.") + (f"-{op.variant_test_name}" if op.variant_test_name else "") for op in OPS
]


# Compared in float32 against torch's op run in float64 (then cast back): with one element to a row, x − μ is 0 in
# exact arithmetic and in ours (the mean of one number is that number), while torch's float32 kernel leaves a
# rounding error of its mean there that r⁻¹ = ε^-½ ≈ 316 amplifies: x̂ ≈ 3e-6 instead of 0, and γ's gradient
# δ·x̂ ≈ 3e-5 where the exact value is 0 (seen on op_db's sample of shape (1,)).
IN_FLOAT64 = {"nn.functional.layer_norm", "nn.functional.rms_norm"}


def _in_float64(fn):
    def run(*args):
        up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return fn(*up).float()

    return run


def _samples(op, dtype):
    seen = 0
    for generator in (op.sample_inputs, op.reference_inputs):
        for sample in generator("cpu", dtype, requires_grad=True):
            seen += 1
            yield sample
    assert seen, f"no samples for {op.name}"


def _check_every_sample(op, dtype, wrap=lambda f: f):
    """Values and gradients of torchderiv's twin, as ``wrap`` runs it, equal to torch's op on every sample."""
    ours = TWINS[op.name]
    count = 0
    for sample in _samples(op, dtype):
        names = list(sample.kwargs)
        args = [sample.input, *sample.args, *sample.kwargs.values()]
        n_pos = 1 + len(sample.args)

        def call(fn, *a):
            return fn(*a[:n_pos], **dict(zip(names, a[n_pos:])))

        # torch's elu_backward gives NaN at a NaN input in its vectorised body and passes the gradient
        # in its scalar tail (short tensors); torchderiv always gives NaN, so those entries are skipped.
        skip = torch.isnan(sample.input) if op.name == "nn.functional.elu" else None
        theirs = lambda *a: call(op.op, *a)  # noqa: E731
        if op.name in IN_FLOAT64 and dtype == torch.float32:
            theirs = _in_float64(theirs)
        try:
            check_parity(wrap(lambda *a: call(ours, *a)), theirs, args, skip_grad_where=skip)
        except AssertionError as e:
            raise AssertionError(f"{op.name} sample {sample}: {e}") from e
        count += 1
    assert count > 0


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_every_sample_matches_torch(op, dtype):
    _check_every_sample(op, dtype)


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_every_sample_under_activation_checkpointing(op):
    # A non-reentrant checkpoint recomputes the forward when backward unpacks the saved tensors, and lets each
    # be unpacked only once: a backward (or a helper of it) that reads ctx.saved_tensors twice fails here.
    def checkpointed(fn):
        return lambda *a: checkpoint(fn, *a, use_reentrant=False)

    _check_every_sample(op, torch.float64, checkpointed)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_error_inputs_are_rejected(op):
    ours = TWINS[op.name]
    try:
        errors = list(op.error_inputs("cpu"))
    except TypeError:  # the entry defines no error_inputs
        pytest.skip(f"op_db has no error_inputs for {op.name}")
    for err in errors:
        s = err.sample_input
        with pytest.raises(err.error_type):
            ours(s.input, *s.args, **s.kwargs)


# --- torch's module tests (ModuleInfo): the same exception type for every error input -------------------

from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import torchderiv.nn as tdnn  # noqa: E402

MODULE_TWINS = {getattr(torch.nn, name): getattr(tdnn, name) for name in tdnn.__all__ if hasattr(torch.nn, name)}
ERROR_MODULES = [m for m in module_db if m.module_cls in MODULE_TWINS and m.module_error_inputs_func is not None]


def test_module_error_inputs_exist():
    # a check that cannot silently run over nothing
    assert {m.module_cls.__name__ for m in ERROR_MODULES} >= {"CrossEntropyLoss", "LinearCrossEntropyLoss"}


@pytest.mark.parametrize("info", ERROR_MODULES, ids=lambda m: m.module_cls.__name__)
def test_module_error_inputs_raise_torchs_exception_type(info):
    ours = MODULE_TWINS[info.module_cls]
    errors = list(info.module_error_inputs_func(info, "cpu", torch.float32, False, training=True))
    assert errors
    for err in errors:
        c, f = err.module_error_input.constructor_input, err.module_error_input.forward_input
        if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type):
                ours(*c.args, **c.kwargs)
            continue
        module = ours(*c.args, **c.kwargs)
        with pytest.raises(err.error_type):
            module(*f.args, **f.kwargs)


# --- torch's module samples (ModuleInfo): values and gradients of every twin equal to torch's module ---------


SAMPLE_MODULES = [m for m in module_db if m.module_cls in MODULE_TWINS]


def _floats(out):
    """The floating tensors in a module's output (a tensor or a tuple such as attention's (out, weights))."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _fresh(obj):
    """A copy of a sample's arguments whose tensors are new leaves (requires_grad kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fresh(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    return obj


def test_module_samples_exist():
    assert {m.module_cls.__name__ for m in SAMPLE_MODULES} >= {"Linear", "LayerNorm", "MultiheadAttention", "Embedding"}


@pytest.mark.parametrize("info", SAMPLE_MODULES, ids=lambda m: m.module_cls.__name__)
def test_module_samples_match_torch(info):
    compared = 0
    for sample in info.module_inputs_func(info, "cpu", torch.float64, True, training=False):
        c, f = sample.constructor_input, sample.forward_input
        if f is None:
            continue
        torch.manual_seed(0)  # the same initialisation for both
        theirs = info.module_cls(*c.args, **c.kwargs).to(torch.float64).eval()
        torch.manual_seed(0)
        ours = MODULE_TWINS[info.module_cls](*c.args, **c.kwargs).to(torch.float64).eval()
        args_a, args_b = _fresh((f.args, f.kwargs)), _fresh((f.args, f.kwargs))
        try:
            out_a = _floats(ours(*args_a[0], **args_a[1]))
        except NotImplementedError:  # an option torchderiv refuses (and convert leaves on torch)
            continue
        out_b = _floats(theirs(*args_b[0], **args_b[1]))
        assert len(out_a) == len(out_b)
        for a, b in zip(out_a, out_b):
            torch.testing.assert_close(a, b, equal_nan=True, atol=1e-10, rtol=1e-7)
        leaves_a = [t for t in (*args_a[0], *ours.parameters()) if isinstance(t, torch.Tensor) and t.requires_grad]
        leaves_b = [t for t in (*args_b[0], *theirs.parameters()) if isinstance(t, torch.Tensor) and t.requires_grad]
        diff = [a for a in out_a if a.requires_grad]
        if diff and leaves_a:
            gen = torch.Generator().manual_seed(1)
            weights = [torch.randn(a.shape, dtype=a.dtype, generator=gen) for a in diff]
            total_a = sum((a.nan_to_num() * w).sum() for a, w in zip(diff, weights))
            total_b = sum((b.nan_to_num() * w).sum() for b, w in zip([b for b in out_b if b.requires_grad], weights))
            grads_a = torch.autograd.grad(total_a, leaves_a, allow_unused=True)
            grads_b = torch.autograd.grad(total_b, leaves_b, allow_unused=True)
            for ga, gb in zip(grads_a, grads_b):
                if gb is None:
                    assert ga is None or not ga.any()
                    continue
                torch.testing.assert_close(ga, gb, equal_nan=True, atol=1e-10, rtol=1e-7)
        compared += 1
    if compared == 0:
        pytest.skip(f"every sample of {info.module_cls.__name__} uses an option torchderiv leaves on torch")

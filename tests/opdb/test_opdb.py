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

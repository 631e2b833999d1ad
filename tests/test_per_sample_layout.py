"""Where the examples are: per_sample's ``batch_first``, torch's transformer layers, batches folded into rows.

Ground truth as in test_per_sample.py: the same model on torch's own modules, one autograd backward per
example with every other example's output detached; here the examples may lie along dim 1 of the output.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.nn as tdnn

T, B, D, FF, C = 5, 6, 8, 16, 3
TOL = dict(rtol=1e-10, atol=1e-13)
MISMATCH = r"the tracked layers do not see one batch of examples"


def _per_example(ref, x, bdim, weights):
    """Each example's gradient ``(B, *p.shape)`` of ``Σ weights ⊙ ref(x)`` for ref's trainable parameters, the
    examples along ``bdim`` of the output."""
    params = [p for p in ref.parameters() if p.requires_grad]
    z = ref(x)
    n = z.shape[bdim]
    per = [[] for _ in params]
    for i in range(n):
        keep = (torch.arange(n) == i).reshape([n if d == bdim else 1 for d in range(z.dim())])
        loss = (torch.where(keep, z, z.detach()) * weights).sum()
        for k, g in enumerate(torch.autograd.grad(loss, params, retain_graph=True)):
            per[k].append(g)
    return [torch.stack(g) for g in per]


def _check(ours, ref, x, bdim, batch_first, max_norm=0.5):
    """per_sample(ours, batch_first=...) against the ground truth: norms, clipped .grad, grad_sample; ``bdim``: the
    examples' dim in the model's output. Without grad_sample each layer takes its own path (Gram form and deferred
    GEMM, or each example's product, made at once or after its input's maker's backward); with it, the product."""
    torch.manual_seed(7)
    weights = torch.randn_like(ref(x))
    per = _per_example(ref, x, bdim, weights)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per))
    c = (max_norm / (norms + 1e-6)).clamp(max=1)
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == len(per)
    for grad_sample in (False, True):
        ours.zero_grad(set_to_none=True)
        with torchderiv.per_sample(
            ours, max_norm=max_norm, grad_sample=grad_sample, loss_reduction="sum", batch_first=batch_first
        ) as ps:
            (ours(x) * weights).sum().backward()
        assert ps.norms.shape == (weights.shape[bdim],)
        assert_close(ps.norms, norms, **TOL)
        for (n, p), g in zip(trainable, per):
            if grad_sample:
                assert_close(p.grad_sample, g, msg=lambda m, n=n: f"{n}.grad_sample: {m}", **TOL)
            clipped = (g * c.reshape(-1, *[1] * (g.dim() - 1))).sum(0)
            assert_close(p.grad, clipped, msg=lambda m, n=n: f"{n}: {m}", **TOL)


def _encoder_layer(batch_first, norm_first):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        D, 2, FF, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=norm_first
    ).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    return ours, ref  # every parameter trains: attention's projections, the feed-forward and the norms


@pytest.mark.parametrize("seq", [T, B], ids=["T!=B", "T=B"])
@pytest.mark.parametrize("ps_batch_first", [True, False], ids=["ps_batch_first", "ps_seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["layer_batch_first", "layer_seq_first"])
def test_transformer_layer_uses_its_own_layout(batch_first, norm_first, ps_batch_first, seq):
    # torch's default layout is (T, B, d): linear1/linear2 see it whatever per_sample is told, so their examples are
    # read along the layer's own batch dim. Before, they were read along dim 0: norms of shape (T,), or with T = B
    # values of the wrong rows (each "example" a time step across the batch), silently.
    ours, ref = _encoder_layer(batch_first, norm_first)
    x = torch.randn((B, seq, D) if batch_first else (seq, B, D), dtype=torch.float64)
    bdim = 0 if batch_first else 1
    if ps_batch_first == batch_first or seq == B:
        _check(ours, ref, x, bdim, ps_batch_first)
    else:  # the model's input, read with per_sample's layout, shows another count than the layers do
        with pytest.raises(RuntimeError, match=MISMATCH + r"(.|\n)*the model's input \((5, 6|6, 5), 8\)"):
            with torchderiv.per_sample(ours, batch_first=ps_batch_first):
                ours(x).sum().backward()


class _SeqFirst(nn.Module):
    """A sequence-first classifier: (T, B, n) through two Linears, mean over T, a Linear head on (B, d)."""

    def __init__(self, encoder: nn.Module | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))
        self.encoder = encoder
        self.head = nn.Linear(D, C)

    def forward(self, x):  # (T, B, D)
        h = self.body(x)
        if self.encoder is not None:
            h = self.encoder(h)
        return self.head(h.mean(0))  # (B, C): a 2-D input is (B, n) in either layout


@pytest.mark.parametrize("with_encoder", [False, True], ids=["linears", "linears+encoder"])
def test_sequence_first_model_with_batch_first_false(with_encoder):
    torch.manual_seed(1)
    encoder = None
    if with_encoder:  # a stack of two sequence-first layers, attention and norms frozen
        layer = nn.TransformerEncoderLayer(D, 2, FF, dropout=0.0, batch_first=False)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ref = _SeqFirst(encoder).double()
    for n, p in ref.named_parameters():
        p.requires_grad_("self_attn" not in n)
    ours = torchderiv.convert(copy.deepcopy(ref))
    x = torch.randn(T, B, D, dtype=torch.float64)
    _check(ours, ref, x, 0, batch_first=False)
    # read batch-first, the body's Linears would see T = 5 "examples": refused, naming every layer and its count
    ours.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=MISMATCH) as err:
        with torchderiv.per_sample(ours):
            ours(x).sum().backward()
    message = str(err.value)
    assert "the model's input (5, 6, 8) along dim 0 (batch_first=True): 5 examples" in message
    assert "body.0.weight, body.0.bias: input (5, 6, 8), 5 examples along dim 0" in message
    assert "head.weight, head.bias: input (6, 8), 6 examples along dim 0" in message
    assert all(p.grad is None for p in ours.parameters())


class _Folded(nn.Module):
    """Folds the batch into rows, (B, T, n) -> (B·T, n), before its Linears: each row is then an "example"."""

    def __init__(self):
        super().__init__()
        self.a, self.b = tdnn.Linear(D, FF), tdnn.Linear(FF, C)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.reshape(-1, x.shape[-1]))))


def test_batch_folded_into_rows_is_refused():
    # Every tracked layer agrees on B·T = 30 rows: only the model's input (B = 6) shows that they are not examples.
    model = _Folded().double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=MISMATCH) as err:
        with torchderiv.per_sample(model, max_norm=1.0):
            model(x).sum().backward()
    assert "the model's input (6, 5, 8) along dim 0 (batch_first=True): 6 examples" in str(err.value)
    assert "a.weight, a.bias: input (30, 8), 30 examples along dim 0" in str(err.value)
    assert model.a.weight.grad is None
    # kept as (B, T, n), the same layers give each example's norm
    with torchderiv.per_sample(model, max_norm=1.0) as ps:
        model.b(torch.tanh(model.a(x))).sum().backward()
    assert ps.norms.shape == (B,)


def test_input_found_among_keyword_arguments_and_copies_ignored():
    model = _Folded().double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=MISMATCH):
        with torchderiv.per_sample(model):
            model(x=x).sum().backward()
    # a copy made inside the context (an EMA model, a checkpoint) carries the hook but is not the model: its
    # forward with another batch does not change the B the model's layers are checked against
    layer = tdnn.Linear(D, C).double()
    with torchderiv.per_sample(layer) as ps:
        twin = copy.deepcopy(layer)
        torch.save(layer, io.BytesIO())
        out = layer(torch.randn(B, D, dtype=torch.float64))
        twin(torch.randn(B + 1, D, dtype=torch.float64))
        out.sum().backward()
    assert ps.norms.shape == (B,)


def test_every_refusal_named_in_one_error():
    # The transformer a new user tries: each part per_sample cannot clip is named at once, with what to do.
    tied = tdnn.Linear(D, D)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(10, D),
            "attn": nn.MultiheadAttention(D, 2),
            "attn_kv": nn.MultiheadAttention(D, 2, add_bias_kv=True),
            "norm": nn.LayerNorm(D),
            "plain": nn.Linear(D, D),
            "bn": nn.BatchNorm1d(D),
            "a": tied,
            "b": tdnn.Linear(D, D),
        }
    )
    model["b"].weight = tied.weight
    with pytest.raises(RuntimeError) as err:
        torchderiv.per_sample(model).__enter__()
    message = str(err.value)
    assert message.startswith("per_sample: 10 parts of the model cannot be clipped per example:")
    for line in [
        "bn (BatchNorm1d) is in training mode",
        "parameters bn.weight, bn.bias of BatchNorm1d: not computed",
        "parameter b.weight is also a.weight (tied weights)",
        "parameter emb.weight of Embedding: not computed",
        "freeze it (bn.requires_grad_(False))",
        "parameters attn.in_proj_weight, attn.in_proj_bias of MultiheadAttention: not computed",
        "parameters attn.out_proj.weight, attn.out_proj.bias of NonDynamicallyQuantizableLinear: not computed",
        "parameters attn_kv.in_proj_weight, attn_kv.in_proj_bias, attn_kv.bias_k, attn_kv.bias_v of MultiheadAttention",
        "add_bias_kv: not supported by torchderiv's Function; freeze it (attn_kv.requires_grad_(False))",
        "parameters norm.weight, norm.bias of LayerNorm: not computed",
        "parameters plain.weight, plain.bias of Linear: not computed",
        "convert the model first with torchderiv.convert(model)",
    ]:
        assert line in message, line
    assert torchderiv.functional._per_sample.current is None


def test_batch_first_must_be_a_bool():
    with pytest.raises(TypeError, match="expected batch_first to be True or False, got 0"):
        torchderiv.per_sample(tdnn.Linear(D, C), batch_first=0)


def test_the_model_input_counts_for_the_layers_run_inside_it_only():
    # a forward with another batch that is never backpropagated (an evaluation with gradients on), then a pass that
    # enters through another method (MLP.cross_entropy, no forward hook): that input must not be held against it
    model = tdnn.MLP([D, 6, C]).double()
    with torchderiv.per_sample(model, max_norm=1.0) as ps:
        model(torch.randn(B + 3, D, dtype=torch.float64))
        loss, _ = model.cross_entropy(torch.randn(B, D, dtype=torch.float64), torch.randint(0, C, (B,)))
        loss.backward()
        assert ps.norms.shape == (B,)
        # and a forward that raised leaves nothing behind for the next one
        with pytest.raises(RuntimeError):
            model(torch.randn(B, D + 1, dtype=torch.float64))
        model(torch.randn(B, D, dtype=torch.float64)).sum().backward()
    assert ps.norms.shape == (B,)

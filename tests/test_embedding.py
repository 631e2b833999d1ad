"""embedding and positional: gradcheck, parity with torch, modules, convert, and per-example gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import LEADING_SHAPES, TOL, check_parity, full_check, leaf
from test_per_sample_layout import _check
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.functional as TF
import torchderiv.nn as tdnn

D64 = torch.float64
V, D = 7, 4


def _indices(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
def test_embedding_gradcheck(lead):
    # padding_idx is left out here: its row gets no gradient by torch's convention, though the output reads it
    w = torch.randn(V, D, dtype=D64, requires_grad=True)
    x = _indices(lead)
    full_check(lambda w: TF.embedding(x, w), (w,))


@pytest.mark.parametrize("padding_idx", [None, 2, -1], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, D64], ids=str)
@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
def test_embedding_parity_with_torch(lead, dtype, padding_idx):
    x = _indices(lead, 1)
    for layout in ("contiguous", "strided"):
        w = leaf(torch.randn(V, D * 2, dtype=dtype)[:, ::2] if layout == "strided" else torch.randn(V, D, dtype=dtype))
        check_parity(
            lambda w: TF.embedding(x, w, padding_idx), lambda w: F.embedding(x, w, padding_idx), [w], grad_layout=layout
        )
    check_parity(lambda w: TF.embedding(x.int(), w), lambda w: F.embedding(x.int(), w), [leaf(torch.randn(V, D))])


def test_embedding_refuses_what_it_does_not_do():
    w = torch.randn(V, D)
    x = _indices((3,))
    with pytest.raises(NotImplementedError, match="max_norm is not supported"):
        TF.embedding(x, w, max_norm=1.0)
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq, sparse are not supported"):
        TF.embedding(x, w, scale_grad_by_freq=True, sparse=True)
    with pytest.raises(IndexError, match="index out of range"):
        TF.embedding(torch.tensor([V]), w)
    with pytest.raises(IndexError, match="index out of range"):
        TF.embedding(torch.tensor([-1]), w)  # not wrapped around, as torch
    with pytest.raises(RuntimeError, match="Long or Int tensor of indices, got torch.float32"):
        TF.embedding(x.float(), w)
    with pytest.raises(AssertionError, match="padding_idx must be within num_embeddings"):
        TF.embedding(x, w, padding_idx=V)


def test_embedding_module_and_convert():
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Embedding(V, D, padding_idx=0), nn.Embedding(V, D, max_norm=1.0)).double()
    ours = torchderiv.convert(copy.deepcopy(theirs))
    assert type(ours[0]) is tdnn.Embedding and type(ours[1]) is nn.Embedding  # max_norm: left on torch, and why
    assert ("1", "Embedding", "max_norm: not supported by torchderiv's embedding") in ours.torchderiv_conversion.left
    x = _indices((3, 5))
    check_parity(lambda w: ours[0](x), lambda w: theirs[0](x), [ours[0].weight])
    grads = torch.autograd.grad(ours[0](x).square().sum(), ours[0].weight)
    assert_close(grads[0], torch.autograd.grad(theirs[0](x).square().sum(), theirs[0].weight)[0], **TOL[D64])
    assert ours[0].weight.is_leaf and grads[0][0].abs().sum() == 0  # the padding row


def test_embedding_compiles_and_vmaps():
    w = torch.randn(V, D, dtype=D64)
    x = _indices((3, 5))
    f = torch.compile(lambda w: TF.embedding(x, w).square().sum(), backend="aot_eager", fullgraph=True)
    w1 = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(w1), w1)
    assert_close(g, torch.func.grad(lambda w: F.embedding(x, w).square().sum())(w))
    batched = torch.func.vmap(lambda w: TF.embedding(x, w))(torch.stack([w, 2 * w]))
    assert_close(batched[1], 2 * F.embedding(x, w))


# --- positional ------------------------------------------------------------------------------------------


def _added(x, w, batch_first):
    """The bare-parameter reference: ``x + P[:T]`` broadcast over the batch."""
    t = x.shape[-2] if batch_first or x.dim() == 2 else x.shape[0]
    return x + (w[:t] if batch_first or x.dim() == 2 else w[:t].unsqueeze(1))


@pytest.mark.parametrize("shape, batch_first", [((3, 5, D), True), ((5, 3, D), False), ((5, D), True)])
def test_positional_gradcheck_and_parity(shape, batch_first):
    x = torch.randn(shape, dtype=D64, requires_grad=True)
    w = torch.randn(6, D, dtype=D64, requires_grad=True)
    full_check(lambda x, w: TF.positional(x, w, batch_first), (x, w))
    check_parity(lambda x, w: TF.positional(x, w, batch_first), lambda x, w: _added(x, w, batch_first), [x, w])
    with pytest.raises(RuntimeError, match="positional: 7 positions"):
        TF.positional(torch.randn(7, D), w)


# --- per-example gradients ---------------------------------------------------------------------------


class _Tokens(nn.Module):
    """Embedding + positions → Linear → GELU → mean over positions → Linear head."""

    def __init__(self, bare_positions=False, batch_first=True, padding_idx=1):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.pos = nn.Parameter(torch.randn(6, D)) if bare_positions else tdnn.Positional(6, D, batch_first)
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.emb(x)
        h = _added(h, self.pos, self.batch_first) if isinstance(self.pos, nn.Parameter) else self.pos(h)
        return self.head(F.gelu(self.body(h)).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("padding_idx", [None, 1], ids=["no-padding", "padding"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_per_sample_embedding_and_positions_match_ground_truth(batch_first, padding_idx):
    torch.manual_seed(2)
    ref = _Tokens(batch_first=batch_first, padding_idx=padding_idx).double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    # 6 examples of 5 tokens from 7: tokens repeat within an example (the cross terms count), and 1 is padding
    x = torch.tensor(
        [[2, 2, 2, 3, 1], [1, 1, 4, 4, 0], [5, 6, 5, 6, 5], [0, 0, 0, 0, 0], [3, 1, 2, 1, 3], [6, 6, 6, 6, 6]]
    )
    _check(ours, ref, x if batch_first else x.t().contiguous(), 0, batch_first)


def test_per_sample_repeated_tokens_are_not_separate_rows():
    # the rule's norm against the naive one that treats each position as its own outer product: they differ
    # exactly by the cross terms of repeated tokens, and only the rule's equals the ground truth (above)
    torch.manual_seed(3)
    emb = tdnn.Embedding(V, D).double()
    x = torch.tensor([[2, 2, 3], [4, 5, 6]])
    g = torch.randn(2, 3, D, dtype=D64)
    with torchderiv.per_sample(emb, loss_reduction="sum") as ps:
        (emb(x) * g).sum().backward()
    naive = g.square().sum((1, 2)).sqrt()
    assert_close(ps.norms[1], naive[1])  # no repeats: the same
    exact = ((g[0, 0] + g[0, 1]).square().sum() + g[0, 2].square().sum()).sqrt()
    assert_close(ps.norms[0], exact)
    assert not torch.isclose(ps.norms[0], naive[0])


def test_bare_positional_parameter_refused_naming_the_module():
    model = torchderiv.convert(_Tokens(bare_positions=True))
    with pytest.raises(RuntimeError, match=r"parameter pos of _Tokens: .*torchderiv\.nn\.Positional"):
        torchderiv.per_sample(model).__enter__()

"""Multi-head attention through torchderiv's dense Functions: parity with torch, the packed projection's
gradients, convert, and per-example gradients of whole transformer layers (masks, layouts, norm placement)."""

import copy

import pytest
import torch
from helpers import TOL, full_check
from test_per_sample_layout import _check
from torch import nn
from torch.testing import assert_close

import torchderiv
import torchderiv.functional as TF
import torchderiv.nn as tdnn

D64 = torch.float64
T, S, B, D, H = 5, 4, 3, 8, 2


def _inputs(batch_first, cross, dtype=D64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=dtype, generator=g)
    kv = torch.randn((B, S, D) if batch_first else (S, B, D), dtype=dtype, generator=g) if cross else q
    return q, kv


def _masks(kind, cross, dtype=D64):
    s = S if cross else T
    kpm = torch.zeros(B, s, dtype=torch.bool)
    kpm[0, -1] = kpm[2, -2] = True
    if kind == "none":
        return {}
    if kind == "bool":
        return {"key_padding_mask": kpm, "attn_mask": torch.ones(T, s, dtype=torch.bool).triu(1)}
    if kind == "float":
        g = torch.Generator().manual_seed(1)
        attn_mask = torch.randn(B * H, T, s, dtype=dtype, generator=g)  # one mask per example and head
        return {"key_padding_mask": kpm.to(dtype) * -5.0, "attn_mask": attn_mask}
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)
    return {"attn_mask": causal, "is_causal": True}


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_attention_equals_torch(batch_first, cross, masks, need_weights):
    if cross and masks == "causal":
        pytest.skip("a causal mask is square: self-attention")
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, H, batch_first=batch_first).double()
    ours = torchderiv.convert(copy.deepcopy(theirs))
    assert type(ours) is tdnn.MultiheadAttention
    q, kv = _inputs(batch_first, cross)
    kw = dict(need_weights=need_weights, **_masks(masks, cross))
    args_a = [t.clone().requires_grad_() for t in ((q,) if not cross else (q, kv))]
    args_b = [t.clone().requires_grad_() for t in args_a]
    call = (lambda m, a: m(a[0], a[0], a[0], **kw)) if not cross else (lambda m, a: m(a[0], a[1], a[1], **kw))
    (out_a, w_a), (out_b, w_b) = call(ours, args_a), call(theirs, args_b)
    assert_close(out_a, out_b, **TOL[D64])
    assert (w_a is None) == (w_b is None) and (w_a is None or torch.allclose(w_a, w_b))
    g = torch.randn_like(out_a)
    grads_a = torch.autograd.grad(out_a, args_a + list(ours.parameters()), g)
    grads_b = torch.autograd.grad(out_b, args_b + list(theirs.parameters()), g)
    for a, b in zip(grads_a, grads_b):
        assert_close(a, b, **TOL[D64])


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
def test_attention_fully_masked_rows_as_torch(need_weights):
    # a query that may attend to nothing: NaN through the explicit softmax, 0 through the fused kernel, as torch
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, H, batch_first=True).double()
    ours = torchderiv.convert(copy.deepcopy(theirs))
    x = torch.randn(1, 3, D, dtype=D64)
    kw = dict(
        key_padding_mask=torch.tensor([[True, True, False]]),
        attn_mask=torch.ones(3, 3, dtype=torch.bool).triu(1),
        need_weights=need_weights,
    )
    a, b = ours(x, x, x, **kw)[0], theirs(x, x, x, **kw)[0]
    assert_close(a, b, equal_nan=True, **TOL[D64])
    assert a[0, :2].isnan().all() == need_weights and not a[0, 2].isnan().any()


def test_attention_unbatched_and_per_head_weights():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, H).double()
    ours = torchderiv.convert(copy.deepcopy(theirs))
    x = torch.randn(T, D, dtype=D64)
    a, wa = ours(x, x, x, average_attn_weights=False)
    b, wb = theirs(x, x, x, average_attn_weights=False)
    assert_close(a, b, **TOL[D64])
    assert wa.shape == wb.shape == (H, T, T)
    assert_close(wa, wb, **TOL[D64])


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_dropout_draws_as_torch(batch_first):
    # same seed, same masks: the dropout inside attention and after it (the output keeps torch's memory layout)
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(D, H, 16, dropout=0.3, batch_first=batch_first)
    ours = torchderiv.convert(copy.deepcopy(theirs))
    x = _inputs(batch_first, False, torch.float32)[0]
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    b = theirs(x)
    assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, ours.eval()(x))  # dropout did act


def test_packed_linear_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, 2, 4, dtype=D64, generator=g, requires_grad=True) for n in (3, 5, 5))
    w = torch.randn(3 * 6, 4, dtype=D64, generator=g, requires_grad=True)
    b = torch.randn(3 * 6, dtype=D64, generator=g, requires_grad=True)
    full_check(lambda q, k, v, w, b: torch.cat([z.flatten() for z in TF.packed_linear(q, k, v, w, b)]), (q, k, v, w, b))
    full_check(lambda q, k, v, w: torch.cat([z.flatten() for z in TF.packed_linear(q, k, v, w)]), (q, k, v, w))


def test_attention_gradcheck_through_the_core():
    # the whole forward: projections (ours) and the attention core (torch's), first and second derivatives. With
    # need_weights the core is written out (matmul, softmax): torch's fused CPU kernel has no forward AD.
    torch.manual_seed(3)
    m = tdnn.MultiheadAttention(4, 2).double()
    q = torch.randn(3, 2, 4, dtype=D64, requires_grad=True)
    kv = torch.randn(5, 2, 4, dtype=D64, requires_grad=True)
    params = [m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias]

    def f(q, kv, w_in, b_in, w_out, b_out):
        return TF.multi_head_attention(q, kv, kv, 2, w_in, b_in, w_out, b_out, need_weights=True)[0]

    full_check(f, (q, kv, *params), batched=False)


def test_unsupported_attention_options_stay_on_torch_and_are_refused():
    for kw in (dict(add_bias_kv=True), dict(add_zero_attn=True), dict(kdim=4, vdim=4)):
        model = torchderiv.convert(nn.Sequential(nn.MultiheadAttention(D, H, **kw)))
        assert type(model[0]) is nn.MultiheadAttention
        with pytest.raises(NotImplementedError, match="not supported"):
            model[0].__class__ = tdnn.MultiheadAttention
            x = torch.randn(T, B, D)
            model[0](x, x, x)


# --- per-example gradients of whole transformer layers -----------------------------------------------------


class _Masked(nn.Module):
    """A transformer layer called with masks: encoder (self-attention) or decoder (self- and cross-attention)."""

    def __init__(self, layer, memory=None, **masks):
        super().__init__()
        self.layer, self.memory, self.masks = layer, memory, masks

    def forward(self, x):
        if self.memory is None:
            return self.layer(x, **self.masks)
        return self.layer(x, self.memory, **self.masks)


def _layer(kind, batch_first, norm_first):
    torch.manual_seed(4)
    make = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    return make(D, H, 16, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=norm_first).double()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_per_sample_whole_transformer_layer_with_masks(kind, batch_first, norm_first):
    ref = _layer(kind, batch_first, norm_first)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, -2:] = True  # the first example's last two positions are padding
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=D64)
    q, _ = _inputs(batch_first, False)
    if kind == "encoder":
        masks = dict(src_key_padding_mask=kpm, src_mask=causal, is_causal=True)
        memory = None
    else:
        # the memory (an encoder's output) is data here: the cross-attention's key/value blocks see it
        memory = _inputs(batch_first, True)[1]
        masks = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=torch.zeros(B, S, dtype=torch.bool))
    ours = torchderiv.convert(copy.deepcopy(ref))
    _check(_Masked(ours, memory, **masks), _Masked(ref, memory, **masks), q, 0 if batch_first else 1, batch_first)


def test_per_sample_encoder_stack_with_embedding_and_head():
    # the model a new user tries: tokens, positions, 2 pre-norm encoder layers, a pooled head; every parameter
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, D)
            self.pos = tdnn.Positional(T, D)
            layer = nn.TransformerEncoderLayer(D, H, 16, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(D)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            return self.head(self.norm(self.encoder(self.pos(self.emb(x)))).mean(1))

    torch.manual_seed(6)
    ref = Classifier().double()
    ours = torchderiv.convert(copy.deepcopy(ref))
    x = torch.randint(0, 11, (B, T), generator=torch.Generator().manual_seed(7))
    with torchderiv.per_sample(ours):  # nothing refused: every parameter is tracked
        pass
    _check(ours, ref, x, 0, True)


def test_no_fast_path_bypasses_torchderiv_while_gradients_are_needed():
    # torch's encoder layer takes a fused inference kernel in eval mode when no gradient is needed; with one
    # needed (eval mode included, e.g. a frozen dropout schedule) every projection runs through torchderiv
    from test_nn import graph_functions

    torch.manual_seed(0)
    layer = torchderiv.convert(nn.TransformerEncoderLayer(D, H, 16, batch_first=True)).eval()
    out = layer(torch.randn(B, T, D))
    names = graph_functions(out)
    assert "LinearFunctionBackward" in names and "NormFunctionBackward" in names
    with torch.no_grad():  # no gradient needed: torch's fast path may run, with the same numbers
        fast = layer(torch.randn(B, T, D, generator=torch.Generator().manual_seed(1)))
    slow = layer(torch.randn(B, T, D, generator=torch.Generator().manual_seed(1)))
    assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_under_autocast_as_torch(dtype):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, H, batch_first=True)
    ours = torchderiv.convert(copy.deepcopy(theirs))
    x = torch.randn(B, T, D)
    with torch.autocast("cpu", dtype=dtype):
        a, b = ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    assert a.dtype == b.dtype
    assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    grads = torch.autograd.grad(a.float().sum(), list(ours.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)  # fp32 parameter gradients, as torch's


def test_meta_device():
    x = torch.empty(B, T, D, device="meta")
    attn = tdnn.MultiheadAttention(D, H, batch_first=True, device="meta")
    assert attn(x, x, x)[0].shape == (B, T, D) and attn(x, x, x)[0].device.type == "meta"
    emb = tdnn.Embedding(7, D, device="meta")
    assert emb(torch.zeros(B, T, dtype=torch.long, device="meta")).shape == (B, T, D)
    pos = tdnn.Positional(T, D, device="meta")
    assert pos(x).device.type == "meta"


@pytest.mark.parametrize("batch_first", [True, False])
def test_per_sample_empty_batch(batch_first):
    # Poisson sampling gives empty batches: every parameter gets a zero gradient and no example a norm, as torch's
    # own backward gives zeros (attention's heads, the norms' per-example sums and the embedding's rule on B = 0)
    torch.manual_seed(8)
    model = torchderiv.convert(
        nn.Sequential(
            nn.Embedding(11, D),
            tdnn.Positional(T, D, batch_first=batch_first),
            nn.TransformerEncoderLayer(D, H, 16, dropout=0.0, batch_first=batch_first),
        )
    ).double()
    x = torch.randint(0, 11, (0, T) if batch_first else (T, 0))
    with torchderiv.per_sample(model, max_norm=1.0, grad_sample=True, batch_first=batch_first) as ps:
        model(x).sum().backward()
    assert ps.norms.shape == (0,)
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
        assert p.grad_sample.shape == (0, *p.shape), name

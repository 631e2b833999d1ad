"""Convolution as the derivation's dense layer applied to every patch (docs/derivation.md § convolution).

With ``P = unfold(H)``, one row per output position holding the patch it sees (``C_in/g · k`` numbers for a kernel
of ``k`` taps), a convolution is ``Z = P Wᵀ + b`` with ``W`` the kernel flattened to ``(C_out, C_in/g · k)``, one
such product per group. The dense layer's backward (§3.2–3.5) then gives

    ∂J/∂W = Σ_positions Δᵀ P          ∂J/∂b = Σ_positions Δ          ∂J/∂P = Δ W, folded back onto H

and folding ``Δ W`` back is the transposed convolution of ``Δ`` with ``W``. The forward and the transposed
convolution are torch's kernels; the weight gradient is the GEMM over unfolded patches; no autograd derivative
kernel is used. Each example's weight gradient is the sequence layer's ``Δᵢᵀ Pᵢ`` with T = its output positions,
so :func:`torchderiv.per_sample` clips convolutions with the dense rule (the Gram form or the product), the patches
made again from ``H`` at the end of the pass rather than held.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from . import _per_sample
from ._core import autocast_apply, compile_twin, may_overwrite, save_for_forward, shape_str

__all__ = ["ConvFunction", "conv1d", "conv2d"]


def _conv(x, w, b, stride, padding, dilation, groups):
    return (F.conv1d if x.dim() == 3 else F.conv2d)(x, w, b, stride, padding, dilation, groups)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """A 1-d convolution's ``(N, C, L)`` as the 2-d one's ``(N, C, 1, L)``."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def patches(x, kernel, stride, padding, dilation, by_tap: bool = False) -> torch.Tensor:
    """``P``: ``(N, L, C · k)``, row l the patch output position l sees (channel-major, then the kernel's taps, as a
    flattened weight), ``L`` the output positions; a transposed view of a contiguous ``(N, C · k, L)``, which for a
    1×1 kernel at stride 1 without padding is the input itself (read it, never write it). 1-d inputs are taken as
    2-d of height 1. ``by_tap``: each row's columns ordered by kernel tap, then channel — ``P`` up to one fixed
    permutation of its columns, which the Grams ``PᵢPᵢᵀ`` and the rows' norms do not see — copied from a
    channels-last copy of H, so that each tap moves a run of C numbers where the channel-major order moves runs of a
    few strided ones: 0.44 against 1.19 ms for 209 examples of Opacus's MNIST CNN's second layer (CPU, 2 threads)."""
    if x.dim() == 3:
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    x = _as_2d(x)
    if not may_overwrite():  # differentiated or under a transform: unfold, which both can take
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    # NOTE: unfold's im2col kernel took 3-6x as long as this copy out of a strided view of the padded input (the
    # view's element (n, c, i, j, p, q) is x[n, c, p·s + i·d, q·s + j·d]): 57 ms against 9 ms for the patches of
    # (256, 32, 32, 32) at stride 2 (CPU, 2 threads)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, c, h, w = x.shape
    out = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip((h, w), kernel, stride, dilation)]
    if by_tap:
        x = x.permute(0, 2, 3, 1).contiguous()  # (N, h, w, C)
        st = x.stride()
        view = x.as_strided(
            (n, *out, *kernel, c),
            (st[0], st[1] * stride[0], st[2] * stride[1], st[1] * dilation[0], st[2] * dilation[1], 1),
        )
        return view.reshape(n, math.prod(out), math.prod(kernel) * c)
    st = x.stride()
    view = x.as_strided(
        (n, c, *kernel, *out),
        (st[0], st[1], st[2] * dilation[0], st[3] * dilation[1], st[2] * stride[0], st[3] * stride[1]),
    )
    return view.reshape(n, c * math.prod(kernel), math.prod(out)).transpose(1, 2)


def _positions(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial) -> (N, C, L)``, the sizes given (a -1 is ambiguous for an empty batch)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _group(t: torch.Tensor, dim: int, j: int, size: int, groups: int) -> torch.Tensor:
    """Group j's ``size`` entries of ``t`` along ``dim`` (``t`` itself for one group: no view of all of it, which
    the legacy vmap of batched-gradient checks cannot take)."""
    if groups == 1:
        return t
    return t.narrow(dim, j * size, size)


_CHUNK_FLOATS = 1 << 20  # patches made at once for the weight gradient: 4 MiB of float32
_CORRELATION_FLOATS = 1 << 21  # input entries in one weight-gradient convolution: 8 MiB of float32
_KERNEL_FLOATS = 1 << 19  # Δ's entries as one weight-gradient convolution's kernel: 2 MiB of float32
# NOTE: kernels of this many taps or more, and layers of this many input channels a group with at most this many
# output positions, take the weight gradient as a convolution (torch's forward kernel): for Opacus's MNIST CNN (8×8
# and 4×4 kernels) 1.5 and 1.4 ms against 4.0 and 2.9 ms for the GEMM over patches; for 3×3 kernels at stride 1,
# 22.9 against 27.0 ms on 32 channels of 16×16 (the GroupNorm CNN's third layer) and 0.15 against 0.21 ms on 16
# channels of 4×4 (the digits CNN's second), while on 3 channels of 32×32 (the GroupNorm CNN's first) the GEMM took
# 11.5 ms against 22.2 (experiments/cnn_floor.py; batch 256, the digits CNN's 32; CPU, 2 threads)
_CONVOLUTION_TAPS = 16
_CONVOLUTION_CHANNELS = 16
_CONVOLUTION_POSITIONS = 256


def _summed_by_convolution(kernel, stride, per_in: int, positions: int) -> bool:
    """Whether ``∂J/∂W = Σ Δᵀ P`` is taken as a convolution rather than the GEMM over patches: kernels of many taps
    (above), strided convolutions, whose patches are gathered with the stride along their innermost dim — for the
    GroupNorm CNN's 3×3 stride-2 layers 17.1 and 13.0 ms against 28.7 and 14.0 ms (batch 256, CPU, 2 threads,
    measured) — and layers of 16+ input channels a group (``per_in``) with at most 256 output ``positions`` (Δ's
    extent, the convolution's kernel). NOTE: kernels of 3 and 5 taps a dim at stride 1, correlation / GEMM over
    patches (CPU, 2 threads): for 16 to 256 channels at ≤ 256 positions 0.26–1.02× (4×4 to 16×16 and 32 to 256
    positions, batches 32 to 256; 0.85× for the GroupNorm CNN's third layer, 0.71× for the digits CNN's second in an
    interleaved run, experiments/cnn_floor.py; 0.23–0.78× in 2 to 8 groups of 16 or 32); at 512 to 4096 positions
    of a 1-d convolution 1.14–1.49×, so more positions take the GEMM (though 2-d layers of 24×24 and 32×32 ran at
    0.56–0.68×); for 1 or 3 input channels up to 4.2× (the GroupNorm CNN's first layer: 1.9×)."""
    if math.prod(kernel) >= _CONVOLUTION_TAPS or max(stride) > 1:
        return True
    return per_in >= _CONVOLUTION_CHANNELS and positions <= _CONVOLUTION_POSITIONS


def _per_example_by_convolution(kernel, per_in: int) -> bool:
    """Whether each example's ``Δᵢᵀ Pᵢ`` (per_sample) is one grouped convolution rather than GEMMs over patches:
    kernels of many taps on few input channels (``per_in`` a group), where the grouped convolution, whose batch is
    those channels, runs best. NOTE: 256 examples (CPU, 2 threads), grouped convolution / batched GEMMs over patches:
    0.93× for 1 → 16 channels (8×8, MNIST 28×28), 0.88× for 2 → 16, 0.90× and 0.95× for 3 → 16 (5×5) and 3 → 32
    (8×8) on 32×32 images; 1.6× for 8 → 16 (4×4, 16×16) and 2.8× for 16 → 32 (4×4, 13×13, the MNIST CNN's second)."""
    return math.prod(kernel) >= _CONVOLUTION_TAPS and per_in <= 4


def _examples(t: torch.Tensor, start: int, step: int) -> torch.Tensor:
    """Examples ``start … start + step`` of ``t`` (``t`` itself when that is all of them: no view of the whole)."""
    return t if start == 0 and step >= t.shape[0] else t.narrow(0, start, min(step, t.shape[0] - start))


def _weight_gradient(delta, x, w, stride, padding, dilation, groups) -> torch.Tensor:
    """``Σ Δᵀ P`` over these examples' positions, per group: each example's ``Δᵢᵀ Pᵢ``
    (``(C_out/g, L) @ (L, C_in/g · k)``, one batched GEMM over the examples), summed."""
    rows = patches(x, w.shape[2:], stride, padding, dilation)  # (n, L, C_in · k)
    d = _positions(delta)  # (n, C_out, L)
    per_in, per_out = rows.shape[2] // groups, w.shape[0] // groups
    # NOTE: a batched GEMM takes the patches as they are made, (n, C_in·k, L); one GEMM over n·L would need them
    # (and Δ) transposed into a copy first, which cost more than the GEMM saved
    parts = [
        torch.bmm(_group(d, 1, j, per_out, groups), _group(rows, 2, j, per_in, groups)).sum(0) for j in range(groups)
    ]
    return (parts[0] if groups == 1 else torch.cat(parts)).reshape(w.shape)


def _summed_over_patches(delta, x, w, stride, padding, dilation, groups) -> torch.Tensor:
    """``∂J/∂W = Σ Δᵀ P`` by :func:`_weight_gradient`, a few examples at a time: their patches, C_in·k numbers for
    each of L positions, would otherwise be made for the whole batch at once (hundreds of MB for a batch of 32×32
    images). Zeros for an empty batch."""
    taps = math.prod(w.shape[2:])
    step = max(1, _CHUNK_FLOATS // max(1, math.prod(delta.shape[2:]) * w.shape[1] * taps * groups))
    total = None
    for start in range(0, x.shape[0], step):
        part = _weight_gradient(
            _examples(delta, start, step), _examples(x, start, step), w, stride, padding, dilation, groups
        )
        total = part if total is None else total + part
    return torch.zeros_like(w) if total is None else total


def _weight_gradient_as_convolution(delta, x, kernel, stride, padding, dilation, groups) -> torch.Tensor:
    """``Σ Δᵀ P`` read as the correlation it is: ``∂J/∂W[o, c, i, j] = Σ_{n, p, q} Δ[n, o, p, q] H[n, c, p·s + i·d,
    q·s + j·d]``, torch's forward convolution of H (channels as the batch, the examples of each group as its
    channels) with Δ (examples as channels) for kernel, at stride d and dilation s, cut to the kernel's size."""
    n, channels = x.shape[:2]
    per_in = channels // groups
    spatial = x.shape[2:]
    grouped = x.reshape(n, groups, per_in, *spatial)
    xt = grouped.permute(2, 1, 0, *range(3, grouped.dim())).reshape(per_in, groups * n, *spatial)
    out = _conv(xt, delta.transpose(0, 1), None, dilation, padding, stride, groups)  # (C_in/g, C_out, ≥ kernel)
    for dim, k in enumerate(kernel, start=2):
        out = out.narrow(dim, 0, k)
    return out.transpose(0, 1)


def _summed_as_convolution(delta, x, kernel, stride, padding, dilation, groups) -> torch.Tensor:
    """:func:`_weight_gradient_as_convolution` a few examples at a time, summed. Two temporaries grow with the
    examples taken at once, and on CPU glibc maps a large one afresh each step (page faults): the copy of H with
    channels as the batch (≥ 32 MiB: 39 ms against 17 ms for the GroupNorm CNN's second layer) and mkldnn's copy of
    Δ into its own kernel layout (3.2 MB of Δ for Opacus's MNIST CNN's first layer: 4.2 ms and 1732 page faults a
    call against 1.1 ms and none in parts of 2.4 MB; CPU, 2 threads, measured)."""
    per_example = max(1, math.prod(x.shape[1:])), max(1, math.prod(delta.shape[1:]))
    step = max(1, min(_CORRELATION_FLOATS // per_example[0], _KERNEL_FLOATS // per_example[1]))
    total = None
    for start in range(0, x.shape[0], step):
        part = _weight_gradient_as_convolution(
            _examples(delta, start, step), _examples(x, start, step), kernel, stride, padding, dilation, groups
        )
        total = part if total is None else total + part
    return total


def _per_example_weight_gradients(delta, x, kernel, stride, padding, dilation) -> torch.Tensor:
    """Each example's ``Δᵢᵀ Pᵢ`` of a one-group convolution, ``(N, C_out, C_in · k)``: the correlation of
    :func:`_weight_gradient_as_convolution` done for every example at once as one grouped convolution (group i:
    example i's channels of H against example i's Δ)."""
    n, channels = x.shape[:2]
    c_out = delta.shape[1]
    xt = x.transpose(0, 1)  # (C_in, N, *spatial): example i is channel i
    kernels = delta.reshape(n * c_out, 1, *delta.shape[2:])
    out = _conv(xt, kernels, None, dilation, padding, stride, n)  # (C_in, N · C_out, ≥ kernel)
    for dim, k in enumerate(kernel, start=2):
        out = out.narrow(dim, 0, k)
    return out.reshape(channels, n, c_out, -1).permute(1, 2, 0, 3).reshape(n, c_out, -1)


def _transposed_unpadded(transpose, delta, w, stride, padding, dilation, groups, spatial):
    """``∂J/∂H`` where the forward's stride skipped rows at the far edge: the whole transposed convolution (every
    padded position a tap reached), of which each spatial dim keeps the input's own rows ``p … p + s − 1``, zeros past
    the last tap's reach. The same numbers as ``output_padding``, which sends torch's CPU kernel down a path
    ~2.5× slower than this (3.9 ms against 1.5 ms for Opacus's MNIST CNN's second layer, measured). A few examples at
    a time, copied into one contiguous result: the whole batch's transposed convolution would be a second buffer of
    the input's size (and a view of it a copy for the next layer), each ≥ 32 MiB for the GroupNorm CNN, which glibc
    maps afresh every step."""
    n = delta.shape[0]
    out = delta.new_empty(n, w.shape[1] * groups, *spatial)
    spans = None
    step = max(1, _CORRELATION_FLOATS // max(1, math.prod(out.shape[1:])))
    for start in range(0, n, step):
        full = transpose(_examples(delta, start, step), w, None, stride, 0, 0, groups, dilation)
        if spans is None:  # per spatial dim: (first row kept, rows kept); a padding past the taps' reach keeps none
            spans = [(min(p, r), max(0, min(s, r - p))) for p, s, r in zip(padding, spatial, full.shape[2:])]
        part = _examples(out, start, step)
        for dim, (first, kept) in enumerate(spans, start=2):
            full, part = full.narrow(dim, first, kept), part.narrow(dim, 0, kept)
        part.copy_(full)
    for dim, (_, kept) in enumerate(spans or [], start=2):
        out.narrow(dim, kept, out.shape[dim] - kept).zero_()  # past the last tap's reach
    return out


def _input_gradient_by_phases(delta, w, stride, padding, groups, spatial):
    """``∂J/∂H`` of a strided convolution without dilation, as one forward convolution per phase of the stride.

    ``∂J/∂H[n, c, y] = Σ_{o, q, u : q·s + u − p = y} Δ[n, o, q] W[o, c, u]`` (per spatial dim). The input rows
    ``y = r + s·t`` of one phase r (0 ≤ r < s) are reached only by the taps ``u = u₀ + m·s``, ``u₀ = (r + p) mod s``,
    from ``q = t + c₀ − m``, ``c₀ = (r + p − u₀) / s``: a stride-1 correlation of Δ with those taps reversed — the
    transposed convolution split into sᵈ small convolutions, each written into its phase's rows of ∂J/∂H; rows no
    tap reaches are 0. torch's transposed convolution (cropped, :func:`_transposed_unpadded`) took 0.9–2.2× as long
    for the strided layers of experiments/dp_benchmark.py's CNNs (CPU, 2 threads; experiments/conv_input_gradient.py).
    A few examples at a time: each phase's result is then a small buffer, used while it is in cache."""
    n, c_out = delta.shape[:2]
    kernel = w.shape[2:]
    c_in = w.shape[1] * groups
    # W as the forward convolution of Δ needs it: (C_in, C_out/g, *k), group by group
    wt = w.reshape(groups, c_out // groups, w.shape[1], *kernel).transpose(1, 2).reshape(c_in, c_out // groups, *kernel)
    phases = []
    unreached = False  # some input row no tap reaches
    for phase in itertools.product(*(range(s) for s in stride)):
        taps, rows = [], []  # per dim: (u₀, taps in the phase), (first row reached, rows reached, c₀)
        for r, s, p, k, size, o in zip(phase, stride, padding, kernel, spatial, delta.shape[2:]):
            u0 = (r + p) % s
            m = len(range(u0, k, s))
            c0 = (r + p - u0) // s
            in_phase = len(range(r, size, s))
            first, last = max(0, -c0), min(in_phase, o + m - 1 - c0)  # some q reaches these rows
            taps.append((u0, m))
            rows.append((first, max(0, last - first), c0))
            unreached = unreached or m == 0 or first > 0 or last < in_phase
        k_sub = None
        if all(m > 0 for _, m in taps) and all(count > 0 for _, count, _ in rows):
            k_sub = wt[(slice(None), slice(None), *(slice(u0, None, s) for (u0, _), s in zip(taps, stride)))]
            k_sub = k_sub.flip(list(range(2, 2 + len(kernel))))
        phases.append((phase, taps, rows, k_sub))
    # Unreached rows are 0: the whole result then starts as zeros, one contiguous fill in place of each phase's
    # strided slivers (the same time for the MNIST CNN's second layer, 0.96x paired)
    out = delta.new_zeros(n, c_in, *spatial) if unreached else delta.new_empty(n, c_in, *spatial)
    step = max(1, _CORRELATION_FLOATS // max(1, math.prod(out.shape[1:])))
    for start in range(0, n, step):
        d, part = _examples(delta, start, step), _examples(out, start, step)
        for phase, taps, rows, k_sub in phases:
            if k_sub is None:  # no tap reaches this phase's rows: zeros already
                continue
            target = part[(slice(None), slice(None), *(slice(r, None, s) for r, s in zip(phase, stride)))]
            full = _conv(d, k_sub, None, 1, [m - 1 for _, m in taps], 1, groups)  # every q any tap reaches
            for dim, (first, count, c0) in enumerate(rows, start=2):
                full, target = full.narrow(dim, first + c0, count), target.narrow(dim, first, count)
            target.copy_(full)
    return out


def conv_backward(needs, delta, x, w, b, stride, padding, dilation, groups):
    """``(∂J/∂H, ∂J/∂W, ∂J/∂b)`` given ``Δ = ∂J/∂Z``, each only if ``needs`` asks: ``∂J/∂H`` the transposed
    convolution of Δ with W (``Δ W`` folded back), ``∂J/∂W = Σ Δᵀ P`` per group, ``∂J/∂b = Σ Δ`` over examples and
    positions."""
    grad_input = grad_weight = grad_bias = None
    spatial = x.shape[2:]
    if needs[0] and max(stride) > 1 and max(dilation) == 1 and delta.is_cpu:  # the phases: measured on CPU only
        grad_input = _input_gradient_by_phases(delta, w, stride, padding, groups, spatial)
    elif needs[0]:
        out = delta.shape[2:]
        # the rows and columns the forward's stride skipped at the far edge come back as output_padding
        extra = tuple(
            s - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
            for s, o, st, p, d, k in zip(spatial, out, stride, padding, dilation, w.shape[2:])
        )
        transpose = F.conv_transpose1d if x.dim() == 3 else F.conv_transpose2d
        if any(extra):
            grad_input = _transposed_unpadded(transpose, delta, w, stride, padding, dilation, groups, spatial)
        else:
            grad_input = transpose(delta, w, None, stride, padding, extra, groups, dilation)
    positions = math.prod(delta.shape[2:])
    if needs[1] and _summed_by_convolution(w.shape[2:], stride, w.shape[1], positions) and x.shape[0]:
        grad_weight = _summed_as_convolution(delta, x, w.shape[2:], stride, padding, dilation, groups)
    elif needs[1]:
        grad_weight = _summed_over_patches(delta, x, w, stride, padding, dilation, groups)
    if b is not None and needs[2]:
        # NOTE: positions first, then examples: one reduction over (0, 2, 3) took 1.28 ms against 0.45 on
        # (256, 32, 32, 32) (CPU, 2 threads, measured)
        grad_bias = delta.sum(tuple(range(2, delta.dim()))).sum(0)
    return grad_input, grad_weight, grad_bias


class ConvFunction(torch.autograd.Function):
    """``Z = conv(H, W) + b`` (1-d or 2-d, stride, padding, dilation, groups), the dense layer over patches.

    backward (§3.2–3.5 on ``P = unfold(H)``): ``∂J/∂W = Σ Δᵀ P`` per group, ``∂J/∂b = Σ Δ``, ``∂J/∂H`` the transposed
    convolution of Δ with W. jvp: ``dZ = conv(dH, W) + conv(H, dW) + db``. Saves only its inputs.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return _conv(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight, bias)
        save_for_forward(ctx, input, weight, bias)
        ctx.config = (stride, padding, dilation, groups)
        if _per_sample.current is not None:
            _per_sample.note_tracked(ctx, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        rec = _per_sample.current
        if rec is not None and (needs[1] or (bias is not None and needs[2])):
            needs = _keep_examples(rec, ctx, needs, grad_output, input, weight, bias)
        grads = conv_backward(needs, grad_output, input, weight, bias, *ctx.config)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        input, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.config
        dz = None
        for x, w in ((d_input, weight), (input, d_weight)):
            if x is not None and w is not None:
                term = _conv(x, w, None, stride, padding, dilation, groups)
                dz = term if dz is None else dz + term
        if dz is None:  # only the bias has a tangent
            dz = torch.zeros_like(_conv(input, weight, None, stride, padding, dilation, groups))
        if bias is not None and d_bias is not None:
            dz = dz + d_bias.reshape((1, -1) + (1,) * (input.dim() - 2))
        return dz


def _keep_examples(rec, ctx, needs, delta, x, w, b):
    """Hand each example's ``(Σ_l Δᵢₗᵀ Pᵢₗ, Σ_l δᵢₗ)`` to the per_sample recorder as dense rules over the patches, one
    per group, the patches made from ``H`` a few examples at a time where the rule needs them. Returns ``needs``
    without the GEMMs the recorder now does."""
    w_p, b_p = rec.pair(w, b, _per_sample.tracked_pair(ctx))
    w_p = w_p if needs[1] else None
    b_p = b_p if b is not None and needs[2] else None
    if w_p is None and b_p is None:
        return needs
    stride, padding, dilation, groups = ctx.config
    kernel = w.shape[2:]

    def build(dim):
        d = _positions(delta).transpose(1, 2)  # (N, L, C_out)
        per_out, per_in = w.shape[0] // groups, w.shape[1]
        shape = (x.shape[0], d.shape[1], per_in * math.prod(kernel))
        config = (kernel, stride, padding, dilation)
        # each example's product and the (clipped) sum as torch's forward convolution (each group's block is a
        # convolution of one group) where that is the faster form, else the GEMMs over the patches
        per_example = _per_example_by_convolution(kernel, per_in) and x.shape[0] > 0
        summed = _summed_by_convolution(kernel, stride, per_in, d.shape[1]) and x.shape[0] > 0

        def as_delta(dj):  # a block's (N, L, C_out/g) -> (N, C_out/g, *out)
            return dj.mT.reshape(dj.shape[0], dj.shape[2], *delta.shape[2:])

        def rows_of(xj):
            """The block's patches, made a few examples at a time wherever the rule needs them."""
            products = gemm = None
            if per_example:

                def products(dj):
                    return _per_example_weight_gradients(as_delta(dj), xj.to(dj.dtype), *config)

            if summed:

                def gemm(dj):
                    return _summed_as_convolution(as_delta(dj), xj.to(dj.dtype), *config, 1).reshape(dj.shape[2], -1)

            return _per_sample.MadeRows(
                shape,
                lambda start, stop: patches(xj[start:stop], *config),
                math.prod(xj.shape[1:]),
                products=products,
                gemm=gemm,
                unordered=lambda start, stop: patches(xj[start:stop], *config, by_tap=True),
            )

        blocks = [
            rec.dense_rule(w_p, b_p, _group(d, 2, j, per_out, groups), rows_of(_group(x, 1, j, per_in, groups)))
            for j in range(groups)
        ]
        inner = blocks[0] if groups == 1 else _per_sample.BlockRule((w_p, b_p), blocks)
        return _per_sample.ShapedRule(inner, (w_p, b_p))

    rec.keep((w_p, b_p), delta, x, build)
    return (needs[0], needs[1] and w_p is None, needs[2] and b_p is None)


CONV = compile_twin(ConvFunction)


def _tuple(value, n: int, name: str, what: str) -> tuple:
    t = (value,) * n if isinstance(value, int) else tuple(value)
    if len(t) != n or not all(isinstance(v, int) for v in t):
        raise RuntimeError(f"{name}: expected {what} to be an int or {n} ints, got {value!r}")
    return t


def _padding(padding, kernel, dilation, stride, n: int, name: str):
    """``(symmetric padding, explicit (left, right) pads or None)`` from torch's padding argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n, None
        if padding != "same":
            raise ValueError(f"Invalid padding string {padding!r}, should be one of {{'valid', 'same'}}")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if all(t % 2 == 0 for t in totals):
            return tuple(t // 2 for t in totals), None
        # an even kernel: torch pads the extra row or column on the far side
        pads = []
        for t in reversed(totals):
            pads += [t // 2, t - t // 2]
        return (0,) * n, pads
    pad = _tuple(padding, n, name, "padding")
    if any(p < 0 for p in pad):
        raise RuntimeError(f"{name}: negative padding is not supported, got {padding!r}")
    return pad, None


def _convolution(input, weight, bias, stride, padding, dilation, groups, n: int, name: str):
    for label, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {label} to be a Tensor, got {type(t).__name__}")
    if weight.dim() != n + 2:
        raise RuntimeError(
            f"{name}: expected a {n + 2}-D weight (out_channels, in_channels/groups, *kernel), got shape "
            f"{shape_str(weight)}"
        )
    batched = input.dim() == n + 2
    if input.dim() not in (n + 1, n + 2):
        raise RuntimeError(
            f"{name}: expected a {n + 1}-D (unbatched) or {n + 2}-D (batched) input, got shape {shape_str(input)}"
        )
    if not isinstance(groups, int) or groups < 1:
        raise RuntimeError(f"{name}: expected groups to be a positive int, got {groups!r}")
    stride = _tuple(stride, n, name, "stride")
    dilation = _tuple(dilation, n, name, "dilation")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation):
        raise RuntimeError(f"{name}: expected stride and dilation >= 1, got stride={stride}, dilation={dilation}")
    channels = input.shape[1 if batched else 0]
    if channels != weight.shape[1] * groups or weight.shape[0] % groups:
        raise RuntimeError(
            f"{name}: expected input with {weight.shape[1] * groups} channels (weight {shape_str(weight)}, "
            f"groups={groups}) and out_channels divisible by groups, got input of shape {shape_str(input)}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise RuntimeError(
            f"{name}: expected bias of shape ({weight.shape[0]},), got "
            f"{shape_str(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
        )
    pad, explicit = _padding(padding, weight.shape[2:], dilation, stride, n, name)
    x = input if batched else input.unsqueeze(0)
    if explicit is not None:
        x = F.pad(x, explicit)  # torch's own padding for an even kernel under "same"; autograd differentiates it
    out = autocast_apply(CONV, "lower", x, weight, bias, stride, pad, dilation, groups)
    return out if batched else out.squeeze(0)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """:func:`torch.nn.functional.conv1d` with torchderiv's backward and jvp: the dense layer over patches
    (``Z = P Wᵀ + b``; ``∂J/∂W = Σ Δᵀ P``, ``∂J/∂H`` the transposed convolution of Δ). Same arguments, shapes and
    padding strings (``"valid"``, ``"same"``)."""
    return _convolution(input, weight, bias, stride, padding, dilation, groups, 1, "conv1d")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """:func:`torch.nn.functional.conv2d` with torchderiv's backward and jvp: the dense layer over patches
    (``Z = P Wᵀ + b``; ``∂J/∂W = Σ Δᵀ P``, ``∂J/∂H`` the transposed convolution of Δ). Same arguments, shapes and
    padding strings (``"valid"``, ``"same"``)."""
    return _convolution(input, weight, bias, stride, padding, dilation, groups, 2, "conv2d")

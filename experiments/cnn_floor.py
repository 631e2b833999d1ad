"""What separates torchderiv's plain CNN step from torch autograd's: the weight gradient's forms, and the floors.

To run:
    .venv/bin/python experiments/cnn_floor.py           # the weight gradients per layer, ~1 minute on 2 CPU cores
    .venv/bin/python experiments/cnn_floor.py --steps   # and the two CNNs' plain steps, a few minutes

``∂J/∂W = Σ Δᵀ P`` (docs/derivation.md, C2) can be computed from forward operations in two forms, and
``conv_backward`` (``functional/conv.py``) picks one per layer. For each convolution of the two CNNs in
experiments/dp_benchmark.py (batch 256) and of the digits CNN of configs/digits_cnn.yaml (batch 32) this times,
interleaved in one process (A B C C B A …):

* correlation: the sum read as a forward convolution of H with Δ (``_summed_as_convolution``);
* GEMM over patches: each example's patches copied out, one batched GEMM, a few examples at a time
  (``_summed_over_patches``);
* torch's own ``convolution_backward`` (the derivative kernel autograd runs, mkldnn's direct algorithm on CPU; not
  used by torchderiv), for scale.

Each is checked against torch's first; the table marks the form ``conv_backward`` takes. Prints the median time of
each and the ratio of torchderiv's form to torch's kernel: what the derivation's forms cost over a dedicated kernel.

With ``--steps``, also the plain training step of each CNN (forward, cross-entropy, backward;
``dp_benchmark.build``), interleaved: torchderiv as it is; torchderiv with every weight gradient taken from torch's
derivative kernel instead, everything else unchanged (how much of the step's distance to autograd is the weight
gradient's); for the GroupNorm CNN, also with GroupNorm's backward formulas replaced by torch's fused kernel after the
same recompute of the statistics (what a fused kernel would save: the backward stays the Python formulas, no C++);
and torch autograd. Nothing here is used by the library.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from benchmark import checked_times, interleaved, layer_line, layer_parser, step_line

import torchderiv.functional as TF

conv = importlib.import_module("torchderiv.functional.conv")
group_norm = importlib.import_module("torchderiv.functional.group_norm")
CPU = torch.device("cpu")

# (name, N, C_in, C_out, size, kernel, stride, padding): every convolution of dp_benchmark's two CNNs and the digits CNN
LAYERS = [
    ("MNIST CNN, conv 1", 256, 1, 16, 28, 8, 2, 3),
    ("MNIST CNN, conv 2", 256, 16, 32, 13, 4, 2, 0),
    ("GroupNorm CNN, conv 1", 256, 3, 32, 32, 3, 1, 1),
    ("GroupNorm CNN, conv 2", 256, 32, 32, 32, 3, 2, 1),
    ("GroupNorm CNN, conv 3", 256, 32, 64, 16, 3, 1, 1),
    ("GroupNorm CNN, conv 4", 256, 64, 64, 16, 3, 2, 1),
    ("digits CNN (configs/digits_cnn.yaml), conv 1", 32, 1, 16, 8, 3, 1, 1),
    ("digits CNN (configs/digits_cnn.yaml), conv 2", 32, 16, 32, 4, 3, 1, 1),
]
TORCH = "torch's convolution_backward"


def _torch_weight_gradient(delta, x, w, stride, padding, dilation, groups):
    zeros = (0,) * len(stride)
    mask = (False, True, False)
    return torch.ops.aten.convolution_backward(
        delta, x, w, None, stride, padding, dilation, False, zeros, groups, mask
    )[1]


def contenders(n, c_in, c_out, size, kernel, stride, padding):
    """The three forms for one layer, and the name of the one ``conv_backward`` takes."""
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size)
    w = torch.randn(c_out, c_in, kernel, kernel)
    delta = torch.randn_like(F.conv2d(x, w, None, stride, padding))
    k, s, p, d = (kernel, kernel), (stride, stride), (padding, padding), (1, 1)
    fns = {
        "correlation": lambda: conv._summed_as_convolution(delta, x, k, s, p, d, 1),
        "GEMM over patches": lambda: conv._summed_over_patches(delta, x, w, s, p, d, 1),
        TORCH: lambda: _torch_weight_gradient(delta, x, w, s, p, d, 1),
    }
    positions = math.prod(delta.shape[2:])
    taken = "correlation" if conv._summed_by_convolution(k, s, c_in, positions) else "GEMM over patches"
    return fns, taken


def steps(case: str, rounds: int) -> None:
    """The plain step of dp_benchmark's ``case``: torchderiv, torchderiv with torch's weight gradients, and torch
    autograd, interleaved; prints medians and ratios to autograd."""
    import dp_benchmark

    ours, theirs, x, y = dp_benchmark.build(case)
    own, own_norm = conv.conv_backward, group_norm._backward_plain

    def torch_weights(needs, delta, x, w, b, stride, padding, dilation, groups):
        gi, _, gb = own((needs[0], False, needs[2]), delta, x, w, b, stride, padding, dilation, groups)
        gw = _torch_weight_gradient(delta, x, w, stride, padding, dilation, groups) if needs[1] else None
        return gi, gw, gb

    def torch_norm(want_x, want_w, want_b, grad_output, input, weight, groups, eps, keep):
        n, c = input.shape[:2]
        length = math.prod(input.shape[2:])
        _, mean, rstd = torch.native_group_norm(input.contiguous(), None, None, n, c, length, groups, eps)
        mask = (want_x, want_w, want_b)
        out = torch.ops.aten.native_group_norm_backward(
            grad_output.contiguous(), input.contiguous(), mean, rstd, weight, n, c, length, groups, mask
        )
        return tuple(g if want else None for g, want in zip(out, mask))

    def step(model, loss, backward=None, norm=None):
        def run():
            conv.conv_backward = backward or own
            group_norm._backward_plain = norm or own_norm
            try:
                for p in model.parameters():
                    p.grad = None
                loss(model(x), y).backward()
            finally:
                conv.conv_backward, group_norm._backward_plain = own, own_norm

        return run

    fns = {
        "torchderiv": step(ours, TF.cross_entropy),
        "torch's weight gradients": step(ours, TF.cross_entropy, torch_weights),
    }
    if any(isinstance(m, torch.nn.GroupNorm) for m in ours.modules()):
        fns["… and GroupNorm's fused backward"] = step(ours, TF.cross_entropy, torch_weights, torch_norm)
    grads = {}
    for name in fns:
        fns[name]()
        grads[name] = [p.grad.clone() for p in ours.parameters()]
    for name, got in grads.items():
        for a, b in zip(got, grads["torchderiv"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    fns["autograd"] = step(theirs, F.cross_entropy)
    times = interleaved(fns, rounds, 1, CPU)
    print(step_line(case, times, [(k, "autograd") for k in fns if k != "autograd"]))


def main() -> None:
    args = layer_parser(__doc__, 21).parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, float32; median of {args.rounds} interleaved rounds; * the form taken")
    for name, *shape in LAYERS:
        fns, taken = contenders(*shape)
        # float32 sums of ~50 000 products: agreement relative to the largest entry
        times = checked_times(fns, TORCH, args.rounds, CPU, lambda ref: 1e-5 * ref.abs().max().item())
        print(layer_line(name, shape, times, ("taken / torch's", taken, TORCH), mark=taken))
    if args.steps:
        for case in ("cnn", "cnn_groupnorm"):
            steps(case, args.step_rounds)


if __name__ == "__main__":
    main()

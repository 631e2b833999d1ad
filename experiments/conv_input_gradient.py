"""The input gradient of a strided convolution: one forward convolution per phase of the stride, or the transposed
convolution.

To run:
    .venv/bin/python experiments/conv_input_gradient.py           # ~1 minute on 2 CPU cores
    .venv/bin/python experiments/conv_input_gradient.py --steps   # and the two CNNs' plain steps, a few minutes

For each strided layer of the two CNNs in experiments/dp_benchmark.py (batch 256), this times, interleaved in one
process (A B C C B A …), three ways to compute ``∂J/∂H`` from ``Δ = ∂J/∂Z``:

* phases: what ``conv_backward`` does (``functional/conv.py``, ``_input_gradient_by_phases``; docs/derivation.md, C4):
  one stride-1 forward convolution of Δ per phase of the stride, written into that phase's rows;
* transposed: torch's transposed convolution, cropped to the input's rows where the stride skipped rows at the far
  edge (``_transposed_unpadded``, a few examples at a time, as ``conv_backward`` takes it for dilated layers);
* torch's own ``convolution_backward`` (the derivative kernel autograd runs; not used by torchderiv), for scale.

Each is checked against the others first. Prints the median time of each and the ratio transposed / phases per
layer (above 1: the phases are faster).

With ``--steps``, also the plain training step of each CNN (forward, cross-entropy, backward; ``dp_benchmark.build``)
three ways, interleaved: torchderiv as it is, torchderiv with the transposed convolution in place of the phases, and
torch autograd. Nothing here is used by the library.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from benchmark import checked_times, interleaved, layer_line, layer_parser, step_line
from cnn_floor import LAYERS as CNN_LAYERS

import torchderiv.functional as TF

conv = importlib.import_module("torchderiv.functional.conv")
CPU = torch.device("cpu")

# (name, N, C_in, C_out, size, kernel, stride, padding): the strided layers of dp_benchmark's two CNNs whose input
# gradient a step takes (a first layer's input needs none)
LAYERS = [layer for layer in CNN_LAYERS if layer[6] > 1 and not layer[0].endswith("conv 1")]


def contenders(n, c_in, c_out, size, kernel, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size)
    w = torch.randn(c_out, c_in, kernel, kernel)
    delta = torch.randn_like(F.conv2d(x, w, None, stride, padding))
    s, p = (stride, stride), (padding, padding)
    return {
        "phases": lambda: conv._input_gradient_by_phases(delta, w, s, p, 1, x.shape[2:]),
        "transposed": lambda: _transposed_for_phases(delta, w, s, p, 1, x.shape[2:]),
        "torch's convolution_backward": lambda: torch.ops.aten.convolution_backward(
            delta, x, w, None, s, p, (1, 1), False, (0, 0), 1, (True, False, False)
        )[0],
    }


def _transposed_for_phases(delta, w, stride, padding, groups, spatial):
    """The transposed convolution in the phases' place, with their arguments: cropped where the stride skipped input
    rows at the far edge, as ``conv_backward`` takes it for dilated layers."""
    transpose = F.conv_transpose1d if delta.dim() == 3 else F.conv_transpose2d
    ones = (1,) * len(stride)
    kernel = w.shape[2:]
    dims = zip(spatial, delta.shape[2:], stride, padding, kernel)
    extra = [size - ((o - 1) * s - 2 * p + k) for size, o, s, p, k in dims]
    if any(extra):
        return conv._transposed_unpadded(transpose, delta, w, stride, padding, ones, groups, spatial)
    return transpose(delta, w, None, stride, padding, 0, groups, 1)


def steps(case: str, rounds: int) -> None:
    """The plain step of dp_benchmark's ``case``: torchderiv with the phases, with the transposed convolution, and
    torch autograd, interleaved; prints medians and ratios."""
    import dp_benchmark

    ours, theirs, x, y = dp_benchmark.build(case)
    phases = conv._input_gradient_by_phases

    def step(model, loss, form=None):
        def run():
            if form is not None:
                conv._input_gradient_by_phases = form
            try:
                for p in model.parameters():
                    p.grad = None
                loss(model(x), y).backward()
            finally:
                conv._input_gradient_by_phases = phases

        return run

    fns = {
        "phases": step(ours, TF.cross_entropy),
        "transposed": step(ours, TF.cross_entropy, _transposed_for_phases),
        "autograd": step(theirs, F.cross_entropy),
    }
    grads = {}
    for name in ("phases", "transposed"):
        fns[name]()
        grads[name] = [p.grad.clone() for p in ours.parameters()]
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    times = interleaved(fns, rounds, 1, CPU)
    print(step_line(case, times, [("phases", "transposed"), ("phases", "autograd")]))


def main() -> None:
    args = layer_parser(__doc__, 31).parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, float32; median of {args.rounds} interleaved rounds")
    for name, *shape in LAYERS:
        times = checked_times(contenders(*shape), "torch's convolution_backward", args.rounds, CPU, lambda _: 1e-4)
        print(layer_line(name, shape, times, ("transposed / phases", "transposed", "phases")))
    if args.steps:
        for case in ("cnn", "cnn_groupnorm"):
            steps(case, args.step_rounds)


if __name__ == "__main__":
    main()

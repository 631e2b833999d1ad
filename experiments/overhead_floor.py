"""How close can a Python-level backward get to autograd on a small network? The dispatch floor.

To run:
    .venv/bin/python experiments/overhead_floor.py          # ~1 minute on 2 CPU cores

On the digits-scale MLP (64-128-128-10, batch 64, relu, cross-entropy) a training step is a few hundred
µs and most of it is per-call overhead, not arithmetic. This script times, side by side and interleaved
(as experiments/benchmark.py does), five ways to run the same forward + backward:

* autograd: ``nn.Sequential`` + ``F.cross_entropy`` (torch's C++ backward nodes);
* torchderiv, two: ``torchderiv.nn.MLP`` + ``torchderiv.functional.cross_entropy`` (two Functions);
* torchderiv, one: ``MLP.cross_entropy``, network and loss in one Function;
* floor, two nodes: the same formulas as two bare Functions (network, loss) with none of torchderiv's
  generality: no argument checks, no autocast, no jvp/vmap/compile plumbing, no class weights, no
  ``ignore_index``, 2-D only;
* floor, one node: network and loss as a single bare Function.

The floors are what a Python backward costs at best with these kernels; the gap between them and
torchderiv is the price of torchderiv's generality, and the gap between the two floors is the price of
a second Python backward node. Nothing here is used by the library.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from benchmark import build, interleaved, make_step, ratio_stats, steps


def _relu_mask_(d, h):
    # d ⊙ 1[h > 0] as torchderiv computes it (floats only; see activations._relu_backprop)
    return d.addcmul_(d, torch.le(h, 0, out=torch.empty_like(h)), value=-1)


def _net_forward(x, w1, b1, w2, b2, w3, b3):
    h1 = torch.addmm(b1, x, w1.t()).relu_()
    h2 = torch.addmm(b2, h1, w2.t()).relu_()
    return torch.addmm(b3, h2, w3.t()), h1, h2


def _net_backward(d, x, w1, w2, w3, h1, h2):
    """Seed §3.6 for two hidden layers: ∂J/∂W = Δᵀ H, ∂J/∂b = Σ_rows Δ, Δ ← (Δ W) ⊙ g'(Z)."""
    g3, gb3 = d.t().mm(h2), d.sum(0)
    d = _relu_mask_(d.mm(w3), h2)
    g2, gb2 = d.t().mm(h1), d.sum(0)
    d = _relu_mask_(d.mm(w2), h1)
    return d.t().mm(x), d.sum(0), g2, gb2, g3, gb3


def _ce_backward(z, target, grad_output):
    """∂J/∂Z = s (softmax(Z) − Y) / N (seed §3.1, mean over rows)."""
    p = z.softmax(1)
    p.scatter_(1, target.unsqueeze(1), -1.0, reduce="add")
    return p.mul_(grad_output / target.shape[0])


class BareNet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3):
        z, h1, h2 = _net_forward(x, w1, b1, w2, b2, w3, b3)
        ctx.save_for_backward(x, w1, w2, w3, h1, h2)
        return z

    @staticmethod
    def backward(ctx, d):
        return (None, *_net_backward(d, *ctx.saved_tensors))


class BareCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target):
        ctx.save_for_backward(z, target)
        return F.nll_loss(z.log_softmax(1), target)

    @staticmethod
    def backward(ctx, grad_output):
        z, target = ctx.saved_tensors
        return _ce_backward(z, target, grad_output), None


class BareNetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, w1, b1, w2, b2, w3, b3):
        z, h1, h2 = _net_forward(x, w1, b1, w2, b2, w3, b3)
        ctx.save_for_backward(x, target, w1, w2, w3, h1, h2, z)
        return F.nll_loss(z.log_softmax(1), target)

    @staticmethod
    def backward(ctx, grad_output):
        x, target, w1, w2, w3, h1, h2, z = ctx.saved_tensors
        d = _ce_backward(z, target, grad_output)
        return (None, None, *_net_backward(d, x, w1, w2, w3, h1, h2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--inner", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    ours, theirs, x, target = build([64, 128, 128, 10], 64, "relu", device, torch.float32)
    params = [p for layer in ours.layers for p in (layer.weight, layer.bias)]

    def step(loss_fn):
        def run():
            for p in params:
                p.grad = None
            loss_fn().backward()

        return run

    loss = steps(ours, theirs)
    fns = {
        "autograd": make_step(theirs.parameters(), loss["autograd"], x, target),
        "torchderiv, two": make_step(params, loss["two"], x, target),
        "torchderiv, one": make_step(params, loss["torchderiv"], x, target),
        "floor, two nodes": step(lambda: BareCrossEntropy.apply(BareNet.apply(x, *params), target)),
        "floor, one node": step(lambda: BareNetCrossEntropy.apply(x, target, *params)),
    }
    # All must compute the same gradients, or the timings compare different work.
    grads = {}
    for name, fn in fns.items():
        fn()
        grads[name] = [p.grad.clone() for p in (theirs.parameters() if name == "autograd" else params)]
    for name, g in grads.items():
        for a, b in zip(g, grads["autograd"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name} disagrees with autograd")
    times = interleaved(fns, args.rounds, args.inner, device)
    print(f"64-128-128-10, batch 64, relu, cross-entropy; median of {args.rounds} interleaved rounds (min–max)")
    for name, t in times.items():
        r = ratio_stats(t, times["autograd"])
        print(
            f"{name:17} {1e6 * statistics.median(t):7.1f} µs   vs autograd "
            f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"
        )


if __name__ == "__main__":
    main()

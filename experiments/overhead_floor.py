"""How close can a Python-level backward get to autograd on a small network? The dispatch floor.

To run:
    .venv/bin/python experiments/overhead_floor.py          # ~30 s on 2 CPU cores

On the digits-scale MLP (64-128-128-10, batch 64, relu, cross-entropy) a training step is a few hundred
µs and most of it is per-call overhead, not arithmetic. This script times, side by side and interleaved
(as experiments/benchmark.py does), these ways to run the same forward + backward:

* autograd: ``nn.Sequential`` + ``F.cross_entropy`` (torch's C++ backward nodes);
* torchderiv, two: ``torchderiv.nn.MLP`` + ``torchderiv.functional.cross_entropy`` (two Functions);
* torchderiv, one: ``MLP.cross_entropy``, network and loss in one Function;
* floor, two nodes: the same formulas as two bare Functions (network, loss) with none of torchderiv's
  generality: no argument checks, no autocast, no jvp/vmap/compile plumbing, no class weights, no
  ``ignore_index``, 2-D only;
* floor, one node: network and loss as a single bare Function;
* floor, one node, shaped as ours: the same with torchderiv's inputs (the options too) and outputs (the logits and
  hidden activations, which double backward needs as outputs);
* with ``--cpp``: the one-node floor with its forward and backward bodies written in C++ (the same ATen
  calls, built with ``torch.utils.cpp_extension.load_inline``; needs a C++ compiler and ninja, ~40 s to
  build the first time). The Function stays a Python ``autograd.Function``; only the calls between
  kernels leave Python. Also with ``--cpp``: the same bodies as a C++ autograd node
  (``torch::autograd::Function``: no Python runs in backward at all), alone and behind torchderiv's own
  argument checks — what a compiled hot path for ``MLP.cross_entropy`` would cost.

and, to split torchderiv's own cost into its parts:

* torchderiv, one, no checks: ``MLPFunction`` applied to ready arguments (what ``MLP.cross_entropy`` and
  ``mlp_cross_entropy`` add is their argument checks and packing);
* floor backward / floor forward: ``MLPFunction`` with its backward (or forward) body replaced by the
  floor's, everything else (arguments, outputs, setup_context) torchderiv's.

The floors are what a Python backward costs at best with these kernels; the gap between them and
torchderiv is the price of torchderiv's generality, and the gap between the two floors is the price of
a second Python backward node. The C++ floors show what compiled glue between kernels, or a node
with no Python in it, would buy.

This machine is shared and its speed drifts by tens of percent within a minute, so the default is many
short rounds (400 of 5 steps, each contender's after one untimed step of its own: ``--settle``), each contender's
time divided by autograd's in the same round, and the median ratio is given with a bootstrap 95% interval:
differences of 2-3% are then resolved, where 21 rounds of 100 steps could not tell 5% apart. The last two lines
divide torchderiv's two paths by their floors round by round (the targets of docs/performance.md) and give the time
between them, µs a step: that is the Python torchderiv runs, which stays put where the machine's load moves the
kernels' time and with it the ratio. Nothing here is used by the library.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from benchmark import build, interleaved, make_step, median_interval, ratio_stats, steps

from torchderiv.functional._core import apply, compile_twin
from torchderiv.functional.losses import check_cross_entropy_args
from torchderiv.functional.mlp import MLPFunction, check_layers


def _relu_mask_(d, h):
    # d ⊙ 1[h > 0] as torchderiv computes it without a loss (floats only; see activations._relu_mask_)
    return d.mul_(torch.nan_to_num(h, nan=1.0).sign_())


def _relu_mask_after_loss_(d, h):
    # ... and with the loss in the same Function, where a NaN in h makes d NaN anyway: sign(h) alone
    return d.mul_(h.sign())


def _net_forward(x, w1, b1, w2, b2, w3, b3):
    h1 = torch.addmm(b1, x, w1.t()).relu_()
    h2 = torch.addmm(b2, h1, w2.t()).relu_()
    return torch.addmm(b3, h2, w3.t()), h1, h2


def _net_backward(d, x, w1, w2, w3, h1, h2, mask_=_relu_mask_after_loss_):
    """Seed §3.6 for two hidden layers: ∂J/∂W = Δᵀ H, ∂J/∂b = Σ_rows Δ, Δ ← (Δ W) ⊙ g'(Z)."""
    g3, gb3 = d.t().mm(h2), d.sum(0)
    d = mask_(d.mm(w3), h2)
    g2, gb2 = d.t().mm(h1), d.sum(0)
    d = mask_(d.mm(w2), h1)
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
        return (None, *_net_backward(d, *ctx.saved_tensors, mask_=_relu_mask_))


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


class BareNetCrossEntropyShaped(torch.autograd.Function):
    """The one-node floor with torchderiv's inputs and outputs: the options as four more inputs, and the logits and
    hidden activations returned as outputs (what double backward needs of MLPFunction), not only saved."""

    @staticmethod
    def forward(ctx, x, target, weight, activation, act_params, loss, w1, b1, w2, b2, w3, b3):
        z, h1, h2 = _net_forward(x, w1, b1, w2, b2, w3, b3)
        ctx.save_for_backward(x, target, w1, w2, w3, h1, h2, z)
        ctx.set_materialize_grads(False)
        return F.nll_loss(z.log_softmax(1), target), z, h1, h2

    @staticmethod
    def backward(ctx, grad_output, *_):
        x, target, w1, w2, w3, h1, h2, z = ctx.saved_tensors
        d = _ce_backward(z, target, grad_output)
        return (None,) * 6 + _net_backward(d, x, w1, w2, w3, h1, h2)


class FloorForward(MLPFunction):
    """torchderiv's MLPFunction (relu, cross-entropy, three layers with biases) with the floor's forward body."""

    @staticmethod
    def forward(x, target, weight, activation, act_params, loss, w1, b1, w2, b2, w3, b3):
        z, h1, h2 = _net_forward(x, w1, b1, w2, b2, w3, b3)
        return F.nll_loss(z.log_softmax(1), target), z, h1, h2


class FloorBackward(MLPFunction):
    """torchderiv's MLPFunction with the floor's backward body (same saved tensors, same gradients)."""

    @staticmethod
    def backward(ctx, grad_output, *_):
        x, target, _w, w1, _b1, w2, _b2, w3, _b3, z, h1, h2 = ctx.saved_tensors
        d = _ce_backward(z, target, grad_output)
        return (None,) * 6 + _net_backward(d, x, w1, w2, w3, h1, h2)


# The one-node floor's two bodies in C++: every line is the ATen call the Python floor makes.
_CPP_SOURCE = r"""
#include <torch/extension.h>

static at::Tensor relu_mask_(at::Tensor d, const at::Tensor& h) {
  return d.mul_(h.sign());  // after the loss: a NaN in h makes d NaN anyway
}

std::vector<at::Tensor> net_forward(at::Tensor x, at::Tensor target, at::Tensor w1, at::Tensor b1,
                                    at::Tensor w2, at::Tensor b2, at::Tensor w3, at::Tensor b3) {
  auto h1 = at::addmm(b1, x, w1.t()).relu_();
  auto h2 = at::addmm(b2, h1, w2.t()).relu_();
  auto z = at::addmm(b3, h2, w3.t());
  return {at::nll_loss(z.log_softmax(1), target), z, h1, h2};
}

std::vector<at::Tensor> net_backward(at::Tensor s, at::Tensor x, at::Tensor target, at::Tensor w1,
                                     at::Tensor w2, at::Tensor w3, at::Tensor h1, at::Tensor h2,
                                     at::Tensor z) {
  auto d = z.softmax(1);
  d.scatter_(1, target.unsqueeze(1), -1.0, "add");
  d.mul_(s.item<double>() / target.size(0));
  auto g3 = d.t().mm(h2), gb3 = d.sum(0);
  d = relu_mask_(d.mm(w3), h2);
  auto g2 = d.t().mm(h1), gb2 = d.sum(0);
  d = relu_mask_(d.mm(w2), h1);
  return {d.t().mm(x), d.sum(0), g2, gb2, g3, gb3};
}

// The same two bodies as a C++ autograd node: no Python at all between loss.backward() and the
// gradients, as for torch's own nodes.
struct NetCrossEntropy : public torch::autograd::Function<NetCrossEntropy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, at::Tensor target,
                            at::Tensor w1, at::Tensor b1, at::Tensor w2, at::Tensor b2, at::Tensor w3,
                            at::Tensor b3) {
    auto out = net_forward(x, target, w1, b1, w2, b2, w3, b3);
    ctx->save_for_backward({x, target, w1, w2, w3, out[2], out[3], out[1]});
    return out[0];
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto g = net_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    return {at::Tensor(), at::Tensor(), g[0], g[1], g[2], g[3], g[4], g[5]};
  }
};

at::Tensor net_node(at::Tensor x, at::Tensor target, at::Tensor w1, at::Tensor b1, at::Tensor w2,
                    at::Tensor b2, at::Tensor w3, at::Tensor b3) {
  return NetCrossEntropy::apply(x, target, w1, b1, w2, b2, w3, b3);
}
"""


def cpp_floor():
    """The one-node floor with its bodies compiled, built on first use: ``(Function class, node)``, the
    Function a Python ``autograd.Function`` calling the C++ bodies, ``node(x, target, *params)`` the C++
    autograd node."""
    from torch.utils.cpp_extension import load_inline

    # NOTE: load_inline compiles without optimisation unless asked: at -O0 the glue between the ATen
    # calls (reference counting, argument packing) cost as much as Python's (measured ~1.00x vs ~0.88x).
    ext = load_inline(
        "torchderiv_overhead_floor",
        _CPP_SOURCE,
        functions=["net_forward", "net_backward", "net_node"],
        extra_cflags=["-O2"],
    )

    class CppNetCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, target, w1, b1, w2, b2, w3, b3):
            loss, z, h1, h2 = ext.net_forward(x, target, w1, b1, w2, b2, w3, b3)
            ctx.save_for_backward(x, target, w1, w2, w3, h1, h2, z)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            return (None, None, *ext.net_backward(grad_output, *ctx.saved_tensors))

    return CppNetCrossEntropy, ext.net_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--inner", type=int, default=5, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=int, default=1, help="untimed steps of each contender before its timed ones")
    parser.add_argument("--cpp", action="store_true", help="also time the one-node floor with C++ bodies")
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
        "floor, one node, shaped as ours": step(
            lambda: BareNetCrossEntropyShaped.apply(x, target, None, "relu", (), ("mean", -100, 0.0, False), *params)[0]
        ),
    }

    def checked(x, target):
        """What ``MLP.cross_entropy`` checks and prepares before its Function runs (relu, mean, no options)."""
        layers = ours._plain_layers()
        n_out = check_layers(x, layers, "MLP")
        check_cross_entropy_args(x.shape[:-1] + (n_out,), target, None, -100, 0.0, "MLP")
        return layers

    # torchderiv in parts: its Function on ready arguments, then with one body swapped for the floor's.
    ready = (x, target, None, "relu", (), ("mean", -100, 0.0, False), *params)
    parts = {"no checks": MLPFunction, "floor forward": FloorForward, "floor backward": FloorBackward}
    for name, fn in {k: compile_twin(cls) for k, cls in parts.items()}.items():
        fns[f"torchderiv, one, {name}"] = step(lambda fn=fn: apply(fn, *ready)[0])
    if args.cpp:
        cpp, node = cpp_floor()
        fns["floor, one node, C++"] = step(lambda: cpp.apply(x, target, *params))
        fns["floor, C++ autograd node"] = step(lambda: node(x, target, *params))
        fns["C++ node + torchderiv's checks"] = step(lambda: node(x, target, *checked(x, target)))
    # All must compute the same gradients, or the timings compare different work.
    grads = {}
    for name, fn in fns.items():
        fn()
        grads[name] = [p.grad.clone() for p in (theirs.parameters() if name == "autograd" else params)]
    for name, g in grads.items():
        for a, b in zip(g, grads["autograd"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name} disagrees with autograd")
    times = interleaved(fns, args.rounds, args.inner, device, settle=args.settle)
    print(
        f"64-128-128-10, batch 64, relu, cross-entropy; {args.rounds} interleaved rounds of {args.inner} steps; "
        "time vs autograd in the same round: median [95% interval] (min–max)"
    )
    # The fastest round too: other tenants' load only ever adds time, so it is another low-noise estimate.
    fastest = min(times["autograd"])
    for name, t in times.items():
        r = ratio_stats(t, times["autograd"])
        lo, hi = r["interval"]
        print(
            f"{name:34} {1e6 * statistics.median(t):7.1f} µs   vs autograd {r['median']:.3f} [{lo:.3f}–{hi:.3f}] "
            f"({r['min']:.2f}–{r['max']:.2f})   fastest round {min(t) / fastest:.2f}"
        )
    for ours_name, floor in (("torchderiv, one", "floor, one node"), ("torchderiv, two", "floor, two nodes")):
        r = ratio_stats(times[ours_name], times[floor])
        lo, hi = r["interval"]
        # The time between them too: it is the Python torchderiv runs per step, so it stays where the kernels' speed
        # (and with it the ratio) changes with the machine's load.
        gap = [1e6 * (a - b) for a, b in zip(times[ours_name], times[floor])]
        glo, ghi = median_interval(gap)
        print(
            f"{ours_name} vs {floor}: {r['median']:.3f} [{lo:.3f}–{hi:.3f}], "
            f"{statistics.median(gap):+.1f} µs a step [{glo:+.1f}–{ghi:+.1f}]"
        )


if __name__ == "__main__":
    main()

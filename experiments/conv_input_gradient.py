"""The input gradient of a strided convolution: one forward convolution per phase of the stride, or the transposed
convolution.

To run:
    .venv/bin/python experiments/conv_input_gradient.py      # ~1 minute on 2 CPU cores

For each strided layer of the two CNNs in experiments/dp_benchmark.py (batch 256), this times, interleaved in one
process (A B C C B A …), three ways to compute ``∂J/∂H`` from ``Δ = ∂J/∂Z``:

* phases: what ``conv_backward`` does (``functional/conv.py``, ``_input_gradient_by_phases``; docs/derivation.md, C4):
  one stride-1 forward convolution of Δ per phase of the stride, written into that phase's rows;
* transposed: torch's transposed convolution, cropped to the input's rows where the stride skipped rows at the far
  edge (``_transposed_unpadded``, a few examples at a time, as ``conv_backward`` takes it for dilated layers);
* torch's own ``convolution_backward`` (the derivative kernel autograd runs; not used by torchderiv), for scale.

Each is checked against the others first. Prints the median time of each and the ratio transposed / phases per
layer (above 1: the phases are faster). Nothing here is used by the library.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

conv = importlib.import_module("torchderiv.functional.conv")

# (name, N, C_in, C_out, size, kernel, stride, padding): the strided layers of dp_benchmark's two CNNs
LAYERS = [
    ("MNIST CNN, conv 2", 256, 16, 32, 13, 4, 2, 0),
    ("GroupNorm CNN, conv 2", 256, 32, 32, 32, 3, 2, 1),
    ("GroupNorm CNN, conv 4", 256, 64, 64, 16, 3, 2, 1),
]


def contenders(n, c_in, c_out, size, kernel, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size)
    w = torch.randn(c_out, c_in, kernel, kernel)
    delta = torch.randn_like(F.conv2d(x, w, None, stride, padding))
    s, p = (stride, stride), (padding, padding)

    def transposed():
        out = delta.shape[2:]
        extra = [size - ((o - 1) * stride - 2 * padding + kernel) for o in out]
        if any(extra):
            return conv._transposed_unpadded(F.conv_transpose2d, delta, w, s, p, (1, 1), 1, x.shape[2:])
        return F.conv_transpose2d(delta, w, None, s, p)

    return {
        "phases": lambda: conv._input_gradient_by_phases(delta, w, s, p, 1, x.shape[2:]),
        "transposed": transposed,
        "torch's convolution_backward": lambda: torch.ops.aten.convolution_backward(
            delta, x, w, None, s, p, (1, 1), False, (0, 0), 1, (True, False, False)
        )[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, float32; median of {args.rounds} interleaved rounds")
    for name, *shape in LAYERS:
        fns = contenders(*shape)
        results = {k: f() for k, f in fns.items()}
        for k, r in results.items():
            torch.testing.assert_close(r, results["torch's convolution_backward"], rtol=1e-4, atol=1e-4, msg=k)
        times = {k: [] for k in fns}
        with torch.no_grad():
            for r in range(args.rounds):
                order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
                for k, f in order:
                    start = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - start)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["transposed"], times["phases"]))
        cells = ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
        print(f"{name} {tuple(shape)}: {cells}; transposed / phases {ratio:.2f}")


if __name__ == "__main__":
    main()

"""Linear + cross-entropy: torchderiv's fused chunked op vs the unfused pair vs torch's chunked path.

To run (on its own; experiments/benchmark.py also calls it):
    .venv/bin/python experiments/lce_memory.py            # 4096 x 256 inputs, 32768 classes
    .venv/bin/python experiments/lce_memory.py --quick    # 1024 x 256, 8192 classes

Memory: the extra peak RSS of one forward + backward, each contender in a fresh process (VmHWM after
the call minus VmRSS before it, the high-water mark reset first; inputs and weights already allocated).
Time: forward + backward, interleaved in this process, median over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import torchderiv.functional as TF

KINDS = ("unfused", "torchderiv", "torch_chunked")


def make(n, d, c, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, generator=g, requires_grad=True)
    w = (torch.randn(c, d, device=device, generator=g) / d**0.5).requires_grad_()
    t = torch.randint(0, c, (n,), device=device, generator=g)
    return x, w, t


def step_fn(kind, x, w, t):
    if kind == "unfused":
        return lambda: F.cross_entropy(F.linear(x, w), t).backward()
    if kind == "torchderiv":
        return lambda: TF.linear_cross_entropy(x, w, t).backward()
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda: F.linear_cross_entropy(x, w, t, options=options).backward()


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind, n, d, c, threads):
    torch.set_num_threads(threads)
    x, w, t = make(n, d, c)
    # Reset the high-water mark to the current RSS (Linux: writing 5 to clear_refs), so that the peak of
    # importing torch does not hide the peak of the call.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    step_fn(kind, x, w, t)()
    print(json.dumps({"kind": kind, "extra_peak_mib": _status_mib("VmHWM") - before}))


def measure_memory(kind, n, d, c, threads=2) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--shape", f"{n},{d},{c}", "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mib"]


def bench_linear_cross_entropy(quick=False, rounds=7, device="cpu", threads=2):
    n, d, c = (1024, 256, 8192) if quick else (4096, 256, 32768)
    torch.set_num_threads(threads)
    x, w, t = make(n, d, c, device)
    fns = {k: step_fn(k, x, w, t) for k in KINDS}
    # equal results first: a fast wrong answer is no answer
    with torch.no_grad():
        torch.testing.assert_close(
            TF.linear_cross_entropy(x, w, t), F.cross_entropy(F.linear(x, w), t), rtol=1e-5, atol=1e-5
        )
    for f in fns.values():
        f()
    times = {k: [] for k in KINDS}
    for _ in range(rounds):
        for k, f in fns.items():
            x.grad = w.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    ratio = lambda a, b: [p / q for p, q in zip(times[a], times[b])]
    stats = lambda r: {"median": statistics.median(r), "min": min(r), "max": max(r)}
    row = {
        "kind": "linear_cross_entropy",
        "shape": f"{n}x{d}, {c} classes",
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "time_vs_unfused": stats(ratio("torchderiv", "unfused")),
        "torch_chunked_time_vs_unfused": stats(ratio("torch_chunked", "unfused")),
    }
    if device == "cpu":
        mem = {k: measure_memory(k, n, d, c, threads) for k in KINDS}
        row["extra_peak_mib"] = mem
        row["memory_vs_unfused"] = mem["torchderiv"] / mem["unfused"]
        row["torch_chunked_memory_vs_unfused"] = mem["torch_chunked"] / mem["unfused"]
    else:
        row["memory_vs_unfused"] = float("nan")
        row["torch_chunked_memory_vs_unfused"] = float("nan")
    print(
        f"linear+CE {row['shape']}: time vs unfused {row['time_vs_unfused']['median']:.2f} "
        f"(torch chunked {row['torch_chunked_time_vs_unfused']['median']:.2f}); "
        f"extra peak memory vs unfused {row['memory_vs_unfused']:.3f} "
        f"(torch chunked {row['torch_chunked_memory_vs_unfused']:.3f})",
        flush=True,
    )
    return [row]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=KINDS)
    parser.add_argument("--shape", default="4096,256,32768")
    args = parser.parse_args()
    if args.child:
        child(args.child, *map(int, args.shape.split(",")), args.threads)
        return
    print(json.dumps(bench_linear_cross_entropy(args.quick, args.rounds, threads=args.threads), indent=1))


if __name__ == "__main__":
    main()

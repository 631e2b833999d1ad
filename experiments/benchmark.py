"""torchderiv vs torch autograd vs the 3-GEMM limit: time and saved activation memory, side by side.

To run:
    .venv/bin/python experiments/benchmark.py            # full table (a few minutes on 2 CPU cores)
    .venv/bin/python experiments/benchmark.py --quick    # reduced set, under a minute
    .venv/bin/python experiments/benchmark.py --device cuda --dtype bfloat16
    .venv/bin/python experiments/benchmark.py --dp       # per-example clipping (DP-SGD) step: dp_benchmark.py

Method: every contender runs in this one process, interleaved (A B C C B A …) over
``--rounds`` rounds; each round times ``--inner`` forward+backward passes of each; the table reports the
median of the per-round ratios with their spread (min–max). Ratios < 1 mean torchderiv is faster or
smaller.

* torchderiv: ``MLP.cross_entropy`` — network and loss in one Function, one autograd node per step.
  "two Functions" is the same network as ``MLP`` then ``cross_entropy`` (two nodes), shown alongside.
* autograd: the same network as an ``nn.Sequential`` of torch modules, same weights, same loss.
* 3-GEMM limit: per layer the forward GEMM, the weight-gradient GEMM and the input-gradient GEMM (none
  for the first layer), the same shapes and transposes, no elementwise work.
* saved bytes: unique storages saved for backward (``saved_tensors_hooks``), parameters excluded.
* models (``--only-models`` for them alone): dp_benchmark's transformer and two CNNs, and configs/digits_cnn.yaml's
  small CNN, converted by ``torchderiv.convert``, their plain step (forward + cross-entropy + backward) against the
  same torch modules under autograd.

Writes experiments/out/benchmark.json and benchmark.md (docs/performance.md gives its runs, with dates and commands).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchderiv.functional as TF
from torchderiv.nn import MLP
from torchderiv.testing import saved_bytes

OUT = Path(__file__).resolve().parent / "out"
TORCH_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
NETS = {"large": ([1024, 2048, 2048, 10], 512), "small": ([64, 128, 128, 10], 64)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict, rounds: int, inner: int, device, faults: dict | None = None, settle: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each fn, one list entry per round, contenders alternating within a round.

    ``settle``: untimed calls of each fn before its timed ones in every round, so that each timed call follows a
    call of the same fn, as a step in a training loop follows the same step. Without them, the first timed call
    pays for the caches the previous contender left: ``MLP.cross_entropy``'s step on the 64-128-128-10 MLP, timed
    next to an identical copy of itself in 400 rounds of 5, took 1.150x autograd's step where it ran right after
    autograd and 1.117x where it did not; with ``settle=1``, 1.105x and 1.099x.

    ``faults``: if a dict, it receives each fn's minor page faults per call in each round (the process's
    ``ru_minflt``): memory the allocator gave back to the system and a later call touched again, a cost of
    the allocator's state rather than of the arithmetic.
    """
    for fn in fns.values():  # warm-up (allocator, kernels, compilation)
        fn()
        fn()
    times = {k: [] for k in fns}
    if faults is not None:
        faults.update({k: [] for k in fns})
    names = list(fns)
    for r in range(rounds):
        # Every other round in reverse order, so that no contender always runs right after the same one.
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            for _ in range(settle):
                fn()
            _sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
            if faults is not None:
                faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / inner)
    return times


def median_interval(ratios: list[float], draws: int = 500) -> tuple[float, float]:
    """A bootstrap 95% interval for the median of ``ratios``: how far this run's median may be trusted."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def ratio_stats(num: list[float], den: list[float]) -> dict:
    r = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "interval": median_interval(r)}


def layer_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The arguments of the per-layer CNN experiments (conv_input_gradient.py, cnn_floor.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="also the two CNNs' plain steps (a few minutes)")
    parser.add_argument("--step-rounds", type=int, default=15)
    return parser


def checked_times(fns: dict, reference: str, rounds: int, device, atol) -> dict[str, list[float]]:
    """Each contender's result checked against ``fns[reference]``'s (to ``atol(reference result)``), then all timed
    interleaved without autograd: seconds per call, one entry per round."""
    results = {k: f() for k, f in fns.items()}
    ref = results[reference]
    for k, r in results.items():
        torch.testing.assert_close(r, ref, rtol=1e-4, atol=atol(ref), msg=k)
    with torch.no_grad():
        return interleaved(fns, rounds, 1, device)


def layer_line(name: str, shape, times: dict[str, list[float]], ratio: tuple[str, str, str], mark=None) -> str:
    """``name shape: <median ms each>; label <median ratio a / b>`` for ``ratio = (label, a, b)``; ``mark``: a
    contender starred."""
    cells = ", ".join(f"{k}{'*' if k == mark else ''} {1e3 * statistics.median(v):.2f} ms" for k, v in times.items())
    label, a, b = ratio
    return f"{name} {tuple(shape)}: {cells}; {label} {statistics.median(x / y for x, y in zip(times[a], times[b])):.2f}"


def step_line(case: str, times: dict[str, list[float]], pairs) -> str:
    """``case plain step: <median ms each>; a / b <median ratio> …`` for each ``(a, b)`` in ``pairs``."""
    cells = ", ".join(f"{k} {1e3 * statistics.median(v):.1f} ms" for k, v in times.items())
    ratios = ", ".join(
        f"{a} / {b} {statistics.median(x / y for x, y in zip(times[a], times[b])):.2f}" for a, b in pairs
    )
    return f"{case} plain step: {cells}; {ratios}"


def build(sizes, batch, activation, device, dtype):
    torch.manual_seed(0)
    ours = MLP(sizes, activation=activation, device=device, dtype=dtype)
    layers = []
    for k, lin in enumerate(ours.layers):
        ref = nn.Linear(lin.in_features, lin.out_features, device=device, dtype=dtype)
        ref.load_state_dict(lin.state_dict())
        layers.append(ref)
        if k < len(ours.layers) - 1:
            layers.append(TORCH_ACT[activation]())
    theirs = nn.Sequential(*layers)
    x = torch.randn(batch, sizes[0], device=device, dtype=dtype)
    target = torch.randint(0, sizes[-1], (batch,), device=device)
    return ours, theirs, x, target


def make_step(params, loss_fn, x, target):
    """One training step's forward + backward: clear the gradients of ``params``, ``loss_fn(x, target)``."""
    params = list(params)

    def step(backward=True):
        for p in params:
            p.grad = None
        loss = loss_fn(x, target)
        if backward:
            loss.backward()
        return loss

    return step


def steps(ours, theirs):
    """The loss functions compared: torchderiv's network + cross-entropy as one Function
    (``MLP.cross_entropy``) and as two (``MLP`` then ``cross_entropy``); autograd's ``nn.Sequential``
    then ``F.cross_entropy``."""
    return {
        "torchderiv": lambda x, target: ours.cross_entropy(x, target)[0],
        "two": lambda x, target: TF.cross_entropy(ours(x), target),
        "autograd": lambda x, target: F.cross_entropy(theirs(x), target),
    }


def gemm_limit(sizes, batch, device, dtype):
    """The three GEMMs per layer of forward + backward, nothing else."""
    torch.manual_seed(1)
    hs = [torch.randn(batch, n, device=device, dtype=dtype) for n in sizes]
    ws = [torch.randn(o, i, device=device, dtype=dtype) for i, o in zip(sizes[:-1], sizes[1:])]
    ds = [torch.randn(batch, o, device=device, dtype=dtype) for o in sizes[1:]]

    def step():
        for k, w in enumerate(ws):
            torch.mm(hs[k], w.t())  # Z = H Wᵀ
            torch.mm(ds[k].t(), hs[k])  # ∂J/∂W = Δᵀ H
            if k > 0:
                torch.mm(ds[k], w)  # ∂J/∂H = Δ W

    return step


def bench_mlp(net: str, activation: str, args, device, dtype, compiled: bool = False) -> dict:
    sizes, batch = NETS[net]
    ours, theirs, x, target = build(sizes, batch, activation, device, dtype)
    loss = steps(ours, theirs)
    ours_p, theirs_p = list(ours.parameters()), list(theirs.parameters())
    row = {"net": net, "sizes": sizes, "batch": batch, "activation": activation, "compiled": compiled}
    if compiled:
        torch._dynamo.reset()
        fns = {
            "torchderiv": make_step(ours_p, torch.compile(loss["torchderiv"]), x, target),
            "autograd": make_step(theirs_p, torch.compile(loss["autograd"]), x, target),
        }
        times = interleaved(fns, args.rounds, args.inner, device)
    else:
        ours_step = make_step(ours_p, loss["torchderiv"], x, target)
        theirs_step = make_step(theirs_p, loss["autograd"], x, target)
        fns = {
            "torchderiv": ours_step,
            "autograd": theirs_step,
            "gemm": gemm_limit(sizes, batch, device, dtype),
            "two": make_step(ours_p, loss["two"], x, target),
        }
        times = interleaved(fns, args.rounds, args.inner, device)
        row["vs_gemm"] = ratio_stats(times["torchderiv"], times["gemm"])
        row["autograd_vs_gemm"] = ratio_stats(times["autograd"], times["gemm"])
        row["two_vs_autograd"] = ratio_stats(times["two"], times["autograd"])
        params = list(ours.parameters()) + list(theirs.parameters())
        row["saved_bytes"] = {
            "torchderiv": saved_bytes(ours_step, params),
            "autograd": saved_bytes(theirs_step, params),
        }
        row["saved_ratio"] = row["saved_bytes"]["torchderiv"] / row["saved_bytes"]["autograd"]
    row["vs_autograd"] = ratio_stats(times["torchderiv"], times["autograd"])
    row["ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return row


def bench_model(case: str, args, device, dtype) -> dict:
    """A converted model's plain training step (forward + backward, no optimizer) against torch autograd's on the
    same weights: ``dp_benchmark``'s transformer and CNN cases."""
    import dp_benchmark

    ours, theirs, x, target = _digits_cnn() if case == "digits_cnn" else dp_benchmark.build(case)
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    x, target = (x.to(device, dtype) if x.is_floating_point() else x.to(device)), target.to(device)  # tokens stay
    ours_step = make_step(ours.parameters(), lambda x, t: TF.cross_entropy(ours(x), t), x, target)
    theirs_step = make_step(theirs.parameters(), lambda x, t: F.cross_entropy(theirs(x), t), x, target)
    times = interleaved({"torchderiv": ours_step, "autograd": theirs_step}, args.rounds, args.inner, device)
    params = list(ours.parameters()) + list(theirs.parameters())
    saved = {"torchderiv": saved_bytes(ours_step, params), "autograd": saved_bytes(theirs_step, params)}
    return {
        "kind": "model",
        "net": case,
        "batch": x.shape[0],
        "vs_autograd": ratio_stats(times["torchderiv"], times["autograd"]),
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "saved_bytes": saved,
        "saved_ratio": saved["torchderiv"] / saved["autograd"],
    }


def _digits_cnn():
    """configs/digits_cnn.yaml's CNN (torchderiv.lightning.DigitsCNN: two 3×3 convolutions of 16 and 32 channels on
    8×8 digits), converted, against itself under autograd, on its batch of 32 images given as 64 features."""
    import copy

    import torchderiv
    from torchderiv.lightning import DigitsCNN

    torch.manual_seed(0)
    theirs = DigitsCNN()
    ours = torchderiv.convert(copy.deepcopy(theirs))
    return ours, theirs, torch.rand(32, 64), torch.randint(0, 10, (32,))


MODEL_NAMES = {
    "transformer": "transformer: 2 pre-norm encoder layers (d 64, 4 heads, GELU), 64 tokens",
    "cnn": "Opacus's MNIST CNN, 1×28×28",
    "cnn_groupnorm": "four 3×3 convolutions + GroupNorm, 3×32×32",
    "digits_cnn": "configs/digits_cnn.yaml's CNN, 1×8×8",
}


def fmt(s: dict, interval: bool = False) -> str:
    """``median (min–max)``, or ``median [95% interval of the median] (min–max)``."""
    ci = f" [{s['interval'][0]:.2f}–{s['interval'][1]:.2f}]" if interval else ""
    return f"{s['median']:.2f}{ci} ({s['min']:.2f}–{s['max']:.2f})"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Benchmark: {meta['device']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"median of {meta['rounds']} interleaved rounds (min–max); time vs autograd also with the "
        "median's bootstrap 95% interval [lo–hi].",
    ]
    if any("activation" in r for r in rows):
        lines += [
            "",
            "| net | g | compiled | torchderiv ms | autograd ms | time vs autograd | time vs 3-GEMM "
            "| autograd vs 3-GEMM | saved bytes vs autograd | two Functions vs autograd |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        if r.get("kind") in ("linear_cross_entropy", "model"):
            continue
        net = f"{r['net']} {'-'.join(map(str, r['sizes']))} ×{r['batch']}"
        cells = [
            net,
            r["activation"],
            "yes" if r["compiled"] else "no",
            f"{r['ms']['torchderiv']:.2f}",
            f"{r['ms']['autograd']:.2f}",
            fmt(r["vs_autograd"], interval=True),
            fmt(r["vs_gemm"]) if "vs_gemm" in r else "–",
            fmt(r["autograd_vs_gemm"]) if "autograd_vs_gemm" in r else "–",
            f"{r['saved_ratio']:.2f}" if "saved_ratio" in r else "–",
            fmt(r["two_vs_autograd"]) if "two_vs_autograd" in r else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    models = [r for r in rows if r.get("kind") == "model"]
    if models:
        lines += [
            "",
            "| model (converted; plain step) | torchderiv ms | autograd ms | time vs autograd "
            "| saved bytes vs autograd |",
            "|---|---|---|---|---|",
        ]
        for r in models:
            lines.append(
                f"| {MODEL_NAMES[r['net']]} ×{r['batch']} | {r['ms']['torchderiv']:.1f} | {r['ms']['autograd']:.1f} "
                f"| {fmt(r['vs_autograd'], interval=True)} | {r['saved_ratio']:.2f} |"
            )
    lce = [r for r in rows if r.get("kind") == "linear_cross_entropy"]
    if lce:
        lines += [
            "",
            "| linear + cross-entropy | time vs unfused | extra peak memory vs unfused | torch chunked: time, memory |",
            "|---|---|---|---|",
        ]
        for r in lce:
            lines.append(
                f"| {r['shape']} | {fmt(r['time_vs_unfused'])} | {r['memory_vs_unfused']:.3f} "
                f"| {fmt(r['torch_chunked_time_vs_unfused'])}, {r['torch_chunked_memory_vs_unfused']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced set, under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21; 7 with --quick)")
    parser.add_argument("--inner", type=int, default=0, help="passes per timing (default: by net size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-lce", action="store_true", help="skip the linear + cross-entropy study")
    parser.add_argument("--no-models", action="store_true", help="skip the converted transformer and CNNs")
    parser.add_argument("--only-models", action="store_true", help="only the converted transformer and CNNs")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument(
        "--dp", action="store_true", help="only the per-example clipping (DP-SGD) study: dp_benchmark.py"
    )
    parser.add_argument("--dp-cases", nargs="+", default=None, help="with --dp: a subset of dp_benchmark.CASES")
    args = parser.parse_args()
    if args.dp:
        import dp_benchmark

        dp_benchmark.DEVICE = torch.device(args.device)
        dp_benchmark.run(quick=args.quick, rounds=args.rounds, threads=args.threads, out=args.out, cases=args.dp_cases)
        return
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.rounds = max(args.rounds or (7 if args.quick else 21), 7)
    rows = []
    activations = ["relu", "gelu"] if args.quick else ["relu", "tanh", "gelu", "silu"]
    for net in () if args.only_models else ("large", "small"):
        for activation in activations:
            # On CPU a small net's step is ~0.3 ms: 100 steps a timing keep one timing above the noise floor.
            cpu = device.type == "cpu"
            inner = args.inner or ((2 if net == "large" else 100) if cpu else 20)
            a = argparse.Namespace(rounds=args.rounds, inner=inner)
            row = bench_mlp(net, activation, a, device, dtype)
            rows.append(row)
            print(
                f"{net:5} {activation:5} time vs autograd {fmt(row['vs_autograd'], interval=True)}  "
                f"vs 3-GEMM {fmt(row['vs_gemm'])}  "
                f"(autograd vs 3-GEMM {fmt(row['autograd_vs_gemm'])})  saved bytes {row['saved_ratio']:.2f}  "
                f"two Functions vs autograd {fmt(row['two_vs_autograd'])}",
                flush=True,
            )
    if not args.no_models:
        for case in ["cnn"] if args.quick else ["transformer", "cnn", "cnn_groupnorm", "digits_cnn"]:
            # the transformer's and the GroupNorm CNN's step are ~0.2 s on CPU: one step a timing; the MNIST CNN's
            # ~20 ms: five; the digits CNN's ~1.5 ms: twenty
            inner = {"cnn": 5, "digits_cnn": 20}.get(case, 1)
            a = argparse.Namespace(rounds=args.rounds, inner=args.inner or inner)
            row = bench_model(case, a, device, dtype)
            rows.append(row)
            print(f"{case:13} time vs autograd {fmt(row['vs_autograd'], interval=True)}", flush=True)
    if not args.quick and not args.no_compile and not args.only_models:
        for activation in ["relu", "tanh", "gelu", "silu"]:
            a = argparse.Namespace(rounds=args.rounds, inner=args.inner or 2)
            row = bench_mlp("large", activation, a, device, dtype, compiled=True)
            rows.append(row)
            print(
                f"large {activation:5} compiled: time vs compiled autograd {fmt(row['vs_autograd'], interval=True)}",
                flush=True,
            )
    if not args.no_lce and not args.only_models:
        from lce_memory import bench_linear_cross_entropy

        rows += bench_linear_cross_entropy(quick=args.quick, rounds=args.rounds, device=args.device)
    meta = {
        "device": str(device),
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "rounds": args.rounds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (out / "benchmark.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()

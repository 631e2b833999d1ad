"""``torchderiv check``: run :func:`torchderiv.testing.verify` over Functions and print one table.

To run:
    torchderiv check                                           # every built-in Function
    torchderiv check mypkg.ops:MyLinear --shapes "3,4 5,4 5"   # your own (a Function class or a callable)

Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from . import functional as TF
from .testing import DEFAULT_CHECKS, verify


def builtin_cases():
    """(label, callable, sample inputs) for every built-in Function, inputs generated from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 4, dtype=torch.float64, generator=g)
    idx = torch.tensor([0, 3, 1])
    cases = [
        ("LinearFunction", TF.linear, ((2, 3, 4), (5, 4), (5,))),
        ("DenseFunction[relu]", lambda x, w, b: TF.dense(x, w, b, "relu"), ((6, 4), (5, 4), (5,))),
        ("DenseFunction[gelu]", lambda x, w, b: TF.dense(x, w, b, "gelu"), ((6, 4), (5, 4), (5,))),
    ]
    for name in ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "silu"):
        cls = "".join(p.capitalize() for p in name.split("_")) + "Function"
        cases.append((cls, getattr(TF, name), ((3, 5),)))
    cases += [
        (
            "MLPFunction[tanh]",
            lambda x, w1, b1, w2: TF.mlp(x, [w1, w2], [b1, None], "tanh"),
            ((5, 4), (6, 4), (6,), (3, 6)),
        ),
        (
            "MLPFunction[gelu]",
            lambda x, w1, b1, w2: TF.mlp(x, [w1, w2], [b1, None], "gelu"),
            ((5, 4), (6, 4), (6,), (3, 6)),
        ),
        (
            "MLPFunction[silu, cross-entropy]",
            lambda x, w1, b1, w2: TF.mlp_cross_entropy(x, [w1, w2], [b1, None], idx, "silu", label_smoothing=0.1)[0],
            ((3, 4), (6, 4), (6,), (4, 6)),
        ),
        (
            "LinearCrossEntropy",
            lambda x, w, b: TF.linear_cross_entropy(
                x, w, idx[:2].repeat(3), linear_bias=b, label_smoothing=0.1, chunk_size=4
            ),
            ((6, 3), (4, 3), (4,)),
        ),
        ("ElementwiseLoss[mse]", TF.mse_loss, ((3, 4), (3, 4))),
        ("ElementwiseLoss[huber]", lambda x, y: TF.huber_loss(x, y, delta=0.5), ((3, 4), (3, 4))),
        ("ElementwiseLoss[bce]", TF.binary_cross_entropy_with_logits, ((3, 4), probs)),
        ("CrossEntropy[index]", lambda x: TF.cross_entropy(x, idx, label_smoothing=0.1), ((3, 4),)),
        ("CrossEntropy[probs]", lambda x, t: TF.cross_entropy(x, t.softmax(1)), ((3, 4), (3, 4))),
    ]
    return cases


def _table(reports) -> str:
    names = [n for n in DEFAULT_CHECKS] + ["compile"]
    short = {
        "grad_output_unmodified": "grad_out",
        "needs_input_grad": "needs_grad",
        "double_backward": "double_bw",
        "batched_grad": "batched",
        "fwd_over_rev": "fwd/rev",
        "noncontiguous": "strides",
    }
    header = ["Function"] + [short.get(n, n) for n in names]
    rows = []
    for label, report in reports:
        cells = [label]
        for n in names:
            try:
                r = report[n]
                cells.append("pass" if r.status == "pass" else r.status)
            except KeyError:
                cells.append("-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _load(target: str):
    module_name, _, attr = target.partition(":")
    if not attr:
        raise SystemExit(f"expected module.path:Name, got {target!r}")
    # A console script does not put the current directory on sys.path; `python -m` would. Do what a user
    # running `torchderiv check mypkg.ops:MyLinear` next to mypkg/ expects.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"torchderiv check: cannot import {module_name!r} (from {os.getcwd()}): {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"torchderiv check: {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
        return obj.apply
    return obj


def _shapes(text: str):
    try:
        return [tuple(int(s) for s in group.split(",") if s) for group in text.split()]
    except ValueError:
        raise SystemExit(f'--shapes: expected groups like "3,4 4,4 4", got {text!r}') from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchderiv check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", nargs="?", help="module.path:FunctionOrCallable to check (default: the built-ins)")
    parser.add_argument("--shapes", help='input shapes, space-separated groups of comma-separated sizes: "3,4 4,4 4"')
    parser.add_argument("--compile", action="store_true", help="also check torch.compile parity (user targets)")
    parser.add_argument("--expect-unsupported", default="", help="comma-separated checks allowed to be unsupported")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every report in full")
    args = parser.parse_args(argv)
    expected = {s for s in args.expect_unsupported.split(",") if s}
    if args.target:
        if not args.shapes:
            parser.error("a target needs --shapes")
        report = verify(_load(args.target), *_shapes(args.shapes), compile=args.compile, expect_unsupported=expected)
        print(report)
        return 0 if report.ok else 1
    reports = []
    for label, fn, inputs in builtin_cases():
        reports.append((label, verify(fn, *inputs, compile=True, expect_unsupported=expected)))
    print(_table(reports))
    failed = [(label, r) for label, r in reports if not r.ok]
    for label, r in failed if not args.verbose else reports:
        print()
        print(f"{label}:")
        print(r)
    print()
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed")
    return 0 if not failed else 1

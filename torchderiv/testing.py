"""``verify``: check a custom autograd Function the way PyTorch checks its own operators.

Depends on torch alone, so it serves any user's Function; torchderiv's built-ins are its clients.

Example::

    >>> from torchderiv.testing import verify
    >>> report = verify(MyLinear.apply, (8, 4), (3, 4), (3,))   # shapes, or tensors
    >>> print(report)            # a table: check, status, where the largest error was
    >>> report.raise_if_failed() # inside pytest

Every check works on float64 copies of the sample inputs; nothing the caller passed is modified.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from .functional import _torch_internals

__all__ = ["verify", "Report", "CheckResult", "DEFAULT_CHECKS", "OPTIONAL_CHECKS", "laid_out", "saved_bytes"]

DEFAULT_CHECKS = (
    "gradcheck",
    "forward_ad",
    "batched_grad",
    "double_backward",
    "fwd_over_rev",
    "noncontiguous",
    "grad_output_unmodified",
    "needs_input_grad",
)
OPTIONAL_CHECKS = ("compile", "autocast", "reference")


@dataclass
class CheckResult:
    """One row of the report. ``status`` is pass, FAIL, unsupported, expected-unsupported or skipped."""

    name: str
    status: str
    detail: str = ""
    max_error: float | None = None
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skipped", "expected-unsupported")


@dataclass
class Report:
    """What :func:`verify` found. ``ok`` is True only if every check that ran passed."""

    name: str
    results: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise AssertionError(f"verify found problems:\n{self}")

    def __str__(self) -> str:
        rows = [("check", "status", "largest error", "where / detail")]
        for r in self.results:
            err = "" if r.max_error is None else f"{r.max_error:.3g}"
            rows.append((r.name, r.status, err, "; ".join(x for x in (r.where, r.detail) if x)))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"verify: {self.name} — {'ok' if self.ok else 'FAILED'}"]
        for k, row in enumerate(rows):
            lines.append("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
            if k == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


_UNSUPPORTED_PATTERNS = {
    "forward_ad": ("jvp", "forward AD", "forward-mode", "not implemented for forward"),
    "batched_grad": ("vmap", "generate_vmap_rule", "batching rule"),
    "double_backward": ("once_differentiable",),
    "fwd_over_rev": ("jvp", "forward AD", "once_differentiable", "forward-mode"),
    "compile": ("Dynamo", "dynamo", "Unsupported"),
}


# --- the function under test, in float64 ---------------------------------------------------------


class _Subject:
    """The callable and its float64 sample inputs; modules contribute their parameters as inputs."""

    def __init__(self, fn, inputs: tuple, dtype=torch.float64):
        self.labels: list[str] = []
        self.inputs: list[Any] = []
        for k, x in enumerate(inputs):
            self.inputs.append(_to_float(_materialise(x, k), dtype))
            self.labels.append(f"input {k}")
        self.n_call = len(self.inputs)
        if isinstance(fn, torch.nn.Module):
            module = copy.deepcopy(fn).to(dtype)  # never touch the user's module
            names = [n for n, _ in module.named_parameters()]
            for n, p in module.named_parameters():
                self.inputs.append(p.detach().clone())
                self.labels.append(f"param {n}")

            def call(*args):
                params = dict(zip(names, args[self.n_call :]))
                return torch.func.functional_call(module, params, tuple(args[: self.n_call]))

            self.fn = call
            self.name = type(fn).__name__
        else:
            self.fn = fn
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, type):  # SomeFunction.apply
                self.name = f"{owner.__name__}.apply"
            else:
                self.name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self.diff = [i for i, x in enumerate(self.inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]

    def leaves(self, requires=None, layout="contiguous") -> list:
        requires = set(self.diff) if requires is None else set(requires)
        out = []
        for i, x in enumerate(self.inputs):
            if isinstance(x, torch.Tensor):
                t = laid_out(x.detach().clone(), layout)
                out.append(t.requires_grad_(i in requires))
            else:
                out.append(x)
        return out

    def outputs(self, args) -> list[torch.Tensor]:
        out = self.fn(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _materialise(x, k):
    if isinstance(x, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in x):
        g = torch.Generator().manual_seed(1234 + k)
        return torch.randn(tuple(x), dtype=torch.float64, generator=g)
    return x


def _to_float(x, dtype):
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.to(dtype) if x.is_floating_point() else x.clone()
    return x


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: ``contiguous``; ``strided`` (every other element of a
    twice-as-wide buffer, ``[..., ::2]``); ``permuted`` (stored with the dims reversed and permuted back,
    so ``.view`` across leading dims fails).
    """
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "strided":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout != "permuted":
        raise ValueError(f"unknown layout {layout!r}: expected 'contiguous', 'strided' or 'permuted'")
    dims = list(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs.

    Storages of ``exclude`` (typically the parameters, which exist anyway) are not counted; a storage
    saved by several nodes (relu's output that is also the next layer's input) counts once.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _random_like(ts: Iterable[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in ts]


def _compare(actual, expected, labels, atol, rtol, what="element") -> tuple[float, str, bool]:
    """Largest |actual − expected| over a list of tensors, where it is, and whether all are close."""
    worst, where, ok = 0.0, "", True
    for a, e, label in zip(actual, expected, labels):
        a = torch.zeros_like(e) if a is None else a.detach()
        if a.shape != e.shape:
            return math.inf, f"{label}: shape {tuple(a.shape)}, expected {tuple(e.shape)}", False
        if a.numel() == 0:
            continue
        diff = (a - e).abs()
        bad = diff > atol + rtol * e.abs()
        diff = torch.where(torch.isnan(a) != torch.isnan(e), torch.full_like(diff, math.inf), diff.nan_to_num(0.0))
        bad = bad | (torch.isnan(a) != torch.isnan(e))
        m = diff.max().item()
        if bad.any():
            ok = False
        if m >= worst and (bad.any() or ok):
            idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.dim() else ()
            worst, where = m, f"{label}, {what} {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g}"
    return worst, where, ok


# --- the checks ------------------------------------------------------------------------------------


def _numerical_jacobians(subject: _Subject, eps: float) -> list[torch.Tensor]:
    """Central differences: for each differentiable input, ``J`` of shape ``(n_out_total, numel)``."""
    base = [x.detach() if isinstance(x, torch.Tensor) else x for x in subject.inputs]
    jacobians = []
    with torch.no_grad():
        for i in subject.diff:
            x = base[i].clone().contiguous()
            cols = []
            flat = x.view(-1)
            for e in range(x.numel()):
                orig = flat[e].item()
                flat[e] = orig + eps
                plus = _flat(subject.outputs([x if k == i else b for k, b in enumerate(base)]))
                flat[e] = orig - eps
                minus = _flat(subject.outputs([x if k == i else b for k, b in enumerate(base)]))
                flat[e] = orig
                cols.append((plus - minus) / (2 * eps))
            n_out = _flat(subject.outputs(base)).numel()
            jacobians.append(torch.stack(cols, 1) if cols else torch.zeros(n_out, 0, dtype=torch.float64))
    return jacobians


def _flat(outs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.detach().reshape(-1).to(torch.float64) for o in outs]) if outs else torch.zeros(0)


def _vjp(subject, args, outs, v, create_graph=False, inputs=None, retain_graph=None, fresh=True):
    inputs = [args[i] for i in subject.diff] if inputs is None else inputs
    if fresh:  # a backward that writes into grad_output must not corrupt the checker's own copy
        v = [g.clone() for g in v]
    pairs = [(o, g) for o, g in zip(outs, v) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return torch.autograd.grad(
        [o for o, _ in pairs],
        inputs,
        [g for _, g in pairs],
        allow_unused=True,
        create_graph=create_graph,
        retain_graph=retain_graph,
    )


class _Checker:
    def __init__(self, subject: _Subject, atol: float, rtol: float, eps: float):
        self.s, self.atol, self.rtol, self.eps = subject, atol, rtol, eps
        self.labels = [subject.labels[i] for i in subject.diff]
        self._jac = None
        args = subject.leaves()
        self.outs = subject.outputs(args)
        self.v = _random_like(self.outs, seed=1)

    @property
    def jac(self):
        if self._jac is None:
            self._jac = _numerical_jacobians(self.s, self.eps)
        return self._jac

    def _expected_vjp(self, v):
        vf = _flat(v)
        return [(vf @ J).reshape(self.s.inputs[i].shape) for J, i in zip(self.jac, self.s.diff)]

    def _result(self, name, actual, expected, labels=None, what="element"):
        err, where, ok = _compare(actual, expected, labels or self.labels, self.atol, self.rtol, what)
        return CheckResult(name, "pass" if ok else "FAIL", max_error=err, where="" if ok else where)

    def _outputs_and_grads(self, name, outs, grads, ref_outs, ref_grads):
        """Compare outputs and input gradients with a reference's; a missing gradient counts as zeros."""
        zero = lambda g, i: torch.zeros_like(self.s.inputs[i]) if g is None else g
        return self._result(
            name,
            list(outs) + [zero(g, i) for g, i in zip(grads, self.s.diff)],
            [o.detach() for o in ref_outs] + [zero(g, i) for g, i in zip(ref_grads, self.s.diff)],
            [f"output {k}" for k in range(len(outs))] + [f"{lab} gradient" for lab in self.labels],
        )

    def gradcheck(self):
        args = self.s.leaves()
        grads = _vjp(self.s, args, self.s.outputs(args), self.v)
        return self._result("gradcheck", grads, self._expected_vjp(self.v))

    def forward_ad(self):
        u = _random_like([self.s.inputs[i] for i in self.s.diff], seed=2)
        with fwAD.dual_level():
            args = [
                fwAD.make_dual(x, u[self.s.diff.index(k)]) if k in self.s.diff else x
                for k, x in enumerate(self.s.leaves(requires=()))
            ]
            outs = self.s.outputs(args)
            tangents = [fwAD.unpack_dual(o).tangent for o in outs]
        tangents = [torch.zeros_like(o) if t is None else t for o, t in zip(outs, tangents)]
        expected_flat = sum(
            (J @ ui.reshape(-1) for J, ui in zip(self.jac, u)), torch.zeros(_flat(outs).numel(), dtype=torch.float64)
        )
        expected, start = [], 0
        for o in outs:
            expected.append(expected_flat[start : start + o.numel()].reshape(o.shape))
            start += o.numel()
        return self._result("forward_ad", tangents, expected, [f"output {k}" for k in range(len(outs))])

    def batched_grad(self):
        args = self.s.leaves()
        outs = self.s.outputs(args)
        vs = [_random_like(self.outs, seed=10 + b) for b in range(3)]
        stacked = [torch.stack([v[k] for v in vs]) for k in range(len(outs))]
        pairs = [(o, g) for o, g in zip(outs, stacked) if o.requires_grad]
        batched = torch.autograd.grad(
            [o for o, _ in pairs],
            [args[i] for i in self.s.diff],
            [g for _, g in pairs],
            allow_unused=True,
            is_grads_batched=True,
            retain_graph=True,
        )
        singles = [_vjp(self.s, args, outs, v, retain_graph=True) for v in vs]
        actual = [None if b is None else b for b in batched]
        expected = [
            torch.stack([torch.zeros_like(self.s.inputs[i]) if s[k] is None else s[k] for s in singles])
            for k, i in enumerate(self.s.diff)
        ]
        actual = [torch.zeros_like(e) if a is None else a for a, e in zip(actual, expected)]
        return self._result("batched_grad", actual, expected)

    def _second_order(self, w):
        """h(x) = Σ_i ⟨vjp_i(x; v), w_i⟩ and its numerical gradient."""

        def h(*x):
            args = list(self.s.inputs)
            for k, i in enumerate(self.s.diff):
                args[i] = x[k]
            grads = _vjp(self.s, args, self.s.outputs(args), self.v, create_graph=True, inputs=list(x))
            terms = [(g * wi).sum() for g, wi in zip(grads, w) if g is not None]
            return sum(terms) if terms else torch.zeros((), dtype=torch.float64)

        base = [self.s.inputs[i].detach() for i in self.s.diff]
        numeric = []
        for k, x in enumerate(base):
            col = torch.zeros(x.numel(), dtype=torch.float64)
            for e in range(x.numel()):
                vals = []
                for sign in (1, -1):
                    xs = [b.clone().requires_grad_() for b in base]
                    with torch.no_grad():
                        xs[k].view(-1)[e] += sign * self.eps
                    vals.append(h(*xs).item())
                col[e] = (vals[0] - vals[1]) / (2 * self.eps)
            numeric.append(col.reshape(x.shape))
        return h, base, numeric

    def double_backward(self):
        w = _random_like([self.s.inputs[i] for i in self.s.diff], seed=3)
        h, base, numeric = self._second_order(w)
        xs = [b.clone().requires_grad_() for b in base]
        value = h(*xs)
        if value.requires_grad:
            analytic = torch.autograd.grad(value, xs, allow_unused=True)
        else:
            analytic = [None] * len(xs)  # backward detached everything: its own derivative is lost
        return self._result("double_backward", list(analytic), numeric)

    def fwd_over_rev(self):
        w = _random_like([self.s.inputs[i] for i in self.s.diff], seed=4)
        u = _random_like([self.s.inputs[i] for i in self.s.diff], seed=5)
        h, base, numeric = self._second_order(w)
        with fwAD.dual_level():
            xs = [fwAD.make_dual(b.clone().requires_grad_(), ui) for b, ui in zip(base, u)]
            t = fwAD.unpack_dual(h(*xs)).tangent
        t = torch.zeros((), dtype=torch.float64) if t is None else t
        expected = sum(((n * ui).sum() for n, ui in zip(numeric, u)), torch.zeros((), dtype=torch.float64))
        return self._result("fwd_over_rev", [t], [expected], ["directional second derivative"], what="value")

    def noncontiguous(self):
        args = self.s.leaves()
        outs = self.s.outputs(args)
        ref_grads = _vjp(self.s, args, outs, self.v)
        worst = None
        for layout in ("strided", "permuted"):
            try:
                largs = self.s.leaves(layout=layout)
                louts = self.s.outputs(largs)
                lv = [laid_out(g.clone(), layout) for g in self.v]
                grads = _vjp(self.s, largs, louts, lv)
            except Exception as e:  # e.g. .view on a permuted grad_output
                return CheckResult(
                    "noncontiguous", "FAIL", detail=f"{layout} inputs/grad_outputs: {type(e).__name__}: {_short(e)}"
                )
            r = self._result(
                "noncontiguous",
                list(louts) + list(grads),
                [o.detach() for o in outs]
                + [torch.zeros_like(self.s.inputs[i]) if g is None else g for g, i in zip(ref_grads, self.s.diff)],
                [f"output {k} ({layout})" for k in range(len(outs))]
                + [f"{lab} gradient ({layout})" for lab in self.labels],
            )
            if not r.ok:
                return r
            worst = r if worst is None or (r.max_error or 0) > (worst.max_error or 0) else worst
        return worst

    def grad_output_unmodified(self):
        for layout in ("contiguous", "strided", "permuted"):
            args = self.s.leaves(layout=layout)
            outs = self.s.outputs(args)
            v = [laid_out(g.clone(), layout) for g in self.v]
            before = [g.clone() for g in v]
            try:
                _vjp(self.s, args, outs, v, fresh=False)
            except Exception as e:
                return CheckResult(
                    "grad_output_unmodified", "FAIL", detail=f"{layout}: {type(e).__name__}: {_short(e)}"
                )
            r = self._result(
                "grad_output_unmodified", v, before, [f"grad_output {k} ({layout})" for k in range(len(v))]
            )
            if not r.ok:
                r.detail = "backward modified grad_output in place"
                return r
        return CheckResult("grad_output_unmodified", "pass")

    def needs_input_grad(self, notes: list[str]):
        args = self.s.leaves()
        full = _vjp(self.s, args, self.s.outputs(args), self.v)
        full = [torch.zeros_like(self.s.inputs[i]) if g is None else g for g, i in zip(full, self.s.diff)]
        n = len(self.s.diff)
        worst = CheckResult("needs_input_grad", "pass", max_error=0.0)
        combos = [c for c in itertools.product([False, True], repeat=n) if any(c)]
        wasted: set[str] = set()
        with _BackwardSpy() as spy:
            for combo in combos:
                chosen = [i for i, on in zip(self.s.diff, combo) if on]
                cargs = self.s.leaves(requires=chosen)
                grads = _vjp(self.s, cargs, self.s.outputs(cargs), self.v, inputs=[cargs[i] for i in chosen])
                expected = [full[self.s.diff.index(i)] for i in chosen]
                r = self._result(
                    "needs_input_grad",
                    list(grads),
                    expected,
                    [f"{self.s.labels[i]} (only {self._names(chosen)} need grad)" for i in chosen],
                )
                if not r.ok:
                    return r
            wasted = spy.wasted
        if wasted:
            notes.append(
                "wasted work: backward computed gradients nobody asked for (" + "; ".join(sorted(wasted)) + ")"
            )
            worst.detail = "the same gradients whichever inputs need them; some computed unasked (see note)"
        return worst

    def _names(self, idx):
        return ", ".join(self.s.labels[i] for i in idx)

    def compile(self):
        torch._dynamo.reset()
        compiled = torch.compile(self.s.fn, backend="aot_eager", fullgraph=True)
        args = self.s.leaves()
        ref_outs = self.s.outputs(args)
        ref_grads = _vjp(self.s, args, ref_outs, self.v)
        cargs = self.s.leaves()
        out = compiled(*cargs)
        outs = [
            o
            for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.is_floating_point()
        ]
        grads = _vjp(self.s, cargs, outs, self.v)
        torch._dynamo.reset()
        return self._outputs_and_grads("compile", outs, grads, ref_outs, ref_grads)

    def autocast(self, reference):
        dtype = torch.bfloat16
        args = [
            x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in self.s.leaves(requires=())
        ]
        for i in self.s.diff:
            args[i].requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            out = self.s.fn(*args)
            ref = reference(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args]) if reference else None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if ref is not None:
            refs = ref if isinstance(ref, (tuple, list)) else (ref,)
            for k, (o, r) in enumerate(zip(outs, refs)):
                if isinstance(o, torch.Tensor) and o.dtype != r.dtype:
                    return CheckResult(
                        "autocast", "FAIL", where=f"output {k}", detail=f"dtype {o.dtype}, reference gives {r.dtype}"
                    )
        floats = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
        if floats:
            grads = torch.autograd.grad(
                [o.float().sum() for o in floats], [args[i] for i in self.s.diff], allow_unused=True
            )
            for g, i in zip(grads, self.s.diff):
                if g is not None and g.dtype != args[i].dtype:
                    return CheckResult(
                        "autocast",
                        "FAIL",
                        where=self.s.labels[i],
                        detail=f"gradient dtype {g.dtype}, input dtype {args[i].dtype}",
                    )
        return CheckResult("autocast", "pass", detail=f"output dtype {outs[0].dtype} under bf16 autocast")

    def reference(self, reference):
        args = self.s.leaves()
        outs = self.s.outputs(args)
        grads = _vjp(self.s, args, outs, self.v)
        rargs = self.s.leaves()
        rout = reference(*rargs[: self.s.n_call])
        routs = [o for o in (rout if isinstance(rout, (tuple, list)) else (rout,)) if isinstance(o, torch.Tensor)]
        rgrads = _vjp(self.s, rargs, routs, self.v)
        return self._outputs_and_grads("reference", outs, grads, routs, rgrads)


class _BackwardSpy:
    """Records custom Functions whose backward returns a gradient for an input that needs none."""

    def __init__(self):
        self.wasted: set[str] = set()
        self._patched: dict[type, Any] = {}
        self._orig = torch.autograd.function.BackwardCFunction.apply

    def __enter__(self):
        spy = self

        def apply(node, *grads):
            result = spy._orig(node, *grads)
            cls = _torch_internals.forward_class(node)
            needs = getattr(node, "needs_input_grad", None)
            if cls is not None and needs is not None:
                res = result if isinstance(result, tuple) else (result,)
                for k, (g, need) in enumerate(zip(res, needs)):
                    if g is not None and not need:
                        spy.wasted.add(f"{cls.__name__} input {k}")
            return result

        torch.autograd.function.BackwardCFunction.apply = apply
        return self

    def __exit__(self, *exc):
        torch.autograd.function.BackwardCFunction.apply = self._orig
        return False


def _short(e: Exception, n: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= n else text[: n - 1] + "…"


def _classify(name: str, e: Exception, expect_unsupported: set[str]) -> CheckResult:
    text = f"{type(e).__name__}: {e}"
    patterns = _UNSUPPORTED_PATTERNS.get(name, ())
    if any(p in text for p in patterns):
        status = "expected-unsupported" if name in expect_unsupported else "unsupported"
        return CheckResult(name, status, detail=_short(e))
    return CheckResult(name, "FAIL", detail=f"{type(e).__name__}: {_short(e)}")


def verify(
    fn: Callable | torch.nn.Module,
    *sample_inputs,
    checks: Iterable[str] | None = None,
    compile: bool = False,
    autocast: bool = False,
    reference: Callable | None = None,
    expect_unsupported: Iterable[str] = (),
    atol: float = 1e-5,
    rtol: float = 1e-3,
    eps: float = 1e-6,
) -> Report:
    """Check ``fn`` on ``sample_inputs`` in every way PyTorch checks its own operators.

    Args:
        fn: a ``Function.apply``, any callable built on it, or an ``nn.Module`` (then its parameters are
            checked too, on a deep copy).
        *sample_inputs: tensors, shapes (tuples of ints: float64 normal samples are generated), or any
            other arguments, passed positionally. Floating tensors are differentiated.
        checks: the default checks to run (all of :data:`DEFAULT_CHECKS` by default).
        compile: also compare ``torch.compile(fn, backend="aot_eager", fullgraph=True)`` with eager.
        autocast: also run under CPU bf16 autocast (output dtype equal to ``reference``'s, when given;
            input gradients in the inputs' dtype).
        reference: a callable with ``fn``'s signature (e.g. torch's own op): outputs and gradients
            must equal it.
        expect_unsupported: names of checks allowed to report "unsupported" (e.g. ``{"forward_ad"}``
            for a Function without ``jvp``).
        atol, rtol: tolerances against finite differences (gradcheck's defaults).
        eps: finite-difference step.

    Returns:
        a :class:`Report`; ``report.ok``, ``print(report)``, ``report.raise_if_failed()``.
    """
    expect_unsupported = set(expect_unsupported)
    subject = _Subject(fn, sample_inputs)
    report = Report(subject.name)
    names = list(DEFAULT_CHECKS if checks is None else checks)
    unknown = set(names) - set(DEFAULT_CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}: expected some of {list(DEFAULT_CHECKS)}")
    if compile:
        names.append("compile")
    if autocast:
        names.append("autocast")
    if reference is not None:
        names.append("reference")
    if not subject.diff:
        report.results = [CheckResult(n, "skipped", detail="no floating-point input to differentiate") for n in names]
        return report
    try:
        checker = _Checker(subject, atol, rtol, eps)
    except Exception as e:
        report.results = [CheckResult("forward", "FAIL", detail=f"{type(e).__name__}: {_short(e)}")]
        return report
    for name in names:
        try:
            if name == "needs_input_grad":
                result = checker.needs_input_grad(report.notes)
            elif name in ("autocast", "reference"):
                result = getattr(checker, name)(reference)
            else:
                result = getattr(checker, name)()
        except Exception as e:
            result = _classify(name, e, expect_unsupported)
        report.results.append(result)
    return report

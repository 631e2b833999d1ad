"""Per-example gradients from the factors the backward already holds (docs/derivation.md, § per-example gradients).

The seed differentiates the loss of one example and only then averages (§3: ``J = 1/n Σ Loss``). In a
dense layer the gradient of example i's own term is an outer product of the two factors the backward
has in hand, its error rows and its input rows (§3.2–3.5):

    ∂Lossᵢ/∂W = Δᵢᵀ Hᵢ,    ∂Lossᵢ/∂b = Σ_t δᵢₜ

with ``Δᵢ: (T, n_out)`` and ``Hᵢ: (T, n_in)`` the rows of example i (``T = 1`` for a 2-D input). Its
squared norm needs no outer product:

    T = 1:  ‖δᵢ hᵢᵀ‖² = ‖δᵢ‖² ‖hᵢ‖²
    T > 1:  ‖Δᵢᵀ Hᵢ‖² = ⟨Δᵢ Δᵢᵀ, Hᵢ Hᵢᵀ⟩      (two T×T Gram matrices; or Δᵢᵀ Hᵢ itself when smaller)

With every layer's term summed into ``‖gᵢ‖²``, flat clipping scales example i by
``cᵢ = min(1, C / (‖gᵢ‖ + 1e-6))`` and the clipped gradient is the ordinary weight GEMM with the rows
of Δ scaled, ``(c ⊙ Δ)ᵀ H``. The factors ``cᵢ`` are known only once the last layer's error is, so a
Function that holds a tracked parameter hands its ``(Δ, H)`` to :data:`current` instead of computing
the weight GEMM, and the GEMMs run once, at the end of the backward pass (:meth:`Recorder.finish`).

This module holds only that state and the arithmetic; ``torchderiv.per_sample`` (above ``nn``) decides
which parameters are tracked. Outside the context :data:`current` is None and nothing here runs.
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext

import torch
from torch.autograd.graph import get_gradient_edge

from . import _torch_internals as internals

__all__ = [
    "Recorder",
    "Rule",
    "DenseRule",
    "ExampleRule",
    "BlockRule",
    "ShapedRule",
    "current",
    "defer",
    "note_tracked",
    "tracked_pair",
    "per_example_sum",
    "by_sample",
]

# The active Recorder, or None. A module global (not thread-local), like autograd's own grad mode flag
# is not: one per_sample context at a time in a process.
current: Recorder | None = None


def by_sample(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``(B, *, n) -> (B, T, n)`` with ``T = prod(*)`` (1 for a 2-D tensor); with ``dim = 1`` the examples are
    along dim 1, ``(T₀, B, *, n)``, and example i's rows are ``t[:, i]`` (a view where it can be)."""
    if dim:
        t = t.movedim(dim, 0)
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def per_example_sum(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_t tᵢₜ`` over each example's rows: ``(*, n) -> (B, n)`` in ``dtype``, the examples along ``dim``."""
    return by_sample(t, dim).sum(1, dtype=dtype)


def batch_dim(layout: int, t: torch.Tensor) -> int:
    """Where the examples are in a layer's input ``t`` of shape ``(*, n)``: a 2-D input is ``(B, n)`` whatever
    the layout (rows are examples: a head on pooled features); a longer one is ``(B, T, …, n)`` for layout 0,
    ``(T, B, …, n)`` for layout 1 (torch's sequence-first transformers)."""
    return layout if t.dim() > 2 else 0


def _by_row(c: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``c`` (B,) shaped to multiply ``like``'s rows of example i, the examples along ``dim``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return c.reshape(shape).to(like.dtype)


# Elements per temporary when a layer's norm is taken a few examples at a time (Gram or product form).
_GRAM_FLOATS = 2**17
# Where Δᵢᵀ Hᵢ is larger than Δ and H (so not kept), its norm is still taken from the products themselves, a part at a
# time, when they cost at most this many times the Grams' multiply-adds (T n_in n_out against T² (n_in + n_out)):
# a batched GEMM with a small T×T result runs fewer multiply-adds a second. NOTE: norms of 256 examples (CPU,
# 2 threads, float32, two runs), products / Grams: at T = 25, 0.72–0.92× the time for 1.28× the multiply-adds
# (64 → 64) and 0.84–1.00× for 1.14× (256 → 32); at T = 16 to 64, 1.6–2.2× the time for 1.6–2.0× the
# multiply-adds. Opacus's MNIST CNN's second convolution (T = 25, 256 → 32) as products over its patches: its
# clipping step 0.94–0.98× the time with the Grams (four runs of 41–61 interleaved rounds).
_PRODUCT_MACS = 1.25


class Recorder:
    """Collects ``(Δ, H)`` of every tracked layer during one backward pass, then finishes it.

    Args:
        names: ``{id(parameter): (parameter, qualified name)}`` of the parameters to track.
        max_norm: C of flat clipping, or None (norms only).
        grad_sample: also store each example's gradient as ``p.grad_sample``, ``(B, *p.shape)``.
        loss_reduction: ``"mean"`` (example i's gradient is B × its share of the batch gradient, as
            Opacus scales it) or ``"sum"``.
        clipped_sum: ``.grad`` receives ``Σᵢ cᵢ gᵢ`` for "mean" too (not divided by B).
        loss_scale: S by which the backpropagated loss was multiplied (a number, a tensor, or an object with
            ``get_scale()``, read at :meth:`finish`); norms, ``cᵢ`` and grad_sample are then of the unscaled loss,
            ``.grad`` keeps the scale.
        recheck: called once per backward pass, returns the parameters to track now (as ``names``) or raises:
            the model may have changed since the context began (a parameter unfrozen, BatchNorm set training).
        layouts: ``{id(parameter): 0 or 1}``, where the examples are in the inputs (3-D or more) of the layer
            that holds it: dim 0, ``(B, T, …, n)``, or dim 1, ``(T, B, …, n)``; 0 for one not listed
            (:func:`batch_dim`).
    """

    def __init__(
        self,
        names: dict,
        max_norm: float | None,
        grad_sample: bool,
        loss_reduction: str,
        clipped_sum: bool = False,
        loss_scale=None,
        recheck=None,
        layouts=None,
    ):
        self.names = names
        self.layouts = {} if layouts is None else layouts
        # (B, what it was read from) of each model forward running now (innermost last): pushed and popped by the
        # model's forward hooks (torchderiv.per_sample)
        self.inputs: list = []
        # {id(parameter): that B, or None} from the latest forward of the layer holding it: the layer ran inside a
        # model forward whose input showed B examples, which its backward must then see (Recorder._one_batch)
        self.expected: dict[int, tuple[int, str] | None] = {}
        self.max_norm = max_norm
        self.clipped_sum = clipped_sum
        self.grad_sample = grad_sample
        self.loss_reduction = loss_reduction
        self.loss_scale = loss_scale
        self.recheck = recheck
        self.aliases: dict[int, tuple[torch.Tensor, torch.Parameter]] = {}
        # the node that accumulates each into .grad, to ask the engine whether this pass runs it
        self.accumulators = {k: get_gradient_edge(p).node for k, (p, _) in names.items()}
        self.pending: list[Rule] = []
        # (the callback queued on the backward pass that finishes, that pass's id)
        self.queued: tuple[weakref.ref, int] | None = None
        self.host: int | None = None  # a pass in which a layer's forward ran: passes nested in it are its own
        self.norms: torch.Tensor | None = None

    # --- forward side: a tracked parameter may reach a Function as a cast copy (autocast) ----------

    def alias(self, originals, casts) -> None:
        """Remember that ``casts[k]`` stands for the tracked parameter ``originals[k]`` (autocast casts)."""
        for p, c in zip(originals, casts):
            if c is not p and isinstance(p, torch.Tensor) and id(p) in self.names:
                self.aliases[id(c)] = (c, p)

    def tracked(self, p):
        """``p`` if it is one of the parameters tracked here, else None."""
        entry = self.names.get(id(p)) if p is not None else None
        return p if entry is not None and entry[0] is p else None

    def param(self, t: torch.Tensor | None):
        """The tracked parameter that ``t`` is (or is a cast of), or None."""
        if self.tracked(t) is not None or t is None:
            return t
        entry = self.aliases.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def name(self, p) -> str:
        return self.names[id(p)][1]

    # --- backward side -------------------------------------------------------------------------------

    def pair(self, weight, bias, params=None):
        """The tracked parameters (or None) behind a Function's ``weight`` and ``bias``: ``params``, the pair
        :func:`note_tracked` kept at forward, or, when it kept none (a forward outside the context), the saved
        tensors."""
        return (self.param(weight), self.param(bias)) if params is None else tuple(map(self.tracked, params))

    def take(self, needs, delta, input, weight, bias, params=None):
        """The dense rule's entry: keep ``(Δ, H)`` for the tracked ``weight``/``bias`` (:class:`DenseRule`); return
        ``needs`` without their GEMMs. ``params``: as :meth:`pair` takes it."""
        w_p, b_p = self.pair(weight, bias, params)
        w = w_p if needs[1] else None
        b = b_p if bias is not None and needs[2] else None
        if w is None and b is None:
            return needs
        self.keep((w, b), delta, input, lambda dim: self._factors(w, b, delta, input, dim))
        return (needs[0], needs[1] and w is None, needs[2] and b is None)

    def dense_rule(self, w, b, delta, input, dim: int = 0) -> DenseRule:
        """The dense rule of ``Z = H Wᵀ + b`` for ``delta`` ``(*, n_out)`` and ``input`` ``(*, n_in)`` (the examples
        along ``dim``), its share of each ``‖gᵢ‖²`` computed: for a Function whose layer is dense in other shapes
        (a convolution over its patches), to wrap in its own :class:`Rule`."""
        return self._factors(w, b, delta, input, dim)

    def take_blocks(self, w, b, deltas, inputs) -> None:
        """A packed dense layer, row blocks ``W_b`` of one weight on inputs ``H_b`` (attention's ``in_proj`` on separate
        query, key and value): one dense rule per block, stacked (:class:`BlockRule`). ``w``/``b``: tracked or None."""
        self.keep(
            (w, b),
            deltas[0],
            inputs[0],
            lambda dim: BlockRule((w, b), [self._factors(w, b, d, h, dim) for d, h in zip(deltas, inputs)]),
        )

    def take_rows(self, w, b, sq, make, samples, input) -> None:
        """Keep a layer whose factors are recomputed rather than held (the fused linear + cross-entropy,
        whose ``Δ`` is ``(B, classes)``): ``sq`` its ``(B,)`` share of ``‖gᵢ‖²``, ``make(c)`` its (clipped)
        gradients ``(∂W, ∂b)`` with example i's rows scaled by ``cᵢ`` (None: unscaled), ``samples()`` each
        example's ``(∂W, ∂b)``, ``(B, *p.shape)``."""
        self.keep((w, b), input, input, lambda dim: Rule((w, b), sq, make, samples))

    def keep(self, params, delta, input, build) -> None:
        """The one way a Function hands over a tracked layer: ``params`` the layer's parameters that are tracked
        here (None for the others), ``delta`` the gradient arriving at its output and ``input`` its input (both
        ``(*, n)`` with the examples along the same dim), ``build(dim)`` its :class:`Rule` given the examples' dim
        in them. The rule is built after what waited for this layer's backward is made (:meth:`_settle`)."""
        p = next(q for q in params if q is not None)
        self._check(p, delta, input)
        self._check_accumulated(*params)
        dim = batch_dim(self.layouts.get(id(p), 0), input)
        with _autocast_off(delta.device.type):
            self._settle()
            rule = build(dim)
        rule.seen = (tuple(input.shape), dim)
        rule.expected = self.expected.get(id(p))
        self._enqueue(rule)

    def _check(self, p, delta, input) -> None:
        who = self.name(p)
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"per_sample: backward with create_graph=True is not supported inside the context "
                f"(parameter {who}); take the double backward outside it"
            )
        if internals.transforms_active() or internals.is_legacy_batched(delta):
            raise RuntimeError(
                f"per_sample: torch.func transforms (vmap, grad, jvp) are not supported inside "
                f"the context (parameter {who})"
            )
        if delta.dim() < 2:
            raise RuntimeError(
                f"per_sample: parameter {who} was used on an input of shape {tuple(input.shape)}, which holds no "
                f"batch of examples; expected an input of shape (B, *, {input.shape[-1]}), or (T, B, *, "
                f"{input.shape[-1]}) with batch_first=False"
            )

    def _check_accumulated(self, *params) -> None:
        """Refuse a pass that does not accumulate into a tracked parameter's ``.grad`` (``torch.autograd.grad``,
        ``backward(inputs=...)`` without it): the (clipped) gradient is written there at the end, and each
        example's norm needs every tracked parameter's share."""
        for p in params:
            if p is None:
                continue
            if not internals.will_execute(self.accumulators[id(p)]):
                raise RuntimeError(
                    f"per_sample: this backward pass does not accumulate into parameter {self.name(p)}'s .grad "
                    f"(torch.autograd.grad, or backward(inputs=...) without it), where its clipped gradient "
                    f"goes and from which each example's norm takes its share; call loss.backward() inside the "
                    f"context, or freeze the parameter"
                )

    def _drop_stale(self) -> None:
        """A backward pass that failed before its end (an error raised inside it) never ran finish: what it left
        is dropped, so a later pass cannot mix with it. What another pass left is kept only when this pass is
        nested in it (a reentrant checkpoint's backward, run by a node of the pass that recomputed its forward,
        :meth:`anchor`) and that pass still runs: the engine lets go of a pass's callbacks when the pass ends."""
        if self.queued is None:
            return
        finish, task = self.queued
        if task == internals.graph_task_id() or (task == self.host and finish() is not None):
            return
        self.pending = []
        self.queued = None

    def anchor(self, host: bool = False) -> None:
        """Queue :meth:`finish` on the backward pass running now, unless it or a pass this one is nested in
        has it. ``host``: a layer's forward runs inside this pass (a reentrant checkpoint's recompute), whose
        backward will be a pass nested in this one, ending first; finish waits for this one's end."""
        self._drop_stale()
        if self.queued is None:
            self._recheck()
            # Runs once, when the whole backward pass is done: only then are all of ‖gᵢ‖'s terms known.
            finish = _Finish(self)
            internals.queue_callback(finish)
            self.queued = (weakref.ref(finish), internals.graph_task_id())
        if host:
            self.host = self.queued[1]

    def _recheck(self) -> None:
        """Refuse a pass of a model whose trainable parameters are no longer those the context tracks: one made
        trainable since would get an unclipped gradient by another path, missing from every norm."""
        if self.recheck is None:
            return
        now = self.recheck()
        added = [name for k, (_, name) in now.items() if k not in self.names]
        if added:
            raise RuntimeError(
                f"per_sample: parameter(s) {', '.join(added)} require grad now but did not when the context was "
                f"entered, so they are not tracked (their per-example gradients would be missing from the norms and "
                f"unclipped); enter the context after changing which parameters are trainable"
            )

    def _enqueue(self, rule: Rule) -> None:
        self.anchor()
        self.pending.append(rule)

    def _factors(self, w, b, delta, input, dim: int = 0) -> DenseRule:
        """One layer's share of ``‖gᵢ‖²`` (now, or its product's at :meth:`_settle`), and what its clipped gradient
        will need at the end; ``dim``: the examples' dim in ``delta`` and ``input``."""
        dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32  # fp32 norms under autocast
        d = by_sample(delta, dim)  # (B, T, n_out)
        h = input if isinstance(input, MadeRows) else by_sample(input, dim)  # (B, T, n_in)
        t, n_out, n_in = d.shape[1], d.shape[2], h.shape[2]
        layer = DenseRule(w, b, dim)
        layer.sum_only = self.max_norm is None and not self.grad_sample and not self.clipped_sum
        sq = torch.zeros(d.shape[0], dtype=dtype, device=d.device)
        delta_sq = None
        if w is not None:
            # Keep Δᵢᵀ Hᵢ itself (then Δ and H may go, and the clipped gradient is Σᵢ cᵢ (Δᵢᵀ Hᵢ): the batched GEMM
            # replaces the deferred one, the fastest form) when it is no larger than the factors the deferred GEMM
            # would hold, Δ and H (for rows made again, what they are made from). Sequence layers only: with T = 1 it
            # is B× the weight.
            remake = None if isinstance(input, MadeRows) else _remake(input)
            held = h.held if isinstance(h, MadeRows) else t * n_in  # floats an example of H, or of its source
            if self.grad_sample or (t > 1 and n_in * n_out <= t * n_out + held):
                if remake is None or layer.sum_only:
                    # norms only: the product is summed a part at a time and never kept, so making it now adds a
                    # part's buffer to no peak, and H is at hand (made again later, it cost an activation's forward)
                    _product(layer, d, h, sq)
                else:
                    # H's maker keeps H (or Z) until its own backward, the next step of this pass and where a
                    # backward's memory peaks (it holds its input, its output's gradient and its result at once):
                    # made now, the kept product would add to that peak. So Δ and H (or Z) wait, and the product is
                    # made after that step, when the next tracked layer comes or at the end (_settle).
                    layer.delta, layer.waiting = delta, True
                    layer.input, layer.remake = (input, None) if remake[1] is None else (None, remake)
            else:
                layer.delta = delta
                if remake is not None and remake[1] is not None:  # H again from its maker's saved input
                    layer.remake = remake
                else:
                    layer.input = input
                if t == 1:  # ‖δᵢ‖² ‖hᵢ‖²
                    h = h[0 : h.shape[0]] if isinstance(h, MadeRows) else h  # one row an example: made whole
                    delta_sq = torch.linalg.vector_norm(d, dim=(1, 2), dtype=dtype).square()
                    sq += delta_sq * torch.linalg.vector_norm(h, dim=(1, 2), dtype=dtype).square()
                elif n_in * n_out <= _PRODUCT_MACS * t * (n_in + n_out):  # ‖Δᵢᵀ Hᵢ‖², the products not kept
                    _product(layer, d, h, sq, keep=False)
                else:
                    # ⟨Δᵢ Δᵢᵀ, Hᵢ Hᵢᵀ⟩ (two T×T Grams) clamped at 0 against round-off: here the product is larger than
                    # Δ and H and costs more than _PRODUCT_MACS times the Grams' multiply-adds. A few examples at a
                    # time, so the temporaries stay near _GRAM_FLOATS floats.
                    # NOTE: summing only the Gram blocks on and above the diagonal (both are symmetric) was no faster
                    # on CPU: the smaller batched GEMMs lost what the skipped blocks saved (measured, 32 × 128 × 256).
                    step = max(1, _GRAM_FLOATS // (t * t))
                    for i in range(0, d.shape[0], step):
                        hh = h.gram_rows(i, i + step) if isinstance(h, MadeRows) else h[i : i + step]
                        dd, hh = d[i : i + step].to(dtype), hh.to(dtype)
                        sq[i : i + step] += ((dd @ dd.mT) * (hh @ hh.mT)).sum((1, 2)).clamp_min(0)
        if b is not None:
            if t == 1:  # Σ_t δᵢₜ is δᵢ itself: a view, and its squared norm is already known when W is tracked
                layer.bias_rows = d[:, 0].to(dtype)  # fp32 under autocast, as the sum below
                sq += (
                    delta_sq if delta_sq is not None else torch.linalg.vector_norm(d, dim=(1, 2), dtype=dtype).square()
                )
            else:
                layer.bias_rows = d.sum(1, dtype=dtype)  # Σ_t δᵢₜ, (B, n_out)
                sq += torch.linalg.vector_norm(layer.bias_rows, dim=1).square()
        layer.sq = sq
        return layer

    def finish(self) -> None:
        """Norms and clipping factors from every layer's share, then the (clipped) gradients into ``.grad``."""
        pending, self.pending, self.queued, self.host = self.pending, [], None, None
        if not pending:  # anchored by a forward whose layers then took no gradient
            return
        # A backward called inside an autocast region runs this there too: the dtypes here are chosen explicitly
        # (float32 norms; the deferred GEMMs in their operands' dtype, as the forward ran them).
        with _autocast_off(pending[0].sq.device.type):
            self._finish(pending)

    def _settle(self, pending: list | None = None) -> None:
        """Make the products that waited for their input's maker's backward (see _factors), letting Δ and H go."""
        if pending is None:
            self._drop_stale()
            pending = self.pending
        for rule in pending:
            rule.settle()

    def _finish(self, pending: list) -> None:
        self._settle(pending)
        self.aliases.clear()
        seen = set()
        for rule in pending:
            for p in rule.params:
                if p is None:
                    continue
                if id(p) in seen:
                    raise RuntimeError(
                        f"per_sample: parameter {self.name(p)} was used more than once in one forward pass (a "
                        f"module called twice, or weights tied between modules): each example's gradient is "
                        f"then a sum whose norm the per-layer factors do not give; not supported"
                    )
                seen.add(id(p))
        n = self._one_batch(pending)
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        dtype = torch.float64 if any(rule.sq.dtype == torch.float64 for rule in pending) else torch.float32
        sq = pending[0].sq.to(dtype)
        for rule in pending[1:]:
            sq = sq + rule.sq.to(dtype)
        # The backward's factors carry the loss scale S: example i's gradient is their product divided by S
        unit = scale / self._loss_scale(dtype)
        norms = sq.sqrt_().mul_(unit)
        self.norms = norms
        c = None if self.max_norm is None else (self.max_norm / (norms + 1e-6)).clamp_(max=1.0)
        if c is not None and self.loss_scale is not None:
            # An overflow in a scaled backward must reach .grad, where the scaler looks for it (and then skips the
            # step and lowers S): cᵢ = 0 for an infinite norm would hide it when only the squares overflowed.
            c.masked_fill_(~norms.isfinite(), math.nan)
        if self.clipped_sum and scale != 1.0:
            # Σᵢ cᵢ gᵢ itself rather than its mean over this batch: each row scaled by B (gᵢ carries the 1/B)
            c = torch.full_like(norms, scale) if c is None else c * scale
        # First layer first, each layer's buffers let go as soon as its gradient is made: the peak is then
        # below "every Δ and H, plus every gradient".
        while pending:
            rule = pending.pop()
            for p, g in zip(rule.params, rule.clipped(c)):
                if p is not None:
                    _accumulate(p, g)
                    self._stamp(p)
            if self.grad_sample:
                for p, g in zip(rule.params, rule.samples()):
                    if p is not None:
                        p.grad_sample = (g * unit).to(p.dtype)
            del rule

    def _one_batch(self, pending: list) -> int:
        """B, which every tracked layer and the model's input must agree on; else an error naming each of them.
        A layer that sees the examples' rows folded into its leading dim (``reshape(-1, n)``), or a sequence-first
        input read batch-first, sees another count: its norms would be per row or per position, silently."""
        sizes = {rule.sq.shape[0] for rule in pending}
        inputs = {rule.expected for rule in pending if rule.expected is not None}
        sizes |= {n for n, _ in inputs}
        if len(sizes) == 1:
            return sizes.pop()
        lines = [f"the model's input {what}: {n} examples" for n, what in sorted(inputs)]
        for rule in reversed(pending):  # first layer first
            shape, dim = rule.seen
            names = ", ".join(self.name(p) for p in rule.params if p is not None)
            lines.append(f"{names}: input {shape}, {rule.sq.shape[0]} examples along dim {dim}")
        raise RuntimeError(
            "per_sample: the tracked layers do not see one batch of examples:\n  "
            + "\n  ".join(lines)
            + "\nEach example must lie along one dim of every tracked layer's input: dim 0 (batch_first=True, "
            "(B, T, …, n)) or, with per_sample(..., batch_first=False), dim 1 ((T, B, …, n)); a 2-D input is "
            "always (B, n). A batch folded into the rows (x.reshape(-1, n)) before a tracked layer gives per-row "
            "norms: keep the batch dim instead"
        )

    def _loss_scale(self, dtype):
        """S, as a float or a 0-dim tensor of ``dtype`` (1.0 without a loss scale)."""
        s = self.loss_scale
        if s is None:
            return 1.0
        if callable(getattr(s, "get_scale", None)):
            s = s.get_scale()
        return s.detach().reshape(()).to(dtype) if isinstance(s, torch.Tensor) else float(s)

    def _stamp(self, p: torch.Tensor) -> None:
        """Mark ``p.grad`` as made by this clipping (what the private optimizer checks before its noise)."""
        if self.max_norm is not None:
            setattr(p, CLIP_STAMP, _Stamp(p.grad, self.max_norm, self.loss_reduction, self.clipped_sum))
        elif hasattr(p, CLIP_STAMP):
            delattr(p, CLIP_STAMP)


CLIP_STAMP = "_torchderiv_clip"


class _Stamp:
    """Which clipping made a parameter's ``.grad``: the tensor (weakly), its version then, the settings."""

    __slots__ = ("grad", "version", "max_norm", "loss_reduction", "clipped_sum")

    def __init__(self, grad, max_norm, loss_reduction, clipped_sum):
        self.grad, self.version = weakref.ref(grad), internals.version(grad)
        self.max_norm, self.loss_reduction, self.clipped_sum = max_norm, loss_reduction, clipped_sum


class _Finish:
    """The callback queued on a backward pass: only that pass holds it, so it lives no longer than the pass."""

    __slots__ = ("recorder", "__weakref__")

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def __call__(self) -> None:
        self.recorder.finish()


class Rule:
    """One tracked layer's per-example gradients, as its Function hands them to the recorder (:meth:`Recorder.keep`).

    A Function that holds parameters gives, from what it already has in its backward: ``sq``, ``(B,)``, the layer's
    share of each example's ``‖gᵢ‖²``; ``clipped(c)``, the layer's gradient ``Σᵢ cᵢ gᵢ`` for each of ``params``
    (``c`` None: ``Σᵢ gᵢ``), called once, at the end of the pass; ``samples()``, each example's ``gᵢ``,
    ``(B, *p.shape)``, when grad_sample is asked for. Each ``gᵢ`` is of the backward's loss J (the recorder
    applies B for "mean" and the loss scale). This base class takes them as given (the fused head's rule, whose
    gradients are recomputed chunk by chunk); :class:`DenseRule` and :class:`ExampleRule` are the others.

    Attributes:
        params: the layer's parameters tracked here, None for the others (e.g. ``(weight, None)``).
        seen: ``(its input's shape, the examples' dim)``, for errors.
    """

    def __init__(self, params, sq=None, clipped=None, samples=None):
        self.params = tuple(params)
        self.sq = sq
        self.seen = ((), 0)
        self.expected = None  # (B, what) of the model input its forward ran under, if any
        if clipped is not None:
            self.clipped = clipped
        if samples is not None:
            self.samples = samples

    def settle(self) -> None:
        """Called when the next tracked layer's backward starts and at the end of the pass (nothing by default)."""

    def clipped(self, c):
        raise NotImplementedError

    def samples(self):
        raise NotImplementedError


class ExampleRule(Rule):
    """A layer whose per-example gradients are small enough to form directly (LayerNorm's ``γ`` and ``β``:
    ``(B, n)`` each): ``grads[k]`` is ``(B, *params[k].shape)``, in the norms' dtype. ``‖gᵢ‖²`` is their squared
    sum, the clipped gradient ``Σᵢ cᵢ gᵢ``."""

    def __init__(self, params, grads):
        super().__init__(params)
        self.grads = grads
        self.sq = sum(torch.linalg.vector_norm(g.flatten(1), dim=1).square() for g in grads if g is not None)

    def clipped(self, c):
        return tuple(
            None if g is None else (g.sum(0) if c is None else torch.tensordot(c.to(g.dtype), g, dims=1))
            for g in self.grads
        )

    def samples(self):
        return self.grads


class BlockRule(Rule):
    """A parameter made of row blocks, each a layer of its own (:meth:`Recorder.take_blocks`): example i's gradient
    is the blocks' stacked, ``‖gᵢ‖² = Σ_blocks ‖gᵢᵇ‖²`` (disjoint rows), the clipped sum the blocks' stacked."""

    def __init__(self, params, blocks):
        super().__init__(params)
        self.blocks = blocks
        self.sq = sum(block.sq for block in blocks)

    def settle(self) -> None:
        if any(getattr(block, "waiting", False) for block in self.blocks):
            for block in self.blocks:
                block.settle()
            self.sq = sum(block.sq for block in self.blocks)

    def clipped(self, c):
        parts = [block.clipped(c) for block in self.blocks]
        return tuple(None if p is None else torch.cat([g[k] for g in parts]) for k, p in enumerate(self.params))

    def samples(self):
        parts = [block.samples() for block in self.blocks]
        return tuple(None if p is None else torch.cat([g[k] for g in parts], 1) for k, p in enumerate(self.params))


class ShapedRule(Rule):
    """A dense rule (or dense blocks) whose ``(n_out, n_in)`` weight is a parameter of another shape (a convolution's
    kernel, flattened): the same norms, the gradients reshaped to the parameters'."""

    def __init__(self, inner: Rule, params):
        super().__init__(params)
        self.inner = inner
        self.sq = inner.sq

    def settle(self) -> None:
        self.inner.settle()
        self.sq = self.inner.sq

    def clipped(self, c):
        return tuple(None if p is None else g.reshape(p.shape) for p, g in zip(self.params, self.inner.clipped(c)))

    def samples(self):
        return tuple(
            None if p is None else g.reshape(g.shape[0], *p.shape) for p, g in zip(self.params, self.inner.samples())
        )


class DenseRule(Rule):
    """The dense layer ``Z = H Wᵀ + b``: example i's ``(Δᵢᵀ Hᵢ, Σ_t δᵢₜ)`` from the layer's two factors
    (:meth:`Recorder._factors` decides what is held: the product, the Gram form's Δ and H, or Z to make H again)."""

    def __init__(self, w, b, dim: int = 0):
        super().__init__((w, b))
        self.dim = dim  # the examples' dim in delta and input
        self.delta = self.input = self.remake = self.product = self.bias_rows = None
        self.waiting = False  # the product waits for the backward of H's maker
        # no clipping and no grad_sample: the products are summed as they are made (each part while it is in cache)
        # and not kept, Σᵢ Δᵢᵀ Hᵢ being all the end of the pass asks of them
        self.sum_only, self.summed = False, None

    def settle(self) -> None:
        """Make the product that waited for its input's maker's backward, letting Δ and H (or Z) go."""
        if self.waiting:
            h = _input_of(self)
            self.input = self.remake = None  # Z goes now unless something else holds it
            _product(self, by_sample(self.delta, self.dim), by_sample(h, self.dim), self.sq)
            self.delta, self.waiting = None, False

    def clipped(self, c):
        w, b = self.params
        gw = gb = None
        if w is not None:
            if self.summed is not None:  # c is None: nothing to weigh
                gw, self.summed = self.summed, None
            elif self.product is not None:
                gw = (
                    self.product.sum(0)
                    if c is None
                    else torch.einsum("b,boi->oi", c.to(self.product.dtype), self.product)
                )
            else:
                gw = _deferred_gemm(self, c)
                self.delta = self.input = self.remake = None  # let them go before the next layer's GEMM
        if b is not None:
            gb = self.bias_rows.sum(0) if c is None else c.to(self.bias_rows.dtype) @ self.bias_rows
        return gw, gb

    def samples(self):
        return self.product, self.bias_rows


class MadeRows:
    """A dense layer's input ``(B, T, n_in)`` (examples along dim 0) that is not held but made a few examples at a
    time where it is needed: a convolution's patches, ``C_in·k`` numbers at each of T positions, several times the
    size of the input they come from. ``make(start, stop)`` gives examples ``start … stop − 1``'s rows; indexing
    with a slice of examples makes them; ``held``: the numbers an example of the source holds. The layer may also
    give its own ways to the two products the rule needs, where they cost less than the rows: ``products(d)`` each
    example's ``Δᵢᵀ Hᵢ`` ``(B, n_out, n_in)`` and ``gemm(d)`` the sum ``Σᵢ Δᵢᵀ Hᵢ`` (its ordinary weight
    gradient), for ``d`` of shape ``(B, T, n_out)``; and ``unordered(start, stop)`` the same rows with their columns
    in another fixed order, where that is cheaper to make, for what does not depend on the order (Grams ``HᵢHᵢᵀ``)."""

    def __init__(self, shape, make, held, products=None, gemm=None, unordered=None):
        self.shape, self.make, self.held = tuple(shape), make, held
        self.products, self.gemm = products, gemm
        self.unordered = unordered or make
        self.step = max(1, _GRAM_FLOATS * 8 // max(1, self.shape[1] * self.shape[2]))  # ~4 MiB of float32 a part

    def __getitem__(self, examples: slice) -> torch.Tensor:
        return self.make(examples.start, min(examples.stop, self.shape[0]))

    def gram_rows(self, start: int, stop: int) -> torch.Tensor:
        """Examples ``start … stop − 1``'s rows, their columns in whichever order is cheapest to make."""
        return self.unordered(start, min(stop, self.shape[0]))


def _product(layer: DenseRule, d: torch.Tensor, h: torch.Tensor, sq: torch.Tensor, keep: bool = True) -> None:
    """``layer.product = Δᵢᵀ Hᵢ`` for every example i, ``(B, n_out, n_in)`` in ``sq``'s dtype, each one's squared
    norm added to ``sq``. ``d: (B, T, n_out)``, ``h: (B, T, n_in)``. ``keep`` False: only the norms, the products
    made a part at a time into one buffer (for made rows, with their columns in whichever order is cheapest)."""
    # Batched GEMMs on transposed views (einsum copied both operands first), a few examples at a time into the one
    # buffer kept, each slice's norm taken at once: in one call, bmm's copy of its transposed operand and the
    # squares came on top of the product
    dtype = sq.dtype
    if keep and isinstance(h, MadeRows) and h.products is not None:
        product = h.products(d.to(dtype)).to(dtype)
        sq += torch.linalg.vector_norm(product.flatten(1), dim=1).square()
        if layer.sum_only:
            layer.summed = product.sum(0)
        else:
            layer.product = product
        return
    step = max(1, _GRAM_FLOATS * 2 // (d.shape[1] * d.shape[2]))  # the copy of Δ's slice: ~1 MiB (fp32)
    if isinstance(h, MadeRows):
        step = min(step, h.step)
    # a norm does not see the order of the columns: made rows in whichever is cheapest
    unordered = isinstance(h, MadeRows) and not keep
    one_part = layer.sum_only or not keep  # one part's buffer, reused
    if one_part:
        # NOTE: a buffer of ~1 MiB (fp32), which stays in cache: with the norms of the MNIST CNN's second
        # convolution (T = 25, 256 → 32) in parts of 32 or 64 examples its clipping step took 0.91–0.93× the time of
        # parts of 163 (2 threads, 41 and 61 interleaved rounds)
        step = min(step, max(1, _GRAM_FLOATS * 2 // (d.shape[2] * h.shape[2])))
        buffer = d.new_empty(min(step, d.shape[0]), d.shape[2], h.shape[2], dtype=dtype)
        if keep:
            layer.summed = d.new_zeros(d.shape[2], h.shape[2], dtype=dtype)
    else:
        buffer = layer.product = d.new_empty(d.shape[0], d.shape[2], h.shape[2], dtype=dtype)
    for i in range(0, d.shape[0], step):
        part = buffer[: min(step, d.shape[0] - i)] if one_part else buffer[i : i + step]
        rows = h.gram_rows(i, i + step) if unordered else h[i : i + step]
        torch.bmm(d[i : i + step].to(dtype).mT, rows.to(dtype), out=part)
        sq[i : i + step] += torch.linalg.vector_norm(part.flatten(1), dim=1).square()
        if keep and layer.sum_only:
            layer.summed += part.sum(0)


def _input_of(layer: DenseRule) -> torch.Tensor:
    """The layer's input H: held, or made again from its maker's saved input (:func:`_remake`)."""
    if layer.remake is None:
        return layer.input
    saved, value = layer.remake
    return value(saved)


def _deferred_gemm(layer: DenseRule, c: torch.Tensor | None) -> torch.Tensor:
    """``(c ⊙ Δ)ᵀ H`` (``Δᵀ H`` when ``c`` is None) from what ``layer`` holds. A function of its own so that
    its temporaries, and its references to Δ and H, are gone when it returns (finish frees layer by layer)."""
    delta, h = layer.delta, _input_of(layer)
    if isinstance(h, MadeRows) and h.gemm is not None:  # the layer's own weight gradient of c ⊙ Δ
        return h.gemm(delta if c is None else delta * _by_row(c, delta, layer.dim))
    if isinstance(h, MadeRows):
        # a few examples' rows at a time: Σ_parts of each example's (cᵢ Δᵢ)ᵀ Hᵢ, one batched GEMM a part. Δ's rows
        # are scaled, never the rows made: those may be a view of the layer's input itself (a 1×1 convolution's
        # patches are its input)
        d, total = by_sample(delta, 0), None
        for i in range(0, d.shape[0], h.step):
            dd = d[i : i + h.step]
            if c is not None:
                dd = dd * c[i : i + h.step].to(dd.dtype).reshape(-1, 1, 1)
            term = torch.bmm(dd.mT, h[i : i + h.step]).sum(0)
            total = term if total is None else total.add_(term)
        return total if total is not None else delta.new_zeros(d.shape[2], h.shape[2])
    if c is not None:
        if layer.remake is not None:
            # (c ⊙ Δ)ᵀ H = Δᵀ (c ⊙ H), and the H just made is a fresh tensor of ours (the activations' values
            # are out of place): scaled where it lies, no Δ-sized buffer
            h.mul_(_by_row(c, h, layer.dim))
        else:
            delta = delta * _by_row(c, delta, layer.dim)
    return delta.reshape(-1, delta.shape[-1]).t().mm(h.reshape(-1, h.shape[-1]))


def _remake(h: torch.Tensor):
    """How ``h`` outlives the next step of the backward without being held here: ``(saved, value)`` when the
    Function that made ``h`` is one of torchderiv's elementwise activations, which saves until its own
    backward either ``h`` itself (``value`` None) or its input ``z``, from which ``value(z)`` gives ``h`` again,
    bit for bit (the same kernel on the same tensor); else None."""
    node = h.grad_fn
    act = getattr(internals.forward_class(node), "activation", None)
    if act is None:
        return None
    if internals.saved_through_hooks(node):
        # Saved through hooks (save_on_cpu, a non-reentrant checkpoint): unpacking copies or recomputes it, and
        # a checkpoint's may be unpacked only once, by the node's own backward.
        return None
    (saved,) = node.saved_tensors
    params = node.params
    if act.saves_output(*params):
        return saved, None
    if saved.shape != h.shape or saved.dtype != h.dtype:
        return None
    return saved, lambda z: act.value(z, *params)


def _autocast_off(device_type: str):
    """Autocast off for ``device_type`` where it is on (a no-op elsewhere, and for device types without it)."""
    return torch.autocast(device_type, enabled=False) if internals.autocast_enabled(device_type) else nullcontext()


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    """``p.grad += g`` as autograd's AccumulateGrad would, in the parameter's dtype."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def note_tracked(ctx, *tensors) -> None:
    """In a Function's ``setup_context``, inside a per_sample context: which tracked parameters ``tensors``
    (weight, bias, …) are, kept on ``ctx`` as :func:`tracked_pair` gives them to backward. Backward cannot always tell
    from its saved tensors: under saved-tensor hooks (``save_on_cpu``, a non-reentrant checkpoint) they come
    back as copies or recomputations. A forward that runs inside a backward pass (a reentrant checkpoint's
    recompute) also anchors :meth:`Recorder.finish` on that pass (:meth:`Recorder.anchor`)."""
    rec = current
    if rec is None:
        return
    ctx.per_sample = tuple(rec.param(t) for t in tensors)
    batch = rec.inputs[-1] if rec.inputs else None  # the model forward this layer runs in, if any
    for p in ctx.per_sample:
        if p is not None:
            rec.expected[id(p)] = batch
    if internals.graph_task_id() != -1:
        rec.anchor(host=True)


def tracked_pair(ctx, k: int = 0):
    """The ``(weight, bias)`` pair ``k`` that :func:`note_tracked` kept on ``ctx``, or None if it kept none."""
    kept = getattr(ctx, "per_sample", None)
    return None if kept is None else kept[2 * k : 2 * k + 2]


def tracked_affine(ctx, weight, bias, want_w: bool, want_b: bool):
    """For a layer whose per-example ``(∂J/∂γ, ∂J/∂β)`` it forms itself (a norm's ``γ``, ``β``), in its backward:
    ``(keep, want_w, want_b)``, ``keep`` = ``(recorder, γ or None, β or None)`` for the gradients that go to the
    recorder inside a per_sample context (None outside it or when neither is tracked), and the wants left for the
    ordinary sums."""
    rec = current
    if rec is None or not (want_w or want_b):
        return None, want_w, want_b
    w_p, b_p = rec.pair(weight, bias, tracked_pair(ctx))
    w_p, b_p = (w_p if want_w else None), (b_p if want_b else None)
    if w_p is None and b_p is None:
        return None, want_w, want_b
    return (rec, w_p, b_p), want_w and w_p is None, want_b and b_p is None


def defer(needs, delta, input, weight, bias, params=None):
    """``needs`` for :func:`~torchderiv.functional.linear.linear_backward`: inside a per_sample context the
    weight and bias GEMMs of tracked parameters are left to :meth:`Recorder.finish`. ``params``: what
    :func:`tracked_pair` gives for this layer."""
    rec = current
    if rec is None or not (needs[1] or needs[2]):
        return needs
    return rec.take(needs, delta, input, weight, bias, params)

"""Per-example clipping (DP-SGD) step: torchderiv.per_sample vs Opacus vs torch.func, side by side.

To run:
    .venv/bin/python experiments/dp_benchmark.py            # MLPs, sequence, transformer, CNNs (every case)
    .venv/bin/python experiments/dp_benchmark.py --cases mlp_digits --rounds 101   # the digits MLP (0.4 ms steps)
    .venv/bin/python experiments/dp_benchmark.py --quick    # fewer rounds; no Opacus hooks, vmap, loop (slow ones)
    .venv/bin/python experiments/benchmark.py --dp          # the same, from the main benchmark

One step = zero the gradients, forward, loss, backward, (clip, noise), SGD update. Contenders:

* ``plain``: torchderiv's non-private step (the base of every ratio).
* ``norms``: the same inside ``torchderiv.per_sample(model)``: every example's gradient norm, no clipping.
* ``dp``: inside ``per_sample(model, max_norm=C)``, plus Gaussian noise ``N(0, σ²C²)/B`` added to
  ``.grad``: a full DP-SGD step.
* ``clip`` and ``noise``: the two halves of ``dp``, to tell their costs apart: ``dp`` with σ = 0 (clipping
  only), and the non-private step with ``dp``'s noise added (drawing it only).
* ``autograd``: the same network as torch modules, non-private (for scale).
* ``opacus_hooks``, ``opacus_ghost``: Opacus's ``GradSampleModule`` + ``DPOptimizer`` and its ghost
  clipping (``GradSampleModuleFastGradientClipping``, two backward passes), when Opacus is installed.
* ``vmap``: ``torch.func.vmap(grad)`` per-example gradients, clipped and summed by hand, noise added (MLP
  cases); for the transformer ``loop``: one autograd backward per example instead (torch's fused attention
  kernels are outside vmap's reach), clipped, summed and noised the same way.
* ``backpack``: BackPACK's ``BatchGrad`` per-example gradients, the same by hand (MLP cases, when
  ``backpack-for-pytorch`` is installed: ``pip install --no-deps backpack-for-pytorch einops unfoldNd``;
  it needs no torchvision for this).

Time: interleaved rounds in this process, median of per-round ratios to ``plain`` with
min–max; page faults / step: the median of each timed step's minor page faults (glibc gives large freed buffers
back to the system, and a step that needs them again faults them in: part of its time, set by the allocator).
``--device cuda``: everything on the GPU, memory the allocator's peak over one step (exact, so in this process).
Memory (CPU): the extra peak RSS of one step, each contender in a fresh process (VmHWM after the step minus VmRSS
before it; before it: model, data and optimizer state, no gradients, the high-water mark
reset after a warm-up step; large buffers mmapped, so that RSS follows the bytes in use), as a ratio to
``plain``'s.
Before timing, ``dp`` with σ = 0 is checked against ``vmap``'s clipped sum (the same numbers or no table); for the
transformer, against one autograd backward per example (torch's fused attention kernels are outside vmap's reach).
The transformer's Opacus contender is the same model with Opacus's ``DPMultiheadAttention`` (``ModuleValidator.fix``)
and its positions as an ``Embedding`` over position indices (what Opacus can clip).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchderiv
import torchderiv.functional as TF
from torchderiv.nn import MLP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import interleaved as _interleaved  # noqa: E402  (the same A B … B A rounds as the main benchmark)

OUT = Path(__file__).resolve().parent / "out"
DEVICE = torch.device("cpu")  # --device: where models, data and steps live
C, SIGMA, LR = 1.0, 1.0, 0.05
CASES = {
    "mlp_relu": dict(kind="mlp", sizes=[784, 1024, 1024, 10], batch=256, activation="relu"),
    "mlp_gelu": dict(kind="mlp", sizes=[784, 1024, 1024, 10], batch=256, activation="gelu"),
    # configs/digits_dp.yaml's network and batch: a step of ~0.4 ms, where per-call costs outweigh the arithmetic
    "mlp_digits": dict(kind="mlp", sizes=[64, 128, 10], batch=64, activation="relu"),
    "seq_gelu": dict(kind="seq", width=256, batch=32, length=128),
    # tokens → embedding + positions → 2 pre-norm encoder layers (GELU) → LayerNorm → a head on the flattened positions
    "transformer": dict(kind="transformer", batch=256, length=64, d_model=64, nhead=4, ff=256, layers=2, classes=10),
    # Opacus's MNIST CNN on 28×28 images: conv 16 (8×8, stride 2, pad 3) → max-pool → conv 32 (4×4, stride 2) →
    # max-pool → dense 32 → dense 10 (ReLU)
    "cnn": dict(kind="cnn", batch=256, net="mnist"),
    # a larger one: 3×32×32 images, four 3×3 convolutions of 32–64 channels with GroupNorm(8) and ReLU, average-pooled
    "cnn_groupnorm": dict(kind="cnn", batch=256, net="groupnorm"),
}
TORCH_ACT = {"relu": nn.ReLU, "gelu": nn.GELU}


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


class _Positions(nn.Module):
    """Learned positions as Opacus can take them: an Embedding over position indices, ``x + E[0..T-1]``."""

    def __init__(self, length, d):
        super().__init__()
        self.table = nn.Embedding(length, d)

    def forward(self, x):
        return x + self.table(torch.arange(x.shape[1], device=x.device).repeat(x.shape[0], 1))


def _transformer(cfg, positions):
    from torchderiv.lightning import TokenTransformer

    model = TokenTransformer(
        num_tokens=17,
        length=cfg["length"],
        d_model=cfg["d_model"],
        nhead=cfg["nhead"],
        dim_feedforward=cfg["ff"],
        num_layers=cfg["layers"],
        num_classes=cfg["classes"],
        dropout=0.0,
    )
    if positions == "embedding":
        table = _Positions(cfg["length"], cfg["d_model"])
        table.table.weight.data.copy_(model.positions.weight.data)
        model.positions = table
    return model


def _cnn(net: str) -> nn.Module:
    if net == "mnist":
        return nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
    layers, c = [], 3
    for out, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
        layers += [nn.Conv2d(c, out, 3, stride, padding=1), nn.GroupNorm(8, out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def build(case: str, positions: str = "module"):
    """(torchderiv model, torch twin with the same weights, x, y, loss on (model output, y)). ``positions``: the
    twin's position parameter as torchderiv's module, or as an Embedding over positions (for Opacus)."""
    cfg = CASES[case]
    torch.manual_seed(0)
    if cfg["kind"] == "transformer":
        ours = _transformer(cfg, "module")
        torch.manual_seed(0)
        theirs = _transformer(cfg, positions)
        torchderiv.convert(ours)
        x = torch.randint(0, 17, (cfg["batch"], cfg["length"]))
        y = torch.randint(0, cfg["classes"], (cfg["batch"],))
    elif cfg["kind"] == "cnn":
        theirs = _cnn(cfg["net"])
        ours = torchderiv.convert(copy.deepcopy(theirs))
        side, channels = (28, 1) if cfg["net"] == "mnist" else (32, 3)
        x = torch.randn(cfg["batch"], channels, side, side)
        y = torch.randint(0, 10, (cfg["batch"],))
    elif cfg["kind"] == "mlp":
        ours = MLP(cfg["sizes"], cfg["activation"])
        layers = []
        for k, lin in enumerate(ours.layers):
            ref = nn.Linear(lin.in_features, lin.out_features)
            ref.load_state_dict(lin.state_dict())
            layers += [ref] + ([TORCH_ACT[cfg["activation"]]()] if k < len(ours.layers) - 1 else [])
        theirs = nn.Sequential(*layers)
        x = torch.randn(cfg["batch"], cfg["sizes"][0])
        y = torch.randint(0, cfg["sizes"][-1], (cfg["batch"],))
    else:
        n = cfg["width"]
        theirs = nn.Sequential(nn.Linear(n, n), nn.GELU(), nn.Linear(n, n))
        ours = torchderiv.convert(nn.Sequential(nn.Linear(n, n), nn.GELU(), nn.Linear(n, n)))
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(cfg["batch"], cfg["length"], n)
        y = torch.randint(0, n, (cfg["batch"], cfg["length"]))
    return ours.to(DEVICE), theirs.to(DEVICE), x.to(DEVICE), y.to(DEVICE)


def _flat_ce(ce):
    # logits (B, [T,] C) and targets (B, [T]) -> mean over every position, as one cross-entropy
    return lambda z, y: ce(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def make_steps(case: str, names) -> tuple[dict, dict]:
    ours, theirs, x, y = build(case)
    batch = x.shape[0]
    td_loss = _flat_ce(TF.cross_entropy)
    if CASES[case]["kind"] == "mlp":
        forward_loss = lambda: ours.cross_entropy(x, y)[0]  # network and loss in one Function
    elif CASES[case]["kind"] in ("transformer", "cnn"):
        forward_loss = lambda: TF.cross_entropy(ours(x), y)
    else:
        forward_loss = lambda: td_loss(ours(x), y)
    opt = torch.optim.SGD(ours.parameters(), lr=LR)
    opt_ref = torch.optim.SGD(theirs.parameters(), lr=LR)

    def plain():
        opt.zero_grad(set_to_none=True)
        forward_loss().backward()
        opt.step()

    def norms():
        opt.zero_grad(set_to_none=True)
        with torchderiv.per_sample(ours):
            forward_loss().backward()
        opt.step()

    def add_noise(sigma):
        for p in ours.parameters():  # noise on the clipped sum, in the mean's scale
            p.grad.add_(torch.randn_like(p), alpha=sigma * C / batch)

    def dp(sigma=SIGMA):
        opt.zero_grad(set_to_none=True)
        with torchderiv.per_sample(ours, max_norm=C):
            forward_loss().backward()
        if sigma:
            add_noise(sigma)
        opt.step()

    def clip():  # the DP step without its noise: what per_sample itself costs
        dp(sigma=0)

    def noise():  # the plain step with the DP step's noise: what drawing it costs, clipping aside
        opt.zero_grad(set_to_none=True)
        forward_loss().backward()
        add_noise(SIGMA)
        opt.step()

    def autograd():
        opt_ref.zero_grad(set_to_none=True)
        _flat_ce(F.cross_entropy)(theirs(x), y).backward()
        opt_ref.step()

    steps = {"plain": plain, "norms": norms, "dp": dp, "clip": clip, "noise": noise, "autograd": autograd}
    if "vmap" in names:
        steps["vmap"] = _vmap_step(theirs, x, y, opt_ref)
    if "loop" in names:

        def loop():  # torch.func's place where vmap cannot reach torch's fused attention kernels
            clipped = _loop_clipped_sum(theirs, x, y)
            for p in theirs.parameters():
                p.grad = None
            for (_, p), g in zip(theirs.named_parameters(), clipped.values()):
                p.grad = g.add_(torch.randn_like(g), alpha=SIGMA * C / batch)
            opt_ref.step()

        steps["loop"] = loop
    if "backpack" in names:
        steps["backpack"] = _backpack_step(theirs, x, y)
    if "opacus_hooks" in names or "opacus_ghost" in names:
        steps.update(_opacus_steps(case, names, x, y))
    extra = {"ours": ours, "theirs": theirs, "x": x, "y": y, "dp": dp}
    return {k: v for k, v in steps.items() if k in names}, extra


def _vmap_clipped_sum(model, x, y):
    """Σᵢ cᵢ gᵢ / B from torch.func: each example's gradient materialised, then clipped."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        z = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), yi.reshape(-1))

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    c = (C / (norms + 1e-6)).clamp(max=1)
    return {k: (g * c.reshape(-1, *([1] * (g.dim() - 1)))).sum(0) / x.shape[0] for k, g in grads.items()}


def _loop_clipped_sum(model, x, y):
    """Σᵢ cᵢ gᵢ / B with each example's gradient from its own autograd backward (the reference where vmap does not
    reach: torch's fused attention kernels)."""
    params = dict(model.named_parameters())
    per = {k: [] for k in params}
    for i in range(x.shape[0]):
        z = model(x[i : i + 1])
        grads = torch.autograd.grad(F.cross_entropy(z, y[i : i + 1]), list(params.values()))
        for k, g in zip(params, grads):
            per[k].append(g)
    grads = {k: torch.stack(v) for k, v in per.items()}
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    c = (C / (norms + 1e-6)).clamp(max=1)
    return {k: (g * c.reshape(-1, *([1] * (g.dim() - 1)))).sum(0) / x.shape[0] for k, g in grads.items()}


def _backpack_clipped_sum(model, loss_fn, x, y):
    """Σᵢ cᵢ gᵢ / B from BackPACK's ``BatchGrad`` (``model`` and ``loss_fn`` extended): each example's gradient
    of the mean loss in ``p.grad_batch``, clipped and summed by hand as ``_vmap_clipped_sum`` does."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    batch = x.shape[0]
    with backpack(BatchGrad()):
        loss_fn(model(x), y).backward()
    grads = {k: p.grad_batch * batch for k, p in model.named_parameters()}  # gᵢ: B × its share of the mean
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    c = (C / (norms + 1e-6)).clamp(max=1)
    return {k: torch.einsum("b,b...->...", c, g) / batch for k, g in grads.items()}


def _backpack_step(model, x, y):
    """BackPACK's per-example gradients, clipped, summed and noised by hand as in ``dp`` (MLP cases only:
    BackPACK needs the loss module right after the model)."""

    from backpack import extend

    model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batch = x.shape[0]

    def step():
        opt.zero_grad(set_to_none=True)
        for k, g in _backpack_clipped_sum(model, loss_fn, x, y).items():
            p = model.get_parameter(k)
            p.grad = g.add_(torch.randn_like(p), alpha=SIGMA * C / batch)
        opt.step()

    return step


def check_backpack(case: str, batch: int = 32) -> float:
    """Largest relative difference between BackPACK's clipped sum and torch.func's (as ``check_clipping``)."""
    from backpack import extend

    _, theirs, x, y = build(case)
    x, y = x[:batch], y[:batch]
    got = _backpack_clipped_sum(extend(copy.deepcopy(theirs)), extend(nn.CrossEntropyLoss()), x, y)
    ref = _vmap_clipped_sum(theirs, x, y)
    return max(((got[k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for k, g in ref.items())


def _vmap_step(model, x, y, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        for k, g in _vmap_clipped_sum(model, x, y).items():
            p = model.get_parameter(k)
            p.grad = g.add_(torch.randn_like(g), alpha=SIGMA * C / x.shape[0])
        opt.step()

    return step


def _opacus_steps(case, names, x, y):
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    transformer = CASES[case]["kind"] == "transformer"
    _, theirs, _, _ = build(case, positions="embedding" if transformer else "module")
    if transformer:  # Opacus requires its DPMultiheadAttention in place of torch's attention
        from opacus.validators import ModuleValidator

        theirs = ModuleValidator.fix(theirs)
    batch = x.shape[0]
    seq = CASES[case]["kind"] == "seq"
    steps = {}
    # the same privacy settings for both of Opacus's optimizers
    dp_kw = dict(noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=batch, loss_reduction="mean")
    if "opacus_hooks" in names:
        gsm = GradSampleModule(copy.deepcopy(theirs), loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=LR), **dp_kw)

        def hooks():
            opt.zero_grad(set_to_none=True)
            _flat_ce(F.cross_entropy)(gsm(x), y).backward()
            opt.step()

        steps["opacus_hooks"] = hooks
    if "opacus_ghost" in names:
        ghost = GradSampleModuleFastGradientClipping(
            copy.deepcopy(theirs), max_grad_norm=C, use_ghost_clipping=True, loss_reduction="mean"
        )
        gopt = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=LR), **dp_kw)
        crit = DPLossFastGradientClipping(ghost, gopt, nn.CrossEntropyLoss(), loss_reduction="mean")

        def ghost_step():
            gopt.zero_grad(set_to_none=True)
            z = ghost(x)
            loss = crit(z.reshape(-1, z.shape[-1]), y.reshape(-1), shape=z.shape if seq else None)
            loss.backward()
            gopt.step()

        steps["opacus_ghost"] = ghost_step
    return steps


def check_clipping(case: str, batch: int = 32) -> float:
    """Largest relative difference between ``dp`` (σ = 0, before the update) and torch.func's clipped sum,
    on the case's first ``batch`` examples (torch.func materialises every example's gradient)."""
    ours, theirs, x, y = build(case)
    x, y = x[:batch], y[:batch]
    with torchderiv.per_sample(ours, max_norm=C):
        (
            ours.cross_entropy(x, y)[0] if CASES[case]["kind"] == "mlp" else _flat_ce(TF.cross_entropy)(ours(x), y)
        ).backward()
    if CASES[case]["kind"] == "transformer":  # torch.func through torch's attention kernels: one example a time
        ref = _loop_clipped_sum(theirs, x, y)
    else:
        ref = _vmap_clipped_sum(theirs, x, y)
    worst = 0.0
    for (_, p), (_, g) in zip(ours.named_parameters(), ref.items()):
        worst = max(worst, ((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-30)).item())
    return worst


def interleaved(fns: dict, rounds: int, faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds per step of each contender, one entry per round (benchmark.interleaved, one step a timing;
    on CUDA it synchronises around each); ``faults`` receives each step's minor page faults."""
    return _interleaved(fns, rounds, 1, DEVICE, faults)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _drop_gradients() -> None:
    """No gradients anywhere: each step makes its own, and every contender's own per-sample buffers count as
    part of its step."""
    for obj in gc.get_objects():
        if isinstance(obj, nn.Parameter):
            obj.grad = None
            for attr in ("grad_sample", "summed_grad"):
                if getattr(obj, attr, None) is not None:
                    setattr(obj, attr, None)
    gc.collect()


def cuda_extra_peak(fn) -> float:
    """MiB the CUDA allocator held at the peak of one step beyond what was allocated before it (exact, so
    measured in this process)."""
    _drop_gradients()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def child(case: str, name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    fns, _ = make_steps(case, [name])
    fns[name]()  # warm-up: optimizer state, one-time initialisation
    _drop_gradients()  # the state before a step: model, data, optimizer
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_mib("VmRSS")
    fns[name]()
    print(json.dumps({"extra_peak_mib": _status_mib("VmHWM") - before}))


def measure_memory(case: str, name: str, threads: int) -> float:
    # Every allocation of 64 KiB or more gets its own mmap, returned to the system when freed: RSS then
    # follows the bytes in use. With glibc's default (a threshold that grows as buffers are freed, and a
    # heap that keeps freed memory) the extra peak of a step after warm-up was 3–8 MiB and swung with
    # allocation order more than with what the step keeps.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, name, "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mib"]


def bench(case: str, names, rounds: int, threads: int, memory: bool = True) -> dict:
    err = check_clipping(case)
    if err > 1e-4:
        raise SystemExit(f"{case}: per_sample's clipped gradient differs from torch.func's by {err:.2e}")
    if "backpack" in names and check_backpack(case) > 1e-4:
        raise SystemExit(f"{case}: BackPACK's clipped gradient differs from torch.func's")
    fns, _ = make_steps(case, names)
    faults: dict[str, list[float]] = {}
    times = interleaved(fns, rounds, faults)
    if not memory:
        mem = {k: float("nan") for k in fns}
    elif DEVICE.type == "cuda":
        mem = {k: cuda_extra_peak(fn) for k, fn in fns.items()}  # after the timing rounds' warm-up
    else:
        mem = {k: measure_memory(case, k, threads) for k in fns}
    row = {"case": case, "clip_check_rel_err": err, "ms": {}, "time_vs_plain": {}, "mem_mib": mem, "mem_vs_plain": {}}
    row["minor_faults"] = {k: statistics.median(v) for k, v in faults.items()}
    for k, t in times.items():
        r = [a / b for a, b in zip(t, times["plain"])]
        row["ms"][k] = 1e3 * statistics.median(t)
        row["time_vs_plain"][k] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
        # below 1 MiB (a small network's step) the plain step's extra peak is within RSS's resolution: no ratio
        row["mem_vs_plain"][k] = mem[k] / mem["plain"] if mem["plain"] >= 1 else float("nan")
    print(
        json.dumps(
            {
                "case": case,
                "time": {k: round(v["median"], 3) for k, v in row["time_vs_plain"].items()},
                "mem": {k: round(v, 2) for k, v in row["mem_vs_plain"].items()},
            }
        ),
        flush=True,
    )
    return row


LABELS = {
    "plain": "torchderiv, non-private (base)",
    "norms": "torchderiv `per_sample`, norms only",
    "dp": "torchderiv `per_sample(max_norm=1)` + noise",
    "clip": "… its clipping alone: `per_sample(max_norm=1)`, σ = 0",
    "noise": "… its noise alone: the non-private step + the same noise",
    "autograd": "torch autograd, non-private",
    "opacus_hooks": "Opacus 1.6 hooks",
    "opacus_ghost": "Opacus 1.6 ghost clipping",
    "vmap": "`torch.func` vmap(grad) + clip + sum",
    "loop": "one autograd backward per example + clip + sum (vmap cannot enter torch's attention kernels)",
    "backpack": "BackPACK 1.7 `BatchGrad` + clip + sum",
}


def _or_dash(value: float, spec: str) -> str:
    """``value`` formatted, or a dash where it was not measured (``--no-memory``) or has no meaning (nan)."""
    return "—" if math.isnan(value) else format(value, spec)


def markdown(rows, meta) -> str:
    lines = [f"DP step benchmark: {meta}", ""]
    for row in rows:
        cfg = CASES[row["case"]]
        if cfg["kind"] == "mlp":
            title = f"MLP {'-'.join(map(str, cfg['sizes']))} {cfg['activation']}, batch {cfg['batch']}"
        elif cfg["kind"] == "cnn":
            title = (
                "CNN: Opacus's MNIST example, 28×28, batch 256"
                if cfg["net"] == "mnist"
                else "CNN: 3×32×32, four 3×3 convolutions of 32–64 channels with GroupNorm, batch 256"
            )
        elif cfg["kind"] == "seq":
            title = f"Linear–GELU–Linear, width {cfg['width']}, on ({cfg['batch']}, {cfg['length']}, {cfg['width']})"
        else:
            title = (
                f"Transformer: batch {cfg['batch']} × {cfg['length']} tokens, d_model {cfg['d_model']}, {cfg['nhead']} "
                f"heads, feed-forward {cfg['ff']}, {cfg['layers']} pre-norm layers, GELU; every parameter clipped"
            )
        lines += [
            f"**{title}** (clipped gradient vs "
            f"{'one autograd backward per example' if cfg['kind'] == 'transformer' else 'torch.func'}: "
            f"max rel. diff {row['clip_check_rel_err']:.1e})",
            "",
            "| contender | ms | time vs plain | page faults / step | extra peak MiB | memory vs plain |",
            "|---|---|---|---|---|---|",
        ]
        for k in row["ms"]:
            s = row["time_vs_plain"][k]
            ms, mib, ratio = row["ms"][k], row["mem_mib"][k], row["mem_vs_plain"][k]
            ms_text = format(ms, ".1f" if ms >= 10 else ".2f")
            lines.append(
                f"| {LABELS[k]} | {ms_text} | {s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f}) | "
                f"{row['minor_faults'][k]:.0f} | {_or_dash(mib, '.0f')} | {_or_dash(ratio, '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(
    quick: bool = False,
    rounds: int | None = None,
    threads: int = 2,
    out: str = str(OUT),
    cases=None,
    memory: bool = True,
) -> list[dict]:
    torch.set_num_threads(threads)
    rounds = rounds or (5 if quick else 7)
    base = ["plain", "norms", "dp", "clip", "noise", "autograd"]
    opacus = ["opacus_ghost"] + ([] if quick else ["opacus_hooks"]) if _have("opacus") else []
    rows = []
    for case in cases or CASES:
        slow = ["vmap"] + (["backpack"] if _have("backpack") else [])
        names = base + opacus + ([] if quick or CASES[case]["kind"] not in ("mlp", "cnn") else slow)
        if CASES[case]["kind"] == "seq":
            names = [n for n in names if n != "opacus_hooks"]
        if CASES[case]["kind"] == "transformer" and not quick:
            names.append("loop")
        rows.append(bench(case, names, rounds, threads, memory))
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"cpu, {threads} threads"
    meta = f"{where}, float32, torch {torch.__version__}, median of {rounds} interleaved rounds (min–max)"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "dp_benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows, meta)
    (Path(out) / "dp_benchmark.md").write_text(md)
    print(md)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="a subset of the cases")
    parser.add_argument("--no-memory", action="store_true", help="time only (no fresh process per contender)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, memory is the allocator's peak)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "NAME"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.child:
        child(*args.child, args.threads)
        return
    run(args.quick, args.rounds, args.threads, args.out, args.cases, not args.no_memory)


if __name__ == "__main__":
    main()

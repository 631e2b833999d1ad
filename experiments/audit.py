"""An empirical privacy audit of one private step: a lower bound on ε from many runs, against the accountant's ε.

DP promises that no test can tell a step taken with a canary example in the batch from the same step without it
better than ε allows: for any test, ``TPR ≤ e^ε·FPR + δ`` (and the same with the two worlds swapped). This script
runs the real private step — torchderiv's per-example clipping in one backward, Opacus's noise through
``torchderiv.privacy.private_optimizer`` — many times in each world and applies a test; the Clopper–Pearson bounds
on its error rates then give ε_lb, a lower bound on the ε the step really has, with 95% confidence (white-box
gradient-canary auditing: Jagielski et al. 2020, Nasr et al. 2021). The accountant's ε is a proof of an upper
bound, so ε_lb > ε is a bug: too little noise, noise added to only part of the gradient, a canary not clipped.

The auditor is white-box, as DP's definition allows: it knows the weights θ, the batch D and the canary. From
the released step it recovers the noisy clipped sum ``R = (θ − θ') · E / lr`` and subtracts the clipped sum of D,
computed independently (one torch autograd backward per example, clipped by hand); the canary's gradient
``g_c`` has norm ≥ C (asserted), so after clipping it adds exactly ``C·u`` with ``u = g_c/‖g_c‖``. The statistic
``s = ⟨R − S_D, u⟩ / C`` is then ``N(b, σ²)``, b = 1 with the canary and 0 without: the best test there is for
one Gaussian step. Half the trials choose the threshold, the other half measure it (choosing it on the
same trials would bias ε_lb up).

The audited mechanism is one step on the whole batch (sampling rate 1), so the claimed ε is the accountant's for
one step at q = 1. ``noise_scale`` multiplies the σ the optimizer uses but not the σ the accountant is told: the
planted bug that the audit must catch (``tests/test_audit.py``).

To run (about a minute for the table; ``--plot`` draws ε_lb against the claimed ε)::

    .venv/bin/python experiments/audit.py
    .venv/bin/python experiments/audit.py --sigmas 1 2 4 --trials 4000 --plot docs/audit.png
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import torchderiv
from torchderiv.privacy import private_optimizer

LR = 1.0


def _data(batch: int, seed: int):
    """A batch of digits (pixels / 16: no statistics of the data) and a canary: an image whose pixels are all
    16 (scaled: 1) given the label it is least like, so its gradient is large and is clipped to C."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(digits.target), generator=g)[:batch]
    x = torch.tensor(digits.data, dtype=torch.float64)[pick] / 16
    y = torch.tensor(digits.target)[pick]
    canary = torch.ones(1, 64, dtype=torch.float64)
    return x, y, canary


def _clipped(model, x, y, max_norm: float) -> torch.Tensor:
    """``Σᵢ min(1, C/‖gᵢ‖) gᵢ`` by torch autograd, one backward per example: the auditor's own clipping."""
    total = None
    params = list(model.parameters())
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        g = torch.cat([t.flatten() for t in grads])
        g = g * min(1.0, max_norm / (g.norm().item() + 1e-6))
        total = g if total is None else total + g
    return total


def claimed_epsilon(sigma: float, delta: float) -> float:
    """The accountant's ε (Opacus, RDP) of one step of the Gaussian mechanism at sampling rate 1."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    return float(accountant.get_epsilon(delta))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """The one-sided (1 − alpha) Clopper–Pearson upper bound on a rate observed as k successes in n trials."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def epsilon_lower_bound(without: torch.Tensor, with_: torch.Tensor, delta: float, alpha: float = 0.05):
    """``(ε_lb, threshold)`` from the statistic's values in the two worlds: the threshold test "s ≥ t means the
    canary was in" chosen on the first half of each world's trials, its error rates bounded on the second half
    (Clopper–Pearson, ``alpha/2`` each: the two bounds hold together with probability ≥ 1 − alpha), and
    ``ε_lb = max(ln((1 − δ − FNR)/FPR), ln((1 − δ − FPR)/FNR))`` from DP's inequality in both directions."""

    def bound(fpr_k, fnr_k, n_neg, n_pos):
        fpr = clopper_pearson_upper(fpr_k, n_neg, alpha / 2)
        fnr = clopper_pearson_upper(fnr_k, n_pos, alpha / 2)
        best = -math.inf
        for a, b in ((fnr, fpr), (fpr, fnr)):
            if 1 - delta - a > 0 and b > 0:
                best = max(best, math.log((1 - delta - a) / b))
        return best

    h0, h1 = len(without) // 2, len(with_) // 2
    choose0, measure0 = without[:h0], without[h0:]
    choose1, measure1 = with_[:h1], with_[h1:]
    candidates = torch.cat([choose0, choose1]).sort().values
    best_t, best = None, -math.inf
    for t in candidates[:: max(1, len(candidates) // 400)].tolist():
        e = bound(int((choose0 >= t).sum()), int((choose1 < t).sum()), len(choose0), len(choose1))
        if e > best:
            best, best_t = e, t
    if best_t is None:
        return 0.0, None
    e = bound(int((measure0 >= best_t).sum()), int((measure1 < best_t).sum()), len(measure0), len(measure1))
    return max(0.0, e), best_t


def audit(
    sigma: float,
    trials: int,
    *,
    noise_scale: float = 1.0,
    max_grad_norm: float = 1.0,
    batch: int = 64,
    delta: float = 1e-5,
    seed: int = 0,
) -> dict:
    """Run ``trials`` private steps with the canary and ``trials`` without; returns ε_lb, the claimed ε and the
    statistic's mean and standard deviation in each world."""
    torch.manual_seed(seed)
    model = torchderiv.nn.MLP([64, 32, 10]).double()
    x, y, canary = _data(batch, seed)
    start = [p.detach().clone() for p in model.parameters()]

    # what the white-box auditor knows: D's clipped sum and the canary's direction
    reference = torchderiv.nn.MLP([64, 32, 10]).double()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        canary_label = reference(canary).argmin(-1)
    s_d = _clipped(reference, x, y, max_grad_norm)
    grads = torch.autograd.grad(F.cross_entropy(reference(canary), canary_label), list(reference.parameters()))
    g_c = torch.cat([t.flatten() for t in grads])
    if not g_c.norm() >= max_grad_norm:
        raise ValueError(f"audit: the canary's gradient norm {g_c.norm():.3g} is below C = {max_grad_norm}")
    u = g_c / g_c.norm()

    worlds = {False: (x, y), True: (torch.cat([x, canary]), torch.cat([y, canary_label]))}
    expected = float(batch)  # the divisor of the mean: the same in both worlds, as with Poisson sampling
    generator = torch.Generator().manual_seed(seed + 1)
    opt = private_optimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=sigma * noise_scale,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        generator=generator,
    )
    stats = {False: [], True: []}
    for _ in range(trials):
        for present, (bx, by) in worlds.items():
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), start):
                    p.copy_(p0)
            opt.zero_grad(set_to_none=True)
            with opt.clipping():
                F.cross_entropy(model(bx), by).backward()
            opt.step()
            released = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(model.parameters(), start)])
            stats[present].append(torch.dot(released * (expected / LR) - s_d, u).item() / max_grad_norm)
    without, with_ = torch.tensor(stats[False]), torch.tensor(stats[True])
    lower, threshold = epsilon_lower_bound(without, with_, delta)
    return {
        "sigma": sigma,
        "noise_scale": noise_scale,
        "trials": trials,
        "claimed": claimed_epsilon(sigma, delta),
        "lower_bound": lower,
        "threshold": threshold,
        "mean_without": without.mean().item(),
        "mean_with": with_.mean().item(),
        "std_without": without.std().item(),
        "std_with": with_.std().item(),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--noise-scales", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--trials", type=int, default=3000, help="steps in each world (with, without the canary)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--plot", default=None, help="draw ε_lb against the claimed ε into this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    print(f"one private step, C = 1, batch 64 (+ the canary), {args.trials} steps per world, δ = {args.delta}")
    print(f"{'σ':>6} {'noise ×':>8} {'claimed ε':>10} {'ε_lb':>7} {'s without':>16} {'s with':>16}   {'':8}")
    for sigma in args.sigmas:
        for scale in args.noise_scales:
            t0 = time.perf_counter()
            r = audit(sigma, args.trials, noise_scale=scale, delta=args.delta)
            verdict = "ok" if r["lower_bound"] <= r["claimed"] else "VIOLATED"
            print(
                f"{sigma:6.2f} {scale:8.2f} {r['claimed']:10.3f} {r['lower_bound']:7.3f} "
                f"{r['mean_without']:7.3f} ± {r['std_without']:5.3f} {r['mean_with']:7.3f} ± {r['std_with']:5.3f}"
                f"   {verdict:8} ({time.perf_counter() - t0:.0f} s)"
            )
            rows.append(r)
    if args.plot:
        _plot(rows, args.plot)
    return rows


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    top = max(max(r["claimed"] for r in rows), max(r["lower_bound"] for r in rows)) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="ε_lb = claimed ε")
    for scale, marker in zip(sorted({r["noise_scale"] for r in rows}, reverse=True), "os^v"):
        pts = [r for r in rows if r["noise_scale"] == scale]
        label = "noise as configured" if scale == 1 else f"noise × {scale:g} (planted bug)"
        ax.scatter([r["claimed"] for r in pts], [r["lower_bound"] for r in pts], marker=marker, s=40, label=label)
        for r in pts:
            ax.annotate(
                f"σ={r['sigma']:g}",
                (r["claimed"], r["lower_bound"]),
                textcoords="offset points",
                xytext=(6, -10),
                fontsize=8,
            )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("accountant's ε (one step, RDP)")
    ax.set_ylabel("audited lower bound ε_lb (95%)")
    ax.set_title("Empirical privacy audit of one DP-SGD step")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

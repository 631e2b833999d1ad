"""The empirical privacy audit (experiments/audit.py): its lower bound on ε respects the accountant's ε with the
configured noise, and exceeds it when the noise is planted 4× too small — the audit can catch a privacy bug."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("opacus")
pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import audit  # noqa: E402

SIGMA, TRIALS = 2.0, 2000  # claimed ε = 2.17 at δ = 1e-5 for one step; the bound comes out ≈ 0.8 here


def test_clopper_pearson_upper_bound():
    # no success in n trials: the bound solves (1 − p)^n = alpha
    assert audit.clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert audit.clopper_pearson_upper(100, 100, 0.05) == 1.0
    assert 0.5 < audit.clopper_pearson_upper(50, 100, 0.05) < 0.6


def test_audit_lower_bound_stays_below_the_accountants_epsilon():
    r = audit.audit(SIGMA, TRIALS)
    assert r["claimed"] == pytest.approx(2.1657, abs=1e-3)
    # the statistic is N(b, σ²): the canary, clipped to C, shifts it by 1; the noise has the configured σ
    assert r["mean_with"] - r["mean_without"] == pytest.approx(1.0, abs=0.15)
    assert r["std_without"] == pytest.approx(SIGMA, rel=0.05)
    assert 0 < r["lower_bound"] <= r["claimed"]


def test_audit_catches_noise_four_times_too_small():
    # the optimizer adds noise at σ/4 while the accountant is told σ: the audit must prove ε is not what is claimed
    r = audit.audit(SIGMA, TRIALS, noise_scale=0.25)
    assert r["lower_bound"] > r["claimed"]
    assert r["std_without"] == pytest.approx(SIGMA / 4, rel=0.05)


def test_audit_experiment_prints_its_table(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    rows = audit.main(["--sigmas", "4", "--trials", "100", "--plot", str(tmp_path / "audit.png")])
    out = capsys.readouterr().out
    assert "claimed ε" in out and len(rows) == 2
    assert all(math.isfinite(r["lower_bound"]) for r in rows)
    assert (tmp_path / "audit.png").stat().st_size > 0

"""The experiment scripts start, agree with autograd where they check it, and write what they promise."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT / "experiments"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_overhead_floor_runs_and_its_bare_functions_match_autograd():
    # The script asserts that all its contenders produce autograd's gradients before timing them.
    out = _run(["overhead_floor.py", "--rounds", "1", "--inner", "1"])
    for name in ("autograd", "torchderiv", "floor, two nodes", "floor, one node", "torchderiv, one, floor backward"):
        assert name in out
    for line in ("torchderiv, one vs floor, one node: ", "torchderiv, two vs floor, two nodes: "):
        # each path against its floor, round by round: the ratio, then the µs between them
        assert re.search(re.escape(line) + r"\d\.\d{3} \[[^]]+\], [+-]\d+\.\d µs a step \[", out), out[-800:]


@pytest.mark.skipif(
    shutil.which("c++") is None or not cpp_extension.is_ninja_available(), reason="needs a C++ compiler and ninja"
)
def test_overhead_floor_cpp_body_builds_and_matches_autograd():
    # Builds the C++ floor and node (~40 s the first time) and, as above, checks their gradients first.
    out = _run(["overhead_floor.py", "--cpp", "--rounds", "1", "--inner", "1"], timeout=600)
    for name in ("floor, one node, C++", "floor, C++ autograd node", "C++ node + torchderiv's checks"):
        assert name in out


def test_conv_input_gradient_runs_and_its_contenders_agree():
    # The script checks the phases and the transposed convolution against torch's derivative kernel before timing,
    # and with --steps the two CNNs' gradients with either against each other.
    out = _run(["conv_input_gradient.py", "--rounds", "1", "--steps", "--step-rounds", "1"])
    for name in ("MNIST CNN, conv 2", "GroupNorm CNN, conv 2", "GroupNorm CNN, conv 4"):
        assert name in out and "transposed / phases" in out.split(name)[1].splitlines()[0]
    for case in ("cnn plain step", "cnn_groupnorm plain step"):
        assert case in out and "phases / autograd" in out.split(case)[1].splitlines()[0]


def test_cnn_floor_runs_and_its_contenders_agree():
    # The script checks each weight-gradient form against torch's derivative kernel before timing, and with --steps
    # the CNNs' gradients with torch's kernels substituted against torchderiv's own.
    out = _run(["cnn_floor.py", "--rounds", "1", "--steps", "--step-rounds", "1"])
    for name in (
        "MNIST CNN, conv 1",
        "MNIST CNN, conv 2",
        "GroupNorm CNN, conv 4",
        "digits CNN (configs/digits_cnn.yaml), conv 2",
    ):
        assert name in out and "taken / torch's" in out.split(name)[1].splitlines()[0]
    assert "torch's weight gradients / autograd" in out.split("cnn plain step")[1].splitlines()[0]
    assert "GroupNorm's fused backward / autograd" in out.split("cnn_groupnorm plain step")[1].splitlines()[0]


def test_benchmark_quick_writes_its_tables(tmp_path):
    _run(["benchmark.py", "--quick", "--no-lce", "--rounds", "7", "--inner", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert [(r["net"], r.get("activation")) for r in rows] == [
        ("large", "relu"),
        ("large", "gelu"),
        ("small", "relu"),
        ("small", "gelu"),
        ("cnn", None),
    ]
    by = {(r["net"], r.get("activation")): r for r in rows}
    # Saved bytes are deterministic: relu keeps what autograd keeps, gelu only Z per layer.
    assert by["large", "relu"]["saved_ratio"] <= 1.0
    assert by["large", "gelu"]["saved_ratio"] < 0.6
    table = (tmp_path / "benchmark.md").read_text()
    assert "| large 1024-2048-2048-10 ×512 | gelu |" in table
    # the CNN's plain step: what autograd saves, no more (the convolutions and ReLUs keep their inputs or outputs)
    assert "| Opacus's MNIST CNN, 1×28×28 ×256 |" in table and by["cnn", None]["saved_ratio"] <= 1.0


def test_ratio_stats_interval_brackets_the_median():
    sys.path.insert(0, str(ROOT / "experiments"))
    from benchmark import ratio_stats

    same = ratio_stats([2.0] * 9, [1.0] * 9)
    assert same["interval"] == (2.0, 2.0) and same["median"] == 2.0
    num = [0.8, 0.9, 1.0, 1.1, 1.2, 0.95, 1.05, 1.0, 0.7, 1.3, 1.0]
    s = ratio_stats(num, [1.0] * len(num))
    lo, hi = s["interval"]
    assert s["min"] <= lo <= s["median"] <= hi <= s["max"]
    assert lo < hi  # the rounds disagree, so the median is not pinned down


def test_dp_benchmark_checks_its_clipping_and_writes_its_table(tmp_path):
    # The script first compares per_sample's clipped gradient with torch.func's (and stops if they differ).
    sys.path.insert(0, str(ROOT / "experiments"))
    import dp_benchmark

    assert dp_benchmark.check_clipping("mlp_relu", batch=16) < 1e-4
    assert dp_benchmark.check_clipping("seq_gelu", batch=8) < 1e-4
    assert dp_benchmark.check_clipping("mlp_digits") < 1e-4
    args = ["--quick", "--rounds", "1", "--cases", "mlp_digits", "--no-memory", "--out", str(tmp_path)]
    _run(["dp_benchmark.py", *args])
    rows = json.loads((tmp_path / "dp_benchmark.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["mlp_digits"]
    assert {"plain", "norms", "dp", "clip", "noise", "autograd"} <= set(rows[0]["ms"])
    assert set(rows[0]["minor_faults"]) == set(rows[0]["ms"]) and min(rows[0]["minor_faults"].values()) >= 0
    table = (tmp_path / "dp_benchmark.md").read_text()
    assert "**MLP 64-128-10 relu, batch 64**" in table and "per_sample(max_norm=1)" in table
    # memory not measured (--no-memory): a dash in both memory columns, not "nan"; a sub-10 ms step with 2 decimals
    plain = next(line for line in table.splitlines() if line.startswith("| torchderiv, non-private"))
    assert plain.endswith("| — | — |") and re.search(r"\| \d\.\d\d \|", plain), plain


@pytest.mark.slow
def test_dp_tradeoff_quick_writes_its_tables_and_plots(tmp_path):
    _run(["dp_tradeoff.py", "--quick", "--out", str(tmp_path)], timeout=900)
    md = (tmp_path / "dp_tradeoff.md").read_text()
    assert "| seed | torchderiv per_sample | Opacus hooks |" in md and "private vs non-private" in md
    assert (tmp_path / "dp_tradeoff.png").exists() and (tmp_path / "dp_norms.png").exists()

"""The console script: its help, `check` without Lightning, a user's module from the current directory."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("torchderiv")

MY_LINEAR = """
import torch


class MyLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return x @ w.t()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x

    @staticmethod
    def jvp(ctx, dx, dw):
        x, w = ctx.saved_tensors
        return dx @ w.t() + x @ dw.t()
"""


def _run(*args, cwd=None, timeout=300):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is not installed in this environment")


def test_help_names_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    assert "hand-derived" in out.stdout
    for sub in ("fit", "validate", "test", "predict", "check"):
        assert f"  {sub} " in out.stdout


def test_check_does_not_import_lightning():
    code = (
        "import sys\nfrom torchderiv import cli\nsys.argv = ['torchderiv', 'check', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\nprint('LIGHTNING', 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LIGHTNING False" in out.stdout, out.stdout + out.stderr


def test_check_imports_from_the_current_directory(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "ops.py").write_text(MY_LINEAR)
    out = _run("check", "mypkg.ops:MyLinear", "--shapes", "6,4 4,4", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify: MyLinear.apply — ok" in out.stdout
    bad = _run("check", "mypkg.nope:MyLinear", "--shapes", "6,4 4,4", cwd=tmp_path)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        f"torchderiv check: cannot import 'mypkg.nope' (from {tmp_path}): No module named 'mypkg.nope'"
    ]


def test_fit_then_test_a_checkpoint_logs_into_the_fits_folder_without_clutter(tmp_path):
    # A new user's first two commands: fit, then test the best checkpoint. The test run's logs go under the fit's
    # version folder (runs/digits/version_0/test), the test line is printed once, and neither run prints Lightning's
    # advertisement, its own deprecation warning or the checkpoint callback's "dirpath has changed".
    root = Path(__file__).resolve().parents[1]
    fit = _run("fit", "--config", str(root / "configs/digits.yaml"), "--trainer.max_epochs=2", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "runs/digits/version_0/checkpoints/best.ckpt"
    test = _run("test", "--config", str(root / "configs/digits.yaml"), f"--ckpt_path={ckpt}", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs/digits").iterdir()) == ["version_0"]
    assert (tmp_path / "runs/digits/version_0/test/metrics.csv").exists()
    for out in (fit, test):
        text = out.stdout + out.stderr
        assert "Tip" not in text and "LeafSpec" not in text and "dirpath has changed" not in text
    assert test.stdout.count("test:  test/acc") == 1


def test_train_prints_the_test_line_once(tmp_path, monkeypatch, capsys):
    from torchderiv.train import main

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    main(
        [str(root / "configs/digits.yaml"), "--trainer.max_epochs=1", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    out = capsys.readouterr().out
    assert out.count("test/acc = ") == 1, out

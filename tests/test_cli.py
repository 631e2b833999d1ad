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

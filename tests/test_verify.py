"""verify() must pass a correct Function and flag each of nine planted bugs (a mutation test)."""

import math

import pytest
import torch

import torchderiv.functional as TF
from torchderiv.testing import DEFAULT_CHECKS, verify


class GoodLinear(torch.autograd.Function):
    """Z = X Wᵀ + b, correct in every way verify checks."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return x.matmul(w.t()) + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g.matmul(w)
        if ctx.needs_input_grad[1]:
            gw = g2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, w = ctx.saved_tensors
        out = 0
        if dx is not None:
            out = out + dx.matmul(w.t())
        if dw is not None:
            out = out + x.matmul(dw.t())
        if db is not None:
            out = out + db
        return out


def _mutant(name, backward=None, jvp=None):
    attrs = {}
    if backward is not None:
        attrs["backward"] = staticmethod(backward)
    if jvp is not None:
        attrs["jvp"] = staticmethod(jvp)
    return type(name, (GoodLinear,), attrs)


def _rows(t):
    return t.reshape(-1, t.shape[-1])


def _bw(fx=None, fw=None, fb=None, order=(0, 1, 2), pre=None, post=None):
    """A backward built from GoodLinear's, with one piece replaced."""

    def backward(ctx, g):
        if pre is not None:
            g = pre(g)
        x, w = ctx.saved_tensors
        gx = (fx or (lambda g, x, w: g.matmul(w)))(g, x, w)
        gw = (fw or (lambda g, x, w: _rows(g).t().mm(_rows(x))))(g, x, w)
        gb = (fb or (lambda g: _rows(g).sum(0)))(g)
        out = (gx, gw, gb)
        if post is not None:
            post(g)
        return tuple(out[i] for i in order)

    return backward


def _inplace_backward(ctx, g):
    result = GoodLinear.backward(ctx, g.clone())
    g.mul_(0.5)  # the bug: the caller's grad_output changes
    return result


def _jvp_missing_weight_term(ctx, dx, dw, db):
    x, w = ctx.saved_tensors
    return dx.matmul(w.t()) + db


MUTANTS = {
    "transposed-weight-grad": (_mutant("T", _bw(fw=lambda g, x, w: _rows(x).t().mm(_rows(g)))), "gradcheck"),
    "flipped-sign": (_mutant("S", _bw(fx=lambda g, x, w: -g.matmul(w))), "gradcheck"),
    "bias-grad-averaged": (_mutant("B", _bw(fb=lambda g: _rows(g).mean(0))), "gradcheck"),
    "wrong-order": (_mutant("O", _bw(order=(1, 0, 2))), "gradcheck"),
    "wrong-matrix-in-input-grad": (_mutant("M", _bw(fx=lambda g, x, w: g.matmul(w.t()))), "gradcheck"),
    "jvp-missing-term": (_mutant("J", jvp=_jvp_missing_weight_term), "forward_ad"),
    "detach-in-backward": (_mutant("D", _bw(fx=lambda g, x, w: g.matmul(w.detach()))), "double_backward"),
    "view-on-grad-output": (
        _mutant("V", _bw(fw=lambda g, x, w: g.view(-1, g.shape[-1]).t().mm(_rows(x)))),
        "noncontiguous",
    ),
    "grad-output-modified-in-place": (_mutant("I", _inplace_backward), "grad_output_unmodified"),
}

# A 3-D input so that a permuted grad_output cannot be .view-ed, and a square weight so that a
# transposed or wrong matrix has the right shape and only its values are wrong.
SHAPES = ((2, 3, 4), (4, 4), (4,))


def test_correct_linear_passes_every_check():
    report = verify(GoodLinear.apply, *SHAPES, reference=torch.nn.functional.linear)
    assert report.ok, str(report)
    assert [r.name for r in report.results] == list(DEFAULT_CHECKS) + ["reference"]
    assert not report.notes
    assert report.name == "GoodLinear.apply"


def test_compile_check():
    # Dynamo cannot trace a Function with a custom jvp: reported as unsupported, a failure unless expected.
    report = verify(GoodLinear.apply, *SHAPES, checks=[], compile=True)
    assert report["compile"].status == "unsupported" and "jvp" in report["compile"].detail
    assert verify(GoodLinear.apply, *SHAPES, checks=[], compile=True, expect_unsupported={"compile"}).ok
    # torchderiv's own Functions switch to a jvp-free twin while compiling
    assert verify(TF.linear, *SHAPES, checks=[], compile=True, autocast=True, reference=torch.nn.functional.linear).ok


@pytest.mark.parametrize("name", list(MUTANTS))
def test_each_planted_bug_is_flagged(name):
    cls, check = MUTANTS[name]
    report = verify(cls.apply, *SHAPES)
    assert not report.ok, f"{name} not flagged:\n{report}"
    assert not report[check].ok, f"{name}: expected {check} to fail:\n{report}"
    with pytest.raises(AssertionError, match="verify found problems"):
        report.raise_if_failed()


def test_failure_says_where():
    report = verify(MUTANTS["bias-grad-averaged"][0].apply, *SHAPES)
    row = report["gradcheck"]
    assert row.status == "FAIL" and row.max_error > 1e-3
    assert "input 2" in row.where and "expected" in row.where
    assert "gradcheck" in str(report) and "FAIL" in str(report)


def test_unsupported_jvp_is_reported_and_can_be_expected():
    class NoJvp(GoodLinear):
        jvp = torch.autograd.Function.jvp

    report = verify(NoJvp.apply, *SHAPES)
    assert report["forward_ad"].status == "unsupported" and not report.ok
    report = verify(NoJvp.apply, *SHAPES, expect_unsupported={"forward_ad", "fwd_over_rev"})
    assert report.ok, str(report)


def test_wasted_work_is_a_note_not_a_failure():
    class Unguarded(GoodLinear):
        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g.matmul(w), _rows(g).t().mm(_rows(x)), _rows(g).sum(0)

    report = verify(Unguarded.apply, *SHAPES)
    assert report.ok, str(report)
    assert any("wasted work" in n and "Unguarded input" in n for n in report.notes)


def test_module_is_checked_with_its_parameters_on_a_copy():
    layer = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    report = verify(torch.nn.Sequential(layer, torch.nn.Tanh()), (5, 4))
    assert report.ok, str(report)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == torch.float32


def test_caller_tensors_untouched():
    x = torch.randn(3, 4)
    w = torch.randn(2, 4, requires_grad=True)
    verify(TF.linear, x, w)
    assert x.dtype == torch.float32 and w.grad is None


@pytest.mark.parametrize(
    "fn, inputs",
    [
        (TF.linear, ((2, 3, 4), (5, 4), (5,))),
        (lambda x, w, b: TF.dense(x, w, b, "gelu"), ((2, 3, 4), (5, 4), (5,))),
        (TF.sigmoid, ((3, 4),)),
        (TF.silu, ((3, 4),)),
        (lambda x: TF.cross_entropy(x, torch.tensor([0, 2, 1]), label_smoothing=0.1), ((3, 4),)),
        (TF.binary_cross_entropy_with_logits, ((3, 4), torch.rand(3, 4))),
    ],
    ids=["linear", "dense-gelu", "sigmoid", "silu", "cross_entropy", "bce"],
)
def test_builtins_pass(fn, inputs):
    report = verify(fn, *inputs)
    assert report.ok, str(report)


def test_no_differentiable_input_is_skipped():
    report = verify(lambda t: t * 2, torch.tensor([1, 2]))
    assert report.ok and all(r.status == "skipped" for r in report.results)
    assert math.isfinite(len(report.results))


FlippedSign = MUTANTS["flipped-sign"][0]


def test_check_command_on_user_targets(capsys):
    from torchderiv.check import main

    assert main(["torchderiv.functional.linear:LinearFunction", "--shapes", "3,4 5,4 5"]) == 0
    assert "LinearFunction.apply — ok" in capsys.readouterr().out
    assert main(["test_verify:FlippedSign", "--shapes", "2,3,4 4,4 4"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_command_on_builtins(capsys):
    from torchderiv.check import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "CrossEntropy[probs]" in out and "LinearCrossEntropy" in out and "20 passed, 0 failed" in out


def test_docs_example_prints_what_the_docs_show():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "verify.md").read_text()
    code = re.search(r"```python\n(import torch\nfrom torchderiv.testing import verify\n.*?)```", text, re.S).group(1)
    shown = re.search(r"prints\n\n```\n(.*?)```", text[text.index(code) :], re.S).group(1)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/verify.md", "exec"), {})

    def rows(s):
        # round-off below 1e-6 (double backward's 1e-9, a strided input's 1e-16) differs between machines
        def cell(c):
            try:
                return "~0" if abs(float(c)) < 1e-6 else c
            except ValueError:
                return c

        return [[cell(c) for c in re.split(r"\s{2,}", line.strip())] for line in s.strip().splitlines()]

    assert rows(out.getvalue()) == rows(shown)


def test_readme_examples_run():
    # The README's Python blocks, in order, in one namespace; the private loop gets a model, optimizer and loader.
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    space: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), space)
    exec(compile(blocks[1], "README.md", "exec"), space)
    assert space["ps"].norms.shape == (32,)
    pytest.importorskip("opacus")
    data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,)))
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    space |= {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": torch.utils.data.DataLoader(data, batch_size=16),
    }
    exec(compile(blocks[2], "README.md", "exec"), space)
    space["model"].cleanup()

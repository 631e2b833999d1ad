"""The package's layering, as docs/architecture.md states it: which package may import which, and no module
taking another's underscore names (the internal modules _core, _per_sample and _torch_internals are imported
whole, as modules)."""

import ast
from pathlib import Path

import torchderiv

PACKAGE = Path(torchderiv.__file__).parent

# module (prefix) -> the torchderiv modules (prefixes) it may import; checked in order, first match wins
ALLOWED = [
    # the self-test of the torch internals runs one per_sample context end to end (imported inside the function)
    ("torchderiv.functional._torch_internals", ["torchderiv.functional", "torchderiv.clipping", "torchderiv.nn"]),
    ("torchderiv.functional", ["torchderiv.functional"]),
    ("torchderiv.nn", ["torchderiv.functional", "torchderiv.nn"]),
    ("torchderiv.clipping", ["torchderiv.functional", "torchderiv.nn"]),
    ("torchderiv.privacy", ["torchderiv.functional", "torchderiv.nn", "torchderiv.clipping", "torchderiv.extras"]),
    ("torchderiv.testing", ["torchderiv.functional", "torchderiv.nn"]),
    ("torchderiv.check", ["torchderiv.functional", "torchderiv.nn", "torchderiv.testing"]),
    ("torchderiv.reference", ["torchderiv.functional"]),
    ("torchderiv.extras", []),
    (
        "torchderiv.lightning",
        [
            "torchderiv.functional",
            "torchderiv.nn",
            "torchderiv.clipping",
            "torchderiv.privacy",
            "torchderiv.extras",
            "torchderiv.lightning",
        ],
    ),
    ("torchderiv", ["torchderiv"]),  # the package itself and its command line: anything
]
INTERNAL_MODULES = {"_core", "_per_sample", "_torch_internals", "_lightning_cli"}


def _imports():
    """(module, imported module, names) for every import of a torchderiv module, top level or inside functions."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        module = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("torchderiv"):
                    yield module, target, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("torchderiv"):
                        yield module, alias.name, []


def _violations(imports):
    wrong = []
    for module, target, names in imports:
        allowed = next(a for prefix, a in ALLOWED if module == prefix or module.startswith(prefix + "."))
        for t in [f"{target}.{n}" for n in names] if names else [target]:
            if not any(t == a or t.startswith(a + ".") for a in allowed):
                wrong.append(f"{module} imports {t}")
    return wrong


def test_each_package_imports_only_the_layers_below_it():
    assert _violations(_imports()) == []
    # the check itself: a Function module importing the modules above it is caught
    planted = [
        ("torchderiv.functional.linear", "torchderiv.nn", ["Linear"]),
        ("torchderiv.nn.modules", "torchderiv", ["privacy"]),
    ]
    assert _violations(planted) == [
        "torchderiv.functional.linear imports torchderiv.nn.Linear",
        "torchderiv.nn.modules imports torchderiv.privacy",
    ]


def test_no_module_imports_another_modules_underscore_names():
    wrong = [
        f"{module}: from {target} import {name}"
        for module, target, names in _imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and name not in INTERNAL_MODULES
    ]
    assert wrong == []

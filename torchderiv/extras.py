"""Which optional extra a feature needs, and the error that says so.

torchderiv itself needs only torch: its Functions, modules, ``convert``, ``per_sample`` and ``testing.verify``.
Training from configs needs the ``lightning`` extra, private training Opacus (the ``privacy`` extra); ``all``
installs both.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "missing", "require"]

# extra -> the modules it provides (import names)
EXTRAS = {
    "lightning": ("lightning", "torchmetrics", "sklearn", "matplotlib", "jsonargparse"),
    "privacy": ("opacus",),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """Raise ImportError naming the extra to install unless every module of ``extra`` is importable."""
    absent = missing(extra)
    if absent:
        raise ImportError(
            f"{what} needs the '{extra}' extra ({', '.join(absent)} not installed): "
            f"pip install 'torchderiv[{extra}]' (or 'torchderiv[all]')"
        )

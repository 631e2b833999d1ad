"""Lightning integration: the seed's network or any torch model as a LightningModule, and offline data modules.

Needs the ``lightning`` extra (Lightning, torchmetrics, scikit-learn, matplotlib, jsonargparse):
``pip install 'torchderiv[lightning]'``.
"""

from ..extras import require

require("lightning", "torchderiv.lightning")

from ..privacy import Privacy  # noqa: E402  (after the check: a missing extra gets its message, not a traceback)
from .data import (  # noqa: E402
    ArrayDataModule,
    BreastCancerDataModule,
    DigitsDataModule,
    EpochShuffleSampler,
    StudentDataModule,
)
from .models import DigitsCNN, TokenTransformer  # noqa: E402
from .module import AutogradMLP, MLPModule, ModelModule  # noqa: E402
from .report import RunReport  # noqa: E402

__all__ = [
    "MLPModule",
    "ModelModule",
    "TokenTransformer",
    "DigitsCNN",
    "AutogradMLP",
    "ArrayDataModule",
    "DigitsDataModule",
    "BreastCancerDataModule",
    "StudentDataModule",
    "EpochShuffleSampler",
    "RunReport",
    "Privacy",
]

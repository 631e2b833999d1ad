"""Lightning integration: the seed's network or any torch model as a LightningModule, and offline data modules."""

from .data import ArrayDataModule, BreastCancerDataModule, DigitsDataModule, EpochShuffleSampler, StudentDataModule
from .models import TokenTransformer
from .module import AutogradMLP, MLPModule, ModelModule
from .privacy import Privacy
from .report import RunReport

__all__ = [
    "MLPModule",
    "ModelModule",
    "TokenTransformer",
    "AutogradMLP",
    "ArrayDataModule",
    "DigitsDataModule",
    "BreastCancerDataModule",
    "StudentDataModule",
    "EpochShuffleSampler",
    "RunReport",
    "Privacy",
]

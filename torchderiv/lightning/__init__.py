"""Lightning integration: the seed's network as a LightningModule and offline data modules."""

from .data import ArrayDataModule, BreastCancerDataModule, DigitsDataModule, EpochShuffleSampler, StudentDataModule
from .module import AutogradMLP, MLPModule
from .privacy import Privacy
from .report import RunReport

__all__ = [
    "MLPModule",
    "AutogradMLP",
    "ArrayDataModule",
    "DigitsDataModule",
    "BreastCancerDataModule",
    "StudentDataModule",
    "EpochShuffleSampler",
    "RunReport",
    "Privacy",
]

"""Offline data modules: scikit-learn's bundled digits and breast cancer, and the seed's student example.

Every module scales its features either with statistics of the training split (``preprocessing="standardise"``)
or with fixed constants that depend on no data (``preprocessing="fixed"``: what private training needs, since the
training split's mean and standard deviation are statistics of the private data outside the privacy budget). It
splits deterministically from ``seed`` and shuffles the training set as a function of ``(seed, epoch)`` so that a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = ["ArrayDataModule", "DigitsDataModule", "BreastCancerDataModule", "StudentDataModule", "EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every training epoch (also under DDP, through its
    sampler wrapper), so the order of epoch e is the same whether or not the run was interrupted.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ArrayDataModule(LightningDataModule):
    """Base class: a feature matrix and targets split into train / val / test.

    Args:
        batch_size: samples per training batch (evaluation uses the same).
        num_workers: DataLoader worker processes (0 loads in the main process; the data sets are tiny).
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for the test.
        seed: fixes the split and the shuffling.
        preprocessing: ``standardise`` (each feature centred and scaled by the training split's mean and standard
            deviation) or ``fixed`` (the data set's fixed, data-independent scaling, :meth:`fixed_scaling`;
            needed by private training).
    """

    task: str = "multiclass"
    # False: the features are integer tokens, passed on as they are (long), with no statistics of the data
    standardise: bool = True

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        preprocessing: Literal["standardise", "fixed"] = "standardise",
    ) -> None:
        super().__init__()
        if preprocessing not in ("standardise", "fixed"):
            raise ValueError(f"preprocessing must be 'standardise' or 'fixed', got {preprocessing!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"expected 0 < val_fraction, test_fraction and their sum < 1, got {val_fraction} and {test_fraction}"
            )
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.preprocessing = preprocessing
        self.splits: dict[str, TensorDataset] = {}

    @property
    def uses_training_statistics(self) -> bool:
        """Whether the features are scaled with statistics of the training split (refused by private training)."""
        return self.standardise and self.preprocessing == "standardise"

    def fixed_scaling(self, X: np.ndarray) -> np.ndarray:
        """The features scaled by constants that depend on no data (``preprocessing="fixed"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed scaling; use preprocessing='standardise'")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(X, y)``: features ``(n, d)`` and targets ``(n,)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        X, y = self.load()
        n = len(X)
        order = np.random.default_rng(self.seed).permutation(n)
        n_test, n_val = int(round(n * self.test_fraction)), int(round(n * self.val_fraction))
        parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        if self.uses_training_statistics:
            train = X[parts["train"]].astype(np.float64)
            self.mean = train.mean(0)
            std = train.std(0)
            # A constant feature (digits has pixels that are always 0) is centred and left unscaled: no NaN.
            self.std = np.where(std > 0, std, 1.0)
        target_dtype = torch.long if self.task == "multiclass" else torch.float32
        for name, idx in parts.items():
            if self.uses_training_statistics:
                features = torch.tensor((X[idx] - self.mean) / self.std, dtype=torch.float32)
            elif self.standardise:
                features = torch.tensor(self.fixed_scaling(X[idx].astype(np.float64)), dtype=torch.float32)
            else:
                features = torch.tensor(X[idx], dtype=torch.long)
            self.splits[name] = TensorDataset(features, torch.tensor(y[idx], dtype=target_dtype))

    def _loader(self, name: str, sampler=None) -> DataLoader:
        return DataLoader(
            self.splits[name],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", EpochShuffleSampler(len(self.splits["train"]), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8×8 handwritten digits: 1797 samples, 64 features, 10 classes (bundled, offline).

    Args:
        batch_size, num_workers, val_fraction, test_fraction, seed: as :class:`ArrayDataModule`.
        tokens: give each image as 64 tokens, its pixels' intensities 0–16 (long, row by row), for a sequence model
            (:class:`~torchderiv.lightning.TokenTransformer`); no statistics of the data are used. False: 64
            float features, scaled as ``preprocessing`` says.
        preprocessing: ``standardise`` (the training split's mean and standard deviation) or ``fixed``: each pixel's
            intensity divided by 16, its largest value, into [0, 1].
    """

    task = "multiclass"

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        tokens: bool = False,
        preprocessing: Literal["standardise", "fixed"] = "standardise",
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, test_fraction, seed, preprocessing)
        self.tokens = tokens
        self.standardise = not tokens

    def fixed_scaling(self, X):
        return X / 16.0

    def load(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.data, data.target


class BreastCancerDataModule(ArrayDataModule):
    """scikit-learn's Wisconsin breast cancer set: 569 samples, 30 features, binary (the seed's one output).

    ``preprocessing="fixed"`` divides each feature by its measurement's unit, a power of ten fixed once from what
    the measurement is, not computed from the data: radius and texture 10, perimeter 100, area 1000, the six shape
    ratios (smoothness, compactness, concavity, concave points, symmetry, fractal dimension) 0.1; the "error"
    columns (standard errors) by a tenth of that, the "worst" columns as the "mean" ones. Most values then lie
    within [0, 5] (the largest, one image's concavity error, is 40).
    """

    task = "binary"
    UNITS = np.array([10.0, 10.0, 100.0, 1000.0] + [0.1] * 6)

    def fixed_scaling(self, X):
        return X / np.concatenate([self.UNITS, self.UNITS / 10, self.UNITS])

    def load(self):
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        return data.data, data.target


class StudentDataModule(ArrayDataModule):
    """The seed's §1 example, generated: will a student get an A?

    Generative model (all draws from ``numpy.random.default_rng(data_seed)``), for each student:

    * two latent factors, *innate intelligence* ``I ~ N(0, 1)`` and *physical health* ``P ~ N(0, 1)``;
    * features that load on one factor each, plus noise:
      ``GPA = clip(3.0 + 0.45 I + N(0, 0.25²), 0, 4)``, ``IQ = 100 + 12 I + N(0, 6²)``,
      ``BMI = 23 − 2.5 P + N(0, 1.5²)``, ``sleep = 7 + 0.8 P + N(0, 0.6²)`` (hours);
    * the label "gets an A" ``~ Bernoulli(σ(2.0 I + 1.2 P − 0.3))``.

    Feature order: GPA, IQ, BMI, sleep. A network that learns the task should find hidden units
    that combine GPA with IQ and BMI with sleep — the "more-complex features" the seed describes.

    Args:
        n_samples: number of students.
        data_seed: seed of the generator (the split and shuffling use ``seed``).
        preprocessing: ``standardise`` or ``fixed``: each feature centred and scaled by its generative model's
            constants (GPA 3 ± 0.5, IQ 100 ± 13.4, BMI 23 ± 2.9, sleep 7 ± 1).
    """

    task = "binary"
    FEATURES = ("gpa", "iq", "bmi", "sleep")

    def __init__(
        self,
        n_samples: int = 2000,
        data_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        preprocessing: Literal["standardise", "fixed"] = "standardise",
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, test_fraction, seed, preprocessing)
        self.n_samples, self.data_seed = n_samples, data_seed

    def fixed_scaling(self, X):
        # the generative model's own centres and spreads (a property of the code above, not of the draws)
        centre = np.array([3.0, 100.0, 23.0, 7.0])
        spread = np.array([0.5, 13.4, 2.9, 1.0])
        return (X - centre) / spread

    def load(self):
        return generate_students(self.n_samples, self.data_seed)


def generate_students(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, 4)`` = GPA, IQ, BMI, sleep and labels ``(n,)`` from :class:`StudentDataModule`'s model."""
    rng = np.random.default_rng(seed)
    intelligence = rng.standard_normal(n)
    health = rng.standard_normal(n)
    gpa = np.clip(3.0 + 0.45 * intelligence + rng.normal(0, 0.25, n), 0.0, 4.0)
    iq = 100 + 12 * intelligence + rng.normal(0, 6, n)
    bmi = 23 - 2.5 * health + rng.normal(0, 1.5, n)
    sleep = 7 + 0.8 * health + rng.normal(0, 0.6, n)
    logit = 2.0 * intelligence + 1.2 * health - 0.3
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return np.stack([gpa, iq, bmi, sleep], axis=1), label

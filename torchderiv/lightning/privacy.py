"""Differentially private training for :class:`~torchderiv.lightning.MLPModule` (DP-SGD, DESIGN §9).

torchderiv clips each example's gradient inside its own backward (:func:`torchderiv.per_sample`);
everything else is Opacus's, unchanged: the noise and the division by the expected batch size
(``DPOptimizerFastGradientClipping``), Poisson sampling (``DPDataLoader``), the privacy accountant
(RDP or PRV) and solving σ for a target ε (``get_noise_multiplier``). Opacus is imported here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Privacy", "PrivateTraining"]


@dataclass
class Privacy:
    """The ``model.privacy:`` block of a config.

    Args:
        noise_multiplier: σ, the noise's standard deviation in units of ``max_grad_norm``. Give this **or**
            ``target_epsilon``.
        target_epsilon: the ε to reach after ``trainer.max_epochs`` epochs; σ is solved for it (Opacus).
        max_grad_norm: C, each example's gradient is clipped to this L2 norm.
        delta: δ of (ε, δ)-DP; keep it below 1 / (number of training examples).
        accountant: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables: tighter ε).
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy: give exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}"
            )
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"privacy: noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"privacy: target_epsilon must be > 0, got {self.target_epsilon}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy: max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy: delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"privacy: accountant must be 'rdp' or 'prv', got {self.accountant!r}")


class PrivateTraining:
    """What a private run holds: the accountant, σ, the sampling rate and the expected batch size.

    Built when fit starts (the sampling rate needs the training set's size); its accountant's history
    goes into every checkpoint and comes back on resume, so ε after a resumed run equals ε after an
    uninterrupted one.
    """

    def __init__(self, config: Privacy) -> None:
        from opacus.accountants import create_accountant

        self.config = config
        self.accountant = create_accountant(config.accountant)
        self.sample_rate: float | None = None
        self.expected_batch_size: int | None = None
        self.noise_multiplier: float | None = config.noise_multiplier

    def prepare(self, train_loader, epochs: int):
        """Poisson sampling over ``train_loader``'s data set; σ (solved if a target ε was given)."""
        from opacus.data_loader import DPDataLoader

        loader = DPDataLoader.from_data_loader(train_loader)
        self.sample_rate = loader.sample_rate
        # Opacus's own choice (make_private): the mean's divisor is the expected batch size
        self.expected_batch_size = int(len(train_loader.dataset) * self.sample_rate)
        if self.config.target_epsilon is not None:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.config.target_epsilon,
                target_delta=self.config.delta,
                sample_rate=self.sample_rate,
                epochs=epochs,
                accountant=self.config.accountant,
            )
        return loader

    def optimizer(self, optimizer):
        """Opacus's optimizer for a ``.grad`` that already holds the clipped sum; its steps are accounted."""
        from opacus.optimizers import DPOptimizerFastGradientClipping

        if self.sample_rate is None:
            raise RuntimeError("privacy: the training data must be prepared (Poisson sampling) before the optimizer")
        dp = DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
        )
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return dp

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.config.delta))

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier = state["noise_multiplier"]

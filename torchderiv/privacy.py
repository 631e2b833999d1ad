"""DP-SGD with torchderiv's clipping and Opacus's everything else (docs/derivation.md, § per-example gradients).

torchderiv clips each example's gradient inside its own backward (:func:`torchderiv.per_sample`);
the rest is Opacus's, unchanged: the noise and the division by the expected batch size
(``DPOptimizerFastGradientClipping``, or its distributed twin that adds the noise once and all-reduces),
Poisson sampling (``DPDataLoader``), the privacy accountant (RDP or PRV) and solving σ for a target ε
(``get_noise_multiplier``). Opacus is imported lazily, by the functions that need it, and only here.

Two pieces serve both your own loop and :class:`~torchderiv.lightning.MLPModule`:

- :func:`private_optimizer` wraps an optimizer in Opacus's optimizer after checking it is over exactly the
  model's trainable parameters, and refuses at ``step()`` a gradient that was not clipped by ``per_sample``
  with the optimizer's own ``max_grad_norm`` and ``loss_reduction`` (the noise is calibrated to them);
- :class:`PrivateTraining` holds what a private run needs across steps and checkpoints: the accountant,
  σ, the sampling rate, and the random streams of the sampling and the noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from . import extras
from .clipping import check_model, per_sample
from .functional import _per_sample, _torch_internals

__all__ = ["Privacy", "PrivateTraining", "private_optimizer", "derived_seed", "PrivacyEngine", "PrivateModule"]


def derived_seed(stream: str) -> int:
    """A seed for one random stream of a private run, fixed by torch's initial seed (``seed_everything``).

    Not drawn from torch's default generator: how much of it is consumed before training differs between
    one process and DDP, and the streams must not depend on that (a DDP run then samples the same batches
    and draws the same noise as a single-process run with the same seed). Each stream gets its own seed,
    none equal to the initial one (whose numbers initialised the weights).
    """
    seed = torch.initial_seed()
    for byte in stream.encode():
        seed = (seed * 6364136223846793005 + 1442695040888963407 + byte) % 2**63
    return seed


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


# --- the optimizer: Opacus's, checked against the model and the clipping ----------------------------------


def private_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    loss_reduction: str = "mean",
    generator: torch.Generator | None = None,
    distributed: bool = False,
    batch_first: bool = True,
):
    """Opacus's ``DPOptimizerFastGradientClipping`` over ``optimizer``, for a ``.grad`` clipped by torchderiv.

    ``step()`` adds ``N(0, σ²C²)`` to the clipped sum once and divides by ``expected_batch_size`` (for
    "mean"), as Opacus does; with ``distributed=True`` (DDP) Opacus's distributed twin adds the noise on
    rank 0 only and all-reduces, and ``expected_batch_size`` is this process's share.

    Refused with a clear error, before training: an optimizer that is not over exactly the trainable
    parameters of ``model``, and a model with parameters :func:`~torchderiv.per_sample` cannot compute.
    Refused at ``step()``: a gradient that did not come from a backward inside
    ``per_sample(model, max_norm=max_grad_norm, loss_reduction=loss_reduction, clipped_sum=True)``, or was
    changed since — the noise is calibrated to exactly that clipping. ``optimizer.clipping()`` returns that
    context.

    Args:
        model: the torchderiv model (or converted model) whose examples are clipped.
        optimizer: any torch optimizer over ``model``'s trainable parameters.
        noise_multiplier: σ. max_grad_norm: C. loss_reduction: ``"mean"`` or ``"sum"``, as the loss.
        expected_batch_size: the Poisson sampler's expected batch size (per process under DDP).
        generator: the noise's random stream (keep it to checkpoint it); torch's default one if None.
        batch_first: where the examples are, as :func:`~torchderiv.per_sample` takes it (False: sequence-first
            inputs ``(T, B, …)``); ``optimizer.clipping()`` passes it on.
    """
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"privacy: expected loss_reduction 'mean' or 'sum', got {loss_reduction!r}")
    tracked = check_model(model)
    names = {id(p): name for p, name in tracked.values()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                known = {id(q): n for n, q in model.named_parameters()}
                what = f"parameter {known[id(p)]} of the model, which is frozen" if id(p) in known else "a tensor"
                raise ValueError(
                    f"privacy: the optimizer holds {what} of shape {tuple(p.shape)} that is not a trainable "
                    f"parameter of the model: its gradient would not be clipped; build the optimizer over "
                    f"model.parameters()"
                )
            seen.add(id(p))
    missing = [name for pid, name in names.items() if pid not in seen]
    if missing:
        raise ValueError(
            f"privacy: the optimizer does not hold the model's trainable parameter(s) {', '.join(missing)}; "
            f"build it over model.parameters() (or freeze them with requires_grad_(False))"
        )
    cls = _optimizer_class(distributed)
    opt = cls(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
        generator=generator,
    )
    opt._torchderiv_model = model
    opt._torchderiv_batch_first = batch_first
    opt._torchderiv_names = names
    return opt


_CLASSES: dict = {}


def _optimizer_class(distributed: bool):
    """Opacus's optimizer class with the clipping check before its step (built once, on first use)."""
    if distributed not in _CLASSES:
        extras.require("privacy", "private_optimizer")
        if distributed:
            from opacus.optimizers import DistributedDPOptimizerFastGradientClipping as base
        else:
            from opacus.optimizers import DPOptimizerFastGradientClipping as base

        class Checked(base):
            def clipping(self, loss_scale=None):
                """The per_sample context whose clipping this optimizer's noise is calibrated to; ``loss_scale``:
                a GradScaler (or S) when the loss is scaled, then step through ``scaler.step(optimizer)``."""
                return per_sample(
                    self._torchderiv_model,
                    max_norm=self.max_grad_norm,
                    loss_reduction=self.loss_reduction,
                    clipped_sum=True,
                    loss_scale=loss_scale,
                    batch_first=self._torchderiv_batch_first,
                )

            def accumulate(self):
                # Opacus's own, with a clone where it deep-copies each .grad (0.14 ms a step for a 2-layer MLP,
                # a tenth of a private step's cost over a plain one on digits; the same tensor either way).
                for p in self.params:
                    if p.summed_grad is not None:
                        p.summed_grad.add_(p.grad)
                    else:
                        p.summed_grad = p.grad.detach().clone()

            def pre_step(self, closure=None):
                for p in self.params:
                    _check_clipped(p, self._torchderiv_names[id(p)], self.max_grad_norm, self.loss_reduction)
                return super().pre_step(closure)

        Checked.__name__ = Checked.__qualname__ = f"Checked{base.__name__}"
        _CLASSES[distributed] = Checked
    return _CLASSES[distributed]


def _check_clipped(p: torch.Tensor, name: str, max_grad_norm: float, loss_reduction: str) -> None:
    stamp = getattr(p, _per_sample.CLIP_STAMP, None)
    how = (
        f"run loss.backward() inside torchderiv.per_sample(model, max_norm={max_grad_norm}, "
        f"loss_reduction={loss_reduction!r}, clipped_sum=True) (optimizer.clipping() gives it)"
    )
    if p.grad is None:
        raise RuntimeError(f"privacy: parameter {name} has no gradient at step(); {how}")
    if stamp is None or stamp.grad() is not p.grad or stamp.version != _torch_internals.version(p.grad):
        raise RuntimeError(
            f"privacy: the gradient of parameter {name} was not made by a clipped backward (or was changed "
            f"after it), so the noise would not cover it; {how}"
        )
    if stamp.max_norm != max_grad_norm or stamp.loss_reduction != loss_reduction or not stamp.clipped_sum:
        raise RuntimeError(
            f"privacy: parameter {name} was clipped with max_norm={stamp.max_norm}, "
            f"loss_reduction={stamp.loss_reduction!r}, clipped_sum={stamp.clipped_sum}, but the optimizer adds "
            f"noise for max_grad_norm={max_grad_norm}, loss_reduction={loss_reduction!r} on a clipped sum; {how}"
        )


# --- a private run: accountant, σ, sampling, random streams --------------------------------------------------


class PoissonShare:
    """This process's share of each Poisson batch: every example on one process; under DDP the i-th of
    every ``world`` examples.

    Every process draws the same Poisson batch over the whole training set (Opacus's sampler, one seed for
    all): the union of the shares is exactly the single-process batch, empty ones included, and every
    process takes the same number of steps. The sampling stream feeds the masks and nothing else (a
    DataLoader would also draw each iterator's base seed from it, so the batches would depend on how often
    the trainer calls ``iter``). Not a ``DataLoader``, so Lightning does not swap its sampler.
    """

    def __init__(self, loader, rank: int = 0, world: int = 1) -> None:
        from torch.utils.data import DataLoader

        self.dp_loader = loader
        self.sample_rate = loader.sample_rate
        self.dataset = loader.dataset
        self._loader = DataLoader(
            loader.dataset,
            batch_sampler=_Slices(loader.batch_sampler, rank, world),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )

    def __iter__(self):
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self.dp_loader)


class _Slices:
    def __init__(self, batch_sampler, rank: int, world: int) -> None:
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __iter__(self):
        for batch in self.batch_sampler:
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batch_sampler)


class PrivateTraining:
    """What a private run holds: the accountant, σ, the sampling rate, the expected batch size, and the
    random streams of the Poisson sampling and of the noise.

    Built when fit starts (the sampling rate needs the training set's size). Everything that decides the
    rest of the run goes into each checkpoint and comes back on resume — the accountant's history (ε after
    a resumed run equals ε after an uninterrupted one) and the two random streams (a resumed run draws new
    batches and new noise rather than replaying the first epochs': repeated noise is not accounted for).
    """

    def __init__(self, config: Privacy) -> None:
        extras.require("privacy", "private training")
        from opacus.accountants import create_accountant

        self.config = config
        self.accountant = create_accountant(config.accountant)
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.noise_multiplier: float | None = config.noise_multiplier
        self.sampling_generator: torch.Generator | None = None
        self.noise_generator: torch.Generator | None = None
        self.world_size = 1
        self._pending: dict = {}
        self._rdp_curves: dict = {}  # (σ, q) -> the RDP of one step at each order (see epsilon)

    def prepare(self, train_loader, epochs: int, *, seed: int | None = None, rank: int = 0, world_size: int = 1):
        """Poisson sampling over ``train_loader``'s data set (this process's share of it under DDP); σ
        (solved if a target ε was given). ``seed`` seeds the sampling stream (the same on every process);
        :func:`derived_seed` if None."""
        from opacus.data_loader import DPDataLoader

        if seed is None:
            seed = derived_seed("sampling")
        self.sampling_generator = torch.Generator().manual_seed(seed)
        if "sampling_rng" in self._pending:
            self.sampling_generator.set_state(self._pending.pop("sampling_rng"))
        loader = DPDataLoader.from_data_loader(train_loader, generator=self.sampling_generator)
        self.sample_rate = loader.sample_rate
        self.world_size = world_size
        # Opacus's own choice (make_private): the mean's divisor is the expected batch size, per process
        self.expected_batch_size = int(len(train_loader.dataset) * self.sample_rate) / world_size
        if self.config.target_epsilon is not None:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.config.target_epsilon,
                target_delta=self.config.delta,
                sample_rate=self.sample_rate,
                epochs=epochs,
                accountant=self.config.accountant,
            )
        return PoissonShare(loader, rank, world_size)

    def optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """:func:`private_optimizer` with this run's σ, C, expected batch size and noise stream; its steps
        are accounted."""
        if self.sample_rate is None:
            raise RuntimeError("privacy: the training data must be prepared (Poisson sampling) before the optimizer")
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        self.noise_generator = torch.Generator(device=device)
        self.noise_generator.manual_seed(derived_seed("noise"))
        if "noise_rng" in self._pending:
            self.noise_generator.set_state(self._pending.pop("noise_rng"))
        dp = private_optimizer(
            model,
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self.noise_generator,
            distributed=self.world_size > 1,
        )
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return dp

    def epsilon(self) -> float:
        """ε spent so far at the configured δ: the accountant's own number.

        For RDP it is computed here from Opacus's analysis functions, exactly as the accountant's
        ``get_epsilon`` does, except that each (σ, q)'s one-step RDP curve is kept: the RDP of n steps is n
        times it (what ``compute_rdp`` itself returns), and the curve took ~30 ms to compute, a fifth of a
        digits epoch, each time ε was logged.
        """
        history = self.accountant.history
        if not history:
            return 0.0
        if self.config.accountant != "rdp":
            return float(self.accountant.get_epsilon(delta=self.config.delta))
        from opacus.accountants.analysis import rdp as analysis

        alphas = self.accountant.DEFAULT_ALPHAS
        curves = self._rdp_curves
        for sigma, q, _ in history:
            if (sigma, q) not in curves:
                curves[sigma, q] = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=alphas)
        rdp = sum([curves[sigma, q] * steps for sigma, q, steps in history])
        eps, _ = analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=self.config.delta)
        return float(eps)

    def spent(self) -> dict:
        """What the run has spent, with everything needed to state it: ε at δ, the accountant, σ, C, the
        sampling (Poisson, its rate and expected batch size) and the number of noisy steps taken."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.config.delta,
            "accountant": self.config.accountant,
            "noise_multiplier": None if self.noise_multiplier is None else float(self.noise_multiplier),
            "max_grad_norm": self.config.max_grad_norm,
            "sampling": "poisson",
            "sample_rate": self.sample_rate,
            "expected_batch_size": None
            if self.expected_batch_size is None
            else self.expected_batch_size * self.world_size,
            "steps": int(sum(steps for _, _, steps in self.accountant.history)),
        }

    def state_dict(self) -> dict:
        state = {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier}
        for key, gen in (("sampling_rng", self.sampling_generator), ("noise_rng", self.noise_generator)):
            if gen is not None:
                state[key] = gen.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier = state["noise_multiplier"]
        for key, gen in (("sampling_rng", self.sampling_generator), ("noise_rng", self.noise_generator)):
            if key in state:
                if gen is None:
                    self._pending[key] = state[key]  # applied when the stream is made
                else:
                    gen.set_state(state[key])


# --- Opacus's PrivacyEngine, one import away ------------------------------------------------------------------


class PrivateModule(nn.Module):
    """What :meth:`PrivacyEngine.make_private` returns for the model (Opacus's ``GradSampleModule``'s place): the
    converted model as ``_module`` (so ``state_dict`` keys carry ``_module.``, as Opacus's), whose forward opens the
    optimizer's clipping context if none is open. The context then stays open, as Opacus's hooks stay attached,
    so that every ``loss.backward()`` of the training loop clips each example; :meth:`cleanup` closes it."""

    def __init__(self, module: nn.Module, optimizer) -> None:
        super().__init__()
        self._module = module
        self._optimizer = [optimizer]  # in a list: not a submodule, not in state_dict
        self._context = None

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self._context is None:
            if _per_sample.current is not None:
                raise RuntimeError(
                    "privacy: another torchderiv.per_sample context is open; the private model opens its own "
                    "(close the other first)"
                )
            self._context = self._optimizer[0].clipping()
            self._context.__enter__()
        return self._module(*args, **kwargs)

    def cleanup(self) -> None:
        """Close the clipping context (Opacus's ``GradSampleModule`` removes its hooks the same way)."""
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


class PrivacyEngine:
    """Opacus 1.6's ``PrivacyEngine`` (same constructor, ``make_private``, ``make_private_with_epsilon`` and
    ``get_epsilon`` arguments and return values) with torchderiv's one-pass clipping in place of Opacus's
    per-sample gradient hooks. An Opacus training loop runs with only the import changed::

        from torchderiv.privacy import PrivacyEngine   # instead of: from opacus import PrivacyEngine

    ``make_private`` converts the model in place (:func:`torchderiv.convert`; the report is logged), refuses one
    that :func:`torchderiv.per_sample` cannot clip (one error naming every part), and wraps Opacus's optimizer
    (noise, expected batch size), accountant and Poisson sampler around it. Not supported (refused, naming the
    argument): ``clipping`` other than ``"flat"`` (and per-layer norm lists), ``secure_mode``, ``rand_on_empty``,
    ``wrap_model=False`` and a ``DistributedDataParallel`` module (use :func:`private_optimizer` with
    ``distributed=True``). ``grad_sample_mode`` is accepted for compatibility: every mode clips in torchderiv's
    single backward; for the ghost modes the criterion is returned unchanged, as the fourth item Opacus returns.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        extras.require("privacy", "PrivacyEngine")
        from opacus.accountants import create_accountant

        if secure_mode:
            raise NotImplementedError(
                "PrivacyEngine: secure_mode (a cryptographically secure generator) is not supported"
            )
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=None,
        data_loader,
        noise_multiplier: float,
        max_grad_norm: float,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        **kwargs,
    ):
        """Opacus's ``make_private``: returns ``(module, optimizer, data_loader)``, or ``(module, optimizer,
        criterion, data_loader)`` for a ``grad_sample_mode`` containing "ghost"."""
        from torch.nn.parallel import DistributedDataParallel

        from .nn import convert

        refused = [
            what
            for what, bad in (
                (f"clipping={clipping!r} (only 'flat')", clipping != "flat"),
                ("a list of max_grad_norm (per-layer clipping)", isinstance(max_grad_norm, (list, tuple))),
                ("rand_on_empty=True", rand_on_empty),
                ("wrap_model=False", not wrap_model),
                ("a DistributedDataParallel module", isinstance(module, DistributedDataParallel)),
                (f"arguments {sorted(kwargs)}", bool(kwargs)),
            )
            if bad
        ]
        if refused:
            raise NotImplementedError(f"PrivacyEngine.make_private: not supported: {'; '.join(refused)}")
        model_params = {id(p) for p in module.parameters()}
        if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("Module parameters are different than optimizer Parameters")
        convert(module)
        if poisson_sampling:
            from opacus.data_loader import DPDataLoader

            data_loader = DPDataLoader.from_data_loader(data_loader)
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        dp = private_optimizer(
            module,
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            batch_first=batch_first,
        )
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        wrapped = PrivateModule(module, dp)
        if "ghost" in grad_sample_mode:
            return wrapped, dp, (nn.CrossEntropyLoss() if criterion is None else criterion), data_loader
        return wrapped, dp, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=None,
        data_loader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        **kwargs,
    ):
        """Opacus's ``make_private_with_epsilon``: σ solved so that ``epochs`` spend ``target_epsilon`` at
        ``target_delta`` (with this engine's accountant), then :meth:`make_private`."""
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=1 / len(data_loader),
            epochs=epochs,
            accountant=self.accountant.mechanism(),
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``: the accountant's."""
        return self.accountant.get_epsilon(delta=delta)

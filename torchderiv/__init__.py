"""torchderiv: backpropagation made explicit.

Every dense layer, activation and loss is a ``torch.autograd.Function`` whose backward and jvp are
the hand-derived formulas of the derivation in ``docs/derivation.md``.
"""

from . import functional, nn, privacy
from .clipping import PerSample, per_sample
from .nn.convert import convert

__version__ = "0.1.0"
__all__ = ["functional", "nn", "privacy", "convert", "per_sample", "PerSample", "__version__"]

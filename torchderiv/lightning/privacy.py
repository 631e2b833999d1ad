"""The ``privacy:`` block of :class:`~torchderiv.lightning.MLPModule`; the machinery is :mod:`torchderiv.privacy`."""

from ..privacy import Privacy, PrivateTraining

__all__ = ["Privacy", "PrivateTraining"]

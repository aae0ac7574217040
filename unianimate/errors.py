"""Errors of the UniAnimate package; each message says what is wrong and what to do."""
from __future__ import annotations

from ..adapter.errors import CheckpointError, IDAnimatorError

__all__ = ["CheckpointError", "UniAnimateInputError"]


class UniAnimateInputError(IDAnimatorError, ValueError):
    """Inputs the UniAnimate UNet cannot take: wrong shapes, sizes, or condition combinations."""

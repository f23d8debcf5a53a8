"""What counts as a usable input text: one definition for Serve, the Predictor and scoring.

A usable text is a string with at least one non-space character. Anything else (null, empty,
blank, a number, bytes) is never scored or trained on: Serve answers 422, the Predictor returns
label None and score NaN for the row, scoring and training quarantine it with `UNUSABLE_REASON`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["UNUSABLE_REASON", "is_usable_text", "usable_mask"]

UNUSABLE_REASON = "text is null, empty, blank or not a string"


def is_usable_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def usable_mask(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Boolean mask of the usable texts in `values`."""
    return np.fromiter((is_usable_text(v) for v in values), dtype=bool, count=len(values))

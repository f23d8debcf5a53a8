"""What counts as a usable input text: one definition for Serve, the Predictor and scoring.

A usable text is a string with at least one non-space character that is valid Unicode (a lone
surrogate such as "\ud800" cannot be encoded, so no tokenizer takes it). Anything else (null,
empty, blank, not encodable, a number, bytes) is never scored or trained on: Serve answers 422,
the Predictor returns label None and score NaN for the row, scoring and training quarantine it
with `UNUSABLE_REASON`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["UNUSABLE_REASON", "is_usable_text", "usable_mask"]

UNUSABLE_REASON = "text is null, empty, blank, not valid Unicode or not a string"


def is_usable_text(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip():
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def usable_mask(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Boolean mask of the usable texts in `values`."""
    return np.fromiter((is_usable_text(v) for v in values), dtype=bool, count=len(values))

"""What counts as a usable text: one definition for Serve, the Predictor, scoring and training."""

from __future__ import annotations

import numpy as np
import pytest

from serving.text import is_usable_text, usable_mask


@pytest.mark.parametrize(
    ("value", "usable"),
    [
        ("card lost", True),
        ("  où est ma carte  ", True),
        ("emoji 💳", True),
        ("", False),
        ("   \n\t", False),
        (None, False),
        (3, False),
        (b"bytes", False),
        ("lone surrogate \ud800", False),  # not encodable: tokenizers raise on it
    ],
)
def test_is_usable_text(value, usable):
    assert is_usable_text(value) is usable


def test_usable_mask_over_an_object_array():
    values = np.array(["ok", None, " ", "\udfff"], dtype=object)
    assert usable_mask(values).tolist() == [True, False, False, False]

"""Small datasets shipped with raylift for the demo, as scikit-learn ships its own.

BANKING77 (training split): Casanueva et al., "Efficient Intent Detection with Dual Sentence
Encoders", NLP4ConvAI @ ACL 2020 (arXiv:2003.04807). Licence: CC BY 4.0; see banking77/README.md.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["banking77_categories", "banking77_path"]

_HERE = Path(__file__).resolve().parent


def banking77_path() -> Path:
    """The packaged BANKING77 training split (columns text, category)."""
    return _HERE / "banking77" / "train.csv"


def banking77_categories() -> list[str]:
    import json

    return json.loads((_HERE / "banking77" / "categories.json").read_text())

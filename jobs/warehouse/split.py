"""The stratified validation split, decided per row from (seed, key): no shuffle, no pandas.

A row's side depends only on its key, the seed and its class's threshold, so every batch, worker
and process agrees on it, and the same snapshot and seed always give the same split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["SplitFilter", "key_hash", "split_thresholds"]

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # A bijection on uint64 with full avalanche; uint64 arrays wrap, which is the intent.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_hash(keys: np.ndarray, seed: int) -> np.ndarray:
    """A 63-bit hash of each (seed, key) as non-negative int64, identical in every process.

    Distinct keys get distinct 64-bit states (an odd multiplier is a bijection), so the split
    of a row depends only on its key and the seed, never on which batch or worker sees it.
    """
    keys = np.asarray(keys)
    if keys.dtype.kind not in "iu":
        raise ValueError(f"split keys must be integers, got dtype {keys.dtype}")
    salt = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        state = salt + (keys.astype(np.int64).view(np.uint64) + np.uint64(1)) * _GOLDEN
        return (_splitmix64(state) >> np.uint64(1)).astype(np.int64)


def split_thresholds(
    keys: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> dict[str, int]:
    """Per label, the hash below which a row is held out for validation.

    Exactly round(fraction * n) rows of a class of n rows have key_hash < threshold: at least
    one when n >= 2 (every class is evaluated), none when n == 1, never all of them (every
    class is trained on). Labels are keyed by str(label).
    """
    keys = np.asarray(keys)
    labels = np.asarray(labels).astype(str)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("the key column has duplicate values; keys must be unique per row")
    hashes = key_hash(keys, seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.lexsort((hashes, inverse))  # by class, then by hash
    starts = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
    thresholds = {}
    for i, label in enumerate(classes):
        ranked = hashes[order[starts[i] : starts[i + 1]]]
        thresholds[str(label)] = _class_threshold(ranked, fraction)
    return thresholds


def _class_threshold(ranked: np.ndarray, fraction: float) -> int:
    n = len(ranked)
    held_out = 0 if n < 2 else min(max(1, round(fraction * n)), n - 1)
    if held_out == 0:
        return 0  # every hash is >= 0
    if ranked[held_out - 1] == ranked[held_out]:
        raise ValueError("63-bit hash collision at a split boundary; pick another split seed")
    return int(ranked[held_out])


@dataclass(frozen=True)
class SplitFilter:
    """Keeps one side of the split: `ds.map_batches(SplitFilter(...), batch_format="pyarrow")`.

    A plain picklable object, so Ray runs it as a stateless task fused with the read; each
    batch is decided on its own (vectorised over its rows), so any batching gives the same rows.
    """

    thresholds: Mapping[str, int]
    key_column: str
    label_column: str
    keep: Literal["train", "validation"]
    seed: int

    def __post_init__(self) -> None:
        if self.keep not in ("train", "validation"):
            raise ValueError(f"keep={self.keep!r}; use 'train' or 'validation'")

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch[self.key_column]
        if keys.null_count:
            raise ValueError(f"key column {self.key_column!r} has null values; fix or filter them")
        return batch.filter(pa.array(self.mask(keys.to_numpy(), batch[self.label_column])))

    def mask(self, keys: np.ndarray, labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """True for the rows this filter keeps."""
        if isinstance(labels, pa.ChunkedArray):
            labels = labels.combine_chunks()
        encoded = pc.dictionary_encode(labels.cast(pa.string()))
        unknown = [v for v in encoded.dictionary.to_pylist() if v not in self.thresholds]
        if unknown or encoded.null_count:
            raise ValueError(
                f"label(s) {unknown or [None]} in {self.label_column!r} are not in the split "
                "thresholds; compute them from the same table snapshot the batches come from"
            )
        per_label = [self.thresholds[v] for v in encoded.dictionary.to_pylist()]
        threshold = np.array(per_label, dtype=np.int64)[encoded.indices.to_numpy()]
        held_out = key_hash(keys, self.seed) < threshold
        return held_out if self.keep == "validation" else ~held_out

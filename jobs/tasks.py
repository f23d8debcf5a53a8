"""Tasks: what a model predicts, as a small object of functions (no inheritance).

A task knows which Hugging Face head to build, how a warehouse row becomes training tensors, the
metrics it reports, and how logits become an answer. Tasks are registered by name and checked at
registration; a failed lookup lists the known names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Task", "get_task", "register_task", "task_names"]


@dataclass(frozen=True)
class Task:
    name: str
    auto_model: str  # transformers Auto* class that builds the head
    peft_task_type: str  # peft.TaskType member name
    target_ids: Callable[[np.ndarray, dict[str, int]], np.ndarray]
    metrics: Callable[[np.ndarray], dict[str, float]]  # from the all-reduced confusion matrix
    postprocess: Callable[[np.ndarray, list[str]], tuple[np.ndarray, np.ndarray]]


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    import peft
    import transformers

    if not hasattr(transformers, task.auto_model):
        raise ValueError(f"task {task.name!r}: transformers has no {task.auto_model}")
    if not hasattr(peft.TaskType, task.peft_task_type):
        raise ValueError(f"task {task.name!r}: peft.TaskType has no {task.peft_task_type}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}") from None


def task_names() -> list[str]:
    return sorted(_TASKS)


def _label_ids(values: np.ndarray, label_to_id: dict[str, int]) -> np.ndarray:
    try:
        return np.fromiter((label_to_id[str(v)] for v in values), dtype=np.int64, count=len(values))
    except KeyError as exc:
        raise ValueError(
            f"label {exc.args[0]!r} is not in the label map; known labels: "
            f"{', '.join(list(label_to_id)[:10])}..."
        ) from None


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction)."""
    confusion = confusion.astype(np.float64)
    total = confusion.sum()
    true_pos = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    present = actual > 0  # classes absent from this split do not count toward the macro mean
    denom = predicted + actual
    f1 = np.divide(2 * true_pos, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def _softmax_top1(logits: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    logits = logits.astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    top = probs.argmax(axis=-1)
    return np.asarray(labels, dtype=object)[top], probs[np.arange(len(top)), top]


SEQUENCE_CLASSIFICATION = register_task(
    Task(
        name="sequence-classification",
        auto_model="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS",
        target_ids=_label_ids,
        metrics=classification_metrics,
        postprocess=_softmax_top1,
    )
)

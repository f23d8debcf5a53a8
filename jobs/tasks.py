"""Tasks: what a model predicts, as a small object of functions (no inheritance).

A task knows which Hugging Face head to build and what its head modules are called, how a
warehouse row becomes training tensors, how evaluation accumulates over batches and turns into
metrics, and how logits become an answer. Tasks are registered by name and checked at
registration; a failed lookup lists the known names.

Evaluation is split so the train loop can stay task-agnostic across workers: `eval_state(n)`
makes a float64 tensor, `accumulate(state, logits, targets)` adds one batch to it in place, the
loop all-reduces it (a sum), and `metrics(state.numpy())` reads the summed state.

Two flags set a task's shape. `generative`: the model writes text (causal-lm); there is no
label set, the targets are the response tokens (jobs.instruct masks the prompt), `targets` in
`accumulate` are per-token labels (-100: not scored; the loop also passes `loss=`, the model's
own mean loss of the batch, where that is the mean NLL of those tokens), and answers come from
generation, not `postprocess`. `new_head`: the head is created for the task, randomly
initialised, so adapter methods must train it in full (peft's modules_to_save); a pretrained
head (a causal LM's lm_head) stays frozen under LoRA and QLoRA.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Task",
    "forget_missing_bitsandbytes",
    "get_task",
    "is_generative",
    "register_task",
    "task_names",
    "without_bitsandbytes",
]


@dataclass(frozen=True)
class Task:
    name: str
    auto_model: str  # transformers Auto* class that builds the head
    peft_task_type: str  # peft.TaskType member name
    # Top-level attribute names of the head on the Auto* model: trained in full under frozen,
    # LoRA and QLoRA (never quantized), and given train.head_learning_rate.
    head_modules: tuple[str, ...]
    target_ids: Callable[[np.ndarray, dict[str, int]], np.ndarray]
    eval_state: Callable[[int], torch.Tensor]  # n_labels → zeroed float64 sum-reducible state
    # state, logits, ids; a generative task also takes loss= (see the module docstring)
    accumulate: Callable[..., None]
    metrics: Callable[[np.ndarray], dict[str, float]]  # from the all-reduced state
    postprocess: Callable[[np.ndarray, list[str]], tuple[np.ndarray, np.ndarray]]
    generative: bool = False  # writes text: no labels, per-token targets (see module docstring)
    new_head: bool = True  # head built fresh for the task: trained in full under adapters

    def is_head_parameter(self, name: str) -> bool:
        """Whether parameter `name` (any wrapping, e.g. peft's) belongs to the task head."""
        return any(part in self.head_modules for part in name.split("."))


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task`, checked: its head names, and the evaluation state it builds (which imports
    torch)."""
    _check_eval_state(task)
    return _register(task)


def _register(task: Task) -> Task:
    """Add `task` without building its evaluation state: the built-in tasks below, registered
    when this module is imported, so that a Predictor on an exported engine (no torch model)
    does not import torch for them (1.5 CPU-s of each scoring actor's start, measured on 2
    AVX512-BF16 cores); tests/unit/test_task_contract.py checks their states instead."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    _check_head_modules(task)
    _TASKS[task.name] = task
    return task


@functools.cache
def _check_libraries(name: str, peft_needed: bool) -> None:
    """The Hugging Face class and (if `peft_needed`) peft task type a task names exist (once
    per process).

    Checked when a task is first fetched for modelling, not at registration: importing peft
    costs about 4 s, which `raylift validate` (it only needs the task names) should not pay,
    nor should a scoring actor or replica loading a checkpoint (an adapter checkpoint imports
    peft to merge; its task type comes from adapter_config.json, not from the task): there it
    was 3-5 s of each actor's start.
    """
    import transformers

    task = _TASKS[name]
    if not hasattr(transformers, task.auto_model):
        raise ValueError(f"task {task.name!r}: transformers has no {task.auto_model}")
    if not peft_needed:
        return
    with without_bitsandbytes():
        import peft

    if not hasattr(peft.TaskType, task.peft_task_type):
        raise ValueError(f"task {task.name!r}: peft.TaskType has no {task.peft_task_type}")


@contextlib.contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Imports made inside (peft's, transformers') see no bitsandbytes, unless this process has
    imported it already (a method=qlora config imports it when it is validated).

    peft imports bitsandbytes whenever it is installed, and with it torch's inductor: 1.0-1.3
    CPU-s of each training worker's and scoring actor's start (AVX512-BF16, 2 cores, measured),
    for LoRA and full models that never use it. A None in sys.modules makes
    `importlib.util.find_spec` answer None (peft's is_bnb_available, transformers'
    is_bitsandbytes_available) and `import bitsandbytes` raise ImportError (peft's optional
    imports); it is taken out again on the way out, so a later QLoRA build in the same process
    can import it (forget_missing_bitsandbytes clears what was cached meanwhile).
    """
    if "bitsandbytes" in sys.modules:  # the real module, or an enclosing block
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


def forget_missing_bitsandbytes() -> None:
    """Clear the cached 'bitsandbytes is not installed' answers that peft and transformers kept
    from inside without_bitsandbytes, before a QLoRA model is built in the same process."""
    import transformers.utils.import_utils

    transformers.utils.import_utils.is_bitsandbytes_available.cache_clear()
    if "peft" in sys.modules:
        import peft.import_utils

        peft.import_utils.is_bnb_available.cache_clear()
        peft.import_utils.is_bnb_4bit_available.cache_clear()


def _check_head_modules(task: Task) -> None:
    heads = task.head_modules
    if not isinstance(heads, tuple) or not heads:
        raise ValueError(f"task {task.name!r}: head_modules must be a non-empty tuple of names")
    bad = [h for h in heads if not (isinstance(h, str) and h.isidentifier())]
    if bad:
        raise ValueError(
            f"task {task.name!r}: head_modules {bad} are not attribute names (no dots)"
        )


def _check_eval_state(task: Task) -> None:
    import torch

    for name in ("target_ids", "eval_state", "accumulate", "metrics", "postprocess"):
        if not callable(getattr(task, name)):
            raise ValueError(f"task {task.name!r}: {name} must be callable")
    state = task.eval_state(2)
    # The loop all-reduces the state as a sum; an integer or non-tensor state cannot be reduced
    # (gloo) or would overflow silently.
    if not isinstance(state, torch.Tensor) or state.dtype != torch.float64:
        raise ValueError(
            f"task {task.name!r}: eval_state must return a float64 torch.Tensor, "
            f"got {type(state).__name__}"
        )
    if state.count_nonzero():
        raise ValueError(f"task {task.name!r}: eval_state must start at zero (it is summed)")


def get_task(name: str, *, peft_needed: bool = True, check_libraries: bool = True) -> Task:
    """The registered task `name`; `peft_needed=False` (loading a checkpoint for inference)
    skips the check of its peft task type, and with it the import of peft;
    `check_libraries=False` (a Predictor on an exported engine, which builds no Hugging Face
    model) skips the transformers check too, and with it the import of transformers."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    if check_libraries:
        _check_libraries(name, peft_needed)
    return _TASKS[name]


def task_names() -> list[str]:
    return sorted(_TASKS)


def is_generative(name: str) -> bool:
    """Whether task `name` writes text (False for an unknown name; get_task reports those)."""
    return name in _TASKS and _TASKS[name].generative


def _label_ids(values: np.ndarray, label_to_id: dict[str, int]) -> np.ndarray:
    try:
        return np.fromiter((label_to_id[str(v)] for v in values), dtype=np.int64, count=len(values))
    except KeyError as exc:
        raise ValueError(
            f"label {exc.args[0]!r} is not in the label map; known labels: "
            f"{', '.join(list(label_to_id)[:10])}..."
        ) from None


def confusion_state(n_labels: int) -> torch.Tensor:
    """An empty confusion matrix (rows: truth, columns: prediction)."""
    import torch

    return torch.zeros((n_labels, n_labels), dtype=torch.float64)


def accumulate_confusion(state: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch's top-1 predictions to the confusion matrix `state`, in place."""
    import torch

    predicted = logits.detach().float().argmax(dim=-1).to(state.device)
    truth = targets.to(device=state.device, dtype=torch.long)
    ones = torch.ones(len(truth), dtype=state.dtype, device=state.device)
    state.index_put_((truth, predicted), ones, accumulate=True)


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction).

    The macro mean is over the classes that occur in the truth or the predictions, as
    scikit-learn's f1_score(average="macro") takes it: a class only ever predicted counts,
    with an F1 of 0; a class neither in this split nor predicted does not."""
    confusion = confusion.astype(np.float64)
    total = confusion.sum()
    true_pos = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    present = (actual > 0) | (predicted > 0)
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


SEQUENCE_CLASSIFICATION = _register(
    Task(
        name="sequence-classification",
        auto_model="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS",
        head_modules=("classifier", "score"),  # BERT-like, Llama-like
        target_ids=_label_ids,
        eval_state=confusion_state,
        accumulate=accumulate_confusion,
        metrics=classification_metrics,
        postprocess=_softmax_top1,
    )
)


def _no_label_map(values: np.ndarray, label_to_id: dict[str, int]) -> np.ndarray:
    raise ValueError(
        "causal-lm has no label map: its targets are the response tokens (jobs.instruct)"
    )


def token_loss_state(n_labels: int) -> torch.Tensor:
    """[summed NLL of the scored tokens (nats), tokens scored]; `n_labels` is unused."""
    import torch

    return torch.zeros(2, dtype=torch.float64)


def accumulate_token_loss(
    state: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor | None = None,
) -> None:
    """Add one batch's next-token NLL over its non-ignored labels to `state`, in place.

    `loss`: the model's own loss of the batch, where it is the mean of that same NLL
    (jobs.instruct.loss_is_mean_token_nll): the sum is then the mean times the scored tokens,
    and the logits are not scored a second time."""
    from jobs.instruct import scored_tokens, token_nll

    if loss is None:
        nll, tokens = token_nll(logits, targets)
    else:
        tokens = scored_tokens(targets)
        nll = float(loss) * tokens if tokens else 0.0  # no token scored: the mean is NaN
    state[0] += nll
    state[1] += tokens


def causal_lm_metrics(state: np.ndarray) -> dict[str, float]:
    """Token-weighted loss and perplexity over every scored token of every worker."""
    from jobs.instruct import perplexity_metrics

    return perplexity_metrics(float(state[0]), float(state[1]))


def _generates(logits: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    raise ValueError("causal-lm answers by generating text (Predictor generate), not by a label")


CAUSAL_LM = _register(
    Task(
        name="causal-lm",
        auto_model="AutoModelForCausalLM",
        peft_task_type="CAUSAL_LM",
        # lm_head is the head: never quantized under QLoRA (bitsandbytes' own default too) and
        # given train.head_learning_rate under method=full. It is pretrained, not new
        # (new_head=False), so LoRA and QLoRA leave it frozen, as peft's CAUSAL_LM does:
        # training it in full would add vocab x hidden weights to every adapter (525M for
        # Llama-3-8B, against ~40M of rank-16 LoRA), untie it from tied input embeddings, and
        # gain little, since the adapters below it already move the output distribution.
        head_modules=("lm_head",),
        target_ids=_no_label_map,
        eval_state=token_loss_state,
        accumulate=accumulate_token_loss,
        metrics=causal_lm_metrics,
        postprocess=_generates,
        generative=True,
        new_head=False,
    )
)

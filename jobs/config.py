"""The lifecycle config: one YAML per model describes data, training, registry, serving and scoring.

Every model is strict (`extra="forbid"`) so a typo fails at validation, before the cluster is
touched. `load_config` applies `key=value` overrides and reports every error at once, each with
the dotted key as the user types it and a fix.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cluster.storage import credentials_in_uri, redact_credentials

__all__ = [
    "ConfigError",
    "LifecycleConfig",
    "config_hash",
    "load_config",
    "parse_overrides",
    "search_space_errors",
    "with_overrides",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _no_credentials(uri: str) -> str:
    problem = credentials_in_uri(uri)
    if problem:
        # A custom error type: `_describe` shows its (redacted) message and never the input.
        raise PydanticCustomError("uri_credentials", "{problem}", {"problem": problem})
    return uri


# A URI or path a job reads or writes. Credentials in one would reach MLflow's run params,
# every checkpoint's raylift.json, the Jobs API entrypoint and the logs, so the config refuses
# them, overrides included.
_Uri = Annotated[str, AfterValidator(_no_credentials)]

# pyiceberg properties that hold a secret (s3.secret-access-key, s3.session-token, token,
# credential, adls.account-key, header.Authorization, ...), matched by whole words.
_SECRET_PROPERTY = re.compile(
    r"(?:^|[._-])(?:secret|password|token|credentials?|authorization|access-key|account-key"
    r"|connection-string)(?:$|[._-])",
    re.IGNORECASE,
)
# AWS keys pyiceberg also takes as properties: pyarrow and boto3 read these variables instead.
_AWS_KEY_ENV = {
    "access-key-id": "AWS_ACCESS_KEY_ID",
    "secret-access-key": "AWS_SECRET_ACCESS_KEY",
    "session-token": "AWS_SESSION_TOKEN",
}
_AWS_PROPERTY_PREFIXES = ("s3", "client", "glue", "dynamodb")


def _secret_property_problem(prop: str, catalog: str) -> str:
    prefix, _, rest = prop.partition(".")
    env = _AWS_KEY_ENV.get(rest) if prefix in _AWS_PROPERTY_PREFIXES else None
    if env is None:
        # pyiceberg's own form: PYICEBERG_CATALOG__<name>__<property, `.` as `__`, `-` as `_`>
        parts = [catalog, *prop.split(".")]
        env = "PYICEBERG_CATALOG__" + "__".join(p.upper().replace("-", "_") for p in parts)
    return f"{prop} is a secret: remove it and set {env} on every node instead"


class CatalogConfig(_Strict):
    name: str = Field("raylift", description="Name pyiceberg gives the catalog.")
    type: Literal["sql", "rest", "glue", "hive"] = Field(
        "sql", description="pyiceberg catalog type; 'sql' on SQLite is the embedded default."
    )
    uri: _Uri = Field(
        "sqlite:///.raylift/warehouse/catalog.db",
        description="Catalog URI (SQLAlchemy URL for 'sql', endpoint for 'rest').",
    )
    warehouse: _Uri = Field(
        ".raylift/warehouse",
        description="Where table files live: a local path or s3:// / gs:// URI.",
    )
    properties: dict[str, _Uri] = Field(
        default_factory=dict,
        description="Extra pyiceberg catalog properties (s3.endpoint, s3.region, ...). Secrets "
        "(s3.secret-access-key, token, credential, ...) are refused: they belong in the "
        "environment of every node.",
    )

    @field_validator("properties")
    @classmethod
    def _no_secret_properties(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        catalog = info.data.get("name", "raylift")
        problems = [
            _secret_property_problem(k, catalog) for k in value if _SECRET_PROPERTY.search(k)
        ]
        if problems:
            raise PydanticCustomError(
                "secret_properties", "{problem}", {"problem": "; ".join(problems)}
            )
        return value


class TaskConfig(_Strict):
    type: str = Field(
        "sequence-classification", description="Task name; see jobs.tasks for the registry."
    )
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the target label.")
    key_column: str = Field("ticket_id", description="Stable integer key of each row.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens kept per text.")
    labels: list[str] | None = Field(
        None, description="Fixed label order; by default the sorted distinct labels of the table."
    )
    max_refused_share: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Largest share of the table's rows training may drop for a null, empty or "
        "blank text or a null label (dropped rows are counted, logged and tagged); a table "
        "with more is refused before Ray starts. 0: refuse any such row.",
    )

    prompt_column: str = Field(
        "prompt", description="causal-lm: column holding the instruction (the user's message)."
    )
    response_column: str = Field(
        "response", description="causal-lm: column holding the answer the model learns to write."
    )
    system_column: str | None = Field(
        None,
        description="causal-lm: column holding a system message per row (null cells: none); "
        "null: no system message.",
    )
    prompt_template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="causal-lm: how an example becomes text. chat: the tokenizer's chat "
        "template; plain: jobs.instruct.PLAIN_TEMPLATE ('### Instruction:' / '### Response:'); "
        "auto: chat when the tokenizer has a chat template, else plain.",
    )
    packing: bool = Field(
        False,
        description="causal-lm: pack each batch's examples into rows of up to max_length tokens "
        "(position ids restart per example, attention stays within it); same loss, less padding.",
    )

    @property
    def input_column(self) -> str:
        """The column a model reads: the text (classification) or the prompt (causal-lm)."""
        return self.prompt_column if _generative(self.type) else self.text_column

    @property
    def target_column(self) -> str:
        """The column a model learns: the label (classification) or the response (causal-lm)."""
        return self.response_column if _generative(self.type) else self.label_column

    @model_validator(mode="after")
    def _keys_fit_task(self) -> TaskConfig:
        # Set means changed from the default: a dumped and re-validated config (a Tune trial,
        # a worker's copy) names every key.
        fields = type(self).model_fields
        given = {k for k in fields if getattr(self, k) != fields[k].default}
        if _generative(self.type):
            wrong = {
                "labels": "a causal LM has no label set; remove task.labels",
                "label_column": "the target is task.response_column; set that instead",
                "text_column": "the input is task.prompt_column; set that instead",
            }
        else:
            only = f"applies to task.type=causal-lm only; remove it for {self.type}"
            wrong = {key: only for key in _CAUSAL_LM_KEYS}
        problems = [f"task.{key}: {why}" for key, why in wrong.items() if key in given]
        if problems:
            raise ValueError(f"task.type={self.type}: " + "; ".join(problems))
        return self

    @field_validator("type")
    @classmethod
    def _known_task(cls, value: str) -> str:
        # Imported when a config is validated, not when this module is: registering the built-in
        # tasks imports transformers and peft (about 5 s here), which `raylift --help` and the
        # other config-free paths should not pay for.
        from jobs.tasks import task_names

        if value not in task_names():
            raise ValueError(f"unknown task {value!r}; known: {', '.join(task_names())}")
        return value

    @field_validator("labels")
    @classmethod
    def _two_distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"labels repeat {', '.join(repeated)}; list each label once")
        if len(value) < 2:
            raise ValueError("a classifier needs at least two labels; list them all, or unset")
        return value


_CAUSAL_LM_KEYS = (
    "prompt_column",
    "response_column",
    "system_column",
    "prompt_template",
    "packing",
)


def _generative(task_type: str) -> bool:
    from jobs.tasks import is_generative

    return is_generative(task_type)


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"],
        description="Module name suffixes that get adapters.",
    )


class ModelConfig(_Strict):
    base: _Uri = Field(
        "all-MiniLM-L6-v2",
        description="Pretrained model: a local directory, a folder on object storage "
        "(s3://bucket/models/x: safetensors only, downloaded once per node into "
        "RAYLIFT_CACHE_DIR), a shipped name (all-MiniLM-L6-v2) or a hub id already in the "
        "local cache.",
    )
    method: Literal["lora", "qlora", "full", "frozen"] = Field(
        "lora",
        description="lora/qlora: adapters (qlora = 4-bit NF4 base); full: every weight; "
        "frozen: base frozen, head only.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust its source."
    )

    @model_validator(mode="after")
    def _qlora_needs_bitsandbytes(self) -> ModelConfig:
        if self.method == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise ValueError(
                    "method=qlora needs bitsandbytes; pip install bitsandbytes"
                ) from exc
        return self


class ValidationSplitConfig(_Strict):
    fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of each class held out.")
    seed: int = Field(17, description="Seed of the stratified split; same seed, same split.")


class DataConfig(_Strict):
    table: str = Field("support.tickets", description="Iceberg table with the labelled rows.")
    snapshot_id: int | None = Field(
        None, description="Snapshot to train on; the table's current snapshot by default."
    )
    source: _Uri | None = Field(
        None,
        description="CSV or Parquet file `warehouse load` reads; the packaged BANKING77 if unset.",
    )
    inbox_table: str = Field(
        "support.tickets_inbox", description="Unlabelled table the demo creates for scoring."
    )
    inbox_rows: int = Field(3000, ge=0, description="Rows the demo puts in the inbox table.")
    validation: ValidationSplitConfig = Field(
        default_factory=ValidationSplitConfig, description="Held-out split."
    )
    sample_rows: int | None = Field(
        None, ge=10, description="Load only this many rows (seeded): for tests and quick runs."
    )


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker also reserves, e.g. {node_pool_a: 1} to "
        "keep training on nodes started with `ray start --resources` (CPU and GPU come from "
        "cpus_per_worker and use_gpu).",
    )
    epochs: int = Field(3, ge=1, description="Passes over the training split.")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on optimizer steps per epoch (a training budget)."
    )
    batch_size: int = Field(32, ge=1, description="Rows per step on each worker.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate.")
    head_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the task head; learning_rate if unset."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps warming up.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision; auto: bf16 where the device does it natively "
        "(GPU, CPUs with AVX512-BF16/AMX), else fp32.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    shm_allreduce: bool = Field(
        False,
        description="CPU workers only: DeepSpeed's shared-memory allreduce between the ranks of "
        "one node instead of gloo's. DeepSpeed compiles it (C++, 20-70 s, needs a compiler) "
        "the first time each machine loads it, unless the image prebuilt it "
        "(DS_BUILD_SHM_COMM=1 pip install deepspeed); worth it for many ranks per node "
        "with large gradients (full fine-tuning), not for LoRA or one worker per node.",
    )
    length_window: int = Field(
        8, ge=1, description="Batches whose rows are sorted by length together (bucketing)."
    )
    shuffle_buffer_rows: int = Field(
        10_000,
        ge=0,
        description="Rows each worker shuffles locally per epoch (0: stream order).",
    )
    seed: int = Field(17, description="Seed for weights and dropout.")
    checkpoint_dir: _Uri = Field(
        ".raylift/checkpoints", description="Ray Train storage_path: local path or s3:// URI."
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint the training state (engine, optimizer, LR schedule, data "
        "position) every this many optimizer steps within an epoch, so a failure loses at "
        "most that many steps; null: at epoch ends only. Needs train.preserve_order, so the "
        "resumed epoch skips exactly the batches already trained.",
    )
    preserve_order: bool = Field(
        True,
        description="Ray Data keeps the training stream's order: blocks in read order, split "
        "among the workers in that order rather than by which worker asks first. Two runs of "
        "one config on one snapshot then train on the same batches and end with the same "
        "model (the demo config twice: val_accuracy 0.8355 both times, 82 training rows/s "
        "against 83 unordered; 2 AVX2 cores). false: a little faster where workers wait on "
        "a slow block, and runs of the same config differ.",
    )
    max_failures: int = Field(
        1,
        ge=0,
        description="Times Ray Train restarts the workers after a worker dies or raises "
        "(Ray Train FailureConfig.max_failures); each restart resumes from the latest "
        "checkpoint. Node preemptions are retried on their own, without limit.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Torch threads per worker; cpus_per_worker rounded up if unset."
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        named = sorted({"CPU", "GPU"} & set(value))
        if named:
            raise ValueError(
                f"train.resources_per_worker names {', '.join(named)}; set "
                "train.cpus_per_worker and train.use_gpu instead"
            )
        negative = sorted(k for k, v in value.items() if v <= 0)
        if negative:
            raise ValueError(
                f"train.resources_per_worker: {', '.join(negative)} must be above 0 "
                "(leave a resource out rather than asking for none)"
            )
        return value

    @model_validator(mode="after")
    def _resumable_position_needs_order(self) -> TrainConfig:
        if self.checkpoint_every_steps is not None and not self.preserve_order:
            raise ValueError(
                "train.checkpoint_every_steps needs train.preserve_order: true (a resumed "
                "epoch skips the batches already trained, which must come in the same order); "
                "set preserve_order: true or checkpoint_every_steps: null"
            )
        return self

    @model_validator(mode="after")
    def _fp16_needs_gpu(self) -> TrainConfig:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision=fp16 needs use_gpu=true; use bf16 on CPU")
        return self


class RegistryConfig(_Strict):
    tracking_uri: _Uri = Field(
        "sqlite:///.raylift/mlflow.db", description="MLflow tracking and registry URI."
    )
    experiment: str = Field("raylift", description="MLflow experiment runs are logged to.")
    artifact_location: _Uri | None = Field(
        None,
        description="Where a new experiment stores its runs' artifacts (the registered "
        "checkpoints): a local path or an s3:// URI (AWS_* environment variables give the "
        "keys and endpoint). Unset: mlartifacts/ beside a SQLite tracking_uri, else the "
        "tracking server's default. Fixed when the experiment is created.",
    )
    model_name: str = Field("ticket-router", description="Registered model name.")
    build_engines: bool = Field(
        True,
        description="Export and gate the inference engines (ONNX Runtime, OpenVINO) at "
        "registration; false registers the checkpoint alone, served on torch (a tiny test model "
        "saves seconds per version, a MiniLM about 25 s).",
    )


class PromoteConfig(_Strict):
    alias: str = Field("production", description="Alias the gate moves.")
    metric: str = Field("val_accuracy", description="Metric the floor and regression check use.")
    mode: Literal["max", "min"] = Field(
        "max",
        description="Which way the metric improves: max (val_accuracy, val_macro_f1) or min "
        "(val_loss). With min, a candidate must stay under max_value and may rise at most "
        "max_regression above the current alias.",
    )
    min_value: float | None = Field(
        0.5, description="Floor the metric must clear to promote (mode=max); null: no floor."
    )
    max_value: float | None = Field(
        None, description="Ceiling the metric must stay under to promote (mode=min)."
    )
    max_regression: float = Field(
        0.005,
        ge=0,
        description="How far a candidate may fall behind the current alias on the metric, both "
        "measured on the same rows: the stored figures when both were evaluated on the same "
        "table snapshot and split, else both re-evaluated on the candidate's validation rows.",
    )
    allowed_base_models: list[_Uri] = Field(
        default_factory=list,
        description="Base models (model.base as trained) a candidate may be built on; empty: any.",
    )
    slices: dict[str, str] = Field(
        default_factory=dict,
        description="Label → slice name (e.g. card_arrival: cards). When set, both versions are "
        "evaluated per slice on the same rows; labels not listed belong to no slice.",
    )
    max_slice_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest drop of a slice's accuracy against the current alias (used when "
        "slices is set).",
    )

    @model_validator(mode="after")
    def _bound_matches_mode(self) -> PromoteConfig:
        wrong = "min_value" if self.mode == "min" else "max_value"
        right = "max_value" if self.mode == "min" else "min_value"
        # Set means changed from its default, not present in the input: a dumped config that is
        # validated again (a worker's copy, with_overrides) names every key, min_value's 0.5
        # too, and refused every mode=min config. (bound ignores the other mode's key anyway.)
        value = getattr(self, wrong)
        explicit = value is not None and value != type(self).model_fields[wrong].default
        if explicit:
            raise ValueError(
                f"{wrong} does not apply with mode={self.mode}; set {right} instead "
                f"(a {'ceiling' if self.mode == 'min' else 'floor'} for {self.metric})"
            )
        return self

    @property
    def bound(self) -> float | None:
        """The floor (mode=max) or ceiling (mode=min) the metric must clear; None: no bound."""
        return self.max_value if self.mode == "min" else self.min_value


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="Replicas kept warm.")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class GenerationConfig(_Strict):
    """Text generation by a causal-lm version: defaults for what a request (or a batch row)
    leaves out, and limits a request may not pass (an online request over one gets a 400)."""

    max_new_tokens: int = Field(
        128, ge=1, description="Tokens generated per prompt when the request does not say."
    )
    max_new_tokens_limit: int = Field(
        1024,
        ge=1,
        description="Most tokens a request may ask to generate per prompt (max_tokens).",
    )
    max_prompt_tokens: int = Field(
        2048,
        ge=1,
        description="Longest prompt, in tokens after the chat template; a longer one is "
        "refused (online: a 400, batch: the row is quarantined), never silently cut.",
    )
    max_prompts_per_request: int = Field(
        16, ge=1, description="Most prompts (or choices, n) in one online request."
    )
    max_stop_sequences: int = Field(4, ge=0, description="Most stop sequences per request.")
    temperature: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        description="Sampling temperature when the request does not say; 0 is greedy.",
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the most likely tokens whose probabilities sum "
        "to top_p, when the request does not say; 1 keeps them all.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop sequences when the request does not say: generation ends at the "
        "first one, which is left out of the text.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Sampling seed when the request does not say; prompt i of a request uses "
        "seed + i, so a prompt's output does not depend on what it is batched with. "
        "null: a fresh random seed per prompt.",
    )
    sub_batch_tokens: int = Field(
        8192,
        ge=64,
        description="Prompts sorted by length generate together while rows x (longest prompt "
        "+ max_new_tokens) stays within this many tokens (the KV cache's size).",
    )

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: list[str]) -> list[str]:
        if any(not stop for stop in value):
            raise ValueError("a stop sequence is empty; remove it")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GenerationConfig:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} is over max_new_tokens_limit="
                f"{self.max_new_tokens_limit}; lower it or raise the limit"
            )
        if len(self.stop) > self.max_stop_sequences:
            raise ValueError(
                f"stop lists {len(self.stop)} sequences; max_stop_sequences is "
                f"{self.max_stop_sequences}"
            )
        return self


class BatchGenerationConfig(GenerationConfig):
    """GenerationConfig for batch generation: greedy with seed 0 unless set, so a re-run of a
    date writes the same completions."""

    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 (the default) is greedy."
    )
    seed: int | None = Field(
        0,
        ge=0,
        description="Sampling seed, mixed with each prompt's CRC-32 (a row's text does not "
        "depend on its batch); null: a fresh random seed per prompt, runs differ.",
    )


class ServeConfig(_Strict):
    host: str = Field("127.0.0.1", description="HTTP host Serve binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    model_uri: _Uri | None = Field(
        None, description="Model to serve; models:/<model_name>@<promote.alias> by default."
    )
    max_batch_size: int = Field(64, ge=1, description="Most texts one model batch holds.")
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        description="How long a text may wait for others to share its batch when the model "
        "is free; only after a batch that held several texts (a lone client never waits).",
    )
    max_texts_per_request: int = Field(64, ge=1, description="More texts get a 413.")
    max_text_chars: int = Field(2000, ge=1, description="Longer texts get a 422.")
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=64,
        description="Predict bodies larger than this get a 413, refused from Content-Length "
        "before a byte is read (a body without Content-Length gets a 411). 1 MiB holds the "
        "default 64 texts of 2,000 characters even fully \\u-escaped (6 bytes a character).",
    )
    max_queued_requests: int | None = Field(
        128,
        ge=1,
        description="Requests each Serve proxy holds waiting for a free replica; more get a 503 "
        "(Serve's max_queued_requests). null: no limit, the queue grows without bound.",
    )
    request_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="End-to-end HTTP timeout, queueing included; slower requests get a 408 "
        "(Serve's http_options.request_timeout_s, one value per Serve instance). null: none.",
    )
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs per replica.")
    torch_threads: int = Field(2, ge=1, description="Torch threads per replica.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Inference precision; auto: bf16 where native, else fp32."
    )
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="Inference runtime. auto: the fastest variant that passed the registration "
        "gate, by a short calibration here (torch when the version has no engine artifacts).",
    )
    access_log: bool = Field(
        True,
        description="Serve's log line per request in each replica (`CALL ... OK 12ms`). "
        "raylift_requests_total and the latency histogram count requests either way. Each "
        "line costs CPU in the replica and in Ray's log monitor: at 16 clients on 2 "
        "AVX512-BF16 cores the demo config's endpoint answered 195 req/s with it and 216 "
        "without (make bench).",
    )
    system_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING",
        description="Level of Serve's own controller and HTTP ingress (proxy, HAProxy manager) "
        "logs when raylift starts Serve: at INFO they print every routing-table change and "
        "HAProxy reload (about 30 lines as the demo's endpoint starts). A Serve already "
        "running keeps its own.",
    )
    calibration_texts: int = Field(
        8,
        ge=1,
        description="Texts per batch that engine=auto times the offered engines on when a "
        "replica loads a version: about the batch a loaded replica runs (single-text requests "
        "from 16 clients ran in batches of about 8). Batch scoring times a full token budget.",
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Serve autoscaling."
    )
    model_poll_interval_s: float | None = Field(
        10.0,
        gt=0,
        description="Seconds between two reads of the promoted alias in the registry; when it "
        "moved, replicas load the new version in the background and switch once it is warm. "
        "raylift promote and rollback also tell a running app at once. null: no polling (only "
        "promote/rollback move a running app). Ignored when serve.model_uri names a version.",
    )
    auth_token_env: str | None = Field(
        None,
        description="Name of an environment variable holding a bearer token; when set, "
        "requests must send it. It is read where the app is built (deploy or app_builder); "
        "replicas get only its SHA-256 digest. The token itself never goes in a config.",
    )
    max_adapters_per_replica: int = Field(
        4,
        ge=1,
        description="LoRA versions a replica keeps loaded for requests that name a version or "
        "an alias (/v1/models/{name}/versions/{v}/predict): all share one copy of the base "
        "model, and the least recently used adapter is freed when one more is needed "
        "(Serve's max_num_models_per_replica). The deployment's own version is not counted.",
    )
    adapters_min_replicas: int = Field(
        0,
        ge=0,
        description="Replicas of the app's Adapters deployment (the versions other than the one "
        "served, routed by version with Serve's model multiplexing) kept up without adapter "
        "traffic. 0: the first request for another version starts one (a cold start of "
        "seconds), and the replica set scales back to zero when that traffic stops. Its "
        "maximum and target follow serve.autoscaling.",
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="Defaults and limits of the OpenAI-compatible routes (causal-lm versions).",
    )


class ScoreConfig(_Strict):
    input_table: str = Field("support.tickets_inbox", description="Table to score.")
    output_table: str = Field("support.ticket_predictions", description="Predictions table.")
    key_columns: list[str] = Field(
        default_factory=lambda: ["ticket_id"], description="Input columns copied to each row."
    )
    model_uri: _Uri | None = Field(
        None, description="Model to score with; models:/<model_name>@<promote.alias> by default."
    )
    batch_size: int = Field(
        1024, ge=1, description="Rows per Predictor call (sorted by length together)."
    )
    concurrency: int = Field(
        2,
        ge=1,
        description="Predictor actors. On CPU, one single-threaded actor per core: two "
        "1-thread actors scored 1.2-1.3x the rows of one 2-thread actor on MiniLM; end to end "
        "over 10k rows (2 AVX512-BF16 cores) 2 actors x 1 thread matched or beat 1 x 2 with "
        "every engine (torch-bf16 1.00x, onnxruntime fp32 1.16x, int8 1.14x, openvino-bf16 "
        "1.03x, auto 1.09x).",
    )
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs per Predictor actor.")
    torch_threads: int = Field(
        1,
        ge=1,
        description="Threads per Predictor actor, for whichever engine runs (torch, "
        "onnxruntime or openvino).",
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Inference precision; auto: the engine's fastest variant this CPU runs "
        "natively (bf16 where native, int8 for onnxruntime when offered), else fp32.",
    )
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="Inference runtime. auto: the fastest variant that passed the registration "
        "gate, by a short calibration here (torch when the version has no engine artifacts).",
    )
    run_date: datetime.date | None = Field(
        None, description="YYYY-MM-DD the rows belong to; today (UTC) if unset."
    )
    quarantine_table: str = Field(
        "support.ticket_predictions_quarantine",
        description="Where rows that cannot be scored (null or empty text) go, with the reason.",
    )
    generation: BatchGenerationConfig = Field(
        default_factory=BatchGenerationConfig,
        description="How each prompt row is generated (causal-lm versions); greedy by default, "
        "so a re-run of a date writes the same completions.",
    )


# Config keys a search may vary: what shapes the model (not where data, runs or models live).
# train.epochs is ASHA's max_t, so it is one value for every trial.
_SEARCHABLE_SECTIONS = ("task", "model", "train")
# Trial sizing (jobs.tune) assumes one worker shape for every trial.
_UNSEARCHABLE_KEYS = {
    "train.epochs": "it is ASHA's max_t; set train.epochs for every trial",
    "train.num_workers": "trials are sized for one worker shape; set it for every trial",
    "train.cpus_per_worker": "trials are sized for one worker shape; set it for every trial",
    "train.use_gpu": "trials are sized for one worker shape; set it for every trial",
    "train.checkpoint_dir": "it says where checkpoints go, not how the model trains",
}


class SearchDimension(_Strict):
    """One hyperparameter of a Tune search: a distribution over one dotted config key."""

    type: Literal["loguniform", "uniform", "randint", "choice"] = Field(
        ...,
        description="loguniform/uniform: a float in [low, high]; randint: an integer in "
        "[low, high] (both ends included); choice: one of values.",
    )
    low: int | float | None = Field(None, description="Lower bound (not for choice).")
    high: int | float | None = Field(None, description="Upper bound (not for choice).")
    values: list[Any] | None = Field(None, description="The options of a choice.")

    @model_validator(mode="after")
    def _shape(self) -> SearchDimension:
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("choice takes values: [a, b, ...] (and no low/high)")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} takes low and high (and no values)")
        if self.low >= self.high:
            raise ValueError(
                f"low={self.low} must be below high={self.high}; swap them, or use choice: "
                "[value] for a fixed value"
            )
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}; use uniform from 0")
        if self.type == "randint" and not all(_is_int(v) for v in (self.low, self.high)):
            raise ValueError("randint takes integer low and high; use uniform for floats")
        return self

    def probe_values(self) -> list[Any]:
        """Values a sample can take that a config must accept: the ends, one inner float."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        # An inner float too: an int key accepts 4.0 and 64.0 but not what uniform samples.
        inner = self.low + (self.high - self.low) * 0.3183098861837907
        return [float(self.low), float(self.high), inner]


def _is_int(value: int | float | None) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_OPTUNA_SCALARS = (type(None), bool, int, float, str)


class AshaConfig(_Strict):
    grace_period: int = Field(
        1, ge=1, description="Epochs every trial runs before ASHA may stop it."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA keeps 1/reduction_factor of the trials at each rung."
    )


class TuneConfig(_Strict):
    search_space: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description="Dotted config key → distribution, e.g. train.learning_rate: "
        "{type: loguniform, low: 1.0e-4, high: 3.0e-3}. Keys under task, model and train.",
    )
    num_samples: int = Field(8, ge=1, description="Trials sampled from the search space.")
    metric: str | None = Field(
        None,
        description="Metric trials are ranked by (reported every epoch); promote.metric if unset.",
    )
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Whether the metric is maximized (max) or minimized (min). Unset: "
        "promote.mode when tune.metric is unset, else the way tune.metric improves (min for "
        "val_loss and val_perplexity, max for val_accuracy and val_macro_f1).",
    )
    scheduler: Literal["asha", "sha", "fifo"] = Field(
        "asha",
        description="asha: stop weak trials early, each decision alone as a trial reaches a "
        "rung (Ray's ASHA: best when many trials run at once); sha: synchronous successive "
        "halving, trials wait at each rung until all have reached it, then the best "
        "1/reduction_factor go on (best when the cluster runs few trials at once: the first "
        "trials at an ASHA rung have no peers and always go on); a waiting trial is paused "
        "and later restarted from its checkpoint, or held in its Train run when no other trial "
        "needs its CPUs, or when it is among the best so far near the rung's decision "
        "(tune.max_held_trials); fifo: every trial runs every epoch.",
    )
    asha: AshaConfig = Field(
        default_factory=AshaConfig,
        description="Rungs of asha and sha (grace_period · reduction_factor^k epochs); max_t is "
        "train.epochs (epochs are the time unit).",
    )
    searcher: Literal["random", "optuna"] = Field(
        "random",
        description="How trials are sampled. random: independently (Ray Tune's basic variant "
        "generator); optuna: Optuna's TPE sampler: the first half of the trials (at most 10) at "
        "random, the rest near the best results of the finished ones.",
    )
    seed: int | None = Field(
        17,
        description="Seed of the sampling; same seed, same trials (optuna: the same random "
        "trials, and the same guided ones given the same results).",
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="Trials running at once; by default as many as the cluster's CPUs fit "
        "(each trial's workers plus its data stages).",
    )
    max_held_trials: int | None = Field(
        None,
        ge=0,
        description="scheduler sha: trials that may wait at a rung keeping their workers (CPUs "
        "and memory) outside the running slots, because they are among the best so far, so "
        "that the rung keeps them without a restart. By default as many as the cluster's CPUs "
        "leave beside the running trials; never while the node has under a quarter of its "
        "memory free. 0: only the last trials to reach a rung wait that way.",
    )
    max_failures: int = Field(
        1, ge=0, description="Times a failed trial is restarted before it counts as failed."
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop starting trials, and stop running ones, after this long."
    )

    @field_validator("search_space")
    @classmethod
    def _searchable_keys(cls, value: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        problems = [p for key in value if (p := _key_problem(key))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("searcher")
    @classmethod
    def _searcher_usable(cls, value: str, info: ValidationInfo) -> str:
        if value != "optuna":
            return value
        from importlib.util import find_spec

        if find_spec("optuna") is None:
            raise ValueError("optuna is not installed: pip install optuna, or use searcher: random")
        # Optuna's categorical distribution holds scalars (it warns about the rest and cannot
        # store them): a list-valued choice is searchable by the random searcher only.
        for key, dim in (info.data.get("search_space") or {}).items():
            odd = [v for v in dim.values or [] if not isinstance(v, _OPTUNA_SCALARS)]
            if odd:
                raise ValueError(
                    f"optuna samples choices of numbers, strings, booleans or null, but "
                    f"tune.search_space.{key} offers {odd[0]!r}; use searcher: random for it"
                )
        return value

    def metric_name(self, promote: PromoteConfig) -> str:
        return self.metric or promote.metric

    def mode_name(self, promote: PromoteConfig) -> str:
        """The direction trials are ranked in: tune.mode, else promote.mode for promote's
        metric, else the way tune.metric improves."""
        if self.mode is not None:
            return self.mode
        if self.metric is None or self.metric == promote.metric:
            return promote.mode
        return _improves(self.metric) or "max"


def _key_problem(key: str) -> str | None:
    """Why `key` cannot be searched (unknown, a section, not searchable), or None."""
    loc = key.split(".")
    if key in _UNSEARCHABLE_KEYS:
        return f"{key} cannot be searched: {_UNSEARCHABLE_KEYS[key]}"
    if loc[0] not in _SEARCHABLE_SECTIONS:
        return f"{key} cannot be searched: only keys under {', '.join(_SEARCHABLE_SECTIONS)}"
    model: type[BaseModel] = LifecycleConfig
    for depth, part in enumerate(loc):
        field = model.model_fields.get(part)
        if field is None:
            return f"{key} is not a config key; {_suggest(loc[: depth + 1])}"
        if _is_section(field.annotation):
            model = field.annotation
        elif depth < len(loc) - 1:
            return f"{key}: {'.'.join(loc[: depth + 1])} is a value, not a section"
        else:
            return None
    return f"{key} is a section; search one of its keys: {', '.join(model.model_fields)}"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class ClusterConfig(_Strict):
    allow_local_state: bool = Field(
        False,
        description="Let a job run on a Ray cluster of several nodes while its state is local: "
        "a SQLite catalog.uri or registry.tracking_uri, or a local catalog.warehouse or "
        "train.checkpoint_dir. Only true when every node sees those paths (one machine, or a "
        "shared file system mounted at the same path); otherwise use servers and object storage.",
    )


class LifecycleConfig(_Strict):
    name: str = Field(..., description="Short name of this model's lifecycle.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="What the model predicts.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model + method.")
    catalog: CatalogConfig = Field(default_factory=CatalogConfig, description="Iceberg catalog.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Ray Train settings.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow.")
    # validate_default: the default promote and tune sections are checked against the task too
    promote: PromoteConfig = Field(
        default_factory=PromoteConfig, validate_default=True, description="Promotion gate."
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Online endpoint.")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Batch scoring.")
    tune: TuneConfig = Field(
        default_factory=TuneConfig,
        validate_default=True,
        description="Ray Tune search (raylift tune).",
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Running on a Ray cluster of several nodes."
    )

    @property
    def production_uri(self) -> str:
        return f"models:/{self.registry.model_name}@{self.promote.alias}"

    @model_validator(mode="after")
    def _sections_fit_task(self) -> LifecycleConfig:
        if not _generative(self.task.type):
            return self
        problems = []
        if self.model.method == "frozen":
            problems.append(
                "model.method=frozen trains a new task head only, and a causal LM's head is its "
                "pretrained lm_head: use lora, qlora or full"
            )
        if self.promote.slices:
            problems.append("promote.slices are label groups, and causal-lm has no labels: remove")
        if problems:
            raise ValueError(f"task.type={self.task.type}: " + "; ".join(problems))
        return self

    # promote.metric and tune.metric must be metrics the task reports each epoch, ranked the
    # way they improve: a typo otherwise shows only once trials ran (no trial reports it), and
    # val_loss maximized never (ASHA keeps the worst trials, the gate's floor is upside down).
    # Field validators (task is validated before both), so that they report with the rest.
    @field_validator("promote")
    @classmethod
    def _promote_metric_fits_task(cls, value: PromoteConfig, info: ValidationInfo) -> PromoteConfig:
        task = info.data.get("task")
        problem = task and _promote_metric_problem(value, task.type)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("tune")
    @classmethod
    def _tune_metric_fits_task(cls, value: TuneConfig, info: ValidationInfo) -> TuneConfig:
        task = info.data.get("task")
        problem = task and _tune_metric_problem(value, info.data.get("promote"), task.type)
        if problem:
            raise ValueError(problem)
        return value


# What train_func reports each epoch that a run can be ranked by: val_loss, and the task's own
# metrics prefixed val_ (jobs.train_loop._evaluate; tests/unit/test_tune_config.py checks these
# against each task's metrics()). val_rows and the train_* figures say nothing of quality.
_CAUSAL_LM_METRICS = ("val_perplexity", "val_loss")
_CLASSIFICATION_METRICS = ("val_accuracy", "val_macro_f1", "val_loss")
_LOWER_IS_BETTER = ("loss", "perplexity")
_HIGHER_IS_BETTER = ("accuracy", "f1")


def ranked_metrics(task_type: str) -> tuple[str, ...]:
    """The metrics a run of `task_type` reports each epoch that promote and tune may rank by."""
    return _CAUSAL_LM_METRICS if _generative(task_type) else _CLASSIFICATION_METRICS


def _improves(metric: str) -> str | None:
    """The mode a metric is ranked in: min for a loss or perplexity, max for an accuracy or
    F1; None if its name does not say."""
    if any(word in metric for word in _LOWER_IS_BETTER):
        return "min"
    if any(word in metric for word in _HIGHER_IS_BETTER):
        return "max"
    return None


def _promote_metric_problem(promote: PromoteConfig, task_type: str) -> str | None:
    if promote.metric not in ranked_metrics(task_type):
        return _unknown_metric("promote", promote.metric, promote.mode, task_type)
    right = _improves(promote.metric)
    if right in (None, promote.mode):
        return None
    return (
        f"promote.metric={promote.metric} improves {_WAY[right]}, but promote.mode="
        f"{promote.mode}; set promote.mode: {right} and {_BOUND[right]}"
    )


def _tune_metric_problem(
    tune: TuneConfig, promote: PromoteConfig | None, task_type: str
) -> str | None:
    """tune.metric and tune.mode where set (unset, they are promote's, checked there)."""
    if tune.metric is not None and tune.metric not in ranked_metrics(task_type):
        return _unknown_metric("tune", tune.metric, tune.mode, task_type)
    metric = tune.metric or (promote.metric if promote else None)
    right = _improves(metric) if metric in ranked_metrics(task_type) else None
    if tune.mode is None or right in (None, tune.mode):
        return None
    return (
        f"tune ranks trials by {metric} (mode {tune.mode}), but {metric} improves {_WAY[right]}; "
        f"set tune.mode: {right}, or unset tune.mode (it follows promote.mode, or the way "
        "tune.metric improves)"
    )


_WAY = {"min": "downward (lower is better)", "max": "upward (higher is better)"}
_BOUND = {"min": "promote.max_value (a ceiling, or null)", "max": "promote.min_value (a floor)"}


def _unknown_metric(section: str, metric: str, mode: str | None, task_type: str) -> str:
    known = ranked_metrics(task_type)
    close = difflib.get_close_matches(metric, known, n=1)
    fix = f"set {section}.metric to one of them" + (
        f" (did you mean {close[0]!r}?)" if close else ""
    )
    ways = {_improves(m) for m in known}
    if len(ways) == 1 and mode not in (None, *ways):  # e.g. causal-lm: every one is a loss
        right = ways.pop()
        fix += f", with {section}.mode: {right}"
        fix += f" and {_BOUND[right]}" if section == "promote" else ""
    return (
        f"{section}.metric={metric}: {task_type} reports {' and '.join(known)} each epoch "
        f"(the metrics a run can be ranked by); {fix}"
    )


class ConfigError(ValueError):
    """A config that cannot be used; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['train.epochs=2', 'model.method=full'] into {'train.epochs': 2, ...}."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            shown = redact_credentials(repr(item))
            raise ConfigError("overrides", [f"  {shown}: expected key=value, e.g. train.epochs=2"])
        overrides[key.strip()] = _parse_value(raw)
    return overrides


def _parse_value(raw: str) -> Any:
    """YAML typing for override values ('2' → 2, 'true' → True); the raw text if not YAML."""
    if not raw:
        return None
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError):
        return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> LifecycleConfig:
    """Read, override and validate a lifecycle YAML; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"  file not found: {path}; pass a YAML from configs/"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(str(path), [f"  not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["  top level must be a mapping of sections"])
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return validate_mapping(raw, source=str(path))


def validate_mapping(raw: dict[str, Any], source: str = "<config>") -> LifecycleConfig:
    try:
        config = LifecycleConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from None
    errors = search_space_errors(config)
    if errors:
        raise ConfigError(source, errors)
    return config


def with_overrides(config: LifecycleConfig, overrides: dict[str, Any]) -> LifecycleConfig:
    """`config` with dotted `overrides` applied (a Tune trial's sample), validated again."""
    raw = config.model_dump(mode="python")
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    return LifecycleConfig.model_validate(raw)


def search_space_errors(config: LifecycleConfig) -> list[str]:
    """Every value a tune.search_space dimension can sample must make a valid config.

    Checked with each bound (and one inner float) substituted in turn, so `model.lora.r:
    {type: uniform, low: 0, high: 8}` fails here, not in a trial an hour into a search.
    """
    errors = []
    grace, epochs = config.tune.asha.grace_period, config.train.epochs
    if config.tune.scheduler in ("asha", "sha") and grace > epochs:
        errors.append(
            f"  tune.asha.grace_period: {grace} is more than train.epochs={epochs} (ASHA's "
            "max_t); lower it, or raise train.epochs"
        )
    for key, dimension in config.tune.search_space.items():
        for value in dimension.probe_values():
            try:
                with_overrides(config, {key: value})
            except ValidationError as exc:
                reason = "; ".join(e["msg"] for e in exc.errors())
                errors.append(
                    f"  tune.search_space.{key}: {dimension.type} can sample "
                    f"{redact_credentials(repr(value))}, which "
                    f"{key} refuses ({reason}). {key}: {_field_description(key.split('.'))}; "
                    "narrow the bounds (or use randint/choice for an integer key)"
                )
                break
    return errors


def config_hash(config: LifecycleConfig) -> str:
    """Stable short hash of the settings that shape the model (not where it is served)."""
    shaping = config.model_dump(include={"task", "model", "data", "train"})
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("overrides", [f"  {key}: '{part}' is not a section"])
        node = child
    node[leaf] = value


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"  {key}: unknown key; {_suggest(loc)}"
    if err["type"] == "missing":
        return f"  {key}: required; add it ({_field_description(loc)})"
    if err["type"] in _SECRET_ERRORS:
        return f"  {key}: {err['msg']}"
    value = err.get("input")
    shown = redact_credentials(repr(value)) if not isinstance(value, dict) else "a mapping"
    hint = _field_description(loc)
    return f"  {key}: {err['msg']}, got {shown}. This key: {hint}"


# Errors whose input is a secret: their message says what to do, and the input is never shown.
_SECRET_ERRORS = ("uri_credentials", "secret_properties")


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = LifecycleConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return model
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return model
    return model


def _suggest(loc: list[str]) -> str:
    parent = _model_at(loc[:-1]) or LifecycleConfig
    known = list(parent.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    if close:
        return f"did you mean '{'.'.join([*loc[:-1], close[0]])}'?"
    return "known keys here: " + ", ".join(known)


def _field_description(loc: list[str]) -> str:
    parent = _model_at(loc[:-1]) if loc else None
    field = parent.model_fields.get(loc[-1]) if parent and loc else None
    if field is None or not field.description:
        return "see configs/ for examples"
    return field.description

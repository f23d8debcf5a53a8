"""Predictor: the one object that answers with a model, in Ray Data actors and Serve replicas.

Built from a model URI (a local checkpoint directory, or `models:/name@alias` /
`models:/name/3` resolved through the MLflow registry), it knows the registry name and
version it was loaded from and tags every prediction with them.

The forward pass runs on an engine (`serving.engines`): torch, or onnxruntime / openvino
artifacts built and checked against fp32 torch when the version was registered; `auto` picks the
fastest of those the version offers by a short calibration here, torch when it offers none.

Speed on CPU comes from these, each measured (see the notes by the constants):
- torch threads set explicitly: Ray sets OMP_NUM_THREADS from an actor's CPUs (1 for a
  fractional actor), which would leave a replica on one core;
- tokenized once without padding, rows sorted by token length inside the batch, run in
  sub-batches each padded only to its own longest row, original order restored afterwards
  (BANKING77 texts average 16 tokens; batches of 128 in table order padded to their longest
  row compute 3.8x the real tokens);
- bf16 autocast, but only where the CPU does bf16 natively (AVX512-BF16 or AMX): on an AVX2
  CPU torch emulates bf16 matmuls about 8x slower than fp32, so there bf16 falls back to
  fp32 with a warning;
- an engine faster than torch where the version offers one (`serving.engines`).

On a GPU (one visible to the process, or `device=`) the torch engine runs there instead: the
model and each sub-batch move to the GPU, bf16 autocast where the GPU has native bf16 (else
fp32), and `runtime` names the device. A causal-lm checkpoint generates on the CPU.

One bad row never fails the batch it rides in:
- a text that is not usable (`serving.text.is_usable_text`: null, empty, blank, not a string)
  gets label None and score NaN, so the scoring job can quarantine it and keep the rest;
- a text longer than the model's positions is truncated: `max_length` is clamped to what the
  model can embed (`max_position_embeddings`, less RoBERTa's padding offset), so a long text
  never becomes an index error for the texts batched with it;
- a row whose logits or score are not finite (NaN, inf: a broken checkpoint or an overflow)
  gets label None and score NaN too, never a label picked by argmax over NaN.
`predict_texts` (Serve) says which of these happened in each answer's `error`.

A causal-lm checkpoint generates instead (`serving.generation`): `generate` for Serve, and
`__call__` writes a completion per prompt row (`completion`, `finish_reason`, token counts and
`error` for a prompt the limits refuse), under the `generation` limits; `score_responses`
gives each instruction row's response log-likelihood as training's eval counts it (promotion
re-evaluates perplexity with it, jobs.reevaluate).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from serving import engines, generation
from serving.text import UNUSABLE_REASON, usable_mask

if TYPE_CHECKING:
    import torch

__all__ = ["NON_FINITE_REASON", "Predictor"]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "int8"]

# A forward pass takes rows until rows x (longest row) would pass this many tokens. A token
# budget rather than a row count keeps every matmul about the same size, and gives the long
# tail of a sorted batch small sub-batches, where a fixed row count pads the most. On 3,080
# BANKING77 rows in windows of 512, padded/real tokens: 1.12 at 1,024 tokens (60 forward
# passes) against 1.18 for 32 rows (97 passes), 1.37 for 64 rows, 3.8 for table order.
_SUB_BATCH_TOKENS = 1024
_MAX_SUB_BATCH_ROWS = 256
# On a GPU such passes leave it waiting on the CPU, which tokenizes and pads. Measured on an
# H200 (16 CPU threads; MiniLM-L6's shape, 77 labels; 50,015 BANKING77 rows in calls of 1,024
# rows, as a scoring actor makes them; bf16; tests/benchmarks/test_gpu_scoring.py), two runs:
# 8,570 and 8,408 rows/s at 1,024 tokens (<= 256 rows), 14,201 and 18,172 at 8,192 tokens,
# 15,186 and 15,124 at 32,768 tokens and <= 4,096 rows (the steadiest).
_GPU_SUB_BATCH_TOKENS = 32_768
_GPU_MAX_SUB_BATCH_ROWS = 4_096

# Written to model_version when a local checkpoint directory (no registry) is served.
LOCAL_VERSION = "local"

NON_FINITE_REASON = "the model's score for this text is not finite (NaN or inf); no label given"

# Model families whose position ids start after the padding index (RoBERTa's embeddings hold
# 514 positions for 512 tokens): padding_idx + 1 positions can never be used by a token.
_POSITION_OFFSET_FAMILIES = frozenset(
    {
        "camembert",
        "data2vec-text",
        "ibert",
        "longformer",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)


class Predictor:
    """Score texts with a raylift checkpoint; `__call__` is a Ray Data `map_batches` UDF.

    Args:
        model_uri: checkpoint directory, or a registry URI (`models:/name@alias`).
        tracking_uri: MLflow tracking URI used to resolve registry URIs.
        precision: "bf16" (fp32 on CPUs and GPUs without native bf16), "fp32", "int8"
            (onnxruntime only) or "auto" (the engine's fastest variant this CPU runs natively;
            bf16 on a GPU that has it).
        engine: "torch", "onnxruntime", "openvino", or "auto" (the fastest the version
            offers, by a short calibration here); one the version does not offer, or whose
            artifact is missing or damaged, falls back to torch with a warning.
        torch_threads: threads of the engine (torch, onnxruntime or openvino); None keeps
            torch's default, which under Ray is the actor's CPU count (1 for a fractional
            actor).
        text_column: input column; the checkpoint's `text_column` by default.
        passthrough_columns: input columns copied unchanged to the output (row keys).
        max_length: tokens kept per text; the checkpoint's `max_length` by default.
        sort_window: sort each batch by token length before splitting it into sub-batches.
        sub_batch_tokens: padded tokens per forward pass (rows x longest row); None: 1,024
            on the CPU, 32,768 on a GPU (where a pass also takes up to 4,096 rows, not 256).
        trust_remote_code: run code shipped inside the model directory; pass the config's
            model.trust_remote_code, never a value read from the checkpoint.
        runtime_board: an object whose `add(runtime)` is called with `runtime` once the engine
            is chosen (jobs.score.RuntimeBoard), so the scoring run can report it.
        generation_config: limits and defaults of generation (a jobs.config.GenerationConfig;
            its defaults when None); used only when the checkpoint's task generates.
        calibration_rows: rows of the batch `auto` times the engines on; None fills the token
            budget (batch scoring's shape). Serve passes the few texts its batches hold under
            load: the fastest engine on 64 rows is not always the fastest on 8.
        device: where the torch engine runs, "cpu" or "cuda[:N]"; None: the first visible GPU
            if there is one, else the CPU. On a GPU torch runs whatever `engine` says (the
            other runtimes are CPU builds). A causal-lm checkpoint runs on the CPU.
        model_source: where the driver that pinned `model_uri` (models:/name/N) found its
            artifacts (serving.registry.resolve_version(...).source): a local folder there
            loads without asking the registry again (serving.registry.resolve_model).
    """

    def __init__(
        self,
        model_uri: str,
        *,
        tracking_uri: str | None = None,
        precision: Precision = "bf16",
        engine: engines.EngineName = "auto",
        torch_threads: int | None = None,
        text_column: str | None = None,
        passthrough_columns: Sequence[str] = (),
        max_length: int | None = None,
        sort_window: bool = True,
        sub_batch_tokens: int | None = None,
        trust_remote_code: bool = False,
        runtime_board: Any = None,
        generation_config: Any = None,
        calibration_rows: int | None = None,
        device: str | None = None,
        model_source: str | None = None,
    ):
        if precision not in ("auto", "fp32", "bf16", "int8"):
            raise ValueError(f"precision={precision!r}; use 'auto', 'fp32', 'bf16' or 'int8'")
        if engine not in ("auto", "torch", "onnxruntime", "openvino"):
            raise ValueError(f"engine={engine!r}; use 'auto', 'torch', 'onnxruntime' or 'openvino'")
        self._torch_threads = torch_threads
        self._apply_threads()
        path, self._model_name, self._model_version = _resolve(
            model_uri, tracking_uri, model_source
        )
        self._model_uri = model_uri
        self._trust_remote_code = trust_remote_code  # config's model.trust_remote_code only
        self._path = path
        self._load(path, engine)
        self._device = _inference_device(device, self._task)
        self._text_column = text_column or self._meta.text_column
        self._passthrough = tuple(passthrough_columns)
        self._max_length = _clamp_max_length(
            max_length or self._meta.max_length, self._model_config
        )
        self._sort_window = sort_window
        on_gpu = _device_type(self._device) != "cpu"
        default_tokens = _GPU_SUB_BATCH_TOKENS if on_gpu else _SUB_BATCH_TOKENS
        self._sub_batch_tokens = max(1, int(sub_batch_tokens or default_tokens))
        self._max_sub_batch_rows = _GPU_MAX_SUB_BATCH_ROWS if on_gpu else _MAX_SUB_BATCH_ROWS
        self._calibration_rows = calibration_rows
        self._engine = self._select_engine(path, engine, precision)
        self._generator = self._generator_for(generation_config)
        self._warm_up()
        if runtime_board is not None:
            runtime_board.add(self.runtime)

    # -- public surface -------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def model_version(self) -> str:
        return self._model_version

    @property
    def model_uri(self) -> str:
        return self._model_uri

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    @property
    def precision(self) -> Precision:
        """The precision actually used (bf16 requests fall back to fp32 without native bf16)."""
        return self._engine.precision  # type: ignore[return-value]

    @property
    def engine(self) -> engines.Engine:
        """The engine the forward pass runs on (see `runtime` for what it reports)."""
        return self._engine

    @property
    def generator(self) -> generation.Generator | None:
        """The Generator of a causal-lm checkpoint; None for one that scores texts."""
        return self._generator

    def generate(
        self,
        prompts: Sequence[str | Sequence[dict[str, Any]]],
        params: generation.SamplingParams | Sequence[generation.SamplingParams],
    ) -> list[generation.Completion]:
        """Completions of plain prompts or chat message lists (GenerationRequestError for one
        over the limits, before any is generated)."""
        generator = self._require_generator()
        self._apply_threads()
        if isinstance(params, generation.SamplingParams):
            params = [params] * len(prompts)
        return generator.generate([generator.encode(prompt) for prompt in prompts], params)

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: Sequence[generation.SamplingParams]
    ) -> Iterator[list[generation.Delta]]:
        """`Generator.stream` of encoded prompts, run with this Predictor's threads by whichever
        thread iterates it (Serve's model thread)."""
        generator = self._require_generator()

        def steps() -> Iterator[list[generation.Delta]]:
            self._apply_threads()
            yield from generator.stream(prompts, params)

        return steps()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one Ray Data batch; output: passthrough columns, label, score, model tags
        (a causal-lm checkpoint: completion columns instead of label and score)."""
        if self._text_column not in batch:
            raise KeyError(
                f"text column {self._text_column!r} is not in the batch; columns: "
                f"{', '.join(batch)}. Set text_column= to the column holding the text"
            )
        missing = [col for col in self._passthrough if col not in batch]
        if missing:
            raise KeyError(f"passthrough columns {missing} are not in the batch: {list(batch)}")
        out = {col: np.asarray(batch[col]) for col in self._passthrough}
        if self._generator is not None:
            self._apply_threads()
            out.update(generation.completion_columns(self._generator, batch[self._text_column]))
            rows = len(batch[self._text_column])
        else:
            labels, scores = self._predict(batch[self._text_column])
            rows = len(labels)
            out["label"] = labels
            out["score"] = scores
        out["model_name"] = np.full(rows, self._model_name, dtype=object)
        out["model_version"] = np.full(rows, self._model_version, dtype=object)
        return out

    @property
    def runtime(self) -> dict[str, Any]:
        """What actually runs: {"engine", "precision", "threads"}, for run summaries, GET
        /v1/models/{name} and metric labels."""
        return engines.runtime(self._engine)

    @property
    def max_length(self) -> int:
        """Tokens kept per text: the requested max_length, clamped to the model's positions."""
        return self._max_length

    def predict_labels(
        self, texts: Sequence[Any], engine: engines.Engine | None = None
    ) -> np.ndarray:
        """Labels of `texts` (None where there is none) on `engine`, this Predictor's own by
        default: the engine gate at registration compares engines through it."""
        return self._predict(texts, engine)[0]

    def predict_texts(self, texts: Sequence[Any]) -> list[dict[str, Any]]:
        """Plain-Python answers for Serve, one per text:
        {"label": str | None, "score": float | None, "error": None | why there is no label}."""
        texts = list(texts)
        labels, scores = self._predict(texts)
        usable = usable_mask(texts)
        return [
            _answer(label, score, usable=bool(ok))
            for label, score, ok in zip(labels.tolist(), scores.tolist(), usable, strict=True)
        ]

    def score_responses(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        systems: Sequence[Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per instruction row of a causal-lm version: (summed negative log-likelihood of its
        response tokens given the prompt, in nats; response tokens scored), exactly as
        training's evaluation counts them, so sum(nll) / sum(tokens) is its val_loss.

        Each row is formatted and masked as training formatted it (jobs.instruct.encode_example
        with this version's template and max_length), rows are sorted by length into
        sub-batches of at most `sub_batch_tokens` padded tokens and padded on the right with an
        attention mask (jobs.instruct.collate, as the train loop's eval pads): a row's figure
        does not depend on the rows batched with it. Not left-padded as generation is: a
        left-padded row's positions would start after its padding. A row without a usable
        prompt or response gets NaN and 0 tokens."""
        from jobs import instruct

        self._require_generator()
        self._apply_threads()
        prompts, responses = list(prompts), list(responses)
        systems = list(systems) if systems is not None else [None] * len(prompts)
        if not len(prompts) == len(responses) == len(systems):
            raise ValueError(
                f"{len(prompts)} prompts, {len(responses)} responses and {len(systems)} system "
                "messages: give one of each per row"
            )
        nll = np.full(len(prompts), np.nan, dtype=np.float64)
        tokens = np.zeros(len(prompts), dtype=np.int64)
        rows = np.flatnonzero(usable_mask(prompts) & usable_mask(responses))
        if not len(rows):
            return nll, tokens
        template = instruct.resolve_template(
            self._tokenizer, self._meta.instruct.template if self._meta.instruct else "auto"
        )
        encoded = [
            instruct.encode_example(
                self._tokenizer,
                prompts[i],
                responses[i],
                systems[i] if isinstance(systems[i], str) and systems[i] else None,
                template=template,
                max_length=self._max_length,
            )
            for i in rows
        ]
        lengths = np.fromiter((len(ids) for ids, _ in encoded), dtype=np.int64, count=len(rows))
        order = np.argsort(lengths, kind="stable")
        import torch  # a causal-lm version: its torch model is loaded already

        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self._engine.precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            for chunk in _sub_batches(order, lengths, self._sub_batch_tokens):
                batch = instruct.collate(
                    [encoded[i][0] for i in chunk], [encoded[i][1] for i in chunk], self._pad_id
                )
                labels = batch.pop("labels")
                logits = self._model(**batch).logits
                chunk_nll, chunk_tokens = _response_nll(logits, labels)
                nll[rows[chunk]] = chunk_nll
                tokens[rows[chunk]] = chunk_tokens
        return nll, tokens

    # -- loading --------------------------------------------------------------------------

    def _load(self, path: str, engine: str) -> None:
        """The checkpoint's description, tokenizer and task; its torch model too, unless the
        engine is not torch and the version has engine artifacts: then the torch model is
        loaded only if a torch variant is opened (`_model`): the named engine cannot run, or
        `auto` times torch (not when it reuses a pick made on this node). Building it imports
        most of transformers' modeling code (and peft for an adapter): about 3 s of an actor's
        start on 2 AVX512-BF16 cores, where opening the OpenVINO artifact takes 0.5 s."""
        from jobs.modeling import load_checkpoint, load_tokenizer, read_checkpoint_meta
        from jobs.tasks import get_task

        self._torch_model: Any = None
        meta = read_checkpoint_meta(path, self._trust_remote_code)
        if engine == "torch" or meta.engine_format is None:
            loaded = load_checkpoint(path, trust_remote_code=self._trust_remote_code)
            self._torch_model, self._tokenizer = loaded.model, loaded.tokenizer
            self._meta, self._task = loaded.meta, loaded.task
            self._model_config = loaded.model.config
        else:
            self._meta = meta
            # No Hugging Face model is built here: the task's transformers check (and the
            # import of transformers, about 1 CPU-s of each actor's start) is left to
            # load_checkpoint, should a torch variant be opened after all.
            self._task = get_task(meta.task, peft_needed=False, check_libraries=False)
            self._tokenizer = None
            if not self._task.generative:
                self._tokenizer = _TokenIds.load(Path(path), self._trust_remote_code)
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(path, self._trust_remote_code)
            self._model_config = _read_model_config(Path(path), meta, self._trust_remote_code)
        self._labels = list(self._meta.labels)
        pad = self._tokenizer.pad_token_id
        if pad is None:  # decoder-only tokenizers often have no pad token; eos pads instead
            pad = self._tokenizer.eos_token_id or 0
        self._pad_id = int(pad)

    @property
    def _model(self) -> Any:
        """The checkpoint's torch model (adapters merged, fp32, eval), loaded on first use when
        `_load` left it out."""
        if self._torch_model is None:
            from jobs.modeling import load_checkpoint

            loaded = load_checkpoint(self._path, trust_remote_code=self._trust_remote_code)
            self._torch_model = loaded.model
        return self._torch_model

    def _select_engine(
        self, path: str, engine: engines.EngineName, precision: Precision
    ) -> engines.Engine:
        threads = self._torch_threads or _default_threads()
        rows = self._calibration_rows or max(1, self._sub_batch_tokens // 16)
        selected = engines.select_engine(
            engine,
            precision,
            directory=path,
            engines_meta=engines.read_engines_meta(path, self._meta.engine_format),
            model=lambda: self._model,  # built only if a torch variant is opened
            threads=threads,
            probe=engines.probe_batch(int(self._model_config.vocab_size), rows),
            device=self._device,
        )
        log.info("%s runs on %s", self._model_uri, engines.runtime(selected))
        return selected

    def _generator_for(self, generation_config: Any) -> generation.Generator | None:
        if not generation.is_generative(self._task):
            return None
        if generation_config is None:
            from jobs.config import GenerationConfig

            generation_config = GenerationConfig()
        return generation.Generator(
            self._model,
            self._tokenizer,
            generation_config,
            precision=self._engine.precision,
            position_limit=_position_limit(self._model_config),
            # Prompts are formatted as the version's training formatted them (jobs.instruct).
            template=self._meta.instruct.template if self._meta.instruct else "auto",
        )

    def _require_generator(self) -> generation.Generator:
        if self._generator is None:
            raise TypeError(
                f"{self._model_uri} is a {self._task.name} model: it scores texts, it does not "
                "generate; serve or score a causal-lm version to generate"
            )
        return self._generator

    def _warm_up(self) -> None:
        # The first forward pass picks and JIT-compiles kernels; pay it at load, not on the
        # first request a replica serves.
        if self._generator is not None:
            self._generator.warm_up()
        else:
            self._predict(["warm up"])

    # -- inference ------------------------------------------------------------------------

    def _apply_threads(self) -> None:
        # Torch's thread count is per OS thread under OpenMP; Serve and Ray Data may call us
        # from a thread other than the one that built us, so check on every call (cheap). A
        # process that never imported torch (an exported engine's) runs no torch to set.
        if not self._torch_threads or "torch" not in sys.modules:
            return
        import torch

        if torch.get_num_threads() != self._torch_threads:
            torch.set_num_threads(self._torch_threads)

    def _predict(
        self, texts: Sequence[Any], engine: engines.Engine | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._generator is not None:
            raise TypeError(
                f"{self._model_uri} is a causal-lm model: it generates text, it does not "
                "classify; ask /v1/completions or /v1/chat/completions"
            )
        texts = list(texts)
        labels = np.full(len(texts), None, dtype=object)
        scores = np.full(len(texts), np.nan, dtype=np.float32)
        valid = usable_mask(texts)
        if not valid.any():
            return labels, scores
        if not valid.all():
            log.warning("%d of %d rows have no usable text", (~valid).sum(), len(texts))
        rows = np.flatnonzero(valid)
        logits = self._logits([texts[i] for i in rows], engine or self._engine)
        row_labels, row_scores = self._task.postprocess(logits, self._labels)
        finite = np.isfinite(logits).all(axis=1) & np.isfinite(row_scores)
        if not finite.all():
            log.warning("%d of %d rows have non-finite scores", (~finite).sum(), len(texts))
        labels[rows[finite]] = row_labels[finite]
        scores[rows[finite]] = row_scores[finite]
        return labels, scores

    def _logits(self, texts: list[str], engine: engines.Engine) -> np.ndarray:
        self._apply_threads()
        ids = self._tokenizer(
            texts,
            truncation=True,
            max_length=self._max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable") if self._sort_window else np.arange(len(ids))
        out = np.empty((len(ids), len(self._labels)), dtype=np.float32)
        chunks = list(
            _sub_batches(order, lengths, self._sub_batch_tokens, self._max_sub_batch_rows)
        )
        padded = (_pad([ids[i] for i in rows], self._pad_id) for rows in chunks)
        for rows, logits in zip(chunks, engine.forward(padded), strict=True):
            out[rows] = logits
        return out


def _inference_device(requested: str | None, task: Any) -> str:
    """`requested`, else the first visible GPU, else "cpu"; "cpu" for a checkpoint that
    generates (serving.generation samples with CPU generators and CPU tensors). Asking torch
    about GPUs imports it: where the machine has no GPU device at all, the answer is "cpu"
    without that import (an exported engine's Predictor never needs torch)."""
    if generation.is_generative(task):
        if requested is not None and _device_type(requested) != "cpu":
            raise ValueError(
                f"device={requested!r}: a {task.name} checkpoint generates on the CPU only; "
                "leave device unset"
            )
        return "cpu"
    if requested is not None:
        return requested if requested == "cpu" else str(_torch_device(requested))
    if not _gpu_device_nodes():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _torch_device(name: str) -> torch.device:
    import torch

    return torch.device(name)  # refuses a malformed name, with torch's own message


def _device_type(name: str) -> str:
    return "cpu" if name == "cpu" else _torch_device(name).type


def _gpu_device_nodes() -> bool:
    """Whether this machine shows a GPU to processes at all: NVIDIA's /dev/nvidia* (CUDA) or
    AMD's /dev/kfd (ROCm). Without one, torch.cuda.is_available() is False on any build."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()


def _default_threads() -> int:
    """The thread count torch would use in this process, without importing torch for it:
    OMP_NUM_THREADS where set (Ray sets it to an actor's CPUs), else torch's own default."""
    with contextlib.suppress(KeyError, ValueError):
        threads = int(os.environ["OMP_NUM_THREADS"])
        if threads > 0:
            return threads
    import torch

    return torch.get_num_threads()


def _resolve(model_uri: str, tracking_uri: str | None, source: str | None) -> tuple[str, str, str]:
    """(local checkpoint dir, model name, model version) for a directory or registry URI."""
    local = Path(model_uri).expanduser()
    if local.is_dir():
        return str(local), local.resolve().name, LOCAL_VERSION
    from serving.registry import resolve_model

    resolved = resolve_model(model_uri, tracking_uri, source)
    name = resolved.name or Path(resolved.path).name
    return resolved.path, name, resolved.version or LOCAL_VERSION


class _TokenIds:
    """The checkpoint's fast tokenizer (tokenizer.json) on the `tokenizers` library alone, for
    what `_logits` asks of a tokenizer: input ids, truncated on the right, special tokens
    added, no padding, and the pad and eos ids. Saving a checkpoint (save_pretrained) writes
    the backend transformers built, its settings applied, to tokenizer.json, so the ids are
    the ones transformers gives (tests/unit/test_predictor.py compares them). Loading it
    through transformers imports transformers: about 1 CPU-s of each engine actor's start
    (AVX512-BF16), against 0.03 s here. Only for tokenizer classes whose Python side adds
    nothing to the backend when encoding; any other checkpoint loads through transformers."""

    # Their __call__ is the backend's encode, with special tokens from the post-processor.
    _PLAIN_CLASSES = frozenset(
        {
            "BertTokenizer",
            "DistilBertTokenizer",
            "ElectraTokenizer",
            "MPNetTokenizer",
            "RobertaTokenizer",
            "XLMRobertaTokenizer",
            "PreTrainedTokenizerFast",
            "TokenizersBackend",
        }
    )

    def __init__(self, backend: Any, pad_token_id: int | None, eos_token_id: int | None):
        self._backend = backend
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def load(cls, directory: Path, trust_remote_code: bool) -> _TokenIds | None:
        """The checkpoint's tokenizer, or None when it is not one this class reproduces."""
        import json

        files = directory / "tokenizer.json", directory / "tokenizer_config.json"
        if not all(f.is_file() for f in files):
            return None
        try:
            config = json.loads(files[1].read_text())
        except ValueError:
            return None
        name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        plain = (
            (name in cls._PLAIN_CLASSES or f"{name}Fast" in cls._PLAIN_CLASSES)
            and config.get("backend", "tokenizers") == "tokenizers"
            and config.get("truncation_side", "right") == "right"
            and "auto_map" not in config  # code shipped with the model: transformers decides
            and not config.get("split_special_tokens", False)
        )
        if not plain:
            return None
        from tokenizers import Tokenizer

        from jobs.checkpoint import refuse_remote_code

        refuse_remote_code(directory, trust_remote_code, check_model_type=False)

        try:
            backend = Tokenizer.from_file(str(files[0]))
        except Exception:  # noqa: BLE001  (any parse error: transformers reports it better)
            return None
        backend.no_padding()
        ids = [_special_id(backend, config.get(k)) for k in ("pad_token", "eos_token")]
        return cls(backend, *ids)

    def __call__(
        self,
        texts: list[str],
        *,
        truncation: bool,
        max_length: int,
        padding: bool = False,
        return_attention_mask: bool = False,
        return_token_type_ids: bool = False,
    ) -> dict[str, list[list[int]]]:
        if padding or return_attention_mask or return_token_type_ids:
            raise ValueError("this tokenizer gives unpadded input ids only")
        if truncation:
            self._backend.enable_truncation(max_length, strategy="longest_first", direction="right")
        else:
            self._backend.no_truncation()
        encoded = self._backend.encode_batch_fast(list(texts), add_special_tokens=True)
        return {"input_ids": [e.ids for e in encoded]}


def _special_id(backend: Any, token: Any) -> int | None:
    """The id of a special token as tokenizer_config.json names it (a string, or a dict with
    its content), None if it names none."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _read_model_config(directory: Path, meta: Any, trust_remote_code: bool) -> Any:
    """The model's config.json as attributes (vocab_size, max_position_embeddings, model_type,
    pad_token_id: what the Predictor reads), without building the model: an adapter's from its
    base model."""
    import json
    import types

    from jobs.checkpoint import refuse_remote_code
    from jobs.modeling import resolve_base_model

    source = directory
    if not (directory / "config.json").is_file():  # an adapter: the architecture is the base's
        source = Path(resolve_base_model(meta.base_model))
        refuse_remote_code(source, trust_remote_code, check_model_type=False)
    return types.SimpleNamespace(**json.loads((source / "config.json").read_text()))


def _answer(label: str | None, score: float, *, usable: bool) -> dict[str, Any]:
    if label is not None:
        return {"label": label, "score": float(score), "error": None}
    return {"label": None, "score": None, "error": NON_FINITE_REASON if usable else UNUSABLE_REASON}


def _position_limit(model_config: Any) -> int | None:
    """Tokens the model can embed, or None when it has no absolute positions to run out of."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if getattr(model_config, "model_type", None) in _POSITION_OFFSET_FAMILIES:
        limit -= int(getattr(model_config, "pad_token_id", None) or 0) + 1
    return limit


def _clamp_max_length(requested: int, model_config: Any) -> int:
    """`requested`, or fewer when the model has fewer positions: a longer row would index past
    the position embeddings and fail every text batched with it."""
    limit = _position_limit(model_config)
    if limit is None or requested <= limit:
        return requested
    log.warning(
        "max_length=%d is more than the model's %d positions; texts are truncated to %d tokens",
        requested,
        limit,
        limit,
    )
    return limit


def _sub_batches(
    order: np.ndarray, lengths: np.ndarray, budget: int, max_rows: int = _MAX_SUB_BATCH_ROWS
) -> Iterator[np.ndarray]:
    """Consecutive runs of `order` whose padded size (rows x longest) stays within `budget`,
    of at most `max_rows` rows."""
    start, width = 0, 0
    for i, row in enumerate(order):
        wider = max(width, int(lengths[row]))
        rows = i - start + 1
        if rows > 1 and (rows * wider > budget or rows > max_rows):
            yield order[start:i]
            start, wider = i, int(lengths[row])
        width = wider
    if start < len(order):
        yield order[start:]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Right-pad to the longest row; no mask when every row has the same length."""
    lengths = [len(row) for row in rows]
    width = max(lengths)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    if min(lengths) == width:
        return ids, None
    return ids, (np.arange(width) < np.asarray(lengths)[:, None]).astype(np.int64)


def _response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row, jobs.instruct.token_nll: (summed nats, tokens scored) of next-token prediction
    over the labels that are not -100."""
    import torch

    from jobs.instruct import IGNORE_INDEX

    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(shifted.device, torch.long)
    nll = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    scored = targets != IGNORE_INDEX
    return nll.double().sum(dim=1).numpy(), scored.sum(dim=1).numpy()

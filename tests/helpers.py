"""Builders the tests share: tiny random models, small labelled tables."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

WORDS = (
    "card arrived late lost stolen pin blocked transfer cancel refund fee exchange rate "
    "top up failed cash withdrawal atm declined payment pending balance account verify "
    "identity change address phone contactless apple pay"
).split()


def make_tiny_bert(directory: Path) -> str:
    """Save a random 2-layer BERT (hidden 32) and a word-level tokenizer under `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    # Seeded: the same random base every session, so what a test asserts about learning on it
    # does not depend on which tests ran before (an unseeded base left e2e at chance once).
    torch.manual_seed(1234)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


def windows_by_length(tokenizer, texts: list[str], window: int, max_length: int = 64):
    """The benchmarks' tight loops tokenize `texts` `window` rows at a time and sort each window
    by length: yields (offset of the window, token ids, lengths, row order by length)."""
    import numpy as np

    for start in range(0, len(texts), window):
        ids = tokenizer(texts[start : start + window], truncation=True, max_length=max_length)[
            "input_ids"
        ]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        yield start, ids, lengths, np.argsort(lengths, kind="stable")


def make_ticket_rows(n: int, labels: list[str], seed: int = 0) -> list[dict]:
    """`n` rows of text and category where each category has its own words (learnable)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        anchor = WORDS[(labels.index(label) * 3) % len(WORDS)]
        filler = rng.sample(WORDS, 3)
        rows.append({"text": " ".join([anchor, *filler, anchor]), "category": label})
    return rows


def make_lora_checkpoint(base: str, directory: Path, labels: list[str]) -> str:
    """A raylift checkpoint (LoRA adapter + new head, seeded) over the model at `base`."""
    import torch

    from jobs.checkpoint import AdapterMeta, CheckpointMeta
    from jobs.config import ModelConfig
    from jobs.modeling import build_model, load_tokenizer, resolve_base_model, save_checkpoint
    from jobs.tasks import get_task

    torch.manual_seed(0)
    cfg = ModelConfig(base=base, method="lora", lora={"target_modules": ["query", "value"]})
    model = build_model(cfg, get_task("sequence-classification"), labels)
    lora = cfg.lora
    meta = CheckpointMeta(
        task="sequence-classification",
        labels=labels,
        base_model=base,
        method="lora",
        adapter=AdapterMeta(
            r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
        ),
        max_length=32,
        text_column="text",
    )
    tokenizer = load_tokenizer(resolve_base_model(base))  # base: a folder, or on s3://
    return str(save_checkpoint(model, tokenizer, directory, meta))


def biased_lora_copy(template: str, directory: Path, label: int) -> str:
    """A copy of the LoRA checkpoint `template` whose head answers labels[label] for any text
    (a bias of 20): versions that answer differently, so a response shows which one ran."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    checkpoint = shutil.copytree(template, directory)
    weights = Path(checkpoint) / "adapter_model.safetensors"
    tensors = load_file(weights)
    biases = [name for name in tensors if "classifier" in name and name.endswith("bias")]
    assert biases, f"no head bias in the adapter: {sorted(tensors)}"
    for name in biases:
        bias = torch.zeros_like(tensors[name])
        bias[label] = 20.0
        tensors[name] = bias
    save_file(tensors, weights)
    return str(checkpoint)


def make_full_checkpoint(
    base: str, directory: Path, labels: list[str], model=None, max_length: int = 32
) -> Path:
    """A raylift checkpoint of a whole model (method=full; `model` or a seeded head over `base`)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from jobs.checkpoint import CheckpointMeta
    from jobs.modeling import load_tokenizer, save_checkpoint

    if model is None:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), use_safetensors=True
        )
    meta = CheckpointMeta(
        task="sequence-classification",
        labels=labels,
        base_model=base,
        method="full",
        max_length=max_length,
    )
    return save_checkpoint(model, load_tokenizer(base), directory, meta)


def write_ticket_csv(path: Path, rows: list[dict]) -> Path:
    """`rows` (text, category) as a CSV file a `warehouse load` can read."""
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_lifecycle(root: Path, tiny_bert: str, rows: list[dict], name: str, **sections):
    """A lifecycle config over the tiny BERT with all its state under `root`: a LoRA run on
    `rows` (written as the source CSV), 8-row batches; `sections` are merged over each section.

    Inference engines are off (`registry.build_engines`): tests about engines, and the e2e
    lifecycle, turn them on."""
    from jobs.config import validate_mapping

    source = write_ticket_csv(root / "tickets.csv", rows)
    config = {
        "name": name,
        "task": {"label_column": "category", "max_length": 32},
        "model": {
            "base": tiny_bert,
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        },
        "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
        "data": {"source": str(source), "inbox_rows": 0},
        "train": {"batch_size": 8, "checkpoint_dir": str(root / "checkpoints")},
        "registry": {
            "tracking_uri": f"sqlite:///{root}/mlflow.db",
            "experiment": name,
            "build_engines": False,
        },
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return validate_mapping(config)


def session_ray_address() -> str:
    """The connected Ray's GCS address, for Ray's state API: without one, the API looks for a
    Ray among the machine's processes and fails when it finds several (a developer's own Ray,
    or the two-node test's cluster had it run beside the session's)."""
    import ray

    return ray.get_runtime_context().gcs_address


# One HTTP port for the Serve apps the integration and e2e tests deploy: a module deletes its
# apps and leaves Serve running for the next (a Serve start and shutdown cost about 3 s each
# here, and two actor processes); a module that needs other HTTP options (test_serve_limits'
# request timeout) restarts it, and shuts it down after.
SERVE_PORT = 8123
# score: one actor on half a CPU, one thread, fp32: small Ray Data jobs that fit beside the rest
TINY_SCORE = {
    "concurrency": 1,
    "num_cpus": 0.5,
    "torch_threads": 1,
    "batch_size": 16,
    "precision": "fp32",
}

# A minimal Llama-3-like chat template: each turn is "<|role|> content <|end|>", and the
# generation prompt is "<|assistant|>". Word-level, so every marker is one token.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
_LLAMA_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|end|>"]
_LLAMA_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
# Words of the plain template (jobs.instruct.PLAIN_TEMPLATE) and of the intents the tiny tests
# answer with, so a formatted example never tokenizes to <unk>.
_LLAMA_WORDS = [
    "###", "System", "Instruction", "Response", ":", "_",
    "card_arrival", "lost_card", "refund", "intent", "the", "is", "what",
]  # fmt: skip


def make_tiny_llama(directory: Path, chat_template: bool = True, pad_token: bool = True) -> str:
    """Save a random 2-layer Llama (hidden 32, ~60-token vocab) and its word-level tokenizer
    under `directory`: bos <s>, eos </s>, pad <pad>, and (chat_template) TINY_CHAT_TEMPLATE,
    whose turns end with <|end|>; without it, jobs.instruct formats with its plain template.
    Without `pad_token`, neither the tokenizer nor the config names a pad token, as Llama's
    do not (<pad> stays in the vocabulary, unused, as Llama 3 keeps reserved tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*_LLAMA_SPECIAL, *_LLAMA_ROLES, *_LLAMA_WORDS, *WORDS]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Whitespace splits "<|user|>" into pieces; split on spaces only, and on the characters the
    # plain template glues to words.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(":", behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad_token else None,
        unk_token="<unk>",
        additional_special_tokens=["<|end|>"],
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=vocab["<s>"],
        eos_token_id=[vocab["</s>"], vocab["<|end|>"]] if chat_template else vocab["</s>"],
        pad_token_id=vocab["<pad>"] if pad_token else None,
        tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(1234)  # the same random base every session (see make_tiny_bert)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


def load_prompts_table(config, table: str, directory: Path, prompts: list) -> int:
    """A prompts table for batch generation (`prompt`, an empty `response`, a `ticket_id` key),
    loaded with `warehouse load` as a user loads one; its snapshot id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import warehouse

    path = directory / "prompts.parquet"
    rows = pa.table({"prompt": pa.array(prompts, pa.string()), "response": [""] * len(prompts)})
    pq.write_table(rows, path)
    return warehouse.load_table_from_file(
        config.catalog,
        table,
        path,
        text_column="prompt",
        label_column="response",
        key_column="ticket_id",
    )


def run_in_fresh_process(script: str, *args: str) -> dict:
    """Run `script` in a new Python (this one may have imported the modules a test asks about
    already) with `args` as sys.argv[1:]; the JSON object its last line of output prints."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def one_rank_process_group(backend: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """A one-rank torch.distributed group (gloo on the CPU, nccl on cuda:0), as DeepSpeed and
    the train loop's collectives need; `env` is set for its lifetime, beside the rank's own."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**(env or {}), "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DeepSpeed caches a clone of the world group; left stale, the next group's
        # deepspeed.initialize fails ("Group ... is not registered").
        from deepspeed.utils import groups

        groups._WORLD_GROUP = None
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
        for key, value in before.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


# Ray records metrics in each worker and exports them every metrics_report_interval_ms (10 s by
# default). The session's Ray exports every METRICS_EXPORT_INTERVAL_S (tests/conftest.py): the
# tests that scrape /metrics waited about 21 s less for 5 s exports than for 10 s ones (AVX2),
# for about 1 CPU-s a minute more of an idle Ray.
METRICS_EXPORT_INTERVAL_S = 5.0
# How long a test waits for a recorded value to show on /metrics: a bound, not a wait.
METRICS_EXPORT_BOUND_S = 45.0


def scrape_metrics(url: str) -> list:
    """Every sample on a Prometheus /metrics page (`serving.app.metrics_url()`)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]

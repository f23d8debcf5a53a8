"""Promotion of a causal LM across snapshots: both versions' perplexity measured again on the
candidate's validation split, and the gate (mode min) decides on those figures.

Real Ray Data, Iceberg (SQLite catalog), MLflow (SQLite registry) and Predictor actors. The two
models are built here, not trained through Ray Train: the random tiny Llama, and the same base
after a few in-process steps on the instructions (its perplexity far lower). The
candidate's stored val_perplexity is what training's own evaluation (jobs.train_loop._evaluate
over jobs.training_data's validation stream) reports on its split, and its re-evaluated figure
must be that one: same rows, template, truncation and loss mask.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import instruct, promote, tracking, warehouse
from jobs.config import validate_mapping
from serving import tags
from tests.helpers import TINY_SCORE, make_ticket_rows, make_tiny_llama

INTENTS = ["card_arrival", "lost_card", "refund"]
TABLE = "support.instructions"
SPLIT = "fraction=0.25,seed=5"
MAX_REGRESSION = 0.05
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reevaluate-causal-lm")


@pytest.fixture(scope="module")
def config(root):
    base = make_tiny_llama(root / "tiny-llama")
    return validate_mapping(
        {
            "name": "reevaluate-lm",
            "task": {"type": "causal-lm", "max_length": MAX_LENGTH, "system_column": "system"},
            "model": {"base": base, "method": "full"},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "data": {"table": TABLE, "validation": {"fraction": 0.25, "seed": 5}},
            "train": {"batch_size": 8, "precision": "fp32"},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "reevaluate-lm",
                "model_name": "instruct-reevaluate",
                "build_engines": False,
            },
            "promote": {
                "metric": "val_perplexity",
                "mode": "min",
                "max_value": 1e4,
                "max_regression": MAX_REGRESSION,
            },
            "score": TINY_SCORE,
        }
    )


def _instructions(rows: int, seed: int) -> list[dict]:
    """A ticket as the prompt, its intent as the response; every third with a system message."""
    return [
        {
            "prompt": row["text"],
            "response": row["category"],
            "system": "answer with the intent" if i % 3 == 0 else None,
        }
        for i, row in enumerate(make_ticket_rows(rows, INTENTS, seed=seed))
    ]


@pytest.fixture(scope="module")
def snapshots(config, root) -> tuple[int, int]:
    """Two snapshots of the instruction table with different rows: (old, new)."""
    ids = []
    for seed in (1, 2):
        path = root / f"instructions-{seed}.parquet"
        pq.write_table(pa.Table.from_pylist(_instructions(40, seed)), path)
        ids.append(
            warehouse.load_table_from_file(
                config.catalog,
                TABLE,
                path,
                text_column="prompt",
                label_column="response",
                key_column="ticket_id",
            )
        )
    return ids[0], ids[1]


@pytest.fixture(scope="module")
def models(config):
    """(random base, the base after 10 steps on instructions of a third seed), fp32, eval mode:
    perplexity about 54 and 5 on either snapshot's split (an answer is 2 of ~50 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.modeling import load_tokenizer

    base = config.model.base
    weak = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    torch.manual_seed(0)
    trained = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    tokenizer = load_tokenizer(base)
    encoded = [
        instruct.encode_example(
            tokenizer, r["prompt"], r["response"], r["system"], template="chat", max_length=32
        )
        for r in _instructions(48, seed=0)
    ]
    batch = instruct.collate([e[0] for e in encoded], [e[1] for e in encoded], pad_id=0)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=5e-3)
    trained.train()
    for _ in range(10):
        optimizer.zero_grad()
        trained(**batch).loss.backward()
        optimizer.step()
    return weak, trained.eval()


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group: training's evaluation all-reduces its sums."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _pinned(config, snapshot: int):
    return config.model_copy(
        update={"data": config.data.model_copy(update={"snapshot_id": snapshot})}
    )


def _training_eval(config, model, snapshot: int) -> dict[str, float]:
    """What a training run's per-epoch evaluation reports for `model` on `snapshot`'s split."""
    from jobs.modeling import load_tokenizer
    from jobs.tasks import get_task
    from jobs.train_loop import BatchInputs, _evaluate
    from jobs.training_data import prepare_training_data

    task = get_task("causal-lm")
    pad = instruct.prepare_tokenizer(load_tokenizer(config.model.base)).pad_token_id
    validation = prepare_training_data(_pinned(config, snapshot)).datasets["validation"]
    return _evaluate(model, validation, task, config.train, 0, pad, BatchInputs(task, pad))


def _register(config, model, directory, snapshot: int, stored: dict[str, float]) -> str:
    """A version of `model` tagged as evaluated on `snapshot`'s split with `stored` metrics."""
    from jobs.checkpoint import CheckpointMeta, InstructMeta
    from jobs.modeling import load_tokenizer, save_checkpoint

    meta = CheckpointMeta(
        task="causal-lm",
        labels=[],
        base_model=config.model.base,
        method="full",
        max_length=MAX_LENGTH,
        text_column="prompt",
        instruct=InstructMeta(
            template="chat",
            prompt_column="prompt",
            response_column="response",
            system_column="system",
        ),
    )
    tokenizer = instruct.prepare_tokenizer(load_tokenizer(config.model.base))
    checkpoint = save_checkpoint(model, tokenizer, directory, meta)
    lineage = {
        tags.ICEBERG_TABLE: TABLE,
        tags.ICEBERG_SNAPSHOT_ID: str(snapshot),
        tags.VALIDATION_SPLIT: SPLIT,
        tags.BASE_MODEL: config.model.base,
    }
    with tracking.tracked_run(config, lineage) as run_id:
        return tracking.register(config, run_id, checkpoint, lineage, stored)


def _tags(config, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(config.registry.model_name, version).tags


def _aliases(config) -> dict[str, str]:
    from mlflow import MlflowClient

    model = MlflowClient().get_registered_model(config.registry.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_perplexity_is_measured_again_on_the_candidates_rows_and_decides_the_gate(
    ray_session, process_group, config, snapshots, models, tmp_path
):
    from jobs.training_data import prepare_training_data

    old, new = snapshots
    weak, trained = models
    reevaluated = tags.reevaluated_tag

    # @production: the random model, whose stored figure (from other rows) looks excellent.
    first = _register(config, weak, tmp_path / "v1", old, {"val_perplexity": 1.5})
    promote.main(config, version=first)

    # A better candidate on the new snapshot. Its stored figure (training's eval on its split)
    # is above the incumbent's stored 1.5 + max_regression: stored figures alone would refuse it.
    stored = _training_eval(config, trained, new)
    assert stored["val_perplexity"] > 1.5 + MAX_REGRESSION
    better = _register(config, trained, tmp_path / "v2", new, stored)
    result = promote.main(config, version=better)

    assert (result.version, result.previous_version) == (better, first)
    assert _aliases(config) == {"production": better, "previous": first}
    line = next(c for c in result.checks if "regression" in c)
    assert line.startswith("PASS regression: val_perplexity=") and "both re-evaluated" in line
    new_rows = prepare_training_data(_pinned(config, new)).validation_rows
    found = {v: _tags(config, v) for v in (first, better)}
    for version in (first, better):
        assert (
            found[version][reevaluated("rows")] == f"{TABLE}@{new} validation fraction=0.25,seed=5"
        )
        assert found[version][reevaluated("row_count")] == str(new_rows) == str(stored["val_rows"])
        assert int(found[version][reevaluated("token_count")]) > new_rows
    # Same rows, template and masking: re-evaluated on its own split, the candidate gets what its
    # training's evaluation reported.
    again = float(found[better][reevaluated("val_perplexity")])
    assert again == pytest.approx(stored["val_perplexity"], rel=1e-5)
    assert float(found[better][reevaluated("val_loss")]) == pytest.approx(
        stored["val_loss"], rel=1e-5
    )
    incumbent = float(found[first][reevaluated("val_perplexity")])
    assert incumbent > 2 * again  # the random model, measured on the same rows

    # A worse candidate on the old snapshot, claiming 1.01: both are measured on its rows, and
    # the perplexity it really has there refuses it.
    worse = _register(config, weak, tmp_path / "v3", old, {"val_perplexity": 1.01})
    with pytest.raises(
        promote.GateRefused,
        match=rf"FAIL regression: val_perplexity=\d+\.\d+ vs @production \(version {better}\) "
        r"\d+\.\d+ on .*@\d+ validation .*both re-evaluated.*beyond max_regression 0\.05",
    ):
        promote.main(config, version=worse)

    assert _aliases(config) == {"production": better, "previous": first}
    old_rows = prepare_training_data(_pinned(config, old)).validation_rows
    refused = _tags(config, worse)
    assert refused[tags.gate_check_tag("production", "regression", "verdict")] == "refused"
    assert refused[tags.gate_tag("production")] == "refused"
    for version in (worse, better):
        measured = _tags(config, version)
        assert measured[reevaluated("rows")].startswith(f"{TABLE}@{old} validation")
        assert measured[reevaluated("row_count")] == str(old_rows)
    assert float(_tags(config, worse)[reevaluated("val_perplexity")]) > 2 * float(
        _tags(config, better)[reevaluated("val_perplexity")]
    )

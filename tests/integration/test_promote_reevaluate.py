"""Promotion across snapshots: both versions are evaluated again on the candidate's rows.

Real Ray Data, Iceberg (SQLite catalog), MLflow (SQLite registry) and Predictor actors. One tiny
BERT is trained here until it separates three labels; the "bad" versions are the same weights
saved with their label names shuffled, so their true quality is known exactly, whatever their
stored metric tags claim.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import promote, tracking, warehouse
from jobs.config import validate_mapping
from serving import registry, tags
from tests.helpers import TINY_SCORE, make_full_checkpoint, make_ticket_rows

LABELS = ["card_arrival", "lost_card", "refund"]
SLICES = {"card_arrival": "cards", "lost_card": "cards", "refund": "refunds"}
TABLE = "support.tickets"
LOAD = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}


def _config(root: Path, model: str, **promote_section):
    return validate_mapping(
        {
            "name": "reevaluate-test",
            "task": {"label_column": "category"},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "data": {"table": TABLE, "validation": {"fraction": 0.2, "seed": 5}},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "reevaluate-test",
                "model_name": model,
                "build_engines": False,  # not about engines: spare the export at each version
            },
            "promote": {"min_value": 0.5, "max_regression": 0.02, **promote_section},
            "score": TINY_SCORE,
        }
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reevaluate")


@pytest.fixture(scope="module")
def snapshots(root) -> tuple[int, int]:
    """Two snapshots of the table with different rows: (old, new)."""
    config = _config(root, "unused")
    ids = []
    for seed in (1, 2):
        path = root / f"tickets-{seed}.parquet"
        rows = make_ticket_rows(90, LABELS, seed=seed)
        pq.write_table(pa.Table.from_pylist(rows), path)
        ids.append(warehouse.load_table_from_file(config.catalog, TABLE, path, **LOAD))
    return ids[0], ids[1]


@pytest.fixture(scope="module")
def trained(tiny_bert):
    """A tiny BERT classifier that gets the test rows right (trained here, seconds)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from jobs.modeling import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=len(LABELS), use_safetensors=True
    )
    rows = make_ticket_rows(120, LABELS, seed=0)
    batch = load_tokenizer(tiny_bert)([r["text"] for r in rows], padding=True, return_tensors="pt")
    targets = torch.tensor([LABELS.index(r["category"]) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch, labels=targets).loss.backward()
        optimizer.step()
    model.eval()
    return model


def _register(config, trained, tiny_bert, tmp_path, labels, snapshot: int, stored: float) -> str:
    """A version of `trained` whose class ids are named `labels`, tagged as evaluated on
    `snapshot` with val_accuracy `stored`."""
    checkpoint = make_full_checkpoint(
        tiny_bert, tmp_path / f"ckpt-{snapshot}-{stored}", labels, trained
    )
    lineage = {
        tags.ICEBERG_TABLE: TABLE,
        tags.ICEBERG_SNAPSHOT_ID: str(snapshot),
        tags.VALIDATION_SPLIT: "fraction=0.2,seed=5",
        tags.BASE_MODEL: tiny_bert,
    }
    with tracking.tracked_run(config, lineage) as run_id:
        return tracking.register(config, run_id, checkpoint, lineage, {"val_accuracy": stored})


def _aliases(config) -> dict[str, str]:
    from mlflow import MlflowClient

    model = MlflowClient().get_registered_model(config.registry.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _tags(config, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(config.registry.model_name, version).tags


def _validation_rows(config, snapshot: int) -> int:
    """The candidate snapshot's validation rows as training counts them (driver-side mask)."""
    from jobs.training_data import prepare_training_data

    pinned = config.model_copy(
        update={"data": config.data.model_copy(update={"snapshot_id": snapshot})}
    )
    return prepare_training_data(pinned).validation_rows


def test_a_worse_candidate_on_another_snapshot_is_refused_though_its_stored_metric_looks_fine(
    ray_session, root, snapshots, trained, tiny_bert, tmp_path
):
    old, new = snapshots
    config = _config(root, "across-snapshots")
    good = _register(config, trained, tiny_bert, tmp_path, LABELS, old, stored=0.95)
    promote.main(config, version=good)
    shuffled = [LABELS[1], LABELS[2], LABELS[0]]  # every prediction named wrong
    bad = _register(config, trained, tiny_bert, tmp_path, shuffled, new, stored=0.99)

    with pytest.raises(
        promote.GateRefused,
        match=r"FAIL regression: val_accuracy=0\.0000 vs @production .*\(beyond max_regr",
    ):
        promote.main(config, version=bad)

    assert _aliases(config) == {"production": good}
    rows = _validation_rows(config, new)
    for version, lowest, highest in ((good, 0.9, 1.0), (bad, 0.0, 0.1)):
        found = _tags(config, version)
        assert lowest <= float(found[tags.reevaluated_tag("val_accuracy")]) <= highest
        assert found[tags.reevaluated_tag("rows")].startswith(f"{TABLE}@{new} validation")
        assert found[tags.reevaluated_tag("row_count")] == str(rows)
    refused = _tags(config, bad)
    assert refused[tags.gate_check_tag("production", "regression", "verdict")] == "refused"
    assert refused[tags.gate_tag("production")] == "refused"


def test_a_slice_that_drops_is_refused_and_an_equal_candidate_is_promoted(
    ray_session, root, snapshots, trained, tiny_bert, tmp_path
):
    old, new = snapshots
    # The overall check is loose here, so only the slice gate can refuse.
    config = _config(root, "slices", slices=SLICES, max_regression=1.0, max_slice_drop=0.1)
    good = _register(config, trained, tiny_bert, tmp_path, LABELS, old, stored=0.95)
    promote.main(config, version=good)
    cards_swapped = [LABELS[1], LABELS[0], LABELS[2]]  # cards all wrong, refunds right
    bad = _register(config, trained, tiny_bert, tmp_path, cards_swapped, new, stored=0.97)

    with pytest.raises(promote.GateRefused) as refused:
        promote.main(config, version=bad)
    assert "FAIL slice.cards: slice 'cards' accuracy 0.0000" in str(refused.value)
    assert "PASS slice.refunds" in str(refused.value)
    assert _aliases(config) == {"production": good}
    found = _tags(config, bad)
    assert found[tags.gate_check_tag("production", "slice.cards", "verdict")] == "refused"
    assert float(found[tags.reevaluated_tag("slice.refunds")]) >= 0.9

    same = _register(config, trained, tiny_bert, tmp_path, LABELS, new, stored=0.96)
    result = promote.main(config, version=same)
    assert (result.version, result.previous_version) == (same, good)
    assert _aliases(config) == {"production": same, "previous": good}
    assert registry.resolve_version(config.production_uri).version == same

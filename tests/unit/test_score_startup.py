"""What a scoring actor pays to start: a Predictor over a whole-model checkpoint does not import
peft (with bitsandbytes, 3-5 s of each actor's start on the 2-core box, measured), nor does
jobs.score import pyiceberg (0.2 s); merging a LoRA checkpoint still imports peft, which shows
the check below can see an import."""

from __future__ import annotations

import pytest

from tests.helpers import make_full_checkpoint, make_lora_checkpoint, run_in_fresh_process

LABELS = ["card_arrival", "lost_card", "refund"]

# A child process: this one has imported peft already (other tests, tests.helpers).
_SCRIPT = """
import json, sys
import jobs.score  # the actors unpickle its UsableRows and StampRun
seen = {"jobs.score": sorted(m for m in ("pyiceberg", "mlflow") if m in sys.modules)}
from serving.predictor import Predictor
full = Predictor(sys.argv[1], precision="fp32", torch_threads=1)
full.predict_texts(["my card has not arrived"])
seen["full"] = sorted(m for m in ("peft", "bitsandbytes") if m in sys.modules)
Predictor(sys.argv[2], precision="fp32", torch_threads=1)
seen["lora"] = sorted(m for m in ("peft",) if m in sys.modules)
print(json.dumps(seen))
"""


def test_a_whole_model_loads_without_peft_and_an_adapter_with_it(tiny_bert, tmp_path):
    full = make_full_checkpoint(tiny_bert, tmp_path / "full", LABELS)
    lora = make_lora_checkpoint(tiny_bert, tmp_path / "lora", LABELS)
    seen = run_in_fresh_process(_SCRIPT, str(full), str(lora))
    assert seen == {"jobs.score": [], "full": [], "lora": ["peft"]}


_PINNED_SCRIPT = """
import json, sys
from serving.predictor import Predictor
uri, tracking, source = sys.argv[1:4]
predictor = Predictor(uri, tracking_uri=tracking, model_source=source or None,
                      precision="fp32", torch_threads=1)
print(json.dumps({"name": predictor.model_name, "version": predictor.model_version,
                  "label": predictor.predict_texts(["my card has not arrived"])[0]["label"],
                  "mlflow": "mlflow" in sys.modules}))
"""


def test_an_actor_loads_the_version_its_driver_pinned_without_asking_mlflow(tiny_bert, tmp_path):
    """jobs.score hands each actor the pinned version's artifact folder beside models:/name/N:
    the actor loads it without importing MLflow (1.4 CPU-s of its start) or querying the
    registry; the rows still carry the version's name and number. Without the folder, the
    actor asks the registry, as before."""
    from jobs import tracking
    from jobs.config import validate_mapping
    from serving.registry import resolve_version

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = validate_mapping(
        {
            "name": "pinned",
            "registry": {
                "tracking_uri": tracking_uri,
                "model_name": "pinned",
                "build_engines": False,
            },
        }
    )
    checkpoint = make_full_checkpoint(tiny_bert, tmp_path / "full", LABELS)
    with tracking.tracked_run(config, {}) as run_id:
        version = tracking.register(config, run_id, checkpoint, {}, {"val_accuracy": 0.5})
    pinned = resolve_version(f"models:/pinned/{version}", tracking_uri)
    assert pinned.source.startswith("file://")

    loaded = run_in_fresh_process(_PINNED_SCRIPT, pinned.uri, tracking_uri, pinned.source)
    asked = run_in_fresh_process(_PINNED_SCRIPT, pinned.uri, tracking_uri, "")
    assert loaded == {**asked, "mlflow": False}
    assert asked["mlflow"] is True and asked["name"] == "pinned" and asked["version"] == version
    assert asked["label"] in LABELS


@pytest.mark.parametrize(
    ("same", "keys"),
    [
        ({"output_table": "support.out", "quarantine_table": "support.out"}, "output_table"),
        ({"output_table": "support.inbox"}, "input_table"),
        ({"quarantine_table": "support.inbox"}, "quarantine_table"),
    ],
)
def test_a_run_writing_over_its_own_tables_is_refused_before_ray_starts(same, keys):
    """One table named twice in score.*: the quarantine commit would replace the date's
    predictions (both replace the date's rows), or the predictions would go into the inbox.
    Refused naming both keys, before Ray starts (ray.init fails every unit test)."""
    from jobs import score
    from jobs.config import validate_mapping

    tables = {"input_table": "support.inbox", "output_table": "support.preds"}
    config = validate_mapping({"name": "same", "score": {**tables, **same}})
    with pytest.raises(ValueError, match=rf"score\.{keys}.*score\.|score\..*score\.{keys}"):
        score.main(config)


def test_a_missing_input_column_names_the_config_key(tmp_path):
    """The scorer reads score.key_columns and the task's text column from the input table;
    one it lacks is named with its config key (it said only "Read one of them")."""
    from jobs import score, warehouse
    from jobs.config import validate_mapping

    catalog = {"uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "wh")}
    rows = tmp_path / "inbox.csv"
    rows.write_text("text,category\nmy card is lost,lost_card\n")
    load = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}
    config = validate_mapping(
        {"name": "cols", "catalog": catalog, "score": {"input_table": "support.inbox"}}
    )
    snapshot = warehouse.load_table_from_file(config.catalog, "support.inbox", rows, **load)
    pinned = score._Pinned(snapshot_id=snapshot, model=None, run_date="2026-11-23")

    for section, key, value, named in (
        ("score", "key_columns", ["id"], r"'id' \(score\.key_columns\)"),
        ("task", "text_column", "body", r"'body' \(task\.text_column\)"),
    ):
        part = getattr(config, section).model_copy(update={key: value})
        with pytest.raises(ValueError, match=named):
            score._read_input(config.model_copy(update={section: part}), pinned)

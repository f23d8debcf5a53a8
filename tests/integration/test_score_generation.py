"""Batch generation on the shared Ray: `jobs.score` on a causal-lm version writes a completions
table (model name, version and run date on every row), quarantines unusable prompts, keeps a
prompt over the limits with its error, and replaces the date on a re-run."""

from __future__ import annotations

import pytest

from jobs import score, warehouse
from jobs.config import validate_mapping
from tests.helpers import WORDS, load_prompts_table, make_tiny_llama

RUN_DATE = "2026-11-24"
PROMPTS = "support.prompts"
COMPLETIONS = "support.completions"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, checkpoint directory) with a prompts table of 12 rows, two unusable, one long."""
    from tests.unit.test_generation import make_causal_lm_checkpoint

    root = tmp_path_factory.mktemp("generate")
    base = make_tiny_llama(root / "base")
    checkpoint = make_causal_lm_checkpoint(base, root / "tiny-assistant")
    config = validate_mapping(
        {
            "name": "generate-test",
            "task": {"type": "causal-lm", "key_column": "ticket_id"},
            "model": {"base": base, "method": "full"},
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": None},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "score": {
                "input_table": PROMPTS,
                "output_table": COMPLETIONS,
                "quarantine_table": "support.prompts_quarantine",
                "model_uri": checkpoint,
                "concurrency": 1,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "batch_size": 8,
                "precision": "fp32",
                "run_date": RUN_DATE,
                "generation": {"max_new_tokens": 6, "max_prompt_tokens": 24},
            },
        }
    )
    return config, checkpoint


def _prompts() -> list[str | None]:
    prompts = [" ".join(WORDS[i : i + 1 + i % 4]) for i in range(12)]
    prompts[3], prompts[5] = None, "   "
    prompts[7] = " ".join(WORDS * 2)  # over generation.max_prompt_tokens
    return prompts


def test_completions_table_quarantine_and_rerun(ray_session, setup, tmp_path):
    import numpy as np

    from serving.predictor import Predictor

    config, checkpoint = setup
    prompts = _prompts()
    load_prompts_table(config, PROMPTS, tmp_path, prompts)
    local = Predictor(checkpoint, precision="fp32", generation_config=config.score.generation)
    expected = local({"prompt": np.array(prompts, dtype=object)})

    first = score.main(config)
    again = score.main(config)  # the same date: replaced, not appended

    assert (first.rows_scored, first.rows_quarantined) == (10, 2)
    assert (again.rows_scored, again.rows_quarantined) == (10, 2)
    assert first.model_name == "tiny-assistant" and first.model_version == "local"
    table = warehouse.load_catalog(config.catalog).load_table(COMPLETIONS)
    rows = {row["ticket_id"]: row for row in table.scan().to_arrow().to_pylist()}
    assert sorted(rows) == [i for i in range(12) if i not in (3, 5)]
    for key, row in rows.items():
        assert row["completion"] == expected["completion"][key], key
        assert row["completion_tokens"] == expected["completion_tokens"][key]
        assert row["prompt_tokens"] == expected["prompt_tokens"][key]
        assert (row["model_name"], row["model_version"]) == ("tiny-assistant", "local")
        assert str(row["run_date"]) == RUN_DATE
    assert rows[7]["completion"] is None and "max_prompt_tokens" in rows[7]["error"]
    assert all(rows[k]["error"] is None and rows[k]["completion"] is not None for k in (0, 1, 2))
    quarantine = warehouse.load_catalog(config.catalog).load_table("support.prompts_quarantine")
    assert sorted(quarantine.scan().to_arrow()["ticket_id"].to_pylist()) == [3, 5]

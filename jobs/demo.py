"""The whole lifecycle on the embedded default, end to end, with a summary.

    python -m jobs.demo --config configs/banking77/minilm_lora.yaml

Loads BANKING77 into Iceberg, fine-tunes, registers and promotes, serves the promoted model,
asks it one question, and batch-scores the inbox table back into the warehouse.

Run again on the same state, the demo trains a new candidate and gates it against the version
@production names: training is not bit-for-bit repeatable, and a candidate the gates refuse (a
slice that drops, say) leaves the alias where it was, as `raylift promote` does. The demo then
goes on with the version already in production, and its summary says so.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from jobs import finetune, load, promote, score
from jobs.config import LifecycleConfig

__all__ = ["DemoSummary", "main"]

log = logging.getLogger(__name__)

SAMPLE_TEXTS = ["I still have not received my new card, when will it arrive?"]


@dataclass
class DemoSummary:
    validation_accuracy: float
    validation_macro_f1: float
    model_name: str
    model_version: str
    alias: str
    endpoint_url: str
    metrics_url: str | None
    sample_answer: dict[str, Any]
    rows_scored: int
    rows_per_s: float
    wall_s: float
    scoring_runtime: list[dict[str, Any]] = field(default_factory=list)  # what the actors ran
    refused: str | None = None  # the gates' verdicts when the new version was not promoted


def main(config: LifecycleConfig) -> DemoSummary:
    started = time.perf_counter()
    load.main(config)
    trained = finetune.main(config)
    refused = promote_or_keep(config, trained.version)
    url, answer = _serve_and_ask(config)
    metrics = _metrics_url()
    scored = score.main(config)
    summary = DemoSummary(
        validation_accuracy=trained.metrics["val_accuracy"],
        validation_macro_f1=trained.metrics["val_macro_f1"],
        model_name=trained.model_name,
        model_version=trained.version,
        alias=config.promote.alias,
        endpoint_url=url,
        metrics_url=metrics,
        sample_answer=answer,
        rows_scored=scored.rows_scored,
        rows_per_s=scored.rows_per_s,
        wall_s=time.perf_counter() - started,
        scoring_runtime=scored.runtime,
        refused=refused,
    )
    _print_summary(summary)
    return summary


def promote_or_keep(config: LifecycleConfig, version: str) -> str | None:
    """Promote `version`; if the gates refuse it while promote.alias names an earlier version,
    log why and keep that one (the verdicts, returned). With nothing in production to fall
    back on, the refusal stands."""
    from serving import registry

    try:
        promote.main(config, version=version)
        return None
    except promote.GateRefused as exc:
        kept = registry.get_alias_version(config.registry.model_name, config.promote.alias)
        if kept is None:
            raise
        log.warning(
            "%s\nthe demo goes on with version %s, still @%s",
            exc,
            kept.version,
            config.promote.alias,
        )
        return str(exc)


def _serve_and_ask(config: LifecycleConfig) -> tuple[str, dict[str, Any]]:
    from serving import app

    base_url = app.deploy(config)
    url = f"{base_url}/v1/models/{config.registry.model_name}/predict"
    request = urllib.request.Request(
        url,
        data=json.dumps({"texts": SAMPLE_TEXTS}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return url, json.loads(response.read())


def _metrics_url() -> str | None:
    from serving import app

    return app.metrics_url()


def _runtimes(runtimes: list[dict[str, Any]]) -> str:
    """'openvino bf16, 1 thread' for each distinct runtime the Predictor actors reported."""
    if not runtimes:
        return "(engine not reported)"
    return "; ".join(
        f"{r['engine']} {r['precision']}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}"
        for r in runtimes
    )


def _print_summary(summary: DemoSummary) -> None:
    prediction = summary.sample_answer["predictions"][0]
    registered = f"{summary.model_name} v{summary.model_version} → @{summary.alias}"
    if summary.refused:
        serving = summary.sample_answer.get("model_version", "?")
        registered = (
            f"{summary.model_name} v{summary.model_version}, refused by the promotion gates "
            f"(logged above); @{summary.alias} stays v{serving}"
        )
    lines = [
        "",
        "raylift demo summary",
        f"  validation accuracy   {summary.validation_accuracy:.4f}"
        f"  (macro-F1 {summary.validation_macro_f1:.4f})",
        f"  registered version    {registered}",
        f"  endpoint              POST {summary.endpoint_url}",
        f"  metrics               GET {summary.metrics_url or '(not exported by this Ray)'}"
        "  (Prometheus text, raylift_* and Ray's own)",
        f"  sample                {SAMPLE_TEXTS[0]!r}",
        f"                        → {prediction['label']} ({prediction['score']:.3f})",
        f"  batch scoring         {summary.rows_scored} rows, {summary.rows_per_s:.0f} rows/s"
        f"  on {_runtimes(summary.scoring_runtime)}",
        f"  wall time             {summary.wall_s:.0f} s",
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)

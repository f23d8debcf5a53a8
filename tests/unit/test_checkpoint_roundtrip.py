"""A saved checkpoint answers exactly as the model did before it was saved.

Comparing a load with another load proves only that loading is deterministic: a save that
dropped the adapter or the head would pass. Here the logits are taken from the live model at
the moment it is saved, with weights moved away from their initial values (a fresh LoRA B is
zero, so an untrained adapter is a no-op that a lost adapter would imitate).
"""

from __future__ import annotations

import logging
import shutil

import torch

from jobs import modeling
from jobs.modeling import load_checkpoint
from tests.helpers import make_lora_checkpoint

LABELS = ["a", "b", "c"]
TEXTS = ["card arrived late", "refund fee exchange rate top up failed", "pin"]


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float().clone()


def _move_trainable_weights(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def test_logits_after_loading_equal_logits_before_saving(tiny_bert, tmp_path, monkeypatch):
    seen: dict[str, torch.Tensor] = {}
    real_save = modeling.save_checkpoint

    def save_and_remember(model, tokenizer, *args, **kwargs):
        seen["untrained"] = _logits(model, tokenizer)
        _move_trainable_weights(model)  # what training would do to the adapter and the head
        seen["saved"] = _logits(model, tokenizer)
        return real_save(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(modeling, "save_checkpoint", save_and_remember)
    directory = make_lora_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    loaded = load_checkpoint(directory)
    after = _logits(loaded.model, loaded.tokenizer)

    assert loaded.labels == LABELS
    torch.testing.assert_close(after, seen["saved"], atol=1e-5, rtol=1e-4)
    # The check can fail: losing the moved weights would give logits this far off.
    assert (seen["saved"] - seen["untrained"]).abs().max() > 0.1


def test_loading_an_adapter_logs_no_load_report_or_sharding_warning(tiny_bert, tmp_path):
    # transformers warns "classifier MISSING" for the head the adapter brings, and, if its
    # logger is turned down to hide that, "The following layers were not sharded" for a model
    # that is not sharded: either was printed by every scoring actor and replica.
    import transformers

    directory = make_lora_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    ours = _transformers_warnings(lambda: load_checkpoint(directory))
    plain = _transformers_warnings(  # the check can fail: transformers' own load does warn
        lambda: transformers.AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=len(LABELS)
        )
    )

    assert not [m for m in ours if "not sharded" in m or "LOAD REPORT" in m], ours
    assert [m for m in plain if "LOAD REPORT" in m and "classifier" in m], plain


def test_a_base_missing_weights_beyond_the_head_is_reported(tiny_bert, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_bert, broken)
    weights = load_file(broken / "model.safetensors")
    lost = next(k for k in weights if "encoder.layer.1.output.dense.weight" in k)
    save_file({k: v for k, v in weights.items() if k != lost}, broken / "model.safetensors")

    with caplog.at_level(logging.WARNING, logger="jobs.modeling"):
        make_lora_checkpoint(str(broken), tmp_path / "ckpt", LABELS)

    reports = [r.getMessage() for r in caplog.records if r.name == "jobs.modeling"]
    assert len(reports) == 1 and "encoder.layer.1.output.dense.weight" in reports[0], reports
    assert "classifier" not in reports[0]  # the new head is expected to be missing


def _transformers_warnings(load) -> list[str]:
    """What transformers warned during load(). Its loggers do not propagate to the root
    logger (caplog would see nothing), so the handler goes on theirs."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        load()
    finally:
        library.removeHandler(handler)
    return seen

"""What a scoring actor pays to start: a Predictor over a whole-model checkpoint does not import
peft (with bitsandbytes, 3-5 s of each actor's start on the 2-core box, measured), nor does
jobs.score import pyiceberg (0.2 s); merging a LoRA checkpoint still imports peft, which shows
the check below can see an import."""

from __future__ import annotations

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

"""Inference engines on a tiny random BERT (no Ray): built and gated at registration, each
variant labels like fp32 torch, `auto` picks by measurement, and anything missing, refused,
damaged or older serves on torch with a warning."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving import engines, tags
from tests.helpers import WORDS, make_lora_checkpoint, make_ticket_rows, run_in_fresh_process

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
ALL_VARIANTS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
]


def _native_bf16() -> bool:
    from cluster import hardware

    return hardware.cpu_has_native_bf16()


def _skip_without_bf16(precision: str) -> None:
    if precision == "bf16" and not _native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 paths cannot run")


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=k)) for k in rng.integers(1, 31, size=n)]


def _rows(n: int = 120) -> engines.EngineRows:
    rows = make_ticket_rows(n, LABELS, seed=3)
    return engines.EngineRows(
        texts=[r["text"] for r in rows], labels=[r["category"] for r in rows], source="test rows"
    )


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tiny_bert, tmp_path_factory) -> str:
    return make_lora_checkpoint(tiny_bert, tmp_path_factory.mktemp("ckpt") / "tiny", LABELS)


@pytest.fixture(scope="module")
def staged(checkpoint, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """What registration uploads for the tiny checkpoint, and the version's engine tags."""
    return engines.stage_with_engines(checkpoint, tmp_path_factory.mktemp("stage"), _rows())


def _copy(staged_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(staged_dir, tmp_path / "version"))


def _predictor(path, **kwargs):
    from serving.predictor import Predictor

    return Predictor(str(path), torch_threads=1, **kwargs)


def test_registration_exports_and_records_every_variant(checkpoint, staged):
    from jobs.modeling import read_checkpoint_meta

    directory, version_tags = staged
    assert directory != Path(checkpoint) and not (Path(checkpoint) / "engines").exists()
    for name in ("model.onnx", "model.int8.onnx", "engines.json"):
        assert (directory / "engines" / name).is_file()
    assert read_checkpoint_meta(directory).engine_format == 1
    report = json.loads((directory / "engines" / "engines.json").read_text())
    assert report["rows"] == 120 and report["min_agreement"] == 0.995
    variants = {(v["engine"], v["precision"]): v for v in report["variants"]}
    assert set(variants) == set(ALL_VARIANTS)
    for key, variant in variants.items():
        if key[1] == "bf16" and not _native_bf16():
            assert not variant["offered"] and "no native bf16" in variant["reason"]
            continue
        assert variant["offered"], variant["reason"]
        assert variant["agreement"] >= 0.995
        name = engines.variant_name(*key)
        assert version_tags[tags.engine_tag(name, "verdict")] == "offered"
        assert float(version_tags[tags.engine_tag(name, "agreement")]) == pytest.approx(
            variant["agreement"], abs=1e-6
        )
    assert version_tags[tags.ENGINE_FORMAT] == "1"
    assert "onnxruntime-int8" in version_tags[tags.ENGINES_OFFERED].split(",")


@pytest.mark.parametrize(("engine", "precision"), ALL_VARIANTS)
def test_each_variant_labels_like_fp32_torch(staged, engine, precision, monkeypatch):
    """Every precision path is forced; bf16 ones are skipped where the CPU cannot run them."""
    _skip_without_bf16(precision)
    directory, _ = staged
    texts = np.array(_texts(300, seed=1), dtype=object)
    reference = _predictor(directory, engine="torch", precision="fp32")({"text": texts})
    predictor = _predictor(directory, engine=engine, precision=precision)
    got = predictor({"text": texts})

    assert predictor.runtime == {"engine": engine, "precision": precision, "threads": 1}
    assert np.mean(got["label"] == reference["label"]) >= engines.MIN_AGREEMENT
    tolerance = 1e-4 if precision == "fp32" else 0.03
    np.testing.assert_allclose(got["score"], reference["score"], atol=tolerance)
    assert list(got) == list(reference)  # same output columns, same order


def test_a_named_engine_runs_without_building_the_torch_model(staged, tmp_path, monkeypatch):
    """engine=onnxruntime/openvino over a version with its artifacts never builds the torch
    model (about 3 s of an actor's start): the loader is made to fail and the labels are still
    torch's; when the artifact cannot run, the torch model is built and serves."""
    import jobs.modeling

    directory, _ = staged
    texts = np.array(_texts(100, seed=4), dtype=object)
    reference = _predictor(directory, engine="torch", precision="fp32")({"text": texts})
    load = jobs.modeling.load_checkpoint

    def no_torch_model(*args, **kwargs):
        raise AssertionError("the torch model was built")

    with monkeypatch.context() as patched:
        patched.setattr(jobs.modeling, "load_checkpoint", no_torch_model)
        for engine in ("onnxruntime", "openvino"):
            predictor = _predictor(directory, engine=engine, precision="fp32")
            got = predictor({"text": texts})
            assert predictor.runtime["engine"] == engine
            assert np.mean(got["label"] == reference["label"]) >= engines.MIN_AGREEMENT
            assert predictor.max_length == 32 and predictor.labels == LABELS

    broken = _copy(directory, tmp_path)
    (broken / "engines" / "model.onnx").unlink()
    built = []
    monkeypatch.setattr(
        jobs.modeling, "load_checkpoint", lambda *a, **k: built.append(a) or load(*a, **k)
    )
    fallback = _predictor(broken, engine="openvino", precision="fp32")
    assert fallback.runtime["engine"] == "torch" and len(built) == 1
    np.testing.assert_array_equal(fallback({"text": texts})["label"], reference["label"])


def test_predict_texts_is_the_same_on_every_engine(staged):
    """The Serve path (predict_texts) answers alike whatever runs underneath."""
    directory, _ = staged
    texts = ["card arrived late", "", "refund pending"]
    answers = [
        _predictor(directory, engine=e, precision="fp32").predict_texts(texts)
        for e in ("torch", "onnxruntime", "openvino")
    ]
    assert [a["label"] for a in answers[1]] == [a["label"] for a in answers[0]]
    assert [a["label"] for a in answers[2]] == [a["label"] for a in answers[0]]
    assert answers[1][1]["error"] is not None and answers[2][1]["label"] is None


def test_auto_picks_the_fastest_offered_variant_by_measurement(
    staged, tmp_path, monkeypatch, caplog
):
    import time

    directory, _ = staged
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path))  # no pick remembered from before
    monkeypatch.setattr(engines, "CALIBRATION_S", 0.2)

    def slow(forward):
        def run(self, batches):
            for out in forward(self, batches):
                time.sleep(0.02)
                yield out

        return run

    # Everything but onnxruntime is made slow: auto must measure, not guess.
    monkeypatch.setattr(engines.TorchEngine, "forward", slow(engines.TorchEngine.forward))
    monkeypatch.setattr(engines.OpenVinoEngine, "forward", slow(engines.OpenVinoEngine.forward))
    with caplog.at_level(logging.INFO, logger="serving.engines"):
        predictor = _predictor(directory, engine="auto", precision="auto")
    assert predictor.runtime["engine"] == "onnxruntime"
    assert "engine=auto picked onnxruntime" in caplog.text
    assert "torch" in caplog.text and "openvino" in caplog.text  # all candidates were timed


def test_auto_remembers_its_pick_on_the_node(staged, tmp_path, monkeypatch, caplog):
    """The next `auto` Predictor over the same version on this node opens the variant picked
    before, neither timing anything nor building the torch model (about 6 s of an auto actor's
    start); a pick that is stale, unreadable or for another thread count is measured again."""
    import jobs.modeling

    directory, _ = staged
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(engines, "CALIBRATION_S", 0.1)
    texts = np.array(_texts(60, seed=5), dtype=object)
    first = _predictor(directory, engine="auto", precision="fp32")
    picked = first.runtime["engine"]
    [remembered] = (tmp_path / engines.PICKS_DIR).glob("*.json")
    assert json.loads(remembered.read_text())["engine"] == picked

    def never(*args, **kwargs):
        raise AssertionError("measured or built again")

    with monkeypatch.context() as patched, caplog.at_level(logging.INFO, "serving.engines"):
        patched.setattr(engines, "_fastest", never)
        if picked != "torch":
            patched.setattr(jobs.modeling, "load_checkpoint", never)
        again = _predictor(directory, engine="auto", precision="fp32")
        assert again.runtime == first.runtime
        np.testing.assert_array_equal(
            again({"text": texts})["label"], first({"text": texts})["label"]
        )
    assert "as measured on this node before" in caplog.text

    timed = []
    monkeypatch.setattr(engines, "_fastest", lambda opened, probe: timed.append(1) or opened[0])
    record = json.loads(remembered.read_text())
    remembered.write_text(json.dumps({**record, "picked_at": record["picked_at"] - 8 * 86400}))
    _predictor(directory, engine="auto", precision="fp32")  # a week old: measured again
    remembered.write_text("{not json")
    _predictor(directory, engine="auto", precision="fp32")
    from serving.predictor import Predictor

    Predictor(str(directory), torch_threads=2, engine="auto", precision="fp32")  # another key
    assert len(timed) == 3


def test_auto_on_fp32_considers_only_fp32_variants(staged):
    directory, _ = staged
    predictor = _predictor(directory, engine="auto", precision="fp32")
    assert predictor.runtime["precision"] == "fp32"


def test_a_variant_failing_the_gate_is_not_offered_and_says_why(checkpoint, tmp_path, caplog):
    monkey = pytest.MonkeyPatch()
    monkey.setattr(engines, "MIN_AGREEMENT", 1.01)  # impossible: every variant is refused
    try:
        directory, version_tags = engines.stage_with_engines(checkpoint, tmp_path, _rows(60))
    finally:
        monkey.undo()
    report = json.loads((directory / "engines" / "engines.json").read_text())
    refused = [v for v in report["variants"] if not v["offered"]]
    assert {(v["engine"], v["precision"]) for v in refused} == set(ALL_VARIANTS) - {
        ("torch", "fp32")
    }
    for variant in refused:
        name = engines.variant_name(variant["engine"], variant["precision"])
        assert version_tags[tags.engine_tag(name, "verdict")] == "refused"
        assert version_tags[tags.engine_tag(name, "reason")] == variant["reason"]
        if variant["agreement"] is not None:
            assert "below 1.01" in variant["reason"]
    assert version_tags[tags.ENGINES_OFFERED] == "torch-fp32"
    # No offered variant reads them: not uploaded with the version.
    assert not (directory / "engines" / "model.onnx").exists()
    assert not (directory / "engines" / "model.int8.onnx").exists()
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(directory, engine="onnxruntime", precision="fp32")
    assert predictor.runtime["engine"] == "torch"
    assert "refused at registration: top-1 agreement" in caplog.text
    auto = _predictor(directory, engine="auto", precision="auto")
    assert auto.runtime == {"engine": "torch", "precision": "fp32", "threads": 1}


def test_a_variant_that_cannot_run_is_refused_with_the_error(checkpoint, tmp_path, monkeypatch):
    def broken_quantization(source, target):
        Path(target).write_bytes(b"not an onnx file")
        return Path(target)

    monkeypatch.setattr(engines, "quantize_int8", broken_quantization)
    directory, version_tags = engines.stage_with_engines(checkpoint, tmp_path, _rows(60))
    reason = version_tags[tags.engine_tag("onnxruntime-int8", "reason")]
    assert reason.startswith("failed to run:")
    assert version_tags[tags.engine_tag("onnxruntime-fp32", "verdict")] == "offered"
    assert "onnxruntime-int8" not in version_tags[tags.ENGINES_OFFERED]


def test_a_missing_artifact_falls_back_to_torch_with_a_warning(staged, tmp_path, caplog):
    directory = _copy(staged[0], tmp_path)
    (directory / "engines" / "model.onnx").unlink()
    texts = np.array(_texts(40), dtype=object)
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(directory, engine="openvino", precision="fp32")
    assert predictor.runtime == {"engine": "torch", "precision": "fp32", "threads": 1}
    assert "engines/model.onnx is missing" in caplog.text
    reference = _predictor(directory, engine="torch", precision="fp32")
    assert list(predictor({"text": texts})["label"]) == list(reference({"text": texts})["label"])


def test_a_damaged_artifact_falls_back_to_torch_with_a_warning(staged, tmp_path, caplog):
    directory = _copy(staged[0], tmp_path)
    (directory / "engines" / "model.int8.onnx").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(directory, engine="onnxruntime", precision="int8")
    assert predictor.runtime["engine"] == "torch"
    assert "onnxruntime-int8 could not be opened" in caplog.text


def test_a_checkpoint_without_engines_serves_on_torch(checkpoint, tmp_path, caplog):
    """Versions registered before engines (format 2, or format 3 without engine_format)."""
    directory = Path(shutil.copytree(checkpoint, tmp_path / "old"))
    meta = json.loads((directory / "raylift.json").read_text())
    meta.pop("engine_format")
    (directory / "raylift.json").write_text(json.dumps({**meta, "format_version": 2}))
    assert _predictor(directory, engine="auto", precision="fp32").runtime["engine"] == "torch"
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(directory, engine="openvino", precision="fp32")
    assert predictor.runtime["engine"] == "torch"
    assert "not built for this version" in caplog.text


def test_a_newer_engine_format_serves_on_torch(staged, tmp_path, caplog):
    from jobs.modeling import read_checkpoint_meta, write_checkpoint_meta

    directory = _copy(staged[0], tmp_path)
    meta = read_checkpoint_meta(directory)
    write_checkpoint_meta(directory, meta.model_copy(update={"engine_format": 99}))
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(directory, engine="onnxruntime", precision="fp32")
    assert predictor.runtime["engine"] == "torch"
    assert "engine format 99, newer than the 1" in caplog.text


def test_no_engines_without_rows_or_for_a_non_raylift_directory(checkpoint, tmp_path):
    directory, found = engines.stage_with_engines(checkpoint, tmp_path / "a", None)
    assert directory == Path(checkpoint)
    assert "no labelled validation rows" in found[tags.ENGINES_NOT_BUILT]
    marker = tmp_path / "marker"
    marker.mkdir()
    directory, found = engines.stage_with_engines(marker, tmp_path / "b", _rows(10))
    assert directory == marker and "not a raylift checkpoint" in found[tags.ENGINES_NOT_BUILT]


def test_engines_turned_off_by_the_config_build_nothing_and_say_so(checkpoint, tmp_path):
    off = "registry.build_engines is false"
    directory, found = engines.stage_with_engines(checkpoint, tmp_path, _rows(10), engines_off=off)
    assert directory == Path(checkpoint) and found == {tags.ENGINES_NOT_BUILT: off}
    assert not (Path(checkpoint) / "engines").exists() and not list(tmp_path.iterdir())


def test_a_failed_export_registers_without_engines(checkpoint, tmp_path, monkeypatch):
    def fails(model, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(engines, "export_onnx", fails)
    directory, found = engines.stage_with_engines(checkpoint, tmp_path, _rows(10))
    assert directory == Path(checkpoint)
    assert found[tags.ENGINES_NOT_BUILT] == "export failed: exporter exploded"


def test_unknown_engine_or_precision_names_the_choices(checkpoint):
    with pytest.raises(ValueError, match="engine='tensorrt'.*'onnxruntime'"):
        _predictor(checkpoint, engine="tensorrt")
    with pytest.raises(ValueError, match="precision='fp8'.*'int8'"):
        _predictor(checkpoint, precision="fp8")


def test_engine_tag_names_are_owned_by_serving_tags():
    assert tags.engine_tag("openvino-bf16", "agreement") == "raylift.engine.openvino-bf16.agreement"
    with pytest.raises(ValueError, match="known: verdict"):
        tags.engine_tag("openvino-bf16", "speed")


def test_torch_bf16_runs_on_bf16_linear_weights_made_once_with_autocast_logits(checkpoint):
    """torch-bf16 casts the Linear weights once (autocast re-casts them on every call) and gives
    plain autocast's logits; the fp32 model is left as it was, and only Linear tensors are
    copied (embeddings and layer norms are shared)."""
    import torch

    _skip_without_bf16("bf16")
    predictor = _predictor(checkpoint, engine="torch", precision="bf16")
    runner = predictor.engine
    model = runner.model
    ids, mask = engines.probe_batch(model.config.vocab_size, rows=3, width=9)
    mask[1, 6:] = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = next(runner.forward([(ids, mask)]))
    np.testing.assert_array_equal(got, expected.logits.float().numpy())

    copy = runner._bf16_model
    assert isinstance(copy, torch.nn.Module) and copy is not model  # the bf16 copy, made
    again = next(runner.forward([(ids, mask)]))
    np.testing.assert_array_equal(again, got)  # the second call gives the same logits
    assert runner._bf16_model is copy  # made once, reused by later calls
    linear = [m for m in copy.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the fp32 model untouched
    original = {p.data_ptr() for p in model.parameters()}
    for module in copy.modules():
        for tensor in module.parameters(recurse=False):
            assert (tensor.data_ptr() in original) != isinstance(module, torch.nn.Linear)


def test_a_linear_weight_tied_to_an_embedding_stays_fp32_and_shared():
    import torch

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=True)
            self.head.weight = self.embed.weight

    model = Tied()
    copy = engines.bf16_linear_copy(model)
    assert copy.head.weight is copy.embed.weight is model.embed.weight
    assert copy.head.bias.dtype == torch.bfloat16 and model.head.bias.dtype == torch.float32


def test_auto_calibrates_on_the_rows_it_is_told(staged, monkeypatch):
    """Serve times engines on the few texts its batches hold, batch scoring on a full budget."""
    directory, _ = staged
    shapes = []
    fastest = engines._fastest

    def record(opened, probe):
        shapes.append(probe[0].shape)
        return fastest(opened, probe)

    monkeypatch.setattr(engines, "CALIBRATION_S", 0.05)
    monkeypatch.setattr(engines, "_fastest", record)
    _predictor(directory, engine="auto", precision="auto", calibration_rows=3)
    _predictor(directory, engine="auto", precision="auto", sub_batch_tokens=512)
    assert shapes == [(3, 16), (32, 16)]


# A child process: this one has imported transformers and torch already (other tests,
# tests.helpers). It imports what a scoring actor unpickles (jobs.score) and a replica runs.
_NO_TORCH_SCRIPT = """
import json, sys
import jobs.score, serving.app
from serving.predictor import Predictor
predictor = Predictor(sys.argv[1], engine=sys.argv[3], precision="fp32", torch_threads=1)
labels = predictor({"text": json.loads(sys.argv[2])})["label"].tolist()
print(json.dumps({"engine": predictor.runtime["engine"], "labels": labels,
                  "imported": sorted(m for m in ("transformers", "torch") if m in sys.modules)}))
"""


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_an_engine_predictor_starts_without_transformers_or_torch_and_labels_as_before(
    staged, engine
):
    """A Predictor on an exported engine tokenizes with tokenizer.json on `tokenizers` alone,
    skips the task's transformers check, reads the CPU's bf16 support from the kernel's flags
    and finds no GPU device without asking torch: neither transformers nor torch is imported
    (about 1 and 1.5 CPU-s of each actor's start); the labels are the ones the transformers
    tokenizer gives."""
    from serving.predictor import Predictor

    directory, _ = staged
    texts = _texts(80, seed=6)
    seen = run_in_fresh_process(_NO_TORCH_SCRIPT, str(directory), json.dumps(texts), engine)
    assert seen["engine"] == engine and seen["imported"] == []
    reference = Predictor(str(directory), engine=engine, precision="fp32", torch_threads=1)
    from jobs.modeling import load_tokenizer

    reference._tokenizer = load_tokenizer(str(directory))  # transformers' own tokenizer
    expected = reference({"text": np.array(texts, dtype=object)})["label"].tolist()
    assert seen["labels"] == expected


def test_token_ids_match_transformers_and_odd_tokenizers_go_through_it(staged, tmp_path):
    from jobs.modeling import load_tokenizer, resolve_base_model
    from serving.predictor import _TokenIds

    texts = [*_texts(200, seed=7), "héllo WÖRLD 你好 🙂 [SEP]", "card " * 400, "", "  \t x"]
    folders = [staged[0]]
    with contextlib.suppress(Exception):  # the MiniLM base, where the package ships it
        folders.append(Path(resolve_base_model("all-MiniLM-L6-v2")))
    for folder in folders:
        fast, reference = _TokenIds.load(Path(folder), False), load_tokenizer(str(folder))
        assert fast is not None, folder
        assert fast.pad_token_id == reference.pad_token_id
        for max_length in (8, 32, 512):
            got = fast(texts, truncation=True, max_length=max_length)["input_ids"]
            want = reference(texts, truncation=True, max_length=max_length)["input_ids"]
            assert got == want, (folder, max_length)
    odd = _copy(staged[0], tmp_path)
    config_path = odd / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for change in ({"tokenizer_class": "LlamaTokenizer"}, {"truncation_side": "left"}):
        config_path.write_text(json.dumps({**config, **change}))
        assert _TokenIds.load(odd, False) is None, change  # transformers loads these


def test_openvino_compiles_through_the_cache_holding_the_nodes_lock(staged, tmp_path, monkeypatch):
    """Processes on a node take turns compiling through the cache (two replicas starting
    together: one died of SIGBUS reading the blob the other was writing): while one compiles,
    another open of the lock file cannot take it."""
    import fcntl

    import openvino as ov

    directory, _ = staged
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    lock_path = tmp_path / "cache" / engines.OPENVINO_CACHE_DIR / ".compile.lock"
    held = []

    class Watched:
        """OpenVINO's Core, checking the lock as it compiles."""

        def __init__(self) -> None:
            self.core = ov.Core()

        def compile_model(self, *args):
            with lock_path.open("a") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(True)
                else:
                    held.append(False)
            return self.core.compile_model(*args)

        def read_model(self, *args):
            return self.core.read_model(*args)

    compiled = engines._compile_openvino(Watched(), directory / engines.ONNX_FILE, {})
    assert compiled is not None and held == [True]
    with lock_path.open("a") as after:  # released once compiled
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_openvino_compiles_through_its_cache_on_the_node(staged, tmp_path, monkeypatch):
    """The second compile of the same artifact loads OpenVINO's cached blob (0.37 -> 0.06 s on
    MiniLM) and gives the same logits; an unwritable cache folder compiles as before."""
    directory, _ = staged
    batch = (np.array([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]]), np.array([[1] * 5, [1, 1, 1, 0, 0]]))
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    path = directory / engines.ONNX_FILE
    first = next(engines.OpenVinoEngine(path, "fp32", 1).forward([batch]))
    assert list((tmp_path / "cache" / engines.OPENVINO_CACHE_DIR).glob("*.blob"))
    again = next(engines.OpenVinoEngine(path, "fp32", 1).forward([batch]))
    np.testing.assert_array_equal(first, again)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "file"))  # a file: no folder there
    uncached = next(engines.OpenVinoEngine(path, "fp32", 1).forward([batch]))
    np.testing.assert_allclose(uncached, first, rtol=1e-5, atol=1e-5)

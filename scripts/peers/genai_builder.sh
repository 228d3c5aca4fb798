#!/usr/bin/env bash
# onnxruntime-genai 0.18.0's model builder -> its fp32 CPU graph of SmolLM2-135M in artifacts/peers/genai-fp32.
# Uses the project's .venv when its optional [genai] extra (onnxruntime-genai==0.18.0) is installed there,
# else a peer environment of its own (.venv-peers/genai). An existing graph is reused (REBUILD=1 rebuilds).
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT="$PEERS_OUT/genai-fp32"
if [ "${REBUILD:-0}" = 1 ] || [ ! -f "$OUT/model.onnx" ]; then
  if "$ROOT/.venv/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
  else
    PY="$(bash "$ROOT/scripts/peers/make_env.sh" genai onnxruntime-genai==0.18.0 | tail -1)/bin/python"
  fi
  rm -rf "$OUT"
  "$PY" -m onnxruntime_genai.models.builder -i "$(hf_folder)" -o "$OUT" -p fp32 -e cpu \
    -c "$PEERS_OUT/genai-cache" > "$PEERS_OUT/genai.log" 2>&1
fi
echo "$OUT/model.onnx"

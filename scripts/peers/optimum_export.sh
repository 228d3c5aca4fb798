#!/usr/bin/env bash
# Optimum's ONNX exporter (optimum-onnx 0.1.0, which pins transformers < 4.58, so it lives in
# .venv-peers/optimum, never in the project's .venv) -> artifacts/peers/optimum-fp32/model.onnx.
# An existing graph is reused (REBUILD=1 rebuilds).
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT="$PEERS_OUT/optimum-fp32"
if [ "${REBUILD:-0}" = 1 ] || [ ! -f "$OUT/model.onnx" ]; then
  ENV=$(bash "$ROOT/scripts/peers/make_env.sh" optimum optimum-onnx==0.1.0 | tail -1)
  HF=$(hf_folder)
  rm -rf "$OUT"
  "$ENV/bin/python" -m optimum.exporters.onnx --model "$HF" --task text-generation-with-past "$OUT" \
    > "$PEERS_OUT/optimum.log" 2>&1
fi
echo "$OUT/model.onnx"

#!/usr/bin/env bash
# Optimum's ONNX exporter (optimum-onnx 0.1.0, which pins transformers < 4.58, so it lives in
# .venv-peers/optimum, never in the project's .venv) -> artifacts/peers/optimum-fp32/model.onnx.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ENV=$(bash "$ROOT/scripts/peers/make_env.sh" optimum optimum-onnx==0.1.0 | tail -1)
HF=$(hf_folder)
"$ENV/bin/python" -m optimum.exporters.onnx --model "$HF" --task text-generation-with-past \
  "$PEERS_OUT/optimum-fp32" > "$PEERS_OUT/optimum.log" 2>&1
echo "$PEERS_OUT/optimum-fp32/model.onnx"

#!/usr/bin/env bash
# onnxruntime-genai 0.18.0's model builder -> its CPU graph of SmolLM2-135M (the full model):
#   genai_builder.sh            fp32 -> artifacts/peers/genai-fp32
#   genai_builder.sh int4       -p int4, block_size ${BLOCK:-32}, accuracy_level ${ACC:-4} (the builder's CPU
#                               defaults, as recipes/smollm2-135m-int4.yaml) -> artifacts/peers/genai-int4
#                               (genai-int4-acc0 etc. for another ACC)
# Uses the project's .venv when its optional [genai] extra (onnxruntime-genai==0.18.0) is installed there,
# else a peer environment of its own (.venv-peers/genai). An existing graph is reused (REBUILD=1 rebuilds).
set -euo pipefail
source "$(dirname "$0")/common.sh"
PRECISION=${1:-fp32}
EXTRA=()
OUT="$PEERS_OUT/genai-$PRECISION"
if [ "$PRECISION" = int4 ]; then
  EXTRA=(--extra_options "accuracy_level=${ACC:-4}" "block_size=${BLOCK:-32}")
  [ "${ACC:-4}" = 4 ] && [ "${BLOCK:-32}" = 32 ] || OUT="$OUT-acc${ACC:-4}-b${BLOCK:-32}"
fi
if [ "${REBUILD:-0}" = 1 ] || [ ! -f "$OUT/model.onnx" ]; then
  if "$ROOT/.venv/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
  else
    PY="$(bash "$ROOT/scripts/peers/make_env.sh" genai onnxruntime-genai==0.18.0 | tail -1)/bin/python"
  fi
  rm -rf "$OUT"
  "$PY" -m onnxruntime_genai.models.builder -i "$(hf_folder)" -o "$OUT" -p "$PRECISION" -e cpu \
    -c "$PEERS_OUT/genai-cache" "${EXTRA[@]}" > "$PEERS_OUT/genai-$PRECISION.log" 2>&1
fi
echo "$OUT/model.onnx"

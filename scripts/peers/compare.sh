#!/usr/bin/env bash
# The peer comparison of docs/results/speed.md: build the peers' graphs (once; REBUILD=1 rebuilds), then time
# them with ours in one `export-skip bench` run (same ONNX Runtime, same session settings, one process per
# graph, calls interleaved). Extra arguments go to `export-skip bench`. Needs the artifact first:
#   export-skip recipes/smollm2-135m.yaml [--out DIR]
# docs/results/speed.md ran:
#   EXPORT_SKIP_BENCH_ROUNDS=100 EXPORT_SKIP_BENCH_REPEATS=2 bash scripts/peers/compare.sh \
#     --out artifacts/smollm2-135m-speed --threads 1
set -euo pipefail
source "$(dirname "$0")/common.sh"
mkdir -p "$PEERS_OUT"
PEER_ARGS=(--peer "genai=$(bash "$ROOT/scripts/peers/genai_builder.sh")")
if [ "${WITH_OPTIMUM:-1}" = 1 ]; then
  if OPT=$(bash "$ROOT/scripts/peers/optimum_export.sh"); then PEER_ARGS+=(--peer "optimum=$OPT")
  else echo "optimum export failed (see $PEERS_OUT/optimum.log); comparing with onnxruntime-genai only" >&2; fi
fi
"$ROOT/.venv/bin/export-skip" bench "$RECIPE" "${PEER_ARGS[@]}" "$@"

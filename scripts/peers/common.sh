# Sourced by the peer scripts: paths, and the plain HF folder of SmolLM2-135M that export-skip converts
# the GGUF into (the peers read the same weights as our pipeline).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEERS_OUT=${PEERS_OUT:-$ROOT/artifacts/peers}
RECIPE=${RECIPE:-$ROOT/recipes/smollm2-135m.yaml}
hf_folder() {
  "$ROOT/.venv/bin/python" -c "
import sys
from exporter.model.source import _convert_gguf
from exporter.recipe import load_recipe
print(_convert_gguf(load_recipe(sys.argv[1]).model))" "$RECIPE"
}
mkdir -p "$PEERS_OUT"

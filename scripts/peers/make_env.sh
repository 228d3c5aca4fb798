#!/usr/bin/env bash
# Build a peer's own virtual environment in .venv-peers/NAME (git-ignored), never touching .venv.
# The peers pin packages the project cannot take (optimum-onnx pins transformers < 4.58), so each gets
# its own site-packages first on sys.path; torch, onnx and onnxruntime are shared from the project's
# .venv through a .pth file placed after it (same pinned versions, no second multi-GB torch download).
#   scripts/peers/make_env.sh optimum optimum-onnx==0.1.0 "transformers==4.57.3"
set -euo pipefail
NAME=$1; shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ENV="$ROOT/.venv-peers/$NAME"
PY=${PYTHON:-$(readlink -f "$ROOT/.venv/bin/python")}
[ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PROJECT_SITE=$("$ROOT/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PROJECT_SITE" > "$SITE/zz_export_skip_shared.pth"  # .pth entries go after the env's own packages
"$ENV/bin/python" -m pip install --quiet "$@"
echo "$ENV"

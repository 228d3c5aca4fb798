#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (not run in this project's CI: no GPU there).
#   EXTRAS=test,gpu bash scripts/setup.sh   # or test,rtx on an RTX-class GPU; see README "TensorRT engines"
#   bash scripts/gpu_check.sh
# Runs the GPU tests (pytest -m gpu), then scripts/gpu_check.py for the tiny recipe and SmolLM2:
# engines built for this GPU, parity of the skipped engine against the masked PyTorch reference, and
# full vs skipped decode time, interleaved. Prints one JSON summary on stdout; logs go to stderr.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG=$(mktemp -t gpu-check-XXXX.log)

"$PY" -m pytest -m gpu tests/test_tensorrt.py -q -rs >"$LOG" 2>&1
tests_rc=$?
tests_line=$(tail -n 1 "$LOG")
skips=$(grep -E "^SKIPPED" "$LOG" | head -n 3 | tr '\n' ' ')

check=$("$PY" scripts/gpu_check.py "$@" 2>>"$LOG")
check_rc=$?

"$PY" - "$tests_rc" "$tests_line" "$skips" "$check_rc" "$LOG" "$check" <<'EOF'
import json, sys
tests_rc, tests_line, skips, check_rc, log, check = sys.argv[1:]
try:
    check = json.loads(check)
except ValueError:
    check = {"ran": False, "reason": f"scripts/gpu_check.py printed no JSON (see {log})"}
print(json.dumps({"gpu_tests": {"exit_code": int(tests_rc), "summary": tests_line, "skipped": skips.strip()},
                  "check": check, "check_exit_code": int(check_rc), "log": log}, indent=1))
EOF
[ "$tests_rc" = 0 ] || exit 1
exit "$check_rc"  # 3: nothing could run here (no GPU or no backend); never a pass

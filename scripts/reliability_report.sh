#!/usr/bin/env bash
# Runs every reliability test (slow ones included) and writes the table in docs/results/reliability.md
# from what the tests recorded: bad inputs tried, kill points, resume, locks, no code from data.
set -euo pipefail
cd "$(dirname "$0")/.."
table=$(mktemp)
EXPORT_SKIP_RELIABILITY_REPORT="$table" .venv/bin/python -m pytest -q -m "not gpu" tests/test_reliability.py
{
  echo "# Reliability: what was tried, and what happened"
  echo
  echo "Produced by \`bash scripts/reliability_report.sh\` (runs \`tests/test_reliability.py\`, slow tests"
  echo "included); every row is a test's own record, written only when the test ran. Generated $(date -u +%Y-%m-%d)."
  echo
  cat "$table"
} > docs/results/reliability.md
rm -f "$table"
echo "wrote docs/results/reliability.md"

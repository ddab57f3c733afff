#!/usr/bin/env bash
# Sets up .venv with the test extra (if needed) and runs the test suite; extra args go to pytest.
# --quick runs the quick tier only (tests marked `quick`: pure functions and single layers on
# abstract or tiny inputs). Prints how long the run took at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh" test
cd "$root"
args=()
for arg in "$@"; do
  if [[ "$arg" == "--quick" ]]; then
    args+=(-m "quick and not slow")
  else
    args+=("$arg")
  fi
done
start=$SECONDS
status=0
"$root/.venv/bin/python" -m pytest -q ${args[@]+"${args[@]}"} || status=$?
echo "tests took $((SECONDS - start)) s"
exit "$status"

#!/usr/bin/env bash
# Sets up .venv with the test extra (if needed) and runs the test suite; extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh" test
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"

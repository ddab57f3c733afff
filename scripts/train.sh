#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job on the tiny config; extra args go to train.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" train.py --config=configs/tiny.py --workdir="${WORKDIR:-$root/workdir/tiny}" "$@"

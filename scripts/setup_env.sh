#!/usr/bin/env bash
# Creates .venv in the repository root and installs the project from the pinned lock file.
# Usage: scripts/setup_env.sh [extra]   (extra: "test" adds the test dependencies)
# The install is skipped when the lock file, setup.cfg and the extra are unchanged since the last one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${1:-}"
venv="$root/.venv"
lock="$root/requirements/lock.txt"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

stamp_value="$(cat "$lock" "$root/setup.cfg" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)-${extra}"
stamp_file="$venv/.installed"
if [[ -f "$stamp_file" ]] && grep -qx -- "$stamp_value" "$stamp_file" 2>/dev/null; then
  exit 0
fi
# An environment installed with the test extra also serves the main job.
if [[ -z "$extra" && -f "$stamp_file" ]] && grep -qx -- "${stamp_value}test" "$stamp_file"; then
  exit 0
fi

echo "setting up $venv (extra: ${extra:-none})" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip==$(grep -E '^pip==' "$lock" | cut -d= -f3)" 2>&1 | grep -v "is ignored" >&2 || true
target="$root"
[[ -n "$extra" ]] && target="$root[$extra]"
"$venv/bin/python" -m pip install --quiet -c "$lock" -e "$target" 2>&1 | grep -v "is ignored" >&2 || true
"$venv/bin/python" -c "import jax, flax, optax, orbax.checkpoint, ml_collections, matplotlib" \
  || { echo "setup failed: the core packages do not import; see the pip output above" >&2; exit 1; }
if [[ "$extra" == "test" ]]; then
  "$venv/bin/python" -c "import torch, transformers, pytest" \
    || { echo "setup failed: the test packages do not import; see the pip output above" >&2; exit 1; }
fi
echo "$stamp_value" > "$stamp_file"

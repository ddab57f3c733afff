#!/usr/bin/env bash
# Sets up .venv with the test extra (if needed) and runs one tier of the test suite; other args go to
# pytest. Tiers (markers in setup.cfg):
#   (none)       the default set: every test not marked `slow` or `full_size`
#   --quick      the quick tier: tests marked `quick` (pure functions and single layers on abstract or
#                tiny inputs, tests/conftest.py QUICK_MODULES)
#   --all        everything but `full_size` (what CI runs)
#   --full_size  the shipped full-size configs' dry runs (a full-size compile is tens of minutes here)
# TEST_WORKERS=N runs the test files in N processes (pytest-xdist, a file per worker at a time so that
# a module's fixtures are built once, in collection order: tests/conftest.py LONG_MODULES first, not
# xdist's own order by test count; TEST_WORKERS=auto: as many as there are cores and 6 GiB of free
# memory for each); by default one process. Prints how long the run took at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh" test
cd "$root"
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) args+=(-m "quick and not slow and not full_size") ;;
    --all) args+=(-m "not full_size") ;;
    --full_size) args+=(-m "full_size") ;;
    *) args+=("$arg") ;;
  esac
done
TEST_WORKERS="${TEST_WORKERS:-1}"
if [[ "$TEST_WORKERS" == auto ]]; then
  free_gib=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
  TEST_WORKERS=$(( $(nproc) < free_gib / 6 ? $(nproc) : free_gib / 6 ))
  (( TEST_WORKERS >= 1 )) || TEST_WORKERS=1
fi
if (( TEST_WORKERS > 1 )); then
  args=(-n "$TEST_WORKERS" --dist loadfile --no-loadscope-reorder "${args[@]+"${args[@]}"}")
fi
start=$SECONDS
status=0
"$root/.venv/bin/python" -m pytest -q ${args[@]+"${args[@]}"} || status=$?
echo "tests took $((SECONDS - start)) s ($TEST_WORKERS workers)"
exit "$status"

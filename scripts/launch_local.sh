#!/usr/bin/env bash
# Runs train.py as N processes on this host joined over loopback into one run: each process emulates
# 1/N of the topology's devices (cm384-8 with N=2: one server each). Process 0 prints to the terminal;
# process i>0 writes $LOGS/process_<i>.log. Extra args go to every train.py. A real cluster runs the
# same train.py command once per host instead (README, "Several processes and hosts").
#   N=2 bash scripts/launch_local.sh --config=configs/tiny.py --workdir=workdir/tiny2
# Env: N (default 2), PORT (coordinator port, default a free one), LOGS (default a new temp dir),
# PYTHON (default .venv/bin/python, which scripts/train.sh sets up).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
n="${N:-2}"
port="${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
logs="${LOGS:-$(mktemp -d)}"
mkdir -p "$logs"
cd "$root"
echo "launching $n processes, coordinator 127.0.0.1:$port, logs of processes 1..$((n - 1)) in $logs" >&2
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  command=("$python" train.py --num_processes="$n" --process_id="$i" --coordinator_address="127.0.0.1:$port" "$@")
  if ((i == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" >"$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
# The run failed if any process did: report the first non-zero status.
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; ((status)) || status=$code; }
done
exit "$status"

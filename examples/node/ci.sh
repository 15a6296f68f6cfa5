#!/usr/bin/env bash
# The Node client's tests against a fresh `taskservice dev` (its own embedded
# Redis, a worker with the demo tasks, the server on a free port). Needs Node 20+
# and `taskservice` on PATH (the project's venv, active). Exits with the tests'
# status; stops everything it started, whatever happens.
set -euo pipefail
cd "$(dirname "$0")"

command -v taskservice >/dev/null || { echo "ci.sh: no taskservice on PATH: activate the venv (pip install -e .)" >&2; exit 1; }
command -v node >/dev/null || { echo "ci.sh: no node on PATH (Node 20+ needed)" >&2; exit 1; }

SECONDS=0
echo "== npm ci (examples/node)"
# --ignore-scripts: nothing here needs an install script (protobufjs's postinstall is for its CLI).
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
echo "   ${SECONDS}s"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t taskservice-node-ci.XXXXXX.log)
dev_pid=""

stop_dev() {
  local status=$?
  if [[ -n "$dev_pid" ]] && kill -0 "$dev_pid" 2>/dev/null; then
    kill -TERM "$dev_pid" 2>/dev/null || true # dev drains, then stops its worker and Redis
    for _ in $(seq 100); do kill -0 "$dev_pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$dev_pid" 2>/dev/null; then
      echo "ci.sh: taskservice dev ignored SIGTERM for 20s; killing it" >&2
      kill -KILL "$dev_pid" 2>/dev/null || true
      status=1
    fi
    wait "$dev_pid" 2>/dev/null || true
  fi
  # What dev started must be gone with it: its worker (pid in the log) and its Redis (port in the log).
  local worker redis_port
  worker=$(sed -n 's/.*INFO taskservice: worker: pid \([0-9]*\).*/\1/p' "$log" | head -1)
  redis_port=$(sed -n 's|.*INFO taskservice: redis: redis://127.0.0.1:\([0-9]*\)/.*|\1|p' "$log" | head -1)
  for _ in $(seq 50); do
    if [[ -n "$worker" ]] && kill -0 "$worker" 2>/dev/null; then sleep 0.2; continue; fi
    if [[ -n "$redis_port" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then sleep 0.2; continue; fi
    break
  done
  if [[ -n "$worker" ]] && kill -0 "$worker" 2>/dev/null; then
    echo "ci.sh: the worker (pid $worker) outlived taskservice dev; killing its group" >&2
    kill -KILL -- "-$worker" 2>/dev/null || true
    status=1
  fi
  if [[ -n "$redis_port" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then
    echo "ci.sh: the embedded Redis (port $redis_port) outlived taskservice dev" >&2
    status=1
  fi
  # dev keeps its worker's log in a folder of its own, and says where as it stops.
  local run_dir
  run_dir=$(sed -n 's|.*logs were in \(/[^ ]*taskservice-dev-[^ /]*\)$|\1|p' "$log" | tail -1)
  if [[ $status -ne 0 ]]; then
    echo "== taskservice dev log ($log; the worker's: ${run_dir:-?}/worker.log)"
    tail -n 40 "$log"
  else
    rm -f "$log"
    [[ -n "$run_dir" ]] && rm -rf "$run_dir"
  fi
  echo "== ci.sh: ${SECONDS}s, exit $status"
  exit "$status"
}
trap stop_dev EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== taskservice dev on 127.0.0.1:$port (log $log)"
TASKSERVICE_HOST=127.0.0.1 TASKSERVICE_PORT=$port taskservice dev >"$log" 2>&1 &
dev_pid=$!
node wait-healthy.js "127.0.0.1:$port" 30 "$dev_pid" || { echo "ci.sh: taskservice dev did not become healthy" >&2; exit 1; }
echo "   healthy at ${SECONDS}s"

echo "== npm test (TASKSERVICE_ADDRESS=127.0.0.1:$port)"
TASKSERVICE_ADDRESS="127.0.0.1:$port" npm test

#!/usr/bin/env bash
# N JAX processes on this machine (CPU), coordinated over 127.0.0.1: a multi-host run in miniature.
#
#   launch/local.sh N ARGS...          runs `python -m llava_jax.main ARGS...` in N processes
#   launch/local.sh N -- CMD ARGS...   runs CMD ARGS... in N processes (any program calling
#                                      llava_jax.distributed.initialize())
#
# Each process gets LLAVA_COORDINATOR=127.0.0.1:<free port>, LLAVA_NUM_PROCESSES=N, LLAVA_PROCESS_ID=i and
# DEVICES_PER_PROCESS (default 1) fake CPU devices. Output lines are prefixed with [pI]. The script waits for
# all; when one fails, the others are stopped (TERM, then KILL after $KILL_GRACE seconds) and the script exits
# with the failed process's status.
#
# Environment: DEVICES_PER_PROCESS (1), PYTHON (python), KILL_GRACE (10), LLAVA_PORT (a free port).
set -euo pipefail

usage() { echo "usage: $0 NUM_PROCESSES [ARGS... | -- CMD ARGS...]" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift
python_bin=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
grace=${KILL_GRACE:-10}
if [[ ${1:-} == "--" ]]; then
  shift
  [[ $# -ge 1 ]] || usage
  cmd=("$@")
else
  cmd=("$python_bin" -m llava_jax.main "$@")
fi

port=${LLAVA_PORT:-$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {  # TERM every process still running, KILL what is left after the grace period
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local waited=0
  while (( waited < grace * 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  LLAVA_COORDINATOR="127.0.0.1:$port" LLAVA_NUM_PROCESSES="$num_processes" LLAVA_PROCESS_ID="$i" \
    JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "${cmd[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

status=0
remaining=$num_processes
declare -A done_pids=()
while (( remaining > 0 )); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -n ${done_pids[$pid]:-} ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if (( rc != 0 && status == 0 )); then
      status=$rc
      echo "launch/local.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  (( remaining > 0 )) && sleep 0.2
done
wait  # the output filters
exit "$status"

#!/usr/bin/env bash
# Standalone Flink session cluster for tests: one JobManager and one TaskManager,
# each its own JVM, started from the tree that scripts/fetch_flink.sh caches.
#
#   scripts/flink_cluster.sh up       fetch if needed, start, wait until the REST API
#                                     reports >= 1 TaskManager with free slots; prints
#                                     the master address (localhost:<rest port>) last
#   scripts/flink_cluster.sh down     stop the JVMs this script started (pid files only)
#   scripts/flink_cluster.sh status   pids + /overview; exit 0 if up, 3 if not
#   scripts/flink_cluster.sh logs     print the cluster logs (last $LOG_LINES lines each)
#
# Everything of one cluster instance lives in its run dir: conf/ (a copy of the tree's
# conf with this instance's ports), log/, pids/, master. Several instances can run at
# once with different run dirs and ports.
#
# Environment:
#   BEAM_CURATOR_FLINK_CACHE     cache dir of fetch_flink.sh (default $HOME/.cache/beam-curator/flink)
#   BEAM_CURATOR_FLINK_RUN_DIR   run dir (default $CACHE/run)
#   BEAM_CURATOR_FLINK_REST_PORT REST port = the --flink_master port (default 18081)
#   BEAM_CURATOR_FLINK_RPC_PORT  JobManager RPC port (default 16123)
#   BEAM_CURATOR_FLINK_TIMEOUT   seconds to wait for the cluster (default 120)
#   BEAM_CURATOR_FLINK_TASK_SLOTS  slots of the TaskManager (default 2)
#   BEAM_CURATOR_FLINK_TM_MEMORY / BEAM_CURATOR_FLINK_JM_MEMORY  process sizes (2048m / 1024m)
#   LOG_LINES                    lines per file for `logs` (default 200; 0 = whole files)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BEAM_CURATOR_FLINK_CACHE:-${HOME}/.cache/beam-curator/flink}"
export BEAM_CURATOR_FLINK_CACHE="$CACHE"
RUN_DIR="${BEAM_CURATOR_FLINK_RUN_DIR:-$CACHE/run}"
mkdir -p "$RUN_DIR" && RUN_DIR="$(cd "$RUN_DIR" && pwd)"   # absolute: matched in /proc/*/cmdline
REST_PORT="${BEAM_CURATOR_FLINK_REST_PORT:-18081}"
RPC_PORT="${BEAM_CURATOR_FLINK_RPC_PORT:-16123}"
TIMEOUT="${BEAM_CURATOR_FLINK_TIMEOUT:-120}"
SLOTS="${BEAM_CURATOR_FLINK_TASK_SLOTS:-2}"
TM_MEM="${BEAM_CURATOR_FLINK_TM_MEMORY:-2048m}"
JM_MEM="${BEAM_CURATOR_FLINK_JM_MEMORY:-1024m}"
PYTHON="${PYTHON:-python3}"   # only for urllib/json/socket: any python3 works
IDENT=beam-curator   # pid/log file names: flink-beam-curator-<daemon>.pid

log() { echo "[flink_cluster] $*" >&2; }

load_env() {
  local env_file="$CACHE/flink.env"
  if [ ! -f "$env_file" ]; then
    log "no $env_file: run scripts/fetch_flink.sh first"
    exit 1
  fi
  # shellcheck disable=SC1090
  . "$env_file"
}

# Print the REST /overview JSON (empty on failure).
overview() {
  "$PYTHON" - "$1" <<'PY' 2>/dev/null || true
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://localhost:{sys.argv[1]}/overview", timeout=3) as r:
        print(r.read().decode())
except Exception:
    pass
PY
}

# Exit 0 when the overview JSON on stdin shows >= 1 TaskManager and >= 1 free slot.
overview_ready() {
  "$PYTHON" -c '
import json, sys
try:
    o = json.loads(sys.stdin.read() or "{}")
except ValueError:
    sys.exit(1)
sys.exit(0 if o.get("taskmanagers", 0) >= 1 and o.get("slots-available", 0) >= 1 else 1)'
}

# Is pid $1 alive and really ours (its --configDir is this run dir's conf)?
is_ours() {
  kill -0 "$1" 2>/dev/null && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null \
    | grep -qF -- "--configDir $RUN_DIR/conf"
}

# pids of this run dir that are alive and really ours.
our_pids() {
  local f p
  for f in "$RUN_DIR"/pids/*.pid; do
    [ -f "$f" ] || continue
    while read -r p; do
      [[ "$p" =~ ^[0-9]+$ ]] || continue
      if is_ours "$p"; then
        echo "$p"
      fi
    done <"$f"
  done
}

port_in_use() {
  "$PYTHON" - "$1" <<'PY'
import socket, sys
s = socket.socket()
# like the JVMs (netty) do: TIME_WAIT leftovers must not count as "in use"
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)   # in use
finally:
    s.close()
sys.exit(1)
PY
}

print_logs() {
  local n="${LOG_LINES:-200}" f
  shopt -s nullglob
  for f in "$RUN_DIR"/log/*.log "$RUN_DIR"/log/*.out; do
    echo "===== $f"
    if [ "$n" = 0 ]; then cat "$f"; else tail -n "$n" "$f"; fi
  done
}

stop_pid() {  # TERM, wait up to 20 s, then KILL
  local p="$1" i
  kill -TERM "$p" 2>/dev/null || return 0
  for i in $(seq 1 40); do
    kill -0 "$p" 2>/dev/null || return 0
    sleep 0.5
  done
  log "pid $p did not stop after 20 s, killing"
  kill -KILL "$p" 2>/dev/null || true
}

cmd_down() {
  local daemon f p stopped=0
  # TaskManager first, then the JobManager.
  for daemon in taskexecutor standalonesession; do
    f="$RUN_DIR/pids/flink-$IDENT-$daemon.pid"
    [ -f "$f" ] || continue
    while read -r p; do
      [[ "$p" =~ ^[0-9]+$ ]] || continue
      if is_ours "$p"; then
        log "stopping $daemon (pid $p)"
        stop_pid "$p"
        stopped=$((stopped + 1))
      fi
    done <"$f"
    rm -f "$f"
  done
  rm -f "$RUN_DIR/master"
  # blob caches / spill files of the stopped JVMs (up to a few hundred MB); logs are kept
  if [ -z "$(our_pids)" ]; then rm -rf "$RUN_DIR/tmp"; fi
  [ "$stopped" -gt 0 ] || log "nothing to stop in $RUN_DIR"
}

cmd_status() {
  local pids ov
  if [ -f "$RUN_DIR/master" ]; then REST_PORT="$(sed 's/.*://' "$RUN_DIR/master")"; fi
  pids="$(our_pids | tr '\n' ' ')"
  ov="$(overview "$REST_PORT")"
  echo "run dir: $RUN_DIR"
  echo "pids:    ${pids:-none}"
  echo "rest:    http://localhost:$REST_PORT/overview -> ${ov:-unreachable}"
  if [ -n "$pids" ] && [ -n "$ov" ] && overview_ready <<<"$ov"; then
    echo "status:  up (master localhost:$REST_PORT)"
    return 0
  fi
  echo "status:  down"
  return 3
}

write_conf() {
  rm -rf "$RUN_DIR/conf"
  cp -a "$FLINK_HOME/conf" "$RUN_DIR/conf"
  local c="$RUN_DIR/conf/config.yaml"
  # config.yaml written by fetch_flink.sh uses flat keys, one per line.
  sed -i -E \
    -e "s|^rest\.port: .*|rest.port: $REST_PORT|" \
    -e "s|^jobmanager\.rpc\.port: .*|jobmanager.rpc.port: $RPC_PORT|" \
    -e "s|^taskmanager\.numberOfTaskSlots: .*|taskmanager.numberOfTaskSlots: $SLOTS|" \
    -e "s|^taskmanager\.memory\.process\.size: .*|taskmanager.memory.process.size: $TM_MEM|" \
    -e "s|^jobmanager\.memory\.process\.size: .*|jobmanager.memory.process.size: $JM_MEM|" \
    "$c"
  grep -q "^rest.port: $REST_PORT\$" "$c" || { log "could not set rest.port in $c"; exit 1; }
  {
    echo "env.pid.dir: $RUN_DIR/pids"
    echo "env.log.dir: $RUN_DIR/log"
    echo "io.tmp.dirs: $RUN_DIR/tmp"
    # Beam's fused stages fan out to many shuffles at once: Flink's default network memory
    # (10 % of a 2 GB TaskManager) runs out of buffers at parallelism 2 ("Insufficient
    # number of network buffers: required 512"): more, smaller buffers.
    echo "taskmanager.memory.network.min: 256m"
    echo "taskmanager.memory.network.max: 256m"
    echo "taskmanager.memory.segment-size: 8kb"
  } >>"$c"
}

cmd_up() {
  "$HERE/fetch_flink.sh" >&2
  load_env
  mkdir -p "$RUN_DIR/pids" "$RUN_DIR/log" "$RUN_DIR/tmp"

  if [ -n "$(our_pids)" ]; then
    if overview_ready <<<"$(overview "$REST_PORT")"; then
      log "already running"
      echo "localhost:$REST_PORT"
      return 0
    fi
    log "stale processes in $RUN_DIR, stopping them first"
    cmd_down
  fi
  local p
  for p in "$REST_PORT" "$RPC_PORT"; do
    if port_in_use "$p"; then
      log "port $p is already in use (another Flink? set BEAM_CURATOR_FLINK_REST_PORT / _RPC_PORT)"
      exit 1
    fi
  done

  write_conf
  rm -f "$RUN_DIR"/log/*
  export FLINK_CONF_DIR="$RUN_DIR/conf" FLINK_LOG_DIR="$RUN_DIR/log" \
         FLINK_PID_DIR="$RUN_DIR/pids" FLINK_IDENT_STRING="$IDENT"
  local t0; t0=$(date +%s)
  log "starting JobManager (rest port $REST_PORT, rpc port $RPC_PORT) from $FLINK_HOME"
  if ! "$FLINK_HOME/bin/jobmanager.sh" start >&2; then
    log "bin/jobmanager.sh start failed; logs:"; print_logs >&2; cmd_down || true; exit 1
  fi
  log "starting TaskManager ($SLOTS slots, $TM_MEM)"
  if ! "$FLINK_HOME/bin/taskmanager.sh" start >&2; then
    log "bin/taskmanager.sh start failed; logs:"; print_logs >&2; cmd_down || true; exit 1
  fi

  local deadline=$((t0 + TIMEOUT)) ov
  while :; do
    ov="$(overview "$REST_PORT")"
    if [ -n "$ov" ] && overview_ready <<<"$ov"; then break; fi
    if [ "$(our_pids | wc -l)" -lt 2 ] || [ "$(date +%s)" -ge "$deadline" ]; then
      log "cluster did not come up (a JVM exited, or timeout ${TIMEOUT}s; overview: ${ov:-unreachable}); logs:"
      print_logs >&2
      cmd_down || true
      exit 1
    fi
    sleep 1
  done
  echo "localhost:$REST_PORT" >"$RUN_DIR/master"
  log "up in $(( $(date +%s) - t0 ))s: $ov"
  echo "localhost:$REST_PORT"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  logs) print_logs ;;
  *) echo "usage: $0 up|down|status|logs" >&2; exit 2 ;;
esac

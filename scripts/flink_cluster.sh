#!/usr/bin/env bash
# A Flink session cluster shaped like a production one, on this host: one JobManager, N
# TaskManagers (default 2), and beside each TaskManager its own Python SDK worker pool
# (python -m beam_curator.worker_pool) for `--environment_type EXTERNAL`. Each TaskManager
# and each pool runs under a supervisor that restarts it when it dies, as Kubernetes or
# systemd would; jobs get a restart strategy, so a job survives a lost TaskManager or pool.
#
#   scripts/flink_cluster.sh up       fetch if needed, start, wait until every TaskManager
#                                     is registered, every pool and the job server listen;
#                                     prints the master address (localhost:<rest port>) last
#   scripts/flink_cluster.sh down     stop what this script started (pid files only)
#   scripts/flink_cluster.sh status   pids + /overview; exit 0 if up, 3 if not
#   scripts/flink_cluster.sh logs     print the cluster logs (last $LOG_LINES lines each)
#
# Each TaskManager reaches ITS pool by one name, beam-worker-pool:<pool port>, the address
# a job passes as --environment_config: every TaskManager JVM resolves that name through
# its own hosts file (-Djdk.net.hosts.file), TaskManager i to 127.0.0.<i+1>, where pool i
# listens. So one pipeline option reaches a different pool from each TaskManager, as
# `localhost:50000` does on a real cluster where every TaskManager host has its own pool.
#
# Beside the cluster, a long-running Beam Flink job server (supervised too) on
# localhost:<job port>: jobs submitted with --job_endpoint localhost:<job port> skip the
# job server that FlinkRunner otherwise starts for every job (a JVM start and a cold JIT of
# the pipeline translation: ~8 s and ~10 CPU-seconds a job here, README, Run on Flink).
#
# Everything of one cluster instance lives in its run dir: conf/ (this instance's config),
# lib/ (its classpath: links to Flink's lib/ and Beam's runner jars), hosts-tm<i>, log/,
# pids/, master, cluster.env. Several instances can run at once with
# different run dirs and ports. pids/: tm<i>.pid and pool<i>.pid are the supervised
# processes (the TaskManager JVM, the pool's python), *.supervisor.pid their supervisors.
#
# Environment:
#   BEAM_CURATOR_FLINK_CACHE     cache dir of fetch_flink.sh (default $HOME/.cache/beam-curator/flink)
#   BEAM_CURATOR_FLINK_RUN_DIR   run dir (default $CACHE/run)
#   BEAM_CURATOR_FLINK_REST_PORT REST port = the --flink_master port (default 18081)
#   BEAM_CURATOR_FLINK_RPC_PORT  JobManager RPC port (default 16123)
#   BEAM_CURATOR_FLINK_POOL_PORT port of every TaskManager's worker pool (default 18099)
#   BEAM_CURATOR_FLINK_JOB_PORT  port of the job server (default 18097; 0 = start none); its
#                                artifact service listens on the next port up
#   BEAM_CURATOR_FLINK_JOB_SERVER_MEMORY  the job server's heap (default 1024m)
#   BEAM_CURATOR_FLINK_TASKMANAGERS  number of TaskManagers (default 2)
#   BEAM_CURATOR_FLINK_TASK_SLOTS    slots per TaskManager (default 2)
#   BEAM_CURATOR_FLINK_WORKER_PYTHON python of the pools (default <repo>/.venv/bin/python:
#                                its SDK workers must import beam_curator)
#   BEAM_CURATOR_FLINK_WORKER_DEVICE the pools' --device: auto (default), cpu or cuda
#   BEAM_CURATOR_FLINK_TIMEOUT   seconds to wait for the cluster (default 180)
#   BEAM_CURATOR_FLINK_TM_MEMORY / BEAM_CURATOR_FLINK_JM_MEMORY  process sizes (6144m / 1024m)
#   BEAM_CURATOR_FLINK_BEAM_LIB  1 (default): Beam's runner jars in the cluster's lib/ and
#                                parent-first class loading, so that a job's SDK workers are
#                                reused from stage to stage (README, Run on Flink); 0: as
#                                a stock Flink, Beam's classes come with each job (for
#                                comparison: every stage then starts fresh workers)
#   LOG_LINES                    lines per file for `logs` (default 200; 0 = whole files)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"
CACHE="${BEAM_CURATOR_FLINK_CACHE:-${HOME}/.cache/beam-curator/flink}"
export BEAM_CURATOR_FLINK_CACHE="$CACHE"
RUN_DIR="${BEAM_CURATOR_FLINK_RUN_DIR:-$CACHE/run}"
mkdir -p "$RUN_DIR" && RUN_DIR="$(cd "$RUN_DIR" && pwd)"   # absolute: matched in /proc
export BEAM_CURATOR_FLINK_RUN_DIR="$RUN_DIR"                # inherited: marks our processes
# The script replaces conf/ and lib/ of the run dir: only in a dir it made (its marker, or
# empty), or one an earlier version made (its conf/ carries this script's section), never
# in a user's directory named by mistake (BEAM_CURATOR_FLINK_RUN_DIR=$HOME).
RUN_MARKER="$RUN_DIR/.beam-curator-flink-run"
if [ ! -e "$RUN_MARKER" ]; then
  if [ -z "$(ls -A "$RUN_DIR")" ] \
      || grep -qs '^# ---- scripts/flink_cluster.sh' "$RUN_DIR/conf/config.yaml"; then
    echo "run dir of scripts/flink_cluster.sh (conf/, lib/, log/, pids/ are replaced)" >"$RUN_MARKER"
  else
    echo "[flink_cluster] $RUN_DIR is not empty and not a run dir of this script: point" \
      "BEAM_CURATOR_FLINK_RUN_DIR at a new or empty directory" >&2
    exit 2
  fi
fi
REST_PORT="${BEAM_CURATOR_FLINK_REST_PORT:-18081}"
RPC_PORT="${BEAM_CURATOR_FLINK_RPC_PORT:-16123}"
POOL_PORT="${BEAM_CURATOR_FLINK_POOL_PORT:-18099}"
JOB_PORT="${BEAM_CURATOR_FLINK_JOB_PORT:-18097}"
JOB_SERVER_MEM="${BEAM_CURATOR_FLINK_JOB_SERVER_MEMORY:-1024m}"
N_TM="${BEAM_CURATOR_FLINK_TASKMANAGERS:-2}"
TIMEOUT="${BEAM_CURATOR_FLINK_TIMEOUT:-180}"
SLOTS="${BEAM_CURATOR_FLINK_TASK_SLOTS:-2}"
TM_MEM="${BEAM_CURATOR_FLINK_TM_MEMORY:-6144m}"
JM_MEM="${BEAM_CURATOR_FLINK_JM_MEMORY:-1024m}"
WORKER_PYTHON="${BEAM_CURATOR_FLINK_WORKER_PYTHON:-$REPO_ROOT/.venv/bin/python}"
WORKER_DEVICE="${BEAM_CURATOR_FLINK_WORKER_DEVICE:-auto}"
BEAM_LIB="${BEAM_CURATOR_FLINK_BEAM_LIB:-1}"
POOL_NAME=beam-worker-pool
PYTHON="${PYTHON:-python3}"   # only for urllib/json/socket: any python3 works
IDENT=beam-curator   # JobManager pid/log file names: flink-beam-curator-<daemon>.pid

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

pool_host() { echo "127.0.0.$(($1 + 1))"; }   # pool of TaskManager $1 (1-based)

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

# Exit 0 when the overview JSON on stdin shows >= $1 TaskManagers, all slots free.
overview_ready() {
  "$PYTHON" -c '
import json, sys
try:
    o = json.loads(sys.stdin.read() or "{}")
except ValueError:
    sys.exit(1)
n, slots = int(sys.argv[1]), int(sys.argv[2])
sys.exit(0 if o.get("taskmanagers", 0) >= n and o.get("slots-available", 0) >= n * slots else 1)
' "$1" "$2"
}

# Is pid $1 alive and really ours (started from this run dir)?
is_ours() {
  kill -0 "$1" 2>/dev/null || return 1
  tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$RUN_DIR" && return 0
  tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qxF -- "BEAM_CURATOR_FLINK_RUN_DIR=$RUN_DIR"
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

port_in_use() {  # $1 = port, $2 = address (default 127.0.0.1)
  "$PYTHON" - "$1" "${2:-127.0.0.1}" <<'PY'
import socket, sys
s = socket.socket()
# like the JVMs (netty) do: TIME_WAIT leftovers must not count as "in use"
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[2], int(sys.argv[1])))
except OSError:
    sys.exit(0)   # in use
finally:
    s.close()
sys.exit(1)
PY
}

listening() {  # $1 = address, $2 = port: does something accept connections there?
  "$PYTHON" - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
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

stop_pidfile() {  # stop the pids listed in $1 that are ours; remove the file
  local f="$1" p n=0
  [ -f "$f" ] || return 0
  while read -r p; do
    [[ "$p" =~ ^[0-9]+$ ]] || continue
    if is_ours "$p"; then
      stop_pid "$p"
      n=$((n + 1))
    fi
  done <"$f"
  rm -f "$f"
  STOPPED=$((STOPPED + n))
}

# Run "$@" as supervised process $name: restart it 1 s after it exits, until the run dir
# says stopping. Its pid is in pids/$name.pid; starts and exits go to log/supervisor.log.
cmd_supervise() {
  local name="$1" child rc n=0
  shift
  echo $$ >"$RUN_DIR/pids/$name.supervisor.pid"
  while [ ! -e "$RUN_DIR/stopping" ]; do
    n=$((n + 1))
    "$@" </dev/null >>"$RUN_DIR/log/$name.out" 2>&1 &
    child=$!
    echo "$child" >"$RUN_DIR/pids/$name.pid"
    echo "$(date '+%F %T') $name: start #$n, pid $child" >>"$RUN_DIR/log/supervisor.log"
    rc=0
    wait "$child" || rc=$?
    echo "$(date '+%F %T') $name: pid $child exited, status $rc" >>"$RUN_DIR/log/supervisor.log"
    [ -e "$RUN_DIR/stopping" ] && break
    sleep 1
  done
  rm -f "$RUN_DIR/pids/$name.pid" "$RUN_DIR/pids/$name.supervisor.pid"
}

supervise() {  # detached from this shell: survives `up` returning and the caller's signals
  setsid bash "$HERE/flink_cluster.sh" _supervise "$@" </dev/null >/dev/null 2>&1 &
}

cmd_down() {
  local f
  STOPPED=0
  [ -d "$RUN_DIR/pids" ] || { log "nothing to stop in $RUN_DIR"; return 0; }
  touch "$RUN_DIR/stopping"
  # Supervisors first (so nothing restarts), then TaskManagers, pools and the job server,
  # then the JobManager.
  for f in "$RUN_DIR"/pids/*.supervisor.pid; do stop_pidfile "$f"; done
  for f in "$RUN_DIR"/pids/tm*.pid "$RUN_DIR"/pids/pool*.pid "$RUN_DIR"/pids/jobserver.pid; do
    stop_pidfile "$f"
  done
  stop_pidfile "$RUN_DIR/pids/flink-$IDENT-standalonesession.pid"
  rm -f "$RUN_DIR/master" "$RUN_DIR/cluster.env" "$RUN_DIR"/pids/flink-*-taskexecutor.pid
  # blob caches / spill files of the stopped JVMs (up to a few hundred MB); logs are kept
  if [ -z "$(our_pids)" ]; then rm -rf "$RUN_DIR/tmp"; fi
  [ "$STOPPED" -gt 0 ] && log "stopped $STOPPED processes" || log "nothing to stop in $RUN_DIR"
}

cmd_status() {
  local pids ov
  if [ -f "$RUN_DIR/master" ]; then REST_PORT="$(sed 's/.*://' "$RUN_DIR/master")"; fi
  pids="$(our_pids | sort -un | tr '\n' ' ')"
  ov="$(overview "$REST_PORT")"
  echo "run dir: $RUN_DIR"
  echo "pids:    ${pids:-none}"
  echo "rest:    http://localhost:$REST_PORT/overview -> ${ov:-unreachable}"
  [ -f "$RUN_DIR/cluster.env" ] && sed 's/^/env:     /' "$RUN_DIR/cluster.env"
  if [ -n "$pids" ] && [ -n "$ov" ] && overview_ready 1 1 <<<"$ov"; then
    echo "status:  up (master localhost:$REST_PORT)"
    return 0
  fi
  echo "status:  down"
  return 3
}

write_conf() {
  rm -rf "$RUN_DIR/conf"
  cp -a "$FLINK_HOME/conf" "$RUN_DIR/conf"
  local c="$RUN_DIR/conf/config.yaml" ours="$RUN_DIR/conf/ours.yaml" keys
  cat >"$ours" <<EOF
rest.port: $REST_PORT
jobmanager.rpc.port: $RPC_PORT
jobmanager.memory.process.size: $JM_MEM
taskmanager.numberOfTaskSlots: $SLOTS
taskmanager.memory.process.size: $TM_MEM
# Heap and direct memory for Beam's data streams (6144m: ~2.7 GB task heap, ~2 GB direct).
# Beam's TaskManager side queues up to 100 data messages from each SDK worker (the Python
# SDK sends ~10 MB ones) and sends to the workers faster than they read, buffering in netty's
# direct memory. Dedup of 1M x 768 ran a 2048m TaskManager out of heap, then a 5120m one
# (384m task off-heap) out of direct memory, both on gRPC threads; the first job hung.
env.pid.dir: $RUN_DIR/pids
env.log.dir: $RUN_DIR/log
io.tmp.dirs: $RUN_DIR/tmp
# TaskManagers run in the foreground under a supervisor: their stdout/err go to log files
env.stdout-err.redirect-to-file: true
# Beam's fused stages fan out to many shuffles at once: Flink's default network memory
# (10 % of a 2 GB TaskManager) runs out of buffers at parallelism 2 ("Insufficient
# number of network buffers: required 512"): more, smaller buffers.
taskmanager.memory.network.min: 256m
taskmanager.memory.network.max: 256m
taskmanager.memory.segment-size: 8kb
# Direct memory is capped at framework + task off-heap + network; with no task off-heap, a
# stage shipping a few MB per element failed with "OutOfMemoryError: Direct buffer memory".
# Managed memory (batch sorts, which spill) gives up the room.
taskmanager.memory.task.off-heap.size: 1536m
taskmanager.memory.managed.fraction: 0.15
# Recovery, chosen for batch. Beam's Flink batch translation takes no checkpoints: a failed
# task is re-run from its inputs. Region failover re-runs only the pipelined region that
# lost a task (beam-curator submits --execution_mode_for_batch BATCH_FORCED: every exchange
# is blocking and a region is one stage). Exponential delay: a TaskManager or pool that its supervisor brings
# back in seconds is waited for instead of burning the attempts; a job that keeps failing
# gives up after 6 restarts (about a minute) rather than hiding a bug.
jobmanager.execution.failover-strategy: region
restart-strategy.type: exponential-delay
restart-strategy.exponential-delay.initial-backoff: 1 s
restart-strategy.exponential-delay.backoff-multiplier: 2.0
restart-strategy.exponential-delay.max-backoff: 15 s
restart-strategy.exponential-delay.jitter-factor: 0.1
restart-strategy.exponential-delay.reset-backoff-threshold: 10 min
restart-strategy.exponential-delay.attempts-before-reset-backoff: 6
# A killed TaskManager is noticed by failed heartbeat RPCs (2 in a row) or, at the latest,
# after the timeout (Flink's default 50 s is tuned for long GC pauses on big heaps).
heartbeat.interval: 2000
heartbeat.timeout: 20000
heartbeat.rpc-failure-threshold: 2
# Spread a job's subtasks over the TaskManagers instead of filling the first one.
cluster.evenly-spread-out-slots: true
# The REST API (tests watch a running job through it) refreshes task metrics every second
# and its view of a job's task states every half second (Flink's default, 3 s, is longer
# than a whole stage of a small job once SDK workers are reused).
metrics.fetcher.update-interval: 1000
web.refresh-interval: 500
EOF
  if [ "$BEAM_LIB" = 1 ]; then
    cat >>"$ours" <<EOF
# SDK workers reused across stages. Beam's runner jars are in this cluster's lib/
# (FLINK_LIB_DIR=\$RUN_DIR/lib: Flink's lib/ + the job server's Beam jars, see
# fetch_flink.sh) and loaded parent-first, so the copies each job ships are not used.
# Beam's Flink runner (2.62, FlinkExecutableStageContextFactory) keeps a job's SDK worker
# for --environment_cache_millis after the last task on a TaskManager closes only when its
# own classes come from Flink's classloader; loaded with the job, it stops the worker at
# once, and every batch stage of every TaskManager started a fresh one (issue 30).
classloader.resolve-order: parent-first
EOF
  fi
  # config.yaml from fetch_flink.sh has flat keys, one per line: drop the keys we set (a
  # key twice is an error), then append ours.
  keys="$(grep -oE '^[a-z][a-zA-Z0-9._-]*:' "$ours" | sed 's/[.]/\\./g' | paste -sd'|')"
  grep -vE "^($keys)|^# no restarts" "$c" >"$c.tmp" || true
  { cat "$c.tmp"; echo "# ---- scripts/flink_cluster.sh (this run dir)"; grep -v '^#' "$ours"; } >"$c"
  rm -f "$c.tmp" "$ours"
  grep -q "^rest.port: $REST_PORT\$" "$c" || { log "could not set rest.port in $c"; exit 1; }
  # The cluster's classpath: Flink's lib/, plus (BEAM_LIB=1) Beam's runner jars.
  rm -rf "$RUN_DIR/lib"
  mkdir -p "$RUN_DIR/lib"
  ln -s "$FLINK_HOME"/lib/*.jar "$RUN_DIR/lib/"
  if [ "$BEAM_LIB" = 1 ]; then
    if [ -z "${BEAM_FLINK_CLUSTER_LIB:-}" ] || [ ! -f "$BEAM_FLINK_CLUSTER_LIB/.complete" ]; then
      log "no Beam jars for lib/ (BEAM_FLINK_CLUSTER_LIB in flink.env): run scripts/fetch_flink.sh"
      exit 1
    fi
    local jar
    for jar in "$BEAM_FLINK_CLUSTER_LIB"/*.jar; do
      ln -s "$(readlink -f "$jar")" "$RUN_DIR/lib/"
    done
  fi
  local i
  for i in $(seq 1 "$N_TM"); do
    # Replaces all name lookups of TaskManager i's JVM: list every name it resolves.
    {
      echo "127.0.0.1 localhost"
      echo "127.0.0.1 $(hostname)"
      echo "$(pool_host "$i") $POOL_NAME"
    } >"$RUN_DIR/hosts-tm$i"
  done
}

start_taskmanager() {  # $1 = index
  # A fresh resource id per start (tm<i>-<time>): tests map a subtask's TaskManager to its
  # pid by it, and a restarted TaskManager never poses as the dead one.
  FLINK_ENV_JAVA_OPTS_TM="-Djdk.net.hosts.file=$RUN_DIR/hosts-tm$1" \
  FLINK_IDENT_STRING="$IDENT-tm$1" \
    supervise "tm$1" bash -c 'exec "$0" start-foreground -Dtaskmanager.resource-id="$1-$(date +%s%N)"' \
      "$FLINK_HOME/bin/taskmanager.sh" "tm$1"
}

start_job_server() {
  # Artifacts (the job's Python package, if any) live in the run dir, one dir per job,
  # removed when the job ends (--clean-artifacts-per-job).
  mkdir -p "$RUN_DIR/artifacts"
  supervise jobserver java "-Xmx$JOB_SERVER_MEM" -jar "$BEAM_FLINK_JOB_SERVER_JAR" \
    --flink-master "localhost:$REST_PORT" --job-host localhost --job-port "$JOB_PORT" \
    --artifact-port "$((JOB_PORT + 1))" --expansion-port 0 \
    --artifacts-dir "$RUN_DIR/artifacts" --clean-artifacts-per-job true
}

start_pool() {  # $1 = index
  supervise "pool$1" "$WORKER_PYTHON" -m beam_curator.worker_pool \
    --host "$(pool_host "$1")" --port "$POOL_PORT" --device "$WORKER_DEVICE"
}

cmd_up() {
  "$HERE/fetch_flink.sh" >&2
  load_env
  mkdir -p "$RUN_DIR/pids" "$RUN_DIR/log" "$RUN_DIR/tmp"

  if [ -n "$(our_pids)" ]; then
    if overview_ready "$N_TM" 0 <<<"$(overview "$REST_PORT")"; then
      log "already running"
      echo "localhost:$REST_PORT"
      return 0
    fi
    log "stale processes in $RUN_DIR, stopping them first"
    cmd_down
  fi
  local p i
  local ports=("$REST_PORT" "$RPC_PORT")
  [ "$JOB_PORT" != 0 ] && ports+=("$JOB_PORT" "$((JOB_PORT + 1))")
  for p in "${ports[@]}"; do
    if port_in_use "$p"; then
      log "port $p is already in use (another Flink? set BEAM_CURATOR_FLINK_REST_PORT / _RPC_PORT / _JOB_PORT)"
      exit 1
    fi
  done
  for i in $(seq 1 "$N_TM"); do
    if port_in_use "$POOL_PORT" "$(pool_host "$i")"; then
      log "$(pool_host "$i"):$POOL_PORT is in use (another cluster's pool? set BEAM_CURATOR_FLINK_POOL_PORT)"
      exit 1
    fi
  done
  if ! "$WORKER_PYTHON" -c 'import beam_curator.worker_pool' 2>/dev/null; then
    log "$WORKER_PYTHON cannot import beam_curator (run make venv, or set BEAM_CURATOR_FLINK_WORKER_PYTHON)"
    exit 1
  fi

  write_conf
  rm -f "$RUN_DIR"/log/* "$RUN_DIR/stopping"
  export FLINK_CONF_DIR="$RUN_DIR/conf" FLINK_LOG_DIR="$RUN_DIR/log" \
         FLINK_PID_DIR="$RUN_DIR/pids" FLINK_IDENT_STRING="$IDENT" \
         FLINK_LIB_DIR="$RUN_DIR/lib"
  local t0; t0=$(date +%s)
  log "starting JobManager (rest port $REST_PORT, rpc port $RPC_PORT) from $FLINK_HOME"
  if ! "$FLINK_HOME/bin/jobmanager.sh" start >&2; then
    log "bin/jobmanager.sh start failed; logs:"; print_logs >&2; cmd_down || true; exit 1
  fi
  for i in $(seq 1 "$N_TM"); do
    log "starting TaskManager $i ($SLOTS slots, $TM_MEM) and its worker pool at $(pool_host "$i"):$POOL_PORT"
    start_pool "$i"
    start_taskmanager "$i"
  done
  if [ "$JOB_PORT" != 0 ]; then
    log "starting the Beam Flink job server at localhost:$JOB_PORT"
    start_job_server
  fi

  local deadline=$((t0 + TIMEOUT)) ov pools_up
  while :; do
    ov="$(overview "$REST_PORT")"
    pools_up=1
    for i in $(seq 1 "$N_TM"); do
      listening "$(pool_host "$i")" "$POOL_PORT" || pools_up=0
    done
    if [ "$JOB_PORT" != 0 ] && ! listening 127.0.0.1 "$JOB_PORT"; then pools_up=0; fi
    if [ -n "$ov" ] && [ "$pools_up" = 1 ] && overview_ready "$N_TM" "$SLOTS" <<<"$ov"; then break; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "cluster did not come up in ${TIMEOUT}s (overview: ${ov:-unreachable}; pools and job server up: $pools_up); logs:"
      print_logs >&2
      cmd_down || true
      exit 1
    fi
    sleep 1
  done
  echo "localhost:$REST_PORT" >"$RUN_DIR/master"
  cat >"$RUN_DIR/cluster.env" <<EOF
FLINK_MASTER=localhost:$REST_PORT
ENVIRONMENT_CONFIG=$POOL_NAME:$POOL_PORT
TASKMANAGERS=$N_TM
TASK_SLOTS=$SLOTS
BEAM_LIB=$BEAM_LIB
JOB_ENDPOINT=$([ "$JOB_PORT" != 0 ] && echo "localhost:$JOB_PORT")
EOF
  log "up in $(( $(date +%s) - t0 ))s: $ov"
  local extra=""
  if [ "$BEAM_LIB" = 1 ] && [ -n "${BEAM_FLINK_NO_JAR_STAGING:-}" ]; then
    extra=" [--pipeline_resources_detector_factory_class=$BEAM_FLINK_NO_JAR_STAGING: Beam's jars are in lib/, jobs need not ship them]"
  fi
  [ "$JOB_PORT" != 0 ] && extra="$extra [--job_endpoint localhost:$JOB_PORT: the running job server, instead of one per job]"
  log "submit with --flink_master localhost:$REST_PORT --environment_type EXTERNAL --environment_config $POOL_NAME:$POOL_PORT$extra"
  echo "localhost:$REST_PORT"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  logs) print_logs ;;
  _supervise) shift; cmd_supervise "$@" ;;
  *) echo "usage: $0 up|down|status|logs" >&2; exit 2 ;;
esac

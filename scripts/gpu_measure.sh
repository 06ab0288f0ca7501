#!/usr/bin/env bash
# Issue 13's GPU measurements in ONE command, for a lent GPU machine (one H100/H200, ~16 cores,
# no package index): ~7-8 minutes of wall time, never more than HARD_S (570 s), results as
# small files under $OUT.
#
#   here, once:     scripts/gpu_wheels.sh            # -> .gpuwheels/ (~60 MB, git-ignored)
#   on the device:  bash scripts/gpu_measure.sh      # carry: .gpuwheels ; timeout_s 600
#   here, to check the script itself (CPU, tiny sizes, the current python, ~4 min):
#                   PY=.venv/bin/python OUT=/tmp/gm-out bash scripts/gpu_measure.sh --tiny
#
# Steps, each under its own time limit (cut to what is left of HARD_S), each reporting even
# when another failed (the exit status is the number of failed or skipped steps):
#   1 env        GPU, driver, CPU, python and package versions            -> env.txt
#   2 install    the carried wheels into $SITE (nothing from an index)    -> env.txt
#   3 tests      the dedup backend and device-decode tests, on the GPU     -> tests.txt
#   4 dedup      bench/gpu_dedup.py: 1M x 768 SemDeDup, GPU vs CPU path    -> gpu_dedup.json
#   5 embed      bench/gpu_embed.py handler, decode, staging (ViT-L/14)   -> gpu_embed.json
#   6 pipeline   bench/gpu_embed.py pipeline from 512-px JPEG tars        -> gpu_pipeline.json
#   7 compile    the handler with torch.compile, if 90 s are left         -> gpu_compile.json
#   then summary.txt (the headline numbers) and log.txt (the console, last 4 MB).
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu-measure-out}
SITE=${SITE:-/tmp/gpu-measure-site}
WORK=${WORK:-/tmp/gpu-measure-work}
WHEELS=${WHEELS:-.gpuwheels}       # the carried wheels (scripts/gpu_wheels.sh)
HARD_S=${HARD_S:-570}              # every step ends by then: the device allows 600 s a call
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
mkdir -p "$OUT" "$WORK"
LOG="$WORK/log.txt"
FAILED=()
save_log() { tail -c 4000000 "$LOG" > "$OUT/log.txt" 2>/dev/null; }
trap 'save_log; rm -rf "$WORK" "$SITE"' EXIT
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S COMMAND...: run it under its time limit, cut to what is left of HARD_S,
# log it, remember a failure; skipped when under 20 s would be left.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( HARD_S - 15 - $(elapsed) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "=== [$(elapsed) s] $name: SKIPPED, no time left" | tee -a "$LOG"
    FAILED+=("$name(skipped)")
    return 0
  fi
  echo "=== [$(elapsed) s] $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== [$(elapsed) s] $name: exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED+=("$name(exit $rc)")
  save_log
  return 0
}

# 1-2: the machine, and the carried wheels
{
  echo "date: $(date -u +%FT%TZ)   tiny: $TINY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo "cores: $(nproc)   memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  "$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.is_available())" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt" | tee -a "$LOG"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no $WHEELS/*.whl: using $PY's own packages" | tee -a "$OUT/env.txt" "$LOG"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY_SPY=$(command -v py-spy || true)
[ -x "$SITE/bin/py-spy" ] && PY_SPY="$SITE/bin/py-spy"
"$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib
for name in ("apache_beam", "open_clip", "faiss", "numpy", "pyarrow", "PIL"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:   # noqa: BLE001 - the report says what is missing
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
from beam_curator.dedup.kmeans import kmeans_engine
print("k-means on cuda:", kmeans_engine(device="cuda"))
EOF
echo "py-spy: ${PY_SPY:-none}" >> "$OUT/env.txt"

# 3: correctness on the GPU before any timing (the CUDA tests are skipped on CPU machines)
step tests 100 bash -c "set -o pipefail; '$PY' -m pytest -q -rs -p no:cacheprovider \
  tests/test_dedup_backends.py tests/test_device_decode.py 2>&1 | tail -n 60 > '$OUT/tests.txt'"

# 4: dedup, GPU vs CPU path, 1M x 768
if [ "$TINY" = 1 ]; then
  DEDUP_ARGS=(--n 20000 --d 64 --n-clusters 20 --n-dups 200 --sample-size 5000 --device cpu
              --kmeans-backend torch)
else
  DEDUP_ARGS=(--n 1000000 --d 768 --n-clusters 1000 --n-dups 10000 --device cuda)
fi
step dedup 160 "$PY" bench/gpu_dedup.py "${DEDUP_ARGS[@]}" --out "$OUT/gpu_dedup.json"

# 5-7: embed. One work dir, so the random ViT-L/14 and the shards are made once.
if [ "$TINY" = 1 ]; then
  EMBED_ARGS=(--device cpu --arch tiny --image-px 128 --pipeline-images 96 --pipeline-shards 4
              --batch-sizes 16 --forward-sizes 8 --forward-size 8 --pipeline-batch-size 16)
  CONFIGS="in_process:1,multi_processing:2:env.OMP_NUM_THREADS=1"
  COMPILE_ARGS=()
else
  CORES=$(nproc)
  EMBED_ARGS=(--device cuda --arch ViT-L-14 --image-px 512 --pipeline-images 16384
              --pipeline-shards 16 --batch-sizes 1024 --forward-sizes 256,1024)
  CONFIGS="multi_processing:$CORES,multi_processing:$CORES:env.OMP_NUM_THREADS=1"
  CONFIGS="$CONFIGS,multi_processing:$CORES:large_model"
  COMPILE_ARGS=(--compile-modes default --forward-sizes 256)
fi
[ -n "$PY_SPY" ] && SPY_ARGS=(--py-spy "$PY_SPY" --py-spy-seconds 8) || SPY_ARGS=()
step embed 150 "$PY" bench/gpu_embed.py "${EMBED_ARGS[@]}" --parts handler,decode,staging \
  --workdir "$WORK/embed" --out "$OUT/gpu_embed.json"
step pipeline 200 "$PY" bench/gpu_embed.py "${EMBED_ARGS[@]}" --parts pipeline \
  --pipeline-configs "$CONFIGS" "${SPY_ARGS[@]}" --workdir "$WORK/embed" \
  --out "$OUT/gpu_pipeline.json"
LEFT=$(( HARD_S - 15 - $(elapsed) ))
if [ "${#COMPILE_ARGS[@]}" -gt 0 ] && [ "$LEFT" -ge 90 ]; then
  step compile 150 "$PY" bench/gpu_embed.py "${EMBED_ARGS[@]}" "${COMPILE_ARGS[@]}" \
    --parts handler --workdir "$WORK/embed" --out "$OUT/gpu_compile.json"
else
  echo "=== [$(elapsed) s] compile: not run (${LEFT} s left; it needs 90)" | tee -a "$LOG"
fi

# The headline numbers, from whatever JSON the steps left.
"$PY" scripts/gpu_summary.py "$OUT" > "$OUT/summary.txt" 2>&1
echo "failed steps: ${FAILED[*]:-none}" >> "$OUT/summary.txt"
echo "total: $(elapsed) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "${#FAILED[@]}"

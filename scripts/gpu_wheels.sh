#!/usr/bin/env bash
# Wheels for running the GPU benchmarks (scripts/gpu_measure.sh) on a lent GPU machine that
# reaches no package index.
#
# Its image (Python 3.12, torch with CUDA, torchvision, numpy, pyarrow, pillow, ...) lacks Beam,
# open_clip, faiss and a few of their dependencies. This downloads, HERE, the cp312 wheels of
# exactly the versions this checkout's venv runs, without their dependencies, plus py-spy (a
# profiler, one static binary), into .gpuwheels/ (~60 MB: under the 64 MiB a device call may
# carry together with the working tree; add `/.gpuwheels/` to .git/info/exclude).
# faiss-cpu, not faiss-gpu: the faiss-gpu wheels (135 MB and more, CUDA 12) neither fit that
# limit nor match the machine's CUDA 13; dedup's k-means runs in torch on its GPU instead, and
# faiss-cpu is the CPU path it is measured against.
# On the device, with .gpuwheels carried, scripts/gpu_measure.sh installs them:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpuwheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.gpuwheels}
PACKAGES=(apache-beam beartype braceexpand cffi cryptography dnspython fastavro fasteners ftfy
          httplib2 jsonpickle objsize open_clip_torch proto-plus pycparser pymongo pytz wcwidth
          webdataset zstandard faiss-cpu)
TOOLS=(py-spy==0.4.3)   # not a dependency: the profiler of bench/gpu_embed.py --py-spy

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "error: $name is not installed in $PY's environment (run make venv)" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${pins[@]}" "${TOOLS[@]}"
du -sh "$DEST"

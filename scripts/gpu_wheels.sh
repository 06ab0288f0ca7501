#!/usr/bin/env bash
# Wheels for running bench/gpu_embed.py on a lent GPU machine that reaches no package index.
#
# Its image (Python 3.12, torch with CUDA, numpy, pyarrow, pillow, ...) lacks Beam, open_clip
# and a few of their dependencies. This downloads, HERE, the cp312 wheels of exactly the
# versions this checkout's venv runs, without their dependencies, into .gpuwheels/ (~38 MB,
# under the 64 MiB a device call may carry; add `/.gpuwheels/` to .git/info/exclude).
# On the device, with .gpuwheels carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpuwheels/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_embed.py --parts handler,staging ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.gpuwheels}
PACKAGES=(apache-beam beartype braceexpand cffi cryptography dnspython fastavro fasteners ftfy
          httplib2 jsonpickle objsize open_clip_torch proto-plus pycparser pymongo pytz wcwidth
          webdataset zstandard)

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "error: $name is not installed in $PY's environment (run make venv)" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${pins[@]}"
du -sh "$DEST"

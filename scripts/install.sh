#!/usr/bin/env bash
# Everything fastmlp needs on a fresh machine: torch (a range, never pinned), the Python
# dependencies, and the compiled extension built in place (incremental with ninja, so a second run
# takes seconds). Used by scripts/test.sh, scripts/train.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check \
    'torch>=2.11' 'torchvision>=0.26' numpy tqdm matplotlib pyyaml pytest pytest-timeout ninja
# No build isolation: an isolated build would fetch a second torch and compile against it.
mkdir -p build
echo "fastmlp: building the extension (log: build/build.log) ..."
start=$SECONDS
if ! "$PY" setup.py build_ext --inplace > build/build.log 2>&1; then
    tail -n 60 build/build.log
    echo "fastmlp: the build failed (full log: build/build.log). See README.md, 'Install as a library', for what it needs."
    exit 1
fi
grep -E "^fastmlp:" build/build.log || true
"$PY" -c "import fastmlp; print(f'fastmlp {fastmlp.__version__} ready in $((SECONDS - start)) s (CUDA kernels: {fastmlp.WITH_CUDA})')"

#!/usr/bin/env bash
# Everything fastmlp needs on a fresh machine: torch (a range, never pinned), the Python
# dependencies, and the compiled extension built in place (incremental with ninja, so a second run
# takes seconds). Used by scripts/test.sh, scripts/train.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A torch that is already there (>= 2.11) stays: torchvision is then chosen to match it instead of
# pulling in its own newest torch (a CUDA build is gigabytes), and fastmlp compiles against it.
KEEP_TORCH=$("$PY" - 2>/dev/null <<'EOF' || true
import re, torch
v = re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__)
# The public version (2.11.0 for 2.11.0+cu130): pip finds no candidate for a local label.
print(torch.__version__.split("+")[0] if v and tuple(map(int, v.groups())) >= (2, 11, 0) else "")
EOF
)
CONSTRAINT=()
if [ -n "$KEEP_TORCH" ]; then
    mkdir -p build
    echo "torch==$KEEP_TORCH" > build/torch-constraint.txt
    CONSTRAINT=(-c build/torch-constraint.txt)
fi
# (onnx, onnxscript and onnxruntime: ONNX export and its tests.)
"$PY" -m pip install -q --disable-pip-version-check "${CONSTRAINT[@]}" \
    'torch>=2.11' 'torchvision>=0.26' numpy tqdm matplotlib pyyaml pytest pytest-timeout ninja tensorboard \
    onnx onnxscript onnxruntime
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

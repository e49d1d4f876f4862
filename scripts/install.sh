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
"$PY" setup.py -q build_ext --inplace 2>&1 | grep -v -E "SetuptoolsDeprecationWarning|^\s*\*+|^\s*$|setup.py install|Please avoid running|pypa/setuptools|blog.ganssle|See https://" || true
"$PY" -c "import fastmlp; print(f'fastmlp {fastmlp.__version__} ready (CUDA kernels: {fastmlp.WITH_CUDA})')"

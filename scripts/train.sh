#!/usr/bin/env bash
# The main job: installs what is missing, builds the extension, trains the default MLP on
# Fashion-MNIST. Extra arguments go to `fastmlp train` (e.g. scripts/train.sh --compare --seed 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Read Fashion-MNIST from ../shared when it is there, like the tests; otherwise $FASTMLP_DATA or the cache.
if [ -z "${FASTMLP_DATA:-}" ] && [ -d ../shared/data/fashion-mnist ]; then
    export FASTMLP_DATA="$(cd ../shared/data/fashion-mnist && pwd)"
fi
exec "${PYTHON:-python3}" -m fastmlp train "$@"

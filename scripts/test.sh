#!/usr/bin/env bash
# The test command: installs what is missing, builds the extension, runs the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k linear_act -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The tests read Fashion-MNIST from ../shared when it is there (CI); never from the network.
if [ -z "${FASTMLP_DATA:-}" ] && [ -d ../shared/data/fashion-mnist ]; then
    export FASTMLP_DATA="$(cd ../shared/data/fashion-mnist && pwd)"
fi
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"

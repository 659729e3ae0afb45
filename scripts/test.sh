#!/usr/bin/env bash
# The test command of README.md (and of .ci/run): sets up a fresh machine (scripts/install.sh test: torch, the package
# with its test extra, espeak-ng), then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh test
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -m pytest tests -q -p no:cacheprovider "$@"

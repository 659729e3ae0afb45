#!/usr/bin/env bash
# Installs mini-omni2 on a fresh machine: the CPU build of torch 2.13, the package (editable) with the extras given as
# arguments (e.g. `test`, `train,eval`), and with the `test` extra the system tools the tests use: espeak-ng and flite
# (speech) and chromium + chromedriver (the serving tests' voice page).
#   bash scripts/install.sh            # the package
#   bash scripts/install.sh test       # + pytest and the test dependencies + espeak-ng, flite, chromium, chromedriver
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
extras="${1:-}"

if [[ ",${extras}," == *",test,"* ]] && { ! command -v espeak-ng || ! command -v flite || ! command -v chromium \
    || ! command -v chromedriver; } >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng flite chromium chromium-driver >/dev/null
fi
# torch first, pinned: an unpinned dependency resolution could fetch another (multi-GB CUDA) build
"$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -e ".${extras:+[$extras]}"

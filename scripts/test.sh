#!/usr/bin/env bash
# Install everything the tests need and run them on the CPU with the tiny model.
# Extra arguments go to pytest (for example: -k "not full_default").
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: curl for the tutorial's curl test, Chromium for the browser tests,
# redis-server for the shared job queue's tests (they start their own on a free port).
if ! command -v curl >/dev/null || ! command -v chromium >/dev/null || ! command -v redis-server >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends curl chromium redis-server >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The CPU build of PyTorch first: otherwise pip pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements-test.txt
# The linter (pyproject.toml: pyflakes, pycodestyle, isort, bugbear) before the tests.
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

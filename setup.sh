#!/usr/bin/env bash
# Creates ./.venv with everything slimtune needs, on a fresh machine; does nothing when it is
# already up to date (a stamp records the hash of pyproject.toml it was installed from).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first: a bare `torch` requirement would pull gigabytes of CUDA packages.
# On a GPU machine, set TORCH_SPEC (e.g. TORCH_SPEC=torch) to take the CUDA build instead.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"

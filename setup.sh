#!/usr/bin/env bash
# Creates ./.venv with everything slimtune needs, on a fresh machine; does nothing when it is
# already up to date (a stamp records the hash of pyproject.toml it was installed from).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# bubblewrap isolates generated code (codegen-eval, eval.codegen.sandbox); install it quietly when we can.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    || echo "setup.sh: could not install bubblewrap; generated code will run in a weaker sandbox" >&2
fi
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

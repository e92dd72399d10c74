#!/usr/bin/env bash
# Create .venv-mergekit: a venv separate from the project's, holding mergekit (PyPI) and the same CPU torch,
# used only by the merge benchmark (bench/mergekit_runner.py) to compare moerge's merge executor with
# mergekit. Re-uses the venv when it is present and works; prints its python's path as the last stdout line.
#
#     bash scripts/mergekit_env.sh            # -> /path/to/repo/.venv-mergekit/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-mergekit
MERGEKIT_VERSION=0.1.5
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# The venv "works" when mergekit and torch have the wanted versions, no torchvision/torchaudio/torchcodec
# is installed (built for another torch, they break transformers' imports) and mergekit-yaml starts.
works() {
  [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/mergekit-yaml" ] || return 1
  "$VENV/bin/python" - "$MERGEKIT_VERSION" "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1 || return 1
import importlib.metadata as md, importlib.util, sys
want_mergekit, want_torch = sys.argv[1], sys.argv[2]
assert md.version("mergekit") == want_mergekit, md.version("mergekit")
assert md.version("torch").split("+")[0] == want_torch, md.version("torch")
for bad in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(bad) is None, bad
EOF
  "$VENV/bin/mergekit-yaml" --help >/dev/null 2>&1 || return 1
}

if ! works; then
  echo "mergekit_env: installing mergekit $MERGEKIT_VERSION and torch $TORCH_VERSION into $VENV" >&2
  # A venv whose interpreter no longer runs (moved, or its base Python gone) is rebuilt from scratch.
  "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 || rm -rf "$VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  # Pin torch for the whole install so no dependency can move it (or pull a CUDA build).
  echo "torch==$TORCH_VERSION" > "$constraints"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch 2.13.0+cpu comes from the machine's local wheel folder that pip searches; install it first.
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" >&2
  "$VENV/bin/python" -m pip install -q -c "$constraints" "mergekit==$MERGEKIT_VERSION" >&2
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  works || { echo "mergekit_env: $VENV was installed but does not work (mergekit-yaml --help fails)" >&2; exit 1; }
fi

echo "$(pwd)/$VENV/bin/python"

#!/usr/bin/env bash
# Set everything up and run the demo on the embedded defaults (SQLite and the store under MOERGE_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moerge demo "$@"

#!/usr/bin/env bash
# Set everything up and run the tests: .venv, Debian's chromium, a real PostgreSQL server, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -k store`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/chromium.sh
MOERGE_TEST_POSTGRES_URL=${MOERGE_TEST_POSTGRES_URL:-$(bash scripts/postgres.sh)}
export MOERGE_TEST_POSTGRES_URL
# the admin panel's browser tests save their screenshots here (gitignored), so every run keeps them
export MOERGE_ARTIFACTS="${MOERGE_ARTIFACTS:-$PWD/artifacts}"
exec .venv/bin/python -m pytest "$@"

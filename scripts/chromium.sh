#!/usr/bin/env bash
# Debian's chromium for the admin panel's browser tests (Playwright drives it by executable_path; a
# downloaded browser is never used). Does nothing when /usr/bin/chromium is there.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "chromium: /usr/bin/chromium is missing and apt-get is not available; the browser tests will skip (fail under CI=1)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
echo "setup: installing Debian's chromium (browser tests)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null

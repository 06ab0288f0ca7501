#!/usr/bin/env bash
# Install headless Chromium for the browser test of the HTML report (tests/test_report_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Debian/Ubuntu (apt-get) only;
# needs root (or passwordless sudo). `make test` runs it; CI sets CI=true, and then the browser
# test fails instead of skipping when Chromium is missing.
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ]; then
    echo "chromium: already installed ($("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: $CHROMIUM is missing and apt-get is not available; install Chromium" \
         "yourself (the browser test skips without it, and fails when CI is set)." >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "chromium: $CHROMIUM is missing and installing it needs root: run" \
             "'sudo $0' (the browser test skips without it, and fails when CI is set)." >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
"$CHROMIUM" --version

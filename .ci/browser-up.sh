#!/usr/bin/env bash
# Makes headless Chromium available for the browser tests (tests/test_browser.py, pytest -m browser): installs
# Debian's chromium and chromium-driver when /usr/bin/chromium or /usr/bin/chromedriver is missing.
# Idempotent: does nothing but report the versions when both are there. Selenium itself comes from the `test` extra.
# Needs root (or sudo) and apt; runs `apt-get update` only when the packages are not yet in the apt lists.
set -euo pipefail

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "browser-up: chromium is missing and this is not root (no sudo)" >&2; exit 1; }
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show chromium chromium-driver >/dev/null 2>&1; then
        $SUDO apt-get update -q
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
    for exe in /usr/bin/chromium /usr/bin/chromedriver; do
        [ -x "$exe" ] || { echo "browser-up: chromium packages installed but no $exe" >&2; exit 1; }
    done
fi

/usr/bin/chromium --version
/usr/bin/chromedriver --version

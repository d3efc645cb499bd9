#!/usr/bin/env bash
# The GUI's browser test drives Debian's Chromium (playwright's own browser download is not reachable).
# Installs it when missing and we are root; otherwise says in one line what to install.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the GUI browser test (apt-get install chromium)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
    echo "could not install chromium with apt-get; install it (Debian/Ubuntu: apt-get install chromium) and rerun" >&2
    exit 1
fi
echo "the GUI browser test needs Chromium: run 'sudo apt-get install chromium' (Debian/Ubuntu) and rerun make test" >&2
exit 1

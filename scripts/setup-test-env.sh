#!/usr/bin/env bash
# Everything the test suite needs, on a fresh Debian machine with Python and pip:
#   - Debian packages some tests drive for real: chromium (the status page is
#     rendered in a headless browser), prometheus (its `promtool check metrics`
#     lints /metrics), redis-server (the shared rate limiter);
#   - pyproxy itself with its `test` extra.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)

if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    # Tell the packages' install scripts not to start their services (redis,
    # prometheus): the tests start their own instances and stop them by PID.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        created_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    if [ "$created_policy" = 1 ]; then $sudo rm -f "$policy"; fi
fi

python -m pip install --quiet --disable-pip-version-check '.[test]'

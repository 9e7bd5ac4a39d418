#!/usr/bin/env bash
# Install the other programs the tests and benchmarks drive: a browser and its driver
# (the report's page), nats-server (the scaling-out recipe), PHP's CLI and CGI (the
# peer comparison), wrk and hyperfine (bench/), imagemagick (screenshots).
#
# Idempotent; meant for a fresh Debian machine, run as root with no stdin (called by
# .ci/run). Waits for another apt/dpkg run to finish instead of failing on its lock.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "packages.sh: must run as root (apt-get install)" >&2
    exit 1
fi

packages=(chromium chromium-driver nats-server php-cli php-cgi wrk hyperfine imagemagick)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
        || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    # nats-server and php-cgi ship services: keep them from starting (tests start their own).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get -o DPkg::Lock::Timeout=600 update -qq </dev/null
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null
fi

for svc in nats-server; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
done

echo "packages.sh: ${packages[*]} installed"

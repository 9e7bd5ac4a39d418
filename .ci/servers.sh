#!/usr/bin/env bash
# Install the web servers that tests/test_servers.py drives: Apache 2.4 (CGI),
# nginx + Debian's uWSGI with its python3 plugin, and gunicorn.
#
# Idempotent; meant for a fresh Debian machine, run as root with no stdin
# (called by .ci/run). The tests start their own server processes on
# 127.0.0.1 with private config files, so the services the packages start
# on port 80 are stopped and kept from starting again.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "servers.sh: must run as root (apt-get install)" >&2
    exit 1
fi

packages=(apache2 nginx uwsgi uwsgi-plugin-python3 python3)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
        || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    # Keep the packages' postinst from starting services (no init system in
    # containers anyway, but on a real machine they would grab port 80).
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

# Stop whatever the packages may have started anyway; the tests need none of it.
for svc in apache2 nginx uwsgi; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$svc" ]; then
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done

# gunicorn for the interpreter that runs the tests (PYTHON, default python3): from
# PyPI, or Debian's package when that interpreter is Debian's own (PEP 668).
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import gunicorn' 2>/dev/null; then
    if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends python3-gunicorn </dev/null
    else
        "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
            'gunicorn>=21' </dev/null
    fi
fi

echo "servers.sh: $(apache2 -v 2>/dev/null | head -1 || true)"
echo "servers.sh: $(nginx -v 2>&1 || true)"
echo "servers.sh: uwsgi $(uwsgi --version 2>/dev/null || true)"
echo "servers.sh: $("$PYTHON" -m gunicorn --version 2>/dev/null || true)"

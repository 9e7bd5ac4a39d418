#!/usr/bin/env bash
# Run the whole test suite under Debian unstable's Python (3.14 in 2026), with its
# Apache, nginx and uWSGI (whose python3 plugin embeds that Python) and gunicorn, in
# a debootstrap chroot. Not part of .ci/run: it needs root, Debian's mirror and about
# five minutes the first time. The chroot is kept for the next run.
#
#   sudo bash .ci/sid-chroot.sh [FOLDER]      (default /var/tmp/smsc-sid)
set -euo pipefail

root=${1:-/var/tmp/smsc-sid}
repo=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "sid-chroot.sh: must run as root (debootstrap, chroot)" >&2
    exit 1
fi
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap </dev/null

if [ ! -x "$root/usr/bin/python3" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        sid "$root" http://deb.debian.org/debian
fi
# A mirror snapshot's Release file may be past its Valid-Until date.
echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99smsc-no-valid-until"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The host's CA bundle: where a proxy re-signs TLS, pip in the chroot trusts what the host trusts.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/smsc-host-ca.crt"

mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
trap 'umount "$root/dev" "$root/proc" 2>/dev/null || true' EXIT

rm -rf "$root/work/main"
mkdir -p "$root/work/main"
(cd "$repo" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$root/work/main"

run() {
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
        PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_CERT=/etc/smsc-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        /bin/bash -c "$1"
}
run 'test -x /opt/venv/bin/python || python3 -m venv /opt/venv'
run 'cd /work/main && PYTHON=/opt/venv/bin/python bash .ci/servers.sh'
run 'pip install -q gunicorn'
run 'cd /work/main && python -VV && pip install -q -e ".[dev]" && python -m pytest'

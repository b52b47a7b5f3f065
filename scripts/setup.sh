#!/usr/bin/env bash
# Install everything nbdfabric needs on a Debian bookworm machine (as root), idempotently:
# distro packages (libnbd's Python bindings exist only there), a venv that can import them,
# and the pip dependencies. Quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(python3-venv python3-libnbd libnbd-bin nbdkit qemu-utils fio gzip xz-utils strace e2fsprogs xorriso dosfstools mtools openssh-server nbdkit-plugin-python)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    # openssh-server is here for the ssh plugin's tests, which run a private sshd of their
    # own: installing it must not start the system's. Package scripts start services through
    # invoke-rc.d or deb-systemd-invoke, which ask /usr/sbin/policy-rc.d first (exit 101:
    # "not allowed"). One is put there for the install only if the machine has none, and
    # only ours is removed.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        trap "$sudo rm -f $policy" EXIT
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    if [ -n "$policy" ]; then
        $sudo rm -f "$policy"
        trap - EXIT
    fi
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# The venv does not see the distro's site-packages (it would pin unrelated libraries);
# only libnbd's two files are linked in.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod*.so; do
    ln -sf "$f" "$site/"
done

stamp=.venv/.deps-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
.venv/bin/python -c 'import nbd, nodes' || { echo "setup: the venv cannot import nbd" >&2; exit 1; }

# Bytecode for our modules and libnbd's linked nbd.py, made here: every node is a new process,
# and where PYTHONDONTWRITEBYTECODE is set none would ever be cached, so each node compiled
# some ninety modules as it started (0.75 s to start a node instead of 0.4). Up-to-date files
# are skipped.
.venv/bin/python -m compileall -q -j 0 nodes orchestrator bench "$site/nbd.py" >/dev/null

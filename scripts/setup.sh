#!/usr/bin/env bash
# Installs what the portal and its tests need on a fresh Debian 12 machine: apt packages that are
# missing (as root) and the virtualenv in .venv. Safe to run again: it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc python3-dev libldap2-dev libsasl2-dev          # python-ldap compiles against these
  python3-venv make                                  # python3 -m venv (.venv below) with pip in it; make
  slapd ldap-utils                                   # throwaway directory for the demo and the tests
  openvswitch-switch iproute2 ethtool tcpdump iputils-ping arping iperf3   # the netns lab
  openvpn openssh-server openssh-client procps       # access gateways (ps: the bastion's session watchdog)
  nftables                                           # the bastion legs' table (access/gateway/legs.py)
  systemd                                            # systemd-analyze verifies the gateway's units
  chromium chromium-driver                           # browser tests
  qemu-system-x86 busybox-static                     # the Linux-bridge lane in a guest with a stock kernel …
)
# … whose kernel is Debian's amd64 one (elsewhere the lane says SKIP; arm64 has no linux-image-amd64)
if [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ]; then APT_PACKAGES+=(linux-image-amd64); fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The Debian packages enable their daemons; we start our own throwaway ones instead. Only while we install:
  # a policy-rc.d left behind would block every service start on this machine (an admin's own is kept).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pip's output without its "WARNING: Location" noise, and pip's own exit status (a filter in a pipe would
# give grep's): a failed install must stop here, before the stamp says the venv is complete.
pip_install() {
  local log rc=0
  log=$(mktemp)
  .venv/bin/pip install -q "$@" >"$log" 2>&1 || rc=$?
  grep -v '^WARNING: Location' "$log" >&2 || true
  rm -f "$log"
  if [ "$rc" -ne 0 ]; then
    echo "setup: pip install $* failed (exit $rc); fix the cause and run setup again" >&2
    exit "$rc"
  fi
}

PY=${PYTHON:-python3}  # the system's python3 unless PYTHON says otherwise: hence python3-venv above
# A venv without pip (made before python3-venv was installed: "ensurepip is not available") is made again.
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ]; then
  "$PY" -m venv --clear .venv
fi
stamp=.venv/.requirements-$(cat requirements/*.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  pip_install --upgrade pip wheel
  pip_install -r requirements/dev.txt
  .venv/bin/python -c "import django, ldap, napalm, pyroute2, celery, rest_framework"
  rm -f .venv/.requirements-*
  touch "$stamp"
fi
echo "setup: ready (.venv)"

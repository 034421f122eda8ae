#!/usr/bin/env bash
# Installs what the portal and its tests need on a fresh Debian 12 machine: apt packages that are
# missing (as root) and the virtualenv in .venv. Safe to run again: it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc python3-dev libldap2-dev libsasl2-dev          # python-ldap compiles against these
  slapd ldap-utils                                   # throwaway directory for the demo and the tests
  openvswitch-switch iproute2 ethtool tcpdump iputils-ping arping iperf3   # the netns lab
  openvpn openssh-server openssh-client procps       # access gateways (ps: the bastion's session watchdog)
  systemd                                            # systemd-analyze verifies the gateway's units
  chromium chromium-driver                           # browser tests
  qemu-system-x86 linux-image-amd64 busybox-static   # the Linux-bridge lane in a guest with a stock kernel
)

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
  # The Debian packages enable their daemons; we start our own throwaway ones instead.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.virtcloud
  [ -e /usr/sbin/policy-rc.d ] || { cp /usr/sbin/policy-rc.d.virtcloud /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  rm -f /usr/sbin/policy-rc.d.virtcloud
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements-$(cat requirements/*.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip wheel 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q -r requirements/dev.txt 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import django, ldap, napalm, pyroute2, celery, rest_framework" 
  rm -f .venv/.requirements-*
  touch "$stamp"
fi
echo "setup: ready (.venv)"

#!/usr/bin/env bash
# The Linux-bridge lane. This machine's kernel has no 802.1Q, so the linuxbridge switch and host drivers are
# tested inside a QEMU guest booted with Debian's stock kernel by virtme-ng (software emulation, the host's
# root filesystem shared read-only): network/tests/test_drivers_linuxbridge.py, including the two-switch
# isolation check over a plain 802.1Q core and a QinQ (802.1ad) core, access/tests/test_gateway_legs.py
# (the SSH bastion's VLAN legs) and access/tests/test_router_hook.py (the provider router's VLAN links), without
# Django or a database.
#
#   scripts/vm-lane.sh          run the tests; exit status = pytest's (junit: $VM_LANE_OUT/junit.xml)
#   scripts/vm-lane.sh bench    run bench/lab_linuxbridge.py in the guest ($VM_LANE_OUT/bench.json)
#   scripts/vm-lane.sh test --if-needed    do nothing (exit 0) when this kernel has 802.1Q and we are root:
#                               then the main pytest run already ran these tests natively
#   VM_LANE_PYTEST_ARGS="-k qinq -x" scripts/vm-lane.sh    extra pytest arguments for the guest
#   VM_LANE_BOOT_TIMEOUT (240 s): a guest whose script has not started by then is stopped and booted once more
#
# It installs nothing. Missing qemu, kernel, busybox or vng is a failure that says what to install
# (scripts/setup.sh does). Only a machine that cannot run QEMU at all gives exit 0 with a SKIP line.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mode=${1:-test}
if_needed=0
[ "${2:-}" = --if-needed ] && if_needed=1
out=${VM_LANE_OUT:-$repo/var/vm-lane/$mode}
timeout_s=${VM_LANE_TIMEOUT:-900}

fail() {
  echo "vm-lane: FAIL: $*" >&2
  exit 1
}
skip() {
  echo "vm-lane: ========================================================================"
  echo "vm-lane: SKIP: $* — the linuxbridge driver tests did NOT run"
  echo "vm-lane: ========================================================================"
  exit 0
}

case $mode in test | bench) ;; *) fail "usage: $0 [test|bench] [--if-needed]" ;; esac

if [ "$if_needed" = 1 ] && [ "$(id -u)" = 0 ]; then
  probe_ns=vclb$$-probe native=0
  if ip netns add "$probe_ns" 2>/dev/null; then
    ip -n "$probe_ns" link add d0 type dummy 2>/dev/null &&
      ip -n "$probe_ns" link add link d0 name d0.100 type vlan id 100 2>/dev/null &&
      ip -n "$probe_ns" link add b0 type bridge vlan_filtering 1 2>/dev/null && native=1
    ip netns del "$probe_ns"
  fi
  if [ "$native" = 1 ]; then
    echo "vm-lane: this kernel has 802.1Q: the linuxbridge tests ran in the main pytest run; no guest needed"
    exit 0
  fi
fi

arch=$(uname -m)
[ "$arch" = x86_64 ] || skip "this is a $arch machine; the lane boots an amd64 kernel with qemu-system-x86_64"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 missing: apt-get install -y qemu-system-x86"
# The generic image: Debian's -cloud- kernel has no 9p, so it cannot mount the shared root.
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | grep -v -- -cloud- | sort -V | tail -n 1 || true)
[ -n "$kernel" ] || fail "no /boot/vmlinuz-*-amd64: apt-get install -y linux-image-amd64"
[ -r "$kernel" ] || fail "$kernel is not readable (run as root)"
command -v busybox >/dev/null || [ -x /bin/busybox ] || fail "busybox missing (initramfs): apt-get install -y busybox-static"
vng=$repo/.venv/bin/vng
[ -x "$vng" ] || fail "$vng missing: .venv/bin/pip install -r requirements/dev.txt (virtme-ng)"

# Can this machine run a QEMU guest at all (software emulation, no KVM needed)? Start an empty machine and
# quit it through the monitor. Failing here is not an installation problem but a machine limit: skip.
if ! probe=$(echo quit | timeout 60 qemu-system-x86_64 -machine none -accel tcg -nodefaults -display none \
  -monitor stdio 2>&1); then
  skip "qemu-system-x86_64 cannot start a guest here: $(echo "$probe" | tail -n 2 | tr '\n' ' ')"
fi

# One run per output folder at a time: a second run (another terminal, another make test in this checkout)
# would delete the first one's results under it.
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock -n 9 || fail "another vm-lane run is using $out (wait for it, or set VM_LANE_OUT to another folder)"
rm -rf "$out"
mkdir -p "$out"
printf '%s\n' "${VM_LANE_PYTEST_ARGS:-}" >"$out/pytest-args"
echo "vm-lane: booting $(basename "$kernel") under QEMU (TCG) for '$mode'; output in $out"
start=$(date +%s.%N)
# One guest run, in a session of its own (setsid: the whole process group — timeout, vng, qemu — can be stopped).
# vng calls its helpers (virtme-run, ...) through PATH. The guest writes its own log into $out: vng's console output
# is kept apart (it mangles the guest's stdout). The extra read-only 9p export of / (tag vclbroot) is mounted with
# caching by guest.sh: vng's own root mount is uncached and very slow under TCG.
guest() {
  PATH="$repo/.venv/bin:$PATH" setsid timeout "$timeout_s" "$vng" --disable-kvm --force-9p --cpus 2 --memory 2G \
    --user root --rwdir "$out" --run "$kernel" \
    --qemu-opts="-fsdev local,id=vclbroot,path=/,security_model=none,readonly=on,multidevs=remap" \
    --qemu-opts="-device virtio-9p-pci,fsdev=vclbroot,mount_tag=vclbroot" \
    --exec "sh $(printf %q "$repo/network/lab/vmlane/guest.sh") $(printf %q "$out") $(printf %q "$repo") $mode" \
    >"$out/vng.log" 2>&1 &
  local pid=$! waited=0
  # a guest whose script has not started after $boot_timeout s hangs in its boot (seen once under TCG: no console
  # output at all, the lane's 900 s then failed `make test`): stopped, and booted once more
  while [ ! -f "$out/booted" ] && kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$boot_timeout" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if [ ! -f "$out/booted" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local left=0  # the group's processes (vng, qemu) gone before the next boot: SIGKILL after 10 s
    while kill -0 -- "-$pid" 2>/dev/null && [ "$left" -lt 10 ]; do
      sleep 1
      left=$((left + 1))
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    return 125
  fi
  wait "$pid"
}
boot_timeout=${VM_LANE_BOOT_TIMEOUT:-240}
vng_rc=0
guest || vng_rc=$?
if [ "$vng_rc" = 125 ]; then
  echo "vm-lane: the guest did not start its script within ${boot_timeout}s (a hung boot): booting it again"
  rm -f "$out/booted" "$out/guest.log" "$out/status" "$out/timing"
  vng_rc=0
  guest || vng_rc=$?
  [ "$vng_rc" = 125 ] && fail "the guest did not start its script within ${boot_timeout}s, twice; see $out/vng.log"
fi
end=$(date +%s.%N)

[ -f "$out/guest.log" ] && cat "$out/guest.log"
if [ ! -f "$out/status" ]; then
  echo "--- vng console (last 30 lines) ---" >&2
  tail -n 30 "$out/vng.log" >&2 || true
  [ "$vng_rc" = 124 ] && fail "the guest did not finish within ${timeout_s}s"
  fail "the guest did not finish (vng exit $vng_rc); see $out/vng.log"
fi
status=$(cat "$out/status")
read -r booted finished <"$out/timing"
awk -v s="$start" -v e="$end" -v b="$booted" -v f="$finished" 'BEGIN {
  printf "vm-lane: guest boot %.1f s (kernel start to test script), %s %.1f s, total %.1f s wall clock\n",
         b, "run", f - b, e - s }' | sed "s/ run / $mode /"
echo "vm-lane: $mode exit status $status"
exit "$status"

#!/bin/sh
# Runs INSIDE the QEMU guest started by scripts/vm-lane.sh: $1 = read-write output folder, $2 = repository,
# $3 = test | bench. The host's root filesystem is shared read-only, so everything written goes to $1.
#
# virtme-ng mounts that root over 9p without caching, and under emulation every file access is a slow round
# trip (importing napalm alone took 55-85 s). vm-lane.sh exports the root a second time (9p tag
# "vclbroot"); mounted here with cache=loose (safe: read-only, nothing changes during the run) and entered
# with chroot, the same run is several times faster.
out=$1 repo=$2 mode=$3
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if [ "${VCLB_IN_CHROOT:-}" != 1 ]; then
  exec >"$out/guest.log" 2>&1
  read -r booted _ </proc/uptime
  echo "$booted" >"$out/booted"
  echo "guest: kernel $(uname -r), script started ${booted}s after kernel start"
  root=/run/vclbroot
  mkdir -p "$root"
  if mount -t 9p -o ro,version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose vclbroot "$root"; then
    for d in proc sys dev; do mount --rbind "/$d" "$root/$d"; done
    mount --bind /run "$root/run"
    # A writable /tmp over the cached view (a repository cloned under /tmp stays on the fast path).
    mkdir -p /run/vclbtmp/upper /run/vclbtmp/work
    mount -t overlay overlay -o "lowerdir=$root/tmp,upperdir=/run/vclbtmp/upper,workdir=/run/vclbtmp/work" \
      "$root/tmp" || mount --bind /tmp "$root/tmp"
    mount --bind "$out" "$root$out"
    VCLB_IN_CHROOT=1 exec chroot "$root" /bin/sh "$repo/network/lab/vmlane/guest.sh" "$out" "$repo" "$mode"
  fi
  echo "guest: no cached root export (vclbroot); running on the uncached root (slow)"
fi

export VIRTCLOUD_VMLANE=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp TMPDIR=/tmp PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
cd "$repo" || { echo 1 >"$out/status"; exit 1; }
case $mode in
test)
  .venv/bin/python -m pytest -c network/lab/vmlane/pytest.ini --rootdir "$repo" --noconftest \
    --junitxml="$out/junit.xml" -q --durations=8 network/tests/test_drivers_linuxbridge.py \
    access/tests/test_gateway_legs.py access/tests/test_router_hook.py $(cat "$out/pytest-args")
  rc=$?
  ;;
bench)
  .venv/bin/python bench/lab_linuxbridge.py --here --json-file "$out/bench.json"
  rc=$?
  ;;
*)
  echo "guest: unknown mode $mode"
  rc=2
  ;;
esac
read -r finished _ </proc/uptime
echo "$(cat "$out/booted") $finished" >"$out/timing"
echo "$rc" >"$out/status"

#!/bin/sh
# Runs INSIDE the QEMU guest started by scripts/vm-lane.sh: $1 = read-write output folder, $2 = repository,
# $3 = test | bench. The host's root filesystem is shared read-only, so everything written goes to $1.
out=$1 repo=$2 mode=$3
exec >"$out/guest.log" 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export VIRTCLOUD_VMLANE=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp TMPDIR=/tmp
read -r booted _ </proc/uptime
echo "guest: kernel $(uname -r), script started ${booted}s after kernel start"
cd "$repo" || { echo 1 >"$out/status"; exit 1; }
case $mode in
test)
  .venv/bin/python -m pytest -c network/lab/vmlane/pytest.ini --rootdir "$repo" --noconftest \
    --junitxml="$out/junit.xml" -q --durations=8 network/tests/test_drivers_linuxbridge.py
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
echo "$booted $finished" >"$out/timing"
echo "$rc" >"$out/status"

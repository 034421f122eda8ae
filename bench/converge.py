#!/usr/bin/env python
"""Time to converge one VLAN onto 1, 2, 4, 8 and 16 site switches of the netns lab: in parallel (one Celery
group of ``network.converge_switch`` tasks on a real worker, as ``workflows.provision`` runs them) versus
one by one (the same convergence, switch after switch, in this process). Goal: 16 switches in parallel
within 1.5× the time of 1.

    REDIS_URL=redis://127.0.0.1:6379/3 DATABASE_URL=postgres://postgres@127.0.0.1:5432/virtcloud_bench \\
        .venv/bin/python bench/converge.py

The group's result is polled every 5 ms (Celery's default of 0.5 s would put a 500 ms floor under every
parallel figure and hide the real ratio).

Needs root, Open vSwitch (the lab), PostgreSQL and Redis. Builds a 16-site lab (one host per site, a plain
802.1Q core), points a throw-away inventory at it, starts a worker (threads pool, 16 slots) on its own
queue, and removes all of it at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/3")
os.environ.pop("REDIS_URL", None)  # the test settings would override the broker from it
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings_test",
    CELERY_TASK_ALWAYS_EAGER="false",
    CELERY_BROKER_URL=REDIS,
    CELERY_RESULT_BACKEND=REDIS,
)

import django  # noqa: E402

django.setup()

from celery import group  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from network import convergence, selectors, services, tasks  # noqa: E402
from network.lab import Lab, topology  # noqa: E402
from network.tests.labinventory import inventory_for  # noqa: E402

SIZES = (1, 2, 4, 8, 16)


def start_worker(queue: str, log: Path, slots: int, pool: str = "threads") -> subprocess.Popen:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal.testing_celery",
            "worker",
            "-l",
            "INFO",
            f"--pool={pool}",
            f"-c{slots}",
        ]
        + ["-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}@localhost"],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited: {log.read_text()[-2000:]}")
        if b"ready." in log.read_bytes():
            return proc
        time.sleep(0.1)
    raise SystemExit("worker not ready")


def new_segment(inv: dict, n: int, tag: str):
    hosts = [inv["hosts"][f"h-s{i + 1}-1"] for i in range(n)]
    seg = services.segment_create(owner=f"bench:{tag}", hosts=hosts, gateway=False)
    switches, _hosts = selectors.segment_devices(seg)
    assert len(switches) == n, (n, [s.name for s in switches])
    changes = [convergence.change_create(device=s, segment=seg, cause="bench").pk for s in switches]
    return seg, switches, changes


def remove(seg, switches) -> None:
    services.segment_delete(segment=seg)
    for s in switches:
        convergence.converge_change(convergence.change_create(device=s, segment=seg, cause="bench cleanup").pk)
    seg.refresh_from_db()
    services.vlan_release(allocation=seg.allocation)


def cleanup(inv: dict) -> None:
    """Remove the bench's inventory and everything recorded against it."""
    from network.models import DeviceChange, Segment, SegmentMember, VlanAllocation

    hosts, switches = list(inv["hosts"].values()), list(inv["switches"].values())
    SegmentMember.objects.filter(host__in=hosts).delete()
    DeviceChange.objects.filter(switch__in=switches).delete()
    DeviceChange.objects.filter(host__in=hosts).delete()
    Segment.objects.filter(allocation__pool=inv["pool"]).delete()
    VlanAllocation.objects.filter(pool=inv["pool"]).delete()
    core = inv["pool"].core
    inv["pool"].delete()
    for h in hosts:
        h.delete()
    for s in switches:
        s.delete()
    core.delete()
    for site in inv["sites"].values():
        site.delete()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", default="threads", choices=("threads", "prefork"), help="the worker's pool")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        print("needs PostgreSQL: DATABASE_URL=postgres://...", file=sys.stderr)
        return 2
    call_command("migrate", verbosity=0)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="converge-bench-"))
    lab = Lab.up(topology.generate(sites=max(SIZES), hosts_per_site=1, core_kind="dot1q", vid_min=100, vid_max=999))
    worker = None
    created = []
    try:
        inv = inventory_for(lab, pool_ranges="100-999")
        created = [inv["pool"], *inv["hosts"].values(), *inv["switches"].values(), *inv["sites"].values()]
        worker = start_worker(queue, workdir / "worker.log", max(SIZES), args.pool)
        # warm up: the worker's threads open their database connections, Python imports the drivers
        seg, switches, changes = new_segment(inv, max(SIZES), "warm")
        group(tasks.converge_switch.si(c).set(queue=queue) for c in changes).apply_async().get(
            timeout=120, interval=0.005
        )
        remove(seg, switches)
        print(f"{'switches':>8} {'parallel ms':>12} {'one-by-one ms':>14} {'speed-up':>9} {'vs 1 switch':>12}")
        base = None
        for n in SIZES:
            par, seq = [], []
            for r in range(args.rounds):
                seg, switches, changes = new_segment(inv, n, f"p{n}-{r}")
                started = time.perf_counter()
                group(tasks.converge_switch.si(c).set(queue=queue) for c in changes).apply_async().get(
                    timeout=120, interval=0.005
                )
                par.append(time.perf_counter() - started)
                remove(seg, switches)
                seg, switches, changes = new_segment(inv, n, f"s{n}-{r}")
                started = time.perf_counter()
                for c in changes:
                    convergence.converge_change(c)
                seq.append(time.perf_counter() - started)
                remove(seg, switches)
            p, s = statistics.median(par) * 1000, statistics.median(seq) * 1000
            base = base or p
            print(f"{n:>8} {p:>12.0f} {s:>14.0f} {s / p:>8.1f}x {p / base:>11.2f}x")
        print(
            f"goal: 16 switches within 1.5x of 1 switch (parallel); pool {args.pool}; cores: {os.cpu_count()}, "
            f"load: {os.getloadavg()}"
        )
    finally:
        try:
            if worker:
                worker.terminate()
                worker.wait(timeout=30)
            if created:
                cleanup(inv)
        finally:
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())

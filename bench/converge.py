#!/usr/bin/env python
"""Time to converge one VLAN onto 1, 2, 4, 8 and 16 site switches of the netns lab, three ways, side by side:

- layer: one ``network.converge_devices`` task on a real worker, as ``workflows.provision`` sends a layer
  (the switches converged side by side in threads, a fixed number of database queries);
- per-device tasks: a Celery group of ``network.converge_switch`` tasks, one per switch (the previous design);
- one by one: ``convergence.converge_change`` switch after switch, in this process;
- sessions alone: the switches' driver sessions side by side on 16 threads in this process, with the desired
  state computed before the clock starts: no database, no Celery, no locks. This is the baseline the lab and
  the drivers put under the layer; what the layer takes beyond it is the portal's own.

Goal: 16 switches (layer) within 1.5× the time of 1.

    REDIS_URL=redis://127.0.0.1:6379/3 DATABASE_URL=postgres://postgres@127.0.0.1:5432/virtcloud_bench \\
        .venv/bin/python bench/converge.py

The group's result is polled every 5 ms (Celery's default of 0.5 s would put a 500 ms floor under every
parallel figure and hide the real ratio).

For the layer way it also prints the CPU time each layer took, per round: the worker process, the lab's
daemons (ovsdb-server and ovs-vswitchd, which stand in for the switches' own CPUs) and this client; their sum
over the machine's cores is a floor under the layer's time once the cores are saturated.

Needs root, Open vSwitch (the lab), PostgreSQL and Redis. Builds a 16-site lab (one host per site, a plain
802.1Q core; a control plane per switch and per host by default, ``--planes site`` one per site,
``--planes shared`` one for the lab, see
``network.lab.fabric``), points a throw-away inventory at it, starts a worker (threads pool, 16 slots) on its
own queue, and removes all of it at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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

from network import convergence, selectors, services, specs, tasks  # noqa: E402
from network.drivers import switch_session  # noqa: E402
from network.lab import Lab, topology  # noqa: E402
from network.lab.fabric import PLANES  # noqa: E402
from network.tests.labinventory import inventory_for  # noqa: E402
from portal.testing_celery import WorkerProcess  # noqa: E402

SIZES = (1, 2, 4, 8, 16)


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


def layer(changes: list[int], queue: str) -> None:
    tasks.converge_devices.si(changes).set(queue=queue).apply_async().get(timeout=120, interval=0.005)


def per_device(changes: list[int], queue: str) -> None:
    group(tasks.converge_switch.si(c).set(queue=queue) for c in changes).apply_async().get(timeout=120, interval=0.005)


def one_by_one(changes: list[int], _queue: str) -> None:
    for c in changes:
        convergence.converge_change(c)


_SESSION_THREADS = ThreadPoolExecutor(max_workers=max(SIZES), thread_name_prefix="bench-session")


def sessions_work(changes: list[int]) -> list[tuple]:
    """(spec, desired port VLANs) of the switches of ``changes``, from the database, as a layer computes them."""
    from network.models import DeviceChange

    switches = [c.switch for c in DeviceChange.objects.filter(pk__in=changes).select_related("switch")]
    ids = [s.pk for s in switches]
    statics: dict[int, dict[str, frozenset[int]]] = {}
    segments = selectors.desired_segments(switch_ids=ids, host_ids=[])
    desired = selectors.switch_desired(ids, segments=segments, port_statics=statics)
    return [
        (specs.switch_spec(s, owned_ports=desired[s.pk].keys(), port_static_vlans=statics.get(s.pk, {})), desired[s.pk])
        for s in switches
    ]


def converge_one(spec, desired) -> None:
    with switch_session(spec) as session:
        session.converge(desired)


def sessions(work: list[tuple], _queue: str) -> None:
    for future in [_SESSION_THREADS.submit(converge_one, spec, desired) for spec, desired in work]:
        future.result()


WAYS = {"layer": layer, "per-device": per_device, "one-by-one": one_by_one, "sessions": sessions}
PREPARE = {"sessions": sessions_work}  # done before the clock starts


def cpu_ms(pids) -> float:
    """CPU time (user + system, every thread) the processes ``pids`` have used so far, in ms."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total * 1000 / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--rounds", type=int, default=15, help="rounds per size; the median is printed")
    parser.add_argument(
        "--planes",
        default="device",
        choices=PLANES,
        help="the lab's control planes: a pair (OVSDB, ovs-vswitchd) per switch and per host (default: a commit "
        "reconfigures that device only, as a real switch has its own CPU; the daemons share the machine's "
        "cores), per site (the site's switch and host together), or one for the whole lab (every commit makes "
        "it reconfigure all 16 switches' bridges, so 1 switch pays for 16, which flatters the ratio)",
    )
    parser.add_argument("--pool", default="threads", choices=("threads", "prefork"), help="the worker's pool")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        print("needs PostgreSQL: DATABASE_URL=postgres://...", file=sys.stderr)
        return 2
    call_command("migrate", verbosity=0)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="converge-bench-"))
    lab = Lab.up(
        topology.generate(sites=max(SIZES), hosts_per_site=1, core_kind="dot1q", vid_min=100, vid_max=999),
        planes=args.planes,
    )
    worker = None
    created = []
    try:
        inv = inventory_for(lab, pool_ranges="100-999")
        created = [inv["pool"], *inv["hosts"].values(), *inv["switches"].values(), *inv["sites"].values()]
        worker = WorkerProcess(
            dict(os.environ), workdir / "worker.log", queues=[queue], pool=args.pool, concurrency=max(SIZES), name=queue
        )
        worker.start(timeout=180)
        # warm up: the worker's threads open their database connections, Python imports the drivers
        for name, way in WAYS.items():
            seg, switches, changes = new_segment(inv, max(SIZES), f"warm-{name}")
            way(PREPARE.get(name, list)(changes), queue)
            remove(seg, switches)
        print(
            f"{'switches':>8} {'layer ms':>9} {'per-device tasks ms':>20} {'one-by-one ms':>14} "
            f"{'sessions alone ms':>18} {'layer vs 1 switch':>18} {'per-device vs 1':>16} {'sessions vs 1':>14}"
        )
        base: dict[str, float] = {}
        daemons = [pid for pid in lab.state["pids"].values() if pid]
        cpu: dict[int, tuple[float, float, float]] = {}  # n → layer CPU per round: worker, daemons, client
        for n in SIZES:
            times: dict[str, list[float]] = {name: [] for name in WAYS}
            spent = [0.0, 0.0, 0.0]
            for r in range(args.rounds):
                for name, way in WAYS.items():  # interleaved, so that drift of the machine hits all three
                    seg, switches, changes = new_segment(inv, n, f"{name[:3]}{n}-{r}")
                    arg = PREPARE.get(name, list)(changes)
                    before = (cpu_ms([worker.proc.pid]), cpu_ms(daemons), time.process_time() * 1000)
                    started = time.perf_counter()
                    way(arg, queue)
                    times[name].append(time.perf_counter() - started)
                    if name == "layer":
                        after = (cpu_ms([worker.proc.pid]), cpu_ms(daemons), time.process_time() * 1000)
                        spent = [s + a - b for s, a, b in zip(spent, after, before, strict=True)]
                    remove(seg, switches)
            cpu[n] = tuple(x / args.rounds for x in spent)
            ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
            for name in ms:
                base.setdefault(name, ms[name])
            print(
                f"{n:>8} {ms['layer']:>9.0f} {ms['per-device']:>20.0f} {ms['one-by-one']:>14.0f} "
                f"{ms['sessions']:>18.1f} {ms['layer'] / base['layer']:>17.2f}x "
                f"{ms['per-device'] / base['per-device']:>15.2f}x {ms['sessions'] / base['sessions']:>13.2f}x"
            )
            top = ms
        print(
            f"goal: 16 switches within 1.5x of 1 switch (layer); median of {args.rounds} rounds; pool {args.pool}; "
            f"lab planes: {args.planes}; "
            f"cores: {os.cpu_count()}, load: {os.getloadavg()}"
        )
        cores = os.cpu_count() or 1
        print(f"\nCPU per layer task, mean of {args.rounds} rounds (clock-tick resolution: ±{10 / args.rounds:.1f} ms)")
        print(
            f"{'switches':>8} {'worker ms':>10} {'lab daemons ms':>15} {'client ms':>10} {'sum ms':>7} "
            f"{f'sum / {cores} cores':>15}"
        )
        for n, (w, d, c) in cpu.items():
            print(f"{n:>8} {w:>10.1f} {d:>15.1f} {c:>10.1f} {w + d + c:>7.1f} {(w + d + c) / cores:>15.1f}")
        first, last = min(cpu), max(cpu)
        extra = sum(cpu[last]) - sum(cpu[first])
        floor = base["layer"] + extra / cores
        print(
            f"the {last - first} more switches cost {extra:.1f} ms more CPU per layer: on {cores} cores at least "
            f"{extra / cores:.1f} ms more wall time with perfect parallelism, a floor of {floor / base['layer']:.2f}x "
            f"for {last} switches (goal 1.5x allows {base['layer'] * 0.5:.1f} ms more)"
        )
        # the daemons stand in for the switches' own CPUs: on this machine they share its cores with the worker
        daemons_extra = cpu[last][1] - cpu[first][1]
        print(
            f"of which the lab's daemons: {daemons_extra:.1f} ms, a floor of "
            f"{(base['layer'] + daemons_extra / cores) / base['layer']:.2f}x even if the worker and this client "
            f"spent nothing more"
        )
        sessions_extra, layer_extra = top["sessions"] - base["sessions"], top["layer"] - base["layer"]
        print(
            f"the driver sessions alone (the lab and the drivers: no database, no Celery) take {sessions_extra:.1f} ms "
            f"more for {last} switches than for 1 ({base['sessions']:.1f} -> {top['sessions']:.1f} ms); the layer "
            f"takes {layer_extra:.1f} ms more, so the portal's own share of the extra is "
            f"{layer_extra - sessions_extra:.1f} ms"
        )
    finally:
        try:
            if worker:
                worker.stop(timeout=30)
            if created:
                cleanup(inv)
        finally:
            lab.down()
            shutil.rmtree(workdir, ignore_errors=True)  # the worker's log (a failed start printed its tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The desired state of one device while many clusters are live: computed from only the segments that can
reach the device (what convergence does) versus from every live segment (the baseline), side by side.

    .venv/bin/python bench/desired.py [--sizes 100,1000,4000] [--database-url postgres://…/vc_bench_desired]

A fresh database (dropped and created, dropped again at the end) with a 16-site inventory (2 hosts per
site, a gateway trunk at the first site), no lab: no device is touched. For each number of live segments
(1-4 random hosts each, 40 % closed) it times the desired state of a switch at a site without a gateway,
of the gateway site's switch and of one host, and checks both ways give the same answer.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,4000", help="live segments, comma-separated")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--database-url", default="postgres://postgres@127.0.0.1:5432/vc_bench_desired", help="dropped and created"
    )
    args = parser.parse_args()
    from provision import _recreate_database, topology_file

    _recreate_database(args.database_url)
    os.environ.update(DJANGO_SETTINGS_MODULE="portal.settings_test", DATABASE_URL=args.database_url)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from network import selectors, services
    from network.lab import topology
    from network.models import Host, Switch
    from network.topology import topology_import

    call_command("migrate", verbosity=0)
    topo = topology.generate(sites=16, hosts_per_site=2, core_kind="qinq", vid_min=2, vid_max=4094)
    data = topology_file(topo, agents=False)
    data["pools"][0].update(ranges="2-4094", quarantine=0)
    topology_import(data=data, source="bench desired")
    hosts = list(Host.objects.order_by("name"))
    switches = list(Switch.objects.order_by("name"))
    with_gateway = [s for s in switches if s.ports.filter(role="gateway_trunk").exists()]
    plain = next(s for s in switches if s not in with_gateway)
    gateway = with_gateway[0] if with_gateway else plain
    host = hosts[-1]
    devices = (
        ("switch", lambda segs=None: selectors.switch_desired([plain.pk], segments=segs)),
        ("gateway switch", lambda segs=None: selectors.switch_desired([gateway.pk], segments=segs)),
        ("host", lambda segs=None: selectors.host_desired([host.pk], segments=segs)),
    )
    rng = random.Random(1)
    made = 0
    print(f"{'live segments':>13} {'device':>14} {'reaching ms':>12} {'all segments ms':>16} {'speed-up':>9}")
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            while made < size:
                members = rng.sample(hosts, rng.randint(1, 4))
                services.segment_create(owner=f"bench:{made}", hosts=members, gateway=rng.random() < 0.4)
                made += 1
            for label, desired in devices:
                assert desired() == desired(selectors.desired_segments())
                reach = timed(desired, args.repeat)
                everything = timed(lambda d=desired: d(selectors.desired_segments()), args.repeat)
                print(f"{size:>13} {label:>14} {reach:>12.1f} {everything:>16.1f} {everything / reach:>8.1f}x")
        print(f"median of {args.repeat}; database {connection.vendor}; cores {os.cpu_count()}")
    finally:
        connection.close()
        from provision import _drop_database

        _drop_database(args.database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Concurrent VLAN allocations on PostgreSQL: allocations per second and duplicates.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/virtcloud_bench .venv/bin/python bench/allocate.py

Each request runs ``network.services.vlan_allocate`` on a connection of its own (threads; Django gives each
thread its connection). As many connections as the server allows are opened *before* the clock starts
(``max_connections`` minus those in use minus a margin), so the figure is allocation work, not connection
set-up; with the default ``max_connections = 100`` that is fewer than 200 connections, each serving several
requests. Goal: ≥ 500 allocations/s, 0 duplicates. The database is migrated if needed; the bench's own
rows are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings_test")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402

from network import services  # noqa: E402
from network.errors import PoolExhausted  # noqa: E402
from network.models import CoreTransport, Site, VlanAllocation, VlanPool  # noqa: E402


def available_connections(limit: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SHOW max_connections")
        maximum = int(cursor.fetchone()[0])
        cursor.execute("SELECT count(*) FROM pg_stat_activity")
        used = int(cursor.fetchone()[0])
    return max(1, min(limit, maximum - used - 20))


def one_round(requests: int, workers: int, pool_size: int, warm: bool) -> dict:
    tag = uuid.uuid4().hex[:8]
    site = Site.objects.create(name=f"bench-{tag}")
    core = CoreTransport.objects.create(name=f"bench-{tag}", kind="dot1q", vid_min=2, vid_max=4094)
    core.sites.set([site])
    pool = VlanPool.objects.create(name=f"bench-{tag}", core=core, ranges=f"100-{99 + pool_size}")
    if warm:
        services.vlan_pool_sync(pool=pool)
    shares = [requests // workers + (1 if i < requests % workers else 0) for i in range(workers)]
    ready = threading.Barrier(workers + 1)
    results: list[list] = [[] for _ in range(workers)]

    def worker(i: int) -> None:
        try:
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT 1")  # this thread's own connection, opened before the clock starts
            ready.wait()
            for n in range(shares[i]):
                try:
                    results[i].append(services.vlan_allocate(pool=pool, owner=f"bench:{i}:{n}").vid)
                except PoolExhausted as exc:
                    results[i].append(exc)
        finally:
            connections["default"].close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    vids = [r for rs in results for r in rs if isinstance(r, int)]
    errors = [r for rs in results for r in rs if not isinstance(r, int)]
    in_db = VlanAllocation.objects.filter(pool=pool, state="allocated").count()
    VlanAllocation.objects.filter(pool=pool).delete()
    pool.delete()
    core.delete()
    site.delete()
    return {
        "elapsed": elapsed,
        "rate": len(vids) / elapsed,
        "granted": len(vids),
        "duplicates": len(vids) - len(set(vids)),
        "exhausted": len(errors),
        "in_db": in_db,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--connections", type=int, default=200, help="upper bound; the server may allow fewer")
    parser.add_argument("--pool-size", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="do not create the pool's rows beforehand")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        print("bench/allocate.py needs PostgreSQL: set DATABASE_URL=postgres://...", file=sys.stderr)
        return 2
    call_command("migrate", verbosity=0)
    workers = available_connections(min(args.connections, args.requests))
    print(f"{args.requests} allocations over {workers} concurrent connections, pool of {args.pool_size} ids")
    rounds = []
    for n in range(args.rounds):
        r = one_round(args.requests, workers, args.pool_size, warm=not args.cold)
        rounds.append(r)
        print(
            f"round {n + 1}: {r['granted']} granted in {r['elapsed'] * 1000:.0f} ms = {r['rate']:.0f} allocations/s, "
            f"duplicates {r['duplicates']}, exhausted {r['exhausted']}, rows allocated {r['in_db']}"
        )
    rates = [r["rate"] for r in rounds]
    dups = sum(r["duplicates"] for r in rounds)
    print(f"median {statistics.median(rates):.0f} allocations/s (min {min(rates):.0f}), duplicates {dups}")
    return 0 if dups == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

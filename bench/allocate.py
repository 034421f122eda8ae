#!/usr/bin/env python
"""Concurrent VLAN allocations on PostgreSQL: allocations per second and duplicates.

    .venv/bin/python bench/allocate.py --own-server        # 200 requests on 200 connections (as root or postgres)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/virtcloud_bench .venv/bin/python bench/allocate.py

Each request runs ``network.services.vlan_allocate`` on a connection of its own (a thread each: Django gives
each thread its connection; ``network.tests.allocation_race``), opened *before* the clock starts, so the
figure is allocation work, not connection set-up. Two cases, side by side:

- warm: each connection has served one allocation before (from another pool), as a running portal's
  persistent connections (``CONN_MAX_AGE``) have — the steady state, which the goal is about;
- cold: each request is its server backend's first (the backend loads the tables' catalog entries and
  plans the statement during the measurement) — the worst case, a burst of brand-new connections;
- pooled: the same 200 requests at once over ``--pooled`` warm connections (16: gunicorn's 2 processes × 8
  threads hold that many), each serving its share one after the other — how a portal meets such a burst.
  On 2 cores, 200 connections means 200 client threads and 200 server backends taking turns on them; the
  first two cases measure that as much as the allocation.
 ``--own-server`` starts a throwaway PostgreSQL server
(``portal.testing_pg``) with room for every connection; against ``DATABASE_URL`` the connections are capped
at what that server allows (``max_connections`` minus those in use minus a margin: fewer than 200 with the
default of 100), each serving several requests. Goal: ≥ 500 allocations/s, 0 duplicates. The database is
migrated if needed; the bench's own rows are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings_test")
# the test settings (throwaway keys) with what a deployment allocates with: the gateways' reuse horizon asked
# once a second per process, not at every allocation as the tests do
os.environ.setdefault("VLAN_REUSE_HORIZON_TTL", "1")


def available_connections(limit: int) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW max_connections")
        maximum = int(cursor.fetchone()[0])
        cursor.execute("SELECT count(*) FROM pg_stat_activity")
        used = int(cursor.fetchone()[0])
    return max(1, min(limit, maximum - used - 20))


def one_round(requests: int, workers: int, pool_size: int, warm: bool, processes: int, warm_connections: bool) -> dict:
    from network import services
    from network.models import VlanAllocation
    from network.tests.allocation_race import make_pool, race

    pool = make_pool(pool_size)
    if warm:
        services.vlan_pool_sync(pool=pool)
    warm_pool = make_pool(workers) if warm_connections else None
    result = race(pool, requests, workers, processes=processes, warm_pool=warm_pool)
    vids = result["vids"]
    unexpected = [e for e in result["errors"] if e["status"] != 409]
    in_db = VlanAllocation.objects.filter(pool=pool, state="allocated").count()
    for made in (pool, warm_pool):
        if made is not None:
            VlanAllocation.objects.filter(pool=made).delete()
            core, site = made.core, made.core.sites.get()
            made.delete()
            core.delete()
            site.delete()
    return {
        "elapsed": result["elapsed"],
        "rate": len(vids) / result["elapsed"],
        "granted": len(vids),
        "duplicates": len(vids) - len(set(vids)),
        "exhausted": len(result["errors"]) - len(unexpected),
        "unexpected": unexpected,
        "backends": result["backends"],
        "in_db": in_db,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--connections", type=int, default=200, help="upper bound; the server may allow fewer")
    parser.add_argument(
        "--pooled",
        type=int,
        default=16,
        help="connections of the third case: the requests served as a portal's web workers serve them "
        "(gunicorn 2 processes x 8 threads: 16 connections); 0: leave it out",
    )
    parser.add_argument("--pool-size", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="do not create the pool's rows beforehand")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="client processes the connections are spread over, like web workers (default: one per CPU)",
    )
    parser.add_argument(
        "--own-server",
        action="store_true",
        help="run against a throwaway PostgreSQL server with room for every connection (instead of DATABASE_URL)",
    )
    args = parser.parse_args()
    if args.own_server:
        from portal.testing_pg import throwaway_postgres

        with throwaway_postgres(max_connections=args.connections + 60) as url:
            argv = [a for a in sys.argv[1:] if a != "--own-server"]
            return subprocess.run([sys.executable, __file__, *argv], env={**os.environ, "DATABASE_URL": url}).returncode

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor != "postgresql":
        print(
            "bench/allocate.py needs PostgreSQL: set DATABASE_URL=postgres://... or use --own-server", file=sys.stderr
        )
        return 2
    call_command("migrate", verbosity=0)
    workers = available_connections(min(args.connections, args.requests))
    print(
        f"{args.requests} allocations over {workers} concurrent connections from {args.processes} processes, "
        f"pool of {args.pool_size} ids"
    )
    rounds: dict[str, list[dict]] = {"warm": [], "cold": []}
    if args.pooled:
        rounds["pooled"] = []
    for n in range(args.rounds):
        for case in rounds:  # interleaved, so that drift of the machine hits every case
            r = one_round(
                args.requests,
                min(workers, args.pooled) if case == "pooled" else workers,
                args.pool_size,
                warm=not args.cold,
                processes=args.processes,
                warm_connections=case != "cold",
            )
            rounds[case].append(r)
            print(
                f"round {n + 1} {case}: {r['granted']} granted in {r['elapsed'] * 1000:.0f} ms = "
                f"{r['rate']:.0f} allocations/s over {r['backends']} server connections, duplicates "
                f"{r['duplicates']}, exhausted {r['exhausted']}, other errors {len(r['unexpected'])}, "
                f"rows allocated {r['in_db']}"
            )
    dups = sum(r["duplicates"] for case in rounds.values() for r in case)
    bad = sum(len(r["unexpected"]) for case in rounds.values() for r in case)
    labels = {
        "warm": f"a warm connection per request ({workers}, the steady state)",
        "cold": "each request its backend's first",
        "pooled": f"over {min(workers, args.pooled)} warm connections, as web workers serve them",
    }
    for case, rows in rounds.items():
        rates = [r["rate"] for r in rows]
        print(f"{labels[case]}: median {statistics.median(rates):.0f} allocations/s (min {min(rates):.0f})")
    print(f"duplicates {dups}; goal: >= 500 allocations/s (a warm connection per request), 0 duplicates")
    return 0 if dups == 0 and bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

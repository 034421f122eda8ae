"""Profile issuance benchmark (never run as a test): ``.venv/bin/python bench/profiles.py [--live]``.

Issues OpenVPN profiles through the HTTP endpoint ``POST /api/access/vpn-profiles/`` (key generation, AC
and certificate signatures, database rows, rendering) and prints p50/p95 latency and profiles/s.

- default: in-process with Django's test client, one request at a time (the per-request cost);
- ``--live``: a real gunicorn (``--workers``, default 2 = the cores) on 127.0.0.1 and ``--concurrency``
  client threads with an API token (the throughput a machine gives). Its workers keep their database
  connections (``--conn-max-age``, default 60 s, as ``DATABASE_CONN_MAX_AGE``): with 0, every request
  opens a PostgreSQL connection, which alone costs about a third of the throughput;
- ``--profile``: cProfile of the in-process run, the functions with the most cumulative time.

Goal (issue 6): p95 ≤ 50 ms and ≥ 150 profiles/s on 2 cores. Uses a throwaway SQLite database under a
temporary DATA_DIR unless ``DATABASE_URL`` is set (PostgreSQL gives the production picture; the bench
database is migrated and filled, so point it at a scratch database).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def report(label: str, latencies: list[float], wall: float) -> None:
    print(
        f"{label}: {len(latencies)} profiles, p50 {percentile(latencies, 50) * 1000:.1f} ms, "
        f"p95 {percentile(latencies, 95) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms, "
        f"{len(latencies) / wall:.0f} profiles/s"
    )


def setup_django(data_dir: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings_test")
    os.environ.setdefault("DATA_DIR", data_dir)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def fixtures():
    """A user in a group with a closed READY cluster, a gateway, and an API token for the user."""
    import datetime as dt

    from django.contrib.auth.models import Group, User
    from django.utils import timezone

    from access import services
    from access.models import Gateway
    from clusters.models import Image, VirtualCluster
    from portal.models import TokenScope
    from portal.tokens import token_create

    suffix = str(int(time.time() * 1000))[-8:]
    group = Group.objects.create(name=f"bench-{suffix}")
    user = User.objects.create_user(f"bench{suffix}", f"bench{suffix}@example.org", "x")
    user.groups.add(group)
    image, _ = Image.objects.get_or_create(name="bench-image")
    cluster = VirtualCluster.objects.create(
        name="bench",
        owner=user,
        group=group,
        image=image,
        admin_rights=True,
        connectivity="closed",
        connectivity_reason="bench",
        state="ready",
        vlan_id=3000,
        expires_at=timezone.now() + dt.timedelta(days=1),
    )
    Gateway.objects.get_or_create(name="bench-gw", defaults={"address": "198.18.200.1"})
    services.ca_ensure()
    _, secret = token_create(user=user, name="bench", scopes=[TokenScope.CLUSTERS_WRITE])
    return user, cluster, secret


def bench_in_process(user, cluster, count: int, profile: bool = False) -> None:
    from django.test import Client

    client = Client()
    client.force_login(user)
    body = json.dumps({"clusters": [cluster.pk]})
    for _ in range(20):  # warm up (imports, first connection, caches)
        client.post("/api/access/vpn-profiles/", body, content_type="application/json")
    latencies = []
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    cpu = time.process_time()
    for _ in range(count):
        t = time.perf_counter()
        response = client.post("/api/access/vpn-profiles/", body, content_type="application/json")
        latencies.append(time.perf_counter() - t)
        assert response.status_code == 200, response.content[:300]
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"access|rest_framework/views|psycopg/cursor", 30)
    report("in-process (test client, sequential)", latencies, wall)
    print(f"  this process's CPU: {cpu / count * 1000:.2f} ms per profile")


def bench_live(cluster, token: str, count: int, workers: int, concurrency: int, conn_max_age: int) -> None:
    from bench.web import start_gunicorn

    server, base = start_gunicorn(dict(os.environ, DATABASE_CONN_MAX_AGE=str(conn_max_age)), workers=workers)
    try:
        url = f"{base}/api/access/vpn-profiles/"
        body = json.dumps({"clusters": [cluster.pk]}).encode()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def one() -> float:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            t = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
            return time.perf_counter() - t

        for _ in range(20):
            one()
        latencies: list[float] = []
        lock = threading.Lock()
        remaining = [count]

        def worker():
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                elapsed = one()
                with lock:
                    latencies.append(elapsed)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report(
            f"live (gunicorn -w {workers}, {concurrency} client threads, API token, conn max age {conn_max_age} s)",
            latencies,
            time.perf_counter() - started,
        )
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--requests", type=int, default=500)
    parser.add_argument("--live", action="store_true", help="also measure through gunicorn over HTTP")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--conn-max-age", type=int, default=60, help="DATABASE_CONN_MAX_AGE of the gunicorn workers")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process run")
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="bench-profiles-")
    os.environ.setdefault("DATA_DIR", data_dir)
    try:
        setup_django(data_dir)
        import logging

        logging.getLogger("access").setLevel(logging.WARNING)  # one INFO line per profile would dominate
        user, cluster, token = fixtures()
        from django.db import connection

        print(f"database: {connection.vendor}; cores: {os.cpu_count()}")
        bench_in_process(user, cluster, args.requests, args.profile)
        if args.live and connection.vendor == "sqlite":
            print("live: skipped (SQLite serialises writers across gunicorn workers; set DATABASE_URL=postgres://...)")
        elif args.live:
            os.environ["LOG_LEVEL"] = "WARNING"
            bench_live(cluster, token, args.requests, args.workers, args.concurrency, args.conn_max_age)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""VLAN allocations at once, each request on a PostgreSQL connection of its own (a thread each: Django gives
every thread its own connection), opened before the start so that the race is allocation, not connection
set-up. Used by the allocation tests and ``bench/allocate.py``.

As a program it runs against ``DATABASE_URL`` (migrating it), typically a throwaway server with room for
200+ connections (``portal.testing_pg``), and prints one JSON object per pool size::

    DATABASE_URL=postgres://… python -m network.tests.allocation_race --requests 200 --pool-sizes 300,150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid


def race(pool, requests: int, workers: int, processes: int = 1, warm_pool=None) -> dict:
    """``requests`` allocations from ``pool`` over ``workers`` connections (each serving its share),
    released at once, from ``processes`` processes (threads in each; like web workers, so that one Python
    interpreter's lock does not serialise every request). With ``warm_pool``, each connection first serves
    one allocation from it, before the start: the server backends have loaded the tables and planned the
    statement, as a running portal's persistent connections have (otherwise each request is its backend's
    first). Returns the ids granted, the errors (type, status, message), the distinct server backends that
    served them and the seconds from the start to the last answer.

    The start is one signal per process (each releases its own threads), taken once every thread is
    connected and waiting: a barrier across processes wakes its waiters one by one, each acknowledging
    before the next wakes — through its interpreter's lock, held meanwhile by the threads already allocating
    — so it would release the requests over hundreds of milliseconds and measure itself."""
    shares = [requests // workers + (1 if i < requests % workers else 0) for i in range(workers)]
    processes = max(1, min(processes, workers))
    warm_id = warm_pool.pk if warm_pool is not None else None
    if processes == 1:
        fire, results = _run_threads(pool.pk, shares, warm_id)
        started = time.monotonic()
        fire()
        return _summary([results()], started)
    import multiprocessing

    from django.db import connections

    connections.close_all()  # a forked child must not share the parent's connection
    ctx = multiprocessing.get_context("fork")
    gun = ctx.Event()
    out = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(pool.pk, shares[k::processes], gun, out, warm_id)) for k in range(processes)
    ]
    for child in children:
        child.start()
    for _ in children:
        assert out.get(timeout=120) == "ready"
    started = time.monotonic()
    gun.set()
    parts = [out.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
    return _summary(parts, started)


def _child(pool_id: int, shares: list[int], gun, out, warm_id: int | None) -> None:
    fire, results = _run_threads(pool_id, shares, warm_id)
    out.put("ready")
    gun.wait(timeout=120)
    fire()
    out.put(results())


def _run_threads(pool_id: int, shares: list[int], warm_id: int | None = None):
    """Start one thread per share; each opens its connection (and serves its warm-up allocation), then waits
    for the start. Returns once all of them wait: (a function that starts them, a function that waits for
    them and returns their part of the results)."""
    from django.db import connections

    from network import services
    from network.models import VlanPool

    pool = VlanPool.objects.get(pk=pool_id)
    warm = VlanPool.objects.get(pk=warm_id) if warm_id is not None else None
    connections["default"].close()
    part = {"vids": [], "errors": [], "backends": [], "finished": 0.0}
    lock = threading.Lock()
    ready = threading.Barrier(len(shares) + 1)
    go = threading.Event()

    def worker(i: int) -> None:
        vids, errors = [], []
        try:
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")  # this thread's own connection, opened first
                backend = cursor.fetchone()[0]
            if warm is not None:
                services.vlan_allocate(pool=warm, owner=f"warm:{os.getpid()}:{i}")
            ready.wait(timeout=120)
            go.wait(timeout=120)
            for n in range(shares[i]):
                try:
                    vids.append(services.vlan_allocate(pool=pool, owner=f"race:{os.getpid()}:{i}:{n}").vid)
                except Exception as exc:  # noqa: BLE001 - reported: only PoolExhausted (409) is expected
                    errors.append(
                        {"type": type(exc).__name__, "status": getattr(exc, "status", None), "message": str(exc)}
                    )
        finally:
            connections["default"].close()
        with lock:
            part["vids"] += vids
            part["errors"] += errors
            part["backends"].append(backend)
            part["finished"] = max(part["finished"], time.monotonic())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(shares))]
    for t in threads:
        t.start()
    ready.wait(timeout=120)

    def wait() -> dict:
        for t in threads:
            t.join()
        return part

    return go.set, wait


def _summary(parts: list[dict], started: float) -> dict:
    return {
        "elapsed": max(p["finished"] for p in parts) - started,
        "vids": [v for p in parts for v in p["vids"]],
        "errors": [e for p in parts for e in p["errors"]],
        "backends": len({b for p in parts for b in p["backends"]}),
    }


def make_pool(size: int):
    from network.models import CoreTransport, Site, VlanPool

    tag = uuid.uuid4().hex[:8]
    site = Site.objects.create(name=f"race-{tag}")
    core = CoreTransport.objects.create(name=f"race-{tag}", kind="dot1q", vid_min=2, vid_max=4094)
    core.sites.set([site])
    return VlanPool.objects.create(name=f"race-{tag}", core=core, ranges=f"100-{99 + size}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--pool-sizes", default="300", help="comma-separated: one race per pool size")
    parser.add_argument("--processes", type=int, default=1, help="spread the connections over this many processes")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings_test")
    import django

    django.setup()
    from django.core.management import call_command

    from network.models import VlanAllocation

    call_command("migrate", verbosity=0)
    for size in [int(s) for s in args.pool_sizes.split(",")]:
        pool = make_pool(size)
        result = race(pool, args.requests, args.requests, processes=args.processes)
        result.update(
            pool_size=size,
            requests=args.requests,
            allocated_rows=VlanAllocation.objects.filter(pool=pool, state="allocated").count(),
        )
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""API call → READY latency of virtual clusters in the lab (never run as a test). As root:

    sudo .venv/bin/python bench/provision.py [--clusters 20] [--sites 1,3,4,16] [--hosts both] [--profile]

For each host mode: a fresh database (``--database-url``, dropped and created: default
``postgres://postgres@127.0.0.1:5432/vc_bench_provision``), the topology ``network.lab.topology.generate
(sites=S, hosts_per_site=2)`` imported through the portal's own ``topology_import``, the netns lab built
from the database (real Open vSwitch switches and hosts) and the inventory pointed at it, and real Celery
workers (threads pool) on Redis (``--redis-url``, its database is flushed). ``--layout one-lab`` (the
default): one lab of the largest site count S, and round after round one cluster of each count in turn, so
that the ratios are measured side by side (a neighbour's load or the CPU's clock changing during the run
falls on every count alike: on this kind of machine the same cluster's latency drifts by up to 1.6× between
runs); ``--layout lab-per-count``: a lab of S = N sites for the clusters of N sites, one count after the
other. Host modes (``--hosts``):

- ``agents``: every host has its agent queue ``host.<name>``, as when each hypervisor runs its own agent;
  one worker process stands in for all the agents (``--agent-processes``: one process per host — on a
  2-core machine that is 2 × N Python processes beside the lab);
- ``central``: hosts without an agent queue, converged by the central worker (the host layer is then one
  task, merged with the switch layer's).

Then ``--clusters`` closed clusters of each count, one after the other, each with one node per site (sites
1…N), are created through the API (DRF ``APIClient`` in-process, the way a scheduler's request runs in a
web worker); the latency is from just before the POST to the cluster's ``ready_at``; the client then waits
as a scheduler does, with one long poll (``GET …/wait/``, woken by the state notification), and when that
answer arrives is printed too.
Each cluster is torn down (waited for the same way) before the next. The first ``--warmup`` clusters are not
counted (imports, first connections).

Prints per mode and N: p50, p95, max of API → READY, the time the POST itself took, where the time goes
(request, device layers, joins, bookkeeping) and the ratio of N=16 to N=1; with ``--profile``, where the
time of one 3-site cluster goes (ClusterStep and DeviceChange timestamps relative to the POST). Goal
(issue 5): p95 ≤ 0.5 s at 3 sites, never above 1 s, 16 sites within 1.5× of 1 site.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _configure_environment(args) -> dict:
    """Settings come from the environment (portal/settings.py): production settings, this run's services."""
    env = {
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_hex(32),
        "SECRETS_KEY": os.environ.get("SECRETS_KEY") or base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "ACCESS_CA_PASSPHRASE": os.environ.get("ACCESS_CA_PASSPHRASE") or secrets.token_hex(32),
        "ALLOWED_HOSTS": "testserver,localhost,127.0.0.1",
        "SECURE_SSL_REDIRECT": "false",
        "DATABASE_URL": args.database_url,
        "DATABASE_CONN_MAX_AGE": "600",
        "CELERY_BROKER_URL": args.redis_url,
        "CELERY_RESULT_BACKEND": args.result_backend or args.redis_url,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "LOG_LEVEL": "WARNING",
        "CLUSTER_QUOTA_CLUSTERS": "0",  # one bench user makes every cluster: no quota in the way of a burst
        "CLUSTER_QUOTA_NODES": "0",
    }
    os.environ.update(env)
    return {**os.environ, **env}


def _recreate_database(url: str, *, create: bool = True) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')


def _drop_database(url: str) -> None:
    _recreate_database(url, create=False)


def topology_file(topo, *, agents: bool) -> dict:
    """``network.lab.topology.generate``'s topology in the shape of the portal's topology file (what an
    administrator imports): OVS switches (the lab points them at itself), hosts (with an agent queue each
    when ``agents``), and a VLAN pool over the whole core range with a short quarantine."""
    core = topo.cores[0]
    return {
        "sites": list(topo.sites),
        "cores": [
            {
                "name": c.name,
                "kind": c.kind,
                "sites": list(c.sites),
                "vid_min": c.vid_min,
                "vid_max": c.vid_max,
                "service_tag": c.service_tag,
            }
            for c in topo.cores
        ],
        "switches": [
            {
                "name": sw.name,
                "site": sw.site,
                "platform": "ovs",
                "address": "lab",
                "ports": [{"name": p.name, "role": p.role, **({"core": p.core} if p.core else {})} for p in sw.ports],
            }
            for sw in topo.switches
        ],
        "hosts": [
            {
                "name": h.name,
                "site": h.site,
                "switch": h.switch,
                "port": h.port,
                "trunk": h.trunk_interface,
                "driver": "ovs",
                **({"queue": f"host.{h.name}"} if agents else {}),
            }
            for h in topo.hosts
        ],
        "pools": [{"name": "bench", "core": core.name, "ranges": f"{core.vid_min}-{core.vid_max}", "quarantine": 1}],
    }


def start_workers(app, workers: list, timeout: float = 60.0) -> None:
    """Launch every worker at once, then wait until, together, they answer for every queue (they log at
    WARNING, so there is no "ready." line to wait for: per-task INFO lines would cost the worker CPU)."""
    for w in workers:
        w.launch()
    wanted = {q for w in workers for q in w.queues}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {w.log()[-2000:]}")
        replies = app.control.inspect(timeout=0.5).active_queues() or {}
        if {q["name"] for queues in replies.values() for q in queues} >= wanted:
            return
    raise RuntimeError(f"workers not consuming {sorted(wanted)}: {workers[0].log()[-2000:]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def wait_state(api, cluster_id: int, until: str) -> tuple[dict, float]:
    """Wait for the cluster the way a scheduler does: one long poll (``GET /api/clusters/{id}/wait/``),
    woken by the state-change notification, so the observer takes no CPU from the machine it measures while
    it waits. Returns the cluster as the API answers and when the answer came (perf_counter)."""
    r = api.get(f"/api/clusters/{cluster_id}/wait/", {"until": until, "timeout": 25})
    answered = time.perf_counter()
    if r.status_code != 200:
        raise RuntimeError(f"wait refused: {r.status_code} {r.content[:300]!r}")
    if r.data["state"] not in until.split(","):
        raise RuntimeError(f"cluster {cluster_id} is {r.data['state']} after 25 s: {r.data.get('state_reason')}")
    return r.data, answered


class HttpApi:
    """The few calls the bench makes, over HTTP to a real web server (``APIClient``'s interface)."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def _call(self, method: str, path: str, data=None):
        import json
        import urllib.error
        import urllib.request
        from types import SimpleNamespace

        body = json.dumps(data).encode() if data is not None else None
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (the bench's own server)
                status, content = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, content = exc.code, exc.read()
        return SimpleNamespace(status_code=status, content=content, data=json.loads(content or b"null"))

    def post(self, path: str, data: dict, format: str = "json"):  # noqa: A002 (APIClient's name)
        return self._call("POST", path, data)

    def get(self, path: str, params: dict | None = None):
        from urllib.parse import urlencode

        return self._call("GET", path + (f"?{urlencode(params)}" if params else ""))


def cpu_ms(pids) -> float:
    """CPU time (user + system, every thread) the processes ``pids`` have used so far, in ms (a process
    that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total * 1000 / os.sysconf("SC_CLK_TCK")


def pids_named(name: str) -> list[int]:
    """Every process whose command is ``name`` (PostgreSQL's backends, Redis): read, never signalled."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def profile(cluster_id: int, t0: datetime) -> list[str]:
    """Where the time of one cluster went: every step and device change, in ms from the POST."""
    from clusters.models import ClusterStep
    from network.models import DeviceChange, Segment

    def ms(when) -> str:
        return f"{(when - t0).total_seconds() * 1000:7.1f}" if when else "      -"

    lines = ["    what                               start     end   (ms after the POST)"]
    rows = []
    for step in ClusterStep.objects.filter(cluster_id=cluster_id):
        rows.append((step.started_at, f"step {step.name}", step.started_at, step.finished_at))
    segment = Segment.objects.filter(owner_ref=f"cluster:{cluster_id}").first()
    for change in DeviceChange.objects.filter(segment=segment, cause__startswith="provision"):
        rows.append(
            (
                change.started_at or change.created_at,
                f"{change.kind} {change.device}",
                change.started_at,
                change.finished_at,
            )
        )
        rows.append((change.created_at, f"  (change for {change.device} recorded)", change.created_at, None))
    for _, label, start, end in sorted(rows, key=lambda r: r[0]):
        lines.append(f"    {label:32s} {ms(start)} {ms(end)}")
    return lines


PHASES = ("POST", "→1st device", "switches", "join", "hosts", "→READY")


def phases(cluster, t0: datetime, post: float) -> dict[str, float]:
    """Where one cluster's time went, in seconds: the API call; from its answer to the first device
    session; the switch layer (first start to last end); the join between the layers; the host layer; from
    the last device to READY. Device layers are device work plus the worker's parallelism; the rest is
    the portal's own path (request, broker round trips, chord joins, bookkeeping)."""
    from network.models import DeviceChange, DeviceKind

    changes = DeviceChange.objects.filter(segment_id=cluster.segment_id, cause__startswith="provision")
    sw = [c for c in changes if c.kind == DeviceKind.SWITCH]
    hosts = [c for c in changes if c.kind == DeviceKind.HOST]
    answered = t0.timestamp() + post
    sw_start = min(c.started_at for c in sw).timestamp()
    sw_end = max(c.finished_at for c in sw).timestamp()
    h_start = min(c.started_at for c in hosts).timestamp()
    h_end = max(c.finished_at for c in hosts).timestamp()
    return dict(
        zip(
            PHASES,
            (
                post,
                sw_start - answered,
                sw_end - sw_start,
                h_start - sw_end,
                h_end - h_start,
                cluster.ready_at.timestamp() - h_end,
            ),
            strict=True,
        )
    )


def burst_round(sites: int, n: int, client) -> dict:
    """``n`` clusters (one node per site) created at once, each by a thread of its own that POSTs and then
    waits with the long poll, as a scheduler starting ``n`` jobs together; then all torn down at once.
    ``client()`` makes an API client (over HTTP to gunicorn, or in-process). Returns the spread of POST →
    READY, the time from the first POST to the last READY, and how many device sessions applied the changes
    (the pending changes of one switch are batched into one session)."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    from clusters.models import VirtualCluster
    from network.models import DeviceChange

    def one(k: int) -> tuple[int, float]:
        try:
            api = client()
            nodes = [
                {"name": f"n{j}", "host": f"h-s{j + 1}-{1 + k % 2}", "mac": f"52:54:ff:{k:02x}:{j:02x}:01"}
                for j in range(sites)
            ]
            posted = datetime.now(UTC)
            r = api.post(
                "/api/clusters/",
                {"name": f"b{k}", "image": "user-image", "admin_rights": True, "nodes": nodes, "lifetime": 3600},
                format="json",
            )
            if r.status_code != 201:
                raise RuntimeError(f"create refused: {r.status_code} {r.content[:300]!r}")
            wait_state(api, r.data["id"], "ready")
            ready = VirtualCluster.objects.values_list("ready_at", flat=True).get(pk=r.data["id"])
            return r.data["id"], (ready - posted).total_seconds()
        finally:
            connection.close()

    def down(cid: int) -> None:
        try:
            api = client()
            assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
            wait_state(api, cid, "torn_down")
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=n) as pool:
        started = time.perf_counter()
        made = list(pool.map(one, range(n)))
        all_ready = time.perf_counter() - started
        ids = [cid for cid, _ in made]
        segments = list(VirtualCluster.objects.filter(pk__in=ids).values_list("segment_id", flat=True))
        changes = DeviceChange.objects.filter(segment_id__in=segments, cause__startswith="provision")
        sessions = changes.exclude(status="noop").values("batch").distinct().count()
        started = time.perf_counter()
        list(pool.map(down, ids))
        all_down = time.perf_counter() - started
    latencies = [lat for _, lat in made]
    return {
        "n": n,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "all_ready": all_ready,
        "all_down": all_down,
        "changes": changes.count(),
        "sessions": sessions,
    }


@dataclass
class Bench:
    """One lab with its database, topology, workers and API client (``lab_bench``)."""

    sites: int
    lab: object
    lab_up: float  # seconds the lab took to come up
    user: object
    api: object  # DRF APIClient, authenticated as ``user``
    groups: dict[str, list[int]]  # process group → PIDs whose CPU is counted
    run_dir: Path
    env: dict


@contextlib.contextmanager
def lab_bench(sites: int, args, env: dict, app, *, agents: bool):
    """A fresh ``sites``-site lab: the database flushed and the topology imported, the netns lab built from
    it, the inventory pointed at it and the workers started. ``agents``: every host has its agent queue,
    consumed by one worker process standing in for all the agents, or (``--agent-processes``) by a worker
    process of its own per host, as on real hypervisors — on a 2-core machine that is 2 × sites Python
    processes competing with the lab; otherwise the central worker converges the hosts too (the hosts
    are then one task, merged with the switches')."""
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from rest_framework.test import APIClient

    from clusters.models import Image
    from network.lab import Lab, topology
    from network.lab.inventory import point_inventory_at
    from network.models import Host
    from network.topology import topology_import
    from portal.testing_celery import WorkerProcess

    call_command("flush", interactive=False, verbosity=0)
    topo = topology.generate(sites=sites, hosts_per_site=2, core_kind="qinq", vid_min=100, vid_max=3999)
    topology_import(data=topology_file(topo, agents=agents), source=f"bench {sites} sites")
    user = User.objects.create_user("scheduler")
    Image.objects.create(name="user-image", approved=False)
    started = time.perf_counter()
    lab = Lab.up(topology.from_db(), name=f"bench-provision-{os.getpid()}", planes=args.planes)
    lab_up = time.perf_counter() - started
    workers: list = []
    try:
        point_inventory_at(lab)
        run_dir = Path(lab.run_dir)

        def worker(queues: list[str], slots: int, name: str):
            return WorkerProcess(
                env,
                run_dir / f"{name}.log",
                queues=queues,
                app="portal.celery",
                pool=args.pool,
                concurrency=slots,
                name=name,
                loglevel="WARNING",
            )

        workers.append(worker(["celery"], args.concurrency or max(8, 2 * sites), "worker"))
        agent_queues = sorted(q for q in Host.objects.values_list("agent_queue", flat=True) if q)
        if args.agent_processes:
            workers += [worker([queue], 2, queue) for queue in agent_queues]
        elif agent_queues:  # one process stands in for every hypervisor's agent (as the test suite does)
            workers.append(worker(agent_queues, max(8, len(agent_queues)), "agents"))
        start_workers(app, workers)
        connection.close()  # the flush and import are done: start the measurement on a fresh connection
        api = APIClient()
        api.force_authenticate(user)
        groups = {
            "worker": [w.proc.pid for w in workers],
            "lab": [pid for pid in lab.state["pids"].values() if pid],
            "API": [os.getpid()],
            "postgres": pids_named("postgres"),
            "redis": pids_named("redis-server"),
        }
        yield Bench(sites=sites, lab=lab, lab_up=lab_up, user=user, api=api, groups=groups, run_dir=run_dir, env=env)
    finally:
        for w in workers:  # all at once, then wait for each
            w.terminate()
        for w in workers:
            w.stop(timeout=20)
        lab.down()


def one_cluster(bench: Bench, sites: int, i: int, *, profiled: bool) -> dict:
    """Create the ``i``-th closed cluster with one node on each of sites 1…``sites`` through the API, wait
    for READY with the long poll, tear it down and wait for TORN_DOWN. Returns what it measured."""
    from clusters.models import ClusterState, VirtualCluster

    api, groups = bench.api, bench.groups
    mac = f"52:{sites:02x}:{i // 256:02x}:{i % 256:02x}"  # unique per count and round
    nodes = [{"name": f"n{k}", "host": f"h-s{k + 1}-{1 + i % 2}", "mac": f"{mac}:{k:02x}:01"} for k in range(sites)]
    groups["postgres"] = pids_named("postgres")  # backends come and go
    before = {name: cpu_ms(pids) for name, pids in groups.items()}
    t0 = datetime.now(UTC)
    t_post = time.perf_counter()
    r = api.post(
        "/api/clusters/",
        {"name": f"c{sites}-{i}", "image": "user-image", "admin_rights": True, "nodes": nodes, "lifetime": 3600},
        format="json",
        HTTP_IDEMPOTENCY_KEY=f"bench-{sites}-{i}",
    )
    post = time.perf_counter() - t_post
    if r.status_code != 201:
        raise RuntimeError(f"create refused: {r.status_code} {r.content[:500]!r}")
    _answer, seen = wait_state(api, r.data["id"], "ready,failed")
    cluster = VirtualCluster.objects.get(pk=r.data["id"])
    spent = {name: cpu_ms(pids) - before[name] for name, pids in groups.items()}
    if cluster.state != ClusterState.READY:
        raise RuntimeError(f"cluster c{sites}-{i} failed: {cluster.state_reason}")
    sample = {
        "latency": (cluster.ready_at - t0).total_seconds(),
        "seen": seen - t_post,
        "post": post,
        "phases": phases(cluster, t0, post),
        "cpu": spent,
        "profile": profile(cluster.pk, t0) if profiled else None,
    }
    t_down = time.perf_counter()
    assert api.post(f"/api/clusters/{cluster.pk}/teardown/", {}, format="json").status_code == 202
    wait_state(api, cluster.pk, "torn_down")
    sample["teardown"] = time.perf_counter() - t_down
    return sample


def summary(sites: int, samples: list[dict], bench: Bench, burst: dict | None) -> dict:
    def p(key: str, q: float) -> float:
        return percentile([s[key] for s in samples], q)

    return {
        "burst": burst,
        "sites": sites,
        "n": len(samples),
        "lab_up": bench.lab_up,
        "p50": p("latency", 50),
        "p95": p("latency", 95),
        "max": max(s["latency"] for s in samples),
        "seen_p50": p("seen", 50),
        "post_p50": p("post", 50),
        "teardown_p50": p("teardown", 50),
        "profile": next((s["profile"] for s in samples if s["profile"]), None),
        "phases": {name: statistics.median(s["phases"][name] for s in samples) for name in PHASES},
        "cpu": {name: statistics.mean(s["cpu"][name] for s in samples) for name in bench.groups},
    }


def burst(bench: Bench, sites: int, args) -> dict | None:
    """``--burst`` clusters of ``sites`` sites at once (``burst_round``), through gunicorn or in-process."""
    from rest_framework.test import APIClient

    if not args.burst:
        return None
    if args.burst_api == "http":
        from bench.web import start_gunicorn
        from portal.tokens import token_create

        _, secret = token_create(user=bench.user, name=f"bench burst {sites}", scopes=["clusters:write"])
        web, url = start_gunicorn(
            bench.env, workers=args.web_workers, threads=args.web_threads, log=bench.run_dir / "gunicorn.log"
        )
        try:
            result = burst_round(sites, args.burst, lambda: HttpApi(url, secret))
            result["api"] = f"gunicorn, {args.web_workers} processes × {args.web_threads} threads, over HTTP"
        finally:
            web.terminate()
            web.wait(timeout=20)
        return result

    def in_process():
        client = APIClient()
        client.force_authenticate(bench.user)
        return client

    result = burst_round(sites, args.burst, in_process)
    result["api"] = "in this process (its threads share one interpreter lock)"
    return result


def run_sites(sites: int, args, env: dict, app, *, agents: bool) -> dict:
    """``--layout lab-per-count``: ``--clusters`` clusters (after ``--warmup``) on a fresh ``sites``-site lab."""
    with lab_bench(sites, args, env, app, agents=agents) as bench:
        samples = []
        for i in range(args.warmup + args.clusters):
            sample = one_cluster(bench, sites, i, profiled=args.profile and i == args.warmup)
            if i >= args.warmup:
                samples.append(sample)
        return summary(sites, samples, bench, burst(bench, sites, args))


def run_side_by_side(counts: list[int], args, env: dict, app, *, agents: bool) -> list[dict]:
    """``--layout one-lab``: one lab of ``max(counts)`` sites; round after round, one cluster of each count
    in turn (1, 3, 4, 16, 1, 3, …), so that whatever the machine does meanwhile (a neighbour's load, the
    CPU's clock) falls on every count alike, and the ratios compare like with like. A cluster of N sites has
    its nodes on sites 1…N; the devices of the other sites are idle."""
    with lab_bench(max(counts), args, env, app, agents=agents) as bench:
        samples: dict[int, list[dict]] = {n: [] for n in counts}
        for i in range(args.warmup + args.clusters):
            for n in counts:
                sample = one_cluster(bench, n, i, profiled=args.profile and i == args.warmup)
                if i >= args.warmup:
                    samples[n].append(sample)
        return [summary(n, samples[n], bench, burst(bench, n, args)) for n in counts]


def main() -> None:
    from network.lab.fabric import PLANES  # no Django needed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="1,3,4,16", help="comma-separated site counts")
    parser.add_argument("--clusters", type=int, default=20, help="clusters measured per site count (≥ 20)")
    parser.add_argument("--warmup", type=int, default=2, help="clusters made first and not counted")
    parser.add_argument("--concurrency", type=int, default=0, help="worker threads (default max(8, 2 × sites))")
    parser.add_argument("--profile", action="store_true", help="print where one cluster's time goes")
    parser.add_argument(
        "--planes",
        default="device",
        choices=PLANES,
        help="the lab's control planes: a pair (OVSDB, ovs-vswitchd) per switch and per host (default: a commit "
        "reconfigures that device only, as every real device has its own CPU), per site (a host's commit also "
        "reconfigures its site's switch and other hosts), or one for the whole lab (every commit makes it "
        "reconfigure every site's bridges: in one 16-site lab a 1-site cluster would pay for 16 sites, which "
        "flatters the ratio)",
    )
    parser.add_argument(
        "--burst", type=int, default=20, help="then this many clusters created at once, and torn down (0: none)"
    )
    parser.add_argument(
        "--burst-api",
        default="http",
        choices=("http", "inprocess"),
        help="the burst's API: gunicorn on 127.0.0.1 (--web-workers processes × --web-threads threads, as "
        "deployed) or this process",
    )
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes for the burst")
    parser.add_argument("--web-threads", type=int, default=8, help="threads per gunicorn worker for the burst")
    parser.add_argument(
        "--layout",
        default="one-lab",
        choices=("one-lab", "lab-per-count"),
        help="one-lab (default): one lab of the largest count, a cluster of each count in turn, round after round "
        "(side by side: the machine's drift falls on every count alike); lab-per-count: a lab of N sites for the "
        "clusters of N sites, one count after the other",
    )
    parser.add_argument("--pool", default="threads", choices=("threads", "prefork"), help="the worker's pool")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/vc_bench_provision"),
        help="dropped and created",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2"),
        help="broker (and result backend); this Redis database is flushed",
    )
    parser.add_argument("--result-backend", default="", help="e.g. django-db (default: the Redis of --redis-url)")
    parser.add_argument(
        "--hosts",
        default="both",
        choices=("agents", "central", "both"),
        help="agents: a host agent worker process per hypervisor (its own queue); central: the central worker "
        "converges the hosts; both (default): one after the other, side by side",
    )
    parser.add_argument(
        "--agent-processes",
        action="store_true",
        help="with agents: one worker process per host agent queue (default: one process for all of them)",
    )
    args = parser.parse_args()

    env = _configure_environment(args)
    from network.lab import requirements

    reason = requirements()
    if reason:
        sys.exit(f"cannot run the provisioning benchmark: {reason}")
    _recreate_database(args.database_url)

    import django

    django.setup()
    import redis
    from django.core.management import call_command

    from portal.celery import app

    call_command("migrate", verbosity=0)
    redis.Redis.from_url(args.redis_url).flushdb()
    import portal.wsgi  # noqa: F401 - this process answers the API as a web worker does: started the same way

    modes = ("agents", "central") if args.hosts == "both" else (args.hosts,)
    counts = [int(n) for n in args.sites.split(",")]
    results: dict[str, list[dict]] = {mode: [] for mode in modes}

    def show(mode: str, result: dict) -> None:
        sites = result["sites"]
        print(
            f"  {mode:7s} {sites:2d} sites: p50 {result['p50'] * 1000:6.0f} ms  p95 {result['p95'] * 1000:6.0f} ms"
            f"  max {result['max'] * 1000:6.0f} ms   (POST {result['post_p50'] * 1000:.0f} ms, "
            f"teardown {result['teardown_p50'] * 1000:.0f} ms, lab up {result['lab_up']:.1f} s)",
            flush=True,
        )
        if result["profile"] and (sites == 3 or len(counts) == 1):
            print(f"  one {sites}-site cluster ({mode}):")
            print("\n".join(result["profile"]), flush=True)

    for mode in modes:
        agents = mode == "agents"
        if args.layout == "one-lab":
            results[mode] = run_side_by_side(counts, args, env, app, agents=agents)
        else:
            results[mode] = [run_sites(sites, args, env, app, agents=agents) for sites in counts]
        for result in results[mode]:
            show(mode, result)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nAPI call → READY, {os.cpu_count()} CPUs (load {load}), worker pool {args.pool}, lab planes "
        f"{args.planes}, closed clusters with one node per site, in turn, "
        + ("the site counts side by side in one lab" if args.layout == "one-lab" else "a lab per site count")
    )
    for mode in modes:
        _report(mode, results[mode])


def _report(mode: str, results: list[dict]) -> None:
    what = {
        "agents": "a host agent queue per hypervisor, its tasks run by the agents' worker process(es)",
        "central": "hosts converged by the central worker",
    }[mode]
    print(f"\n{mode}: {what}")
    print("  sites   clusters    p50 ms    p95 ms    max ms   the client's wait answered, p50 ms")
    for r in results:
        print(
            f"  {r['sites']:5d}   {r['n']:8d}  {r['p50'] * 1000:8.0f}  {r['p95'] * 1000:8.0f}  {r['max'] * 1000:8.0f}"
            f"  {r['seen_p50'] * 1000:8.0f}"
        )
    print("  where the time goes (medians, ms)")
    print("  sites" + "".join(f"{name:>13s}" for name in PHASES))
    for r in results:
        print(f"  {r['sites']:5d}" + "".join(f"{r['phases'][name] * 1000:13.0f}" for name in PHASES))
    names = list(results[0]["cpu"])
    print("  CPU per cluster, POST to READY noticed (means, ms; the whole machine has 2 × the wall time)")
    print("  sites" + "".join(f"{name:>11s}" for name in names) + f"{'sum':>9s}")
    for r in results:
        row = [r["cpu"][name] for name in names]
        print(f"  {r['sites']:5d}" + "".join(f"{v:11.0f}" for v in row) + f"{sum(row):9.0f}")
    if results[0].get("burst"):
        print(
            "  a burst: clusters created at once (a client thread each: POST, then the long poll), then torn down "
            f"at once; the API {results[0]['burst']['api']}"
        )
        print("  sites  clusters  p50 ms  p95 ms  first POST → last READY ms  all torn down ms  changes / sessions")
        for r in results:
            b = r["burst"]
            print(
                f"  {r['sites']:5d}  {b['n']:8d}  {b['p50'] * 1000:6.0f}  {b['p95'] * 1000:6.0f}"
                f"  {b['all_ready'] * 1000:26.0f}  {b['all_down'] * 1000:16.0f}  {b['changes']:7d} / {b['sessions']}"
            )
    by_sites = {r["sites"]: r for r in results}
    if 1 in by_sites and 16 in by_sites:
        one, sixteen = by_sites[1], by_sites[16]
        print(
            f"  16 sites / 1 site: p50 {sixteen['p50'] / one['p50']:.2f}×, "
            f"p95 {sixteen['p95'] / one['p95']:.2f}×  (goal ≤ 1.5×)"
        )
        extra_cpu = sum(sixteen["cpu"].values()) - sum(one["cpu"].values())
        cores = os.cpu_count() or 1
        print(
            f"  the 15 more sites cost {extra_cpu:.0f} ms more CPU per cluster (lab daemons "
            f"{sixteen['cpu']['lab'] - one['cpu']['lab']:.0f}): on {cores} cores at least {extra_cpu / cores:.0f} ms "
            f"more wall time with perfect parallelism; measured {(sixteen['p50'] - one['p50']) * 1000:.0f} ms; "
            f"the goal allows {one['p50'] * 500:.0f} ms"
        )
    if 3 in by_sites:
        ok = "met" if by_sites[3]["p95"] <= 0.5 else "NOT met"
        print(f"  3 sites p95 {by_sites[3]['p95'] * 1000:.0f} ms (goal ≤ 500 ms: {ok})")
    worst = max(r["max"] for r in results)
    print(f"  slowest of all: {worst * 1000:.0f} ms (goal: never above 1 s: {'met' if worst <= 1 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""A batch scheduler's client of the cluster API: what a job's prologue and epilogue run (standard library
only, no Django; the API itself is documented at ``/api/docs/``)::

    client.py --url https://portal.example.org --token-file /etc/virtcloud/token up --job 1234.pbs \\
        --name mpi --image debian-12 --node name=node1,host=brno-h1,mac=52:54:00:00:00:01[,address=10.0.0.1] ... \\
        [--admin-rights] [--connectivity closed] [--group G] [--owner U] [--lifetime S] [--bastion-address A] \\
        [--timeout 300] [--wait-access]
    client.py ... plan --job 1234.pbs --name mpi --image debian-12 --node ... (as up, without the waiting)
    client.py ... status
    client.py ... down --job 1234.pbs [--reason R] [--timeout 300]
    client.py ... show --job 1234.pbs
    client.py ... extend --job 1234.pbs (--lifetime S | --until 2026-12-31T18:00:00+01:00)
    client.py ... add-node --job 1234.pbs --node name=node3,host=pilsen-h1,mac=52:54:00:00:00:03 ... [--timeout 300]
    client.py ... remove-node --job 1234.pbs --node node3 ... [--timeout 300]
    client.py ... migrate --job 1234.pbs --node node1 --target pilsen-h2 [--timeout 300]
    client.py ... migrated --job 1234.pbs --node node1 [--cancel] [--timeout 300]
    client.py ... node-token --job 1234.pbs [--write FILE]

and on a node, with the node token ``node-token`` wrote (never the scheduler's)::

    client.py --url … --token-file /etc/virtcloud/node-token host-cert --cluster N --node node1 \
        --key /etc/ssh/ssh_host_ed25519_key.pub [--dir D]
    client.py --url … --token-file /etc/virtcloud/node-token host-access --cluster N --node node1 [--dir /etc/ssh] \
        [--key …]

(``host-cert`` and ``host-access`` take ``--job`` instead of ``--cluster`` with a token that lists clusters.)

``up`` creates the job's cluster and waits, with long polls, until it is READY; it prints the cluster as JSON
(each node with its ``attachment``: bridge, VLAN, the libvirt ``<interface>`` element to plug the VM with). With
``--wait-access`` it waits, for a closed cluster, until every access gateway carrying it has installed it too
(printed as ``access``: the gateways and where users connect), so that the job's users get in at once.
``plan`` is a dry run of ``up`` (the policy's decision, the VLAN pool, the public subnet and addresses it would get
now, or the refusal ``up`` would meet; nothing is made). ``status`` prints whether the portal provisions now and
which hosts cannot get a network (exit 75 when it provisions nothing: hold the job).
``up`` and ``down`` are keyed by the job (``Idempotency-Key``): a prologue that runs again — after a timeout, a
crash, a lost answer — gets the same cluster, never a second one; a job requeued under the same id says which run it
is (``--attempt N``, e.g. ``SLURM_RESTART_COUNT``) and gets a new one. Job ids must be unique among the
schedulers that share a token's view (a ``clusters:manage`` token sees every owner's clusters): PBS's
``1234.server`` is. ``down`` tears down the job's live clusters and waits
until they are torn down (nothing to do is success). ``show`` prints the job's clusters. ``extend`` moves the
expiry of the job's cluster (the job's walltime was changed: ``--lifetime`` seconds from now, or ``--until`` a
time) and prints the cluster. ``add-node`` adds nodes to the job's ready cluster and waits until the network
reaches their hosts, printing the cluster; ``remove-node`` removes nodes (their hosts are cleaned when no node
of the cluster is left there) and waits likewise. Run again, each does nothing twice: a node already there
(``add-node``, the same name, host and MAC) or already gone (``remove-node``) needs nothing. ``migrate`` makes the
network ready on a node's target host before the VM moves (paper §2.2) and prints the node with the
``target_attachment`` to plug the moved VM with; ``migrated`` completes the move once the VM runs there (the host
it left is cleaned), ``migrated --cancel`` calls it off (the target is cleaned). Both look at the node's state
first, so running either again does nothing twice. ``host-cert`` has the portal certify a node's SSH host key
(from the node's boot script, or from the prologue that made the node's keys): it writes the certificate
beside the key (``<key>-cert.pub``, sshd's ``HostCertificate``), the user CA (``virtcloud-user-ca.pub``,
``TrustedUserCAKeys``), the principals file of the account users log in as (``virtcloud-principals-<user>``,
``AuthorizedPrincipalsFile``) and the user CA's KRL (``virtcloud-revoked-keys``, ``RevokedKeys``) into ``--dir``
(default: the key's folder), and prints the answer without the certificate; users then reach the node with no
host-key prompt. ``host-access`` (from a timer on the node) writes those three files again as they are now: who
left the cluster's group, or whose SSH certificate was revoked, is no longer let in; with ``--key`` (the key
``host-cert`` certified) it writes the host certificate too when the portal issued it again (the cluster's lifetime
was extended: the one the node has would end first), all of them as a set. On the node, both run with a node
token (``node-token``, from the prologue: the job's cluster's nodes only, until the cluster ends or changes owner;
the cluster's people are root there, and read whatever token a node holds — never give a node the scheduler's) and
``--cluster ID`` (a node token reads no cluster list: ``node-token`` prints the id).

Exit status: 0 done; 1 the cluster FAILED (the reason on stderr); 2 the portal refused the request (4xx: its
field-level errors on stderr — nothing was left allocated); 75 (EX_TEMPFAIL) the portal could not be reached,
answered 5xx, refused for now (the VLAN pool exhausted, a quota reached, too many requests: nothing was left
allocated), or the
cluster was not READY/torn down within ``--timeout``: run the same command again, later.
"""

# ruff: noqa: E402 (the import path is set before the imports)
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - run as a script
    # Its own folder would come first on the import path, and clusters/selectors.py would shadow the standard
    # library's selectors (which subprocess and http need): the project's root instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import base64
import binascii
import functools
import hashlib
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TextIO

from access.gateway import outgoing  # stdlib only: the no-redirect opener, where a token may go
from access.gateway.state import certificate_digest, write_all_atomic  # stdlib only (files replaced as a set)

EX_TEMPFAIL = 75
LIVE = ("requested", "provisioning", "ready", "updating", "tearing_down")
# refusals that go away by themselves (EX_TEMPFAIL: the scheduler retries later): VLAN ids come back from quarantine,
# other clusters end, a cluster still provisioning or updating gets ready (409 busy)
LATER = ("pool_exhausted", "quota_exceeded", "busy")
LONG_POLL = 25  # seconds one wait request asks for at most (a portal that allows less: its own maximum)


class Refused(Exception):
    """The portal refused the request (4xx): retrying the same request cannot help."""

    def __init__(self, message: str, *, status: int = 0):
        super().__init__(message)
        self.status = status


class Unavailable(Exception):
    """The portal could not be reached or failed (5xx), or the wait ran out: the same command may be retried."""


class ClusterFailed(Exception):
    """The cluster failed (or ended) instead of becoming ready."""


class Api:
    def __init__(self, url: str, token: str, *, timeout: float = 30 + LONG_POLL):
        self.base, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.wait_max = LONG_POLL  # the longest wait the portal allows (learnt from a 400 when it is below)

    def call(self, method: str, path: str, body: dict | None = None, *, key: str | None = None, **query) -> dict:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers, data = {"Idempotency-Key": key} if key else {}, None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        try:
            answer = outgoing.send_with_token(method, url, self.token, headers=headers, data=data, timeout=self.timeout)
        except outgoing.NotSent as exc:
            raise Refused(str(exc)) from None
        except outgoing.Unreachable as exc:
            raise Unavailable(f"{method} {path}: cannot reach the portal at {self.base}: {exc}") from None
        detail = answer.body[:2000].decode(errors="replace")
        if outgoing.redirected(answer.status):  # the token is never sent along
            raise Refused(f"{method} {path}: {answer.status}, a redirect to {answer.headers.get('Location')}")
        if 400 <= answer.status < 500 and answer.status not in (408, 429) and _code(detail) not in LATER:
            raise Refused(f"{method} {path}: {answer.status} {detail}", status=answer.status)
        if answer.status >= 400:
            raise Unavailable(f"{method} {path}: {answer.status} {detail}")
        raw = answer.body
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise Unavailable(f"{method} {path}: the answer is not JSON: {exc}") from None

    def job_clusters(self, job: str) -> list[dict]:
        found: list[dict] = []
        while True:  # page after page (limit/offset pagination)
            answer = self.call("GET", "/api/clusters/", job_id=job, offset=len(found))
            page = answer.get("results", [])
            found += page
            if not page or not answer.get("next"):
                return found

    def wait(self, cluster: dict, until: tuple[str, ...], deadline: float) -> dict:
        """The cluster once its state is one of ``until``; ``Unavailable`` at the deadline."""
        while cluster["state"] not in until:
            asked = time.monotonic()
            left = deadline - asked
            if left <= 0:
                raise Unavailable(f"cluster {cluster['id']} is still {cluster['state']} (not {'/'.join(until)})")
            path, states = f"/api/clusters/{cluster['id']}/wait/", ",".join(until)
            timeout = min(self.wait_max, max(1, int(left + 0.999)))  # never past the deadline
            try:
                cluster = self.call("GET", path, until=states, timeout=timeout)
            except Refused as exc:
                if exc.status != 400 or '"timeout"' not in str(exc) or not timeout:
                    raise
                self.wait_max = _allowed_wait(str(exc), timeout)  # its CLUSTER_WAIT_MAX is lower: as long as allowed
                continue
            early = 1.0 - (time.monotonic() - asked)
            if cluster["state"] not in until and early > 0:  # answered at once (a portal that allows no wait)
                time.sleep(min(early, max(0.0, deadline - time.monotonic())))
        return cluster


def _allowed_wait(refusal: str, asked: int) -> int:
    """The longest wait a portal allows, from its refusal of ``asked`` seconds ("… less than or equal to 20.0");
    half of ``asked`` when it does not say."""
    found = re.search(r"less than or equal to ([0-9]+(?:\.[0-9]*)?)", refusal)
    allowed = int(float(found[1])) if found else asked // 2
    return max(0, min(allowed, asked - 1))


def _code(detail: str) -> str | None:
    """The machine code of an API error body (``{"detail": …, "code": …}``)."""
    try:
        body = json.loads(detail)
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


_JOB_RE = re.compile(r"^[!-~]{1,150}$")  # printable ASCII, no spaces: it goes into a header and the keys


def job_id(text: str) -> str:
    """A job id: never empty (``--job ""`` would select every cluster made without one)."""
    if not _JOB_RE.match(text):
        raise argparse.ArgumentTypeError(f"a job id is 1 to 150 printable ASCII characters without spaces: {text!r}")
    return text


def iso_time(text: str) -> str:
    """An ISO 8601 time with its UTC offset (``Z`` or ``+01:00``): a time without one would be read in the
    portal's time zone, not the scheduler's."""
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time's UTC offset (Z or +01:00): {text!r}")
    return parsed.isoformat()


def parse_node(text: str) -> dict:
    """``name=node1,host=brno-h1,mac=52:54:00:00:00:01[,address=10.0.0.1]``."""
    node = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("name", "host", "mac", "address") or key in node:
            raise argparse.ArgumentTypeError(f"a node is name=…,host=…,mac=…[,address=…], not {text!r}")
        node[key] = value
    if not {"name", "host", "mac"} <= node.keys():
        raise argparse.ArgumentTypeError(f"a node needs name, host and mac: {text!r}")
    return node


def _create_body(args) -> dict:
    body = {"name": args.name, "image": args.image, "admin_rights": args.admin_rights, "nodes": args.node}
    body["job_id"] = args.job
    for field in ("group", "owner", "lifetime", "bastion_address", "connectivity"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    return body


def plan(api: Api, args, out: TextIO) -> int:
    out.write(json.dumps(api.call("POST", "/api/clusters/plan/", _create_body(args)), indent=1) + "\n")
    return 0


def status(api: Api, args, out: TextIO) -> int:
    answer = api.call("GET", "/api/status/")
    out.write(json.dumps(answer, indent=1) + "\n")
    if answer.get("status") == "down":
        raise Unavailable("the portal provisions nothing now (no broker, or no central worker): hold the job")
    return 0


def up(api: Api, args, out: TextIO, err: TextIO = sys.stderr) -> int:
    body = _create_body(args)
    deadline = time.monotonic() + args.timeout
    key = f"{args.job}:up" + (f":{args.attempt}" if args.attempt else "")
    cluster = api.call("POST", "/api/clusters/", body, key=key)
    cluster = api.wait(cluster, ("ready", "failed", "torn_down"), deadline)
    if cluster["state"] == "ready" and args.wait_access and cluster.get("connectivity") == "closed":
        cluster["access"] = wait_access(api, cluster, deadline, err=err)
    out.write(json.dumps(cluster, indent=1) + "\n")
    if cluster["state"] != "ready":
        raise ClusterFailed(
            f"cluster {cluster['id']} ({cluster['name']}) is {cluster['state']}: {cluster['state_reason']} "
            "(running `up` again answers the same; a requeued job asks for a new cluster with --attempt N)"
        )
    return 0


ACCESS_POLL = 2.0  # seconds between two looks at a closed cluster's gateways (they pull every minute or so)


def wait_access(api: Api, cluster: dict, deadline: float, *, err: TextIO) -> dict:
    """``up --wait-access``: wait until every access gateway that carries the closed ``cluster`` has installed it
    (``GET /api/access/clusters/{id}/``: ``access_ready``), so that its users are let in as soon as the job
    starts; the answer. ``Unavailable`` at the deadline (the same command later waits on). None to wait for — no
    ready gateway carries it (``access_ready`` null) — is said on ``err``: its users cannot get in until an
    administrator sets one up."""
    while True:
        access = api.call("GET", f"/api/access/clusters/{cluster['id']}/")
        if access.get("access_ready") is True:
            return access
        if access.get("access_ready") is None:
            err.write(
                f"virtcloud: warning: no ready access gateway carries cluster {cluster['name']}: its users cannot "
                "enter it through the VPN or SSH until an administrator sets one up\n"
            )
            return access
        if time.monotonic() + ACCESS_POLL > deadline:
            raise Unavailable(
                f"cluster {cluster['id']} is ready, but not every access gateway has it yet: run `up` again"
            )
        time.sleep(ACCESS_POLL)


def down(api: Api, args, out: TextIO) -> int:
    deadline = time.monotonic() + args.timeout
    ended = []
    for cluster in api.job_clusters(args.job):
        if cluster["state"] not in LIVE:
            continue
        if cluster["state"] != "tearing_down":
            path, key = f"/api/clusters/{cluster['id']}/teardown/", f"{args.job}:down:{cluster['id']}"
            try:
                cluster = api.call("POST", path, {"reason": args.reason}, key=key)
            except Refused as exc:
                if exc.status != 409:
                    raise
                # it ended meanwhile (its lifetime ran out, someone else tore it down): as asked
                cluster = api.call("GET", f"/api/clusters/{cluster['id']}/")
                if cluster["state"] in LIVE:
                    raise
        ended.append(api.wait(cluster, ("torn_down", "failed"), deadline))
    out.write(json.dumps(ended, indent=1) + "\n")
    return 0


def _live_cluster(api: Api, job: str, deadline: float) -> dict:
    """The job's one live cluster, once no change of it is running (a node change needs it READY)."""
    live = [c for c in api.job_clusters(job) if c["state"] in LIVE and c["state"] != "tearing_down"]
    if len(live) != 1:
        raise Refused(f"job {job} has {len(live)} live clusters (a node change needs exactly one)")
    cluster = api.wait(live[0], ("ready", "failed", "torn_down"), deadline)
    if cluster["state"] != "ready":
        raise ClusterFailed(f"cluster {cluster['id']} is {cluster['state']}: {cluster['state_reason']}")
    return cluster


def _node(cluster: dict, name: str) -> dict:
    for node in cluster["nodes"]:
        if node["name"] == name and node["state"] != "removed":
            return node
    raise Refused(f"cluster {cluster['id']} has no node {name}")


def _last_error(cluster: dict, name: str = "", detail: str = "") -> str:
    """Why the cluster's latest change failed: the error of its latest step (named ``name``, its detail starting
    with ``detail``, when given) if that failed; without a name, the latest error of any step, or the state's
    reason."""
    steps = [s for s in cluster.get("steps", []) if s["name"] == name and s.get("detail", "").startswith(detail)]
    if name:
        return steps[-1]["error"] if steps and steps[-1]["status"] == "failed" else ""
    failed = [step for step in cluster.get("steps", []) if step.get("error")]
    return failed[-1]["error"] if failed else cluster.get("state_reason", "")


def migrate(api: Api, args, out: TextIO) -> int:
    """Prepare ``--node``'s move to ``--target`` (its bridge there, its switch, the core) and wait until it is
    ready: prints the node with its ``target_attachment`` (where the VM is plugged on the target). Run again,
    it waits for the same preparation (and a node already on ``--target`` needs none)."""
    deadline = time.monotonic() + args.timeout
    cluster = _live_cluster(api, args.job, deadline)
    node = _node(cluster, args.node)
    if node["host"] == args.target and node["state"] == "ready":
        out.write(json.dumps(node, indent=1) + "\n")
        return 0
    if not (node["state"] == "migrating" and node["target_host"] == args.target):
        path = f"/api/clusters/{cluster['id']}/nodes/{node['id']}/migrate/"
        cluster = api.call("POST", path, {"target_host": args.target})
    cluster = api.wait(cluster, ("ready", "failed", "torn_down"), deadline)
    node = _node(cluster, args.node)
    if node["state"] == "migrating" and node["target_host"] == args.target:
        out.write(json.dumps(node, indent=1) + "\n")
        return 0
    failed = _last_error(cluster, "migrate.prepare", f"{args.node}:") or _last_error(cluster)
    raise ClusterFailed(f"the network could not be prepared on {args.target} for {args.node}: {failed}")


def migrated(api: Api, args, out: TextIO) -> int:
    """The VM moved (``--cancel``: it did not): complete the node's migration — the host it left is cleaned
    when no node of the cluster is left there — and wait until the network has converged. A node that is not
    migrating (already completed) needs nothing. A device that could not be cleaned exits 1 with its message
    (the node is where the VM is; the reconciler converges the device later)."""
    deadline = time.monotonic() + args.timeout
    cluster = _live_cluster(api, args.job, deadline)
    node = _node(cluster, args.node)
    if node["state"] == "migrating":
        verb = "migrate/cancel" if args.cancel else "migrated"
        cluster = api.call("POST", f"/api/clusters/{cluster['id']}/nodes/{node['id']}/{verb}/")
        cluster = api.wait(cluster, ("ready", "failed", "torn_down"), deadline)
        if cluster["state"] != "ready":
            raise ClusterFailed(f"cluster {cluster['id']} is {cluster['state']}: {cluster['state_reason']}")
        node = _node(cluster, args.node)
        step = "migrate.cancel" if args.cancel else "migrate.complete"
        failed = _last_error(cluster, step, f"{args.node}:")
        if failed:
            where = f"stays on {node['host']}" if args.cancel else f"is on {node['host']}"
            raise ClusterFailed(f"node {args.node} {where}, but the network did not converge: {failed}")
    out.write(json.dumps(node, indent=1) + "\n")
    return 0


def extend(api: Api, args, out: TextIO) -> int:
    """Move the expiry of the job's live cluster to ``--until`` (or ``--lifetime`` s from now)."""
    cluster = _job_cluster(api, args.job, what="extending its lifetime")
    if args.until:
        expires = args.until
    else:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + args.lifetime))
    # keyed by the change as seen (from this expiry to that one): the same run again is one change, a later
    # one — back to an earlier expiry too — another
    key = _key(args.job, cluster, "extend", f"{cluster['expires_at']}>{expires}")
    out.write(
        json.dumps(api.call("PATCH", f"/api/clusters/{cluster['id']}/", {"expires_at": expires}, key=key), indent=1)
        + "\n"
    )
    return 0


def _key(job: str, cluster: dict, verb: str, change: str) -> str:
    """An Idempotency-Key for a change of the job's ``cluster``: the same change of the same cluster, retried,
    gets the same key; another change (or the cluster of a requeued job) another one. At most 190 characters."""
    digest = hashlib.sha256(change.encode()).hexdigest()[:24]
    return f"{job}:{cluster['id']}:{verb}:{digest}"


def add_node(api: Api, args, out: TextIO) -> int:
    """Add ``--node``s to the job's ready cluster and wait until the network has converged onto their hosts.
    Nodes already there with the same host and MAC are not added again — but one still pending (its add did
    not converge) is asked for again, which converges the network for it again; one of the same name that
    differs is a refusal (remove it first)."""
    deadline = time.monotonic() + args.timeout
    cluster = _live_cluster(api, args.job, deadline)
    present = {n["name"]: n for n in cluster["nodes"] if n["state"] != "removed"}
    new = []
    for node in args.node:
        there = present.get(node["name"])
        if there is None:
            new.append(node)
        elif (there["host"], there["mac"].lower()) != (node["host"], node["mac"].lower()):
            raise Refused(
                f"cluster {cluster['id']} has a node {node['name']} already, on {there['host']} ({there['mac']})"
            )
        elif there["state"] == "pending":  # its add failed: asked for again, the network converges again
            new.append(node)
    if new:
        # keyed by the cluster as seen (its nodes, and how many changes it has had: its steps) and the nodes asked
        # for: added, removed and added again is a new change; the same run again is the same one
        nodes_seen = sorted((n["id"], n["state"]) for n in cluster["nodes"])
        seen = json.dumps([len(cluster.get("steps", [])), nodes_seen, new], sort_keys=True)
        key = _key(args.job, cluster, "add", seen)
        cluster = api.call("POST", f"/api/clusters/{cluster['id']}/nodes/", {"nodes": new}, key=key)
        cluster = api.wait(cluster, ("ready", "failed", "torn_down"), deadline)
    nodes = {n["name"]: n for n in cluster["nodes"] if n["state"] != "removed"}
    missing = [n["name"] for n in args.node if nodes.get(n["name"], {}).get("state") != "ready"]
    if cluster["state"] != "ready" or missing:
        failed = _last_error(cluster, "nodes.add") or cluster.get("state_reason") or "not added"
        raise ClusterFailed(f"the network could not be extended to {', '.join(missing) or 'the nodes'}: {failed}")
    out.write(json.dumps(cluster, indent=1) + "\n")
    return 0


def remove_node(api: Api, args, out: TextIO) -> int:
    """Remove ``--node``s from the job's ready cluster, one after the other, and wait until the network has
    converged (a host is cleaned when no node of the cluster is left there): a device that could not be changed
    exits 1 with its message (the node is removed; the reconciler converges the device later). A node already
    gone needs nothing."""
    deadline = time.monotonic() + args.timeout
    cluster = _live_cluster(api, args.job, deadline)
    for name in args.node:
        node = next((n for n in cluster["nodes"] if n["name"] == name and n["state"] != "removed"), None)
        if node is None:
            continue
        path, key = (
            f"/api/clusters/{cluster['id']}/nodes/{node['id']}/",
            _key(args.job, cluster, "remove", str(node["id"])),
        )
        cluster = api.wait(api.call("DELETE", path, key=key), ("ready", "failed", "torn_down"), deadline)
        if cluster["state"] != "ready":
            raise ClusterFailed(f"cluster {cluster['id']} is {cluster['state']}: {cluster['state_reason']}")
        failed = _last_error(cluster, "nodes.remove", f"{name}@")
        if failed:
            raise ClusterFailed(f"node {name} is removed, but the network did not converge: {failed}")
    out.write(json.dumps(cluster, indent=1) + "\n")
    return 0


def _job_cluster(api: Api, job: str, *, what: str = "a node's SSH access") -> dict:
    """The job's one live cluster that is not tearing down (what a node's sshd files are for)."""
    live = [c for c in api.job_clusters(job) if c["state"] in LIVE and c["state"] != "tearing_down"]
    if len(live) != 1:
        raise Refused(f"job {job} has {len(live)} live clusters ({what} needs exactly one)")
    return live[0]


def _read_key(path: Path) -> str:
    """The host PUBLIC key in ``path``: one ``ssh-…``/``ecdsa-…`` line. Anything else is refused here, before it
    leaves the node (``--key /etc/ssh/ssh_host_ed25519_key``, the ``.pub`` forgotten, sent the private key)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(f"cannot read the host key {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if "PRIVATE KEY" in text or len(lines) != 1 or not lines[0].startswith(("ssh-", "ecdsa-")):
        raise Refused(f"{path} is not a host public key (one 'ssh-…' line: the .pub file); nothing was sent")
    return lines[0]


def _node_access(
    api: Api, cluster: dict, node: str, folder: Path, key: Path | None = None
) -> tuple[dict, dict[Path, str | bytes]]:
    """The portal's answer of who may log in to ``node`` now (without its KRL, nor a host certificate's text), and
    the files of the node's sshd it makes in ``folder``: the user CA, the principals file and the KRL — and, when
    the portal issued the host certificate of ``key`` (the node's host public key) again, that certificate
    (``<key>-cert.pub``)."""
    query = {"cluster": cluster["id"], "node": node}
    public_key = _read_key(key) if key is not None else ""
    if public_key:
        query["public_key"] = " ".join(public_key.split()[:2])  # (its type and key: no comment in the portal's log)
        installed = _host_cert_path(key, folder)
        try:
            have = installed.read_text() if installed.is_file() else ""
        except OSError:  # (unreadable: as if it had none; a new one would replace it)
            have = ""
        # which certificate it has (none: the digest of nothing): the newest is sent again when an answer that
        # carried it was lost
        query["certificate_sha256"] = certificate_digest(have)
    answer = api.call("GET", "/api/access/host-certificates/access/", **query)
    node_user = str(answer["node_user"])
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", node_user):
        raise Refused(f"the portal named the node's account {node_user!r}")  # it becomes a file name
    try:
        krl = base64.b64decode(str(answer["krl"]), validate=True)
    except (binascii.Error, ValueError):
        raise Refused("the portal's KRL is not base64") from None
    principals = folder / f"virtcloud-principals-{node_user}"
    files: dict[Path, str | bytes] = {
        folder / "virtcloud-user-ca.pub": str(answer["user_ca"]).rstrip("\n") + "\n",
        principals: str(answer["authorized_principals"]).rstrip("\n") + "\n",
        folder / "virtcloud-revoked-keys": krl,  # binary (ssh-keygen -k)
    }
    # another account's principals file written before (the cluster's people logged in as root until its policy
    # or the portal changed) would keep letting them in as that account, frozen: it lists nobody now
    for other in sorted(folder.glob("virtcloud-principals-*")):
        if other != principals and re.fullmatch(r"virtcloud-principals-[a-z_][a-z0-9_-]{0,31}", other.name):
            files[other] = f"# VirtCloud: nobody logs in as this account; the cluster's people are {node_user}\n"
    shown = {k: v for k, v in answer.items() if k != "krl"}
    renewed = answer.get("host_certificate")
    if renewed and key is not None:
        line = str(renewed.get("certificate", "")).strip()
        if "\n" in line or line.split(" ", 1)[0] != f"{public_key.split()[0]}-cert-v01@openssh.com":
            raise Refused(f"the portal's host certificate is not one for a {public_key.split()[0]} key: {line[:60]!r}")
        files[_host_cert_path(key, folder)] = line + "\n"
        shown["host_certificate"] = {k: v for k, v in renewed.items() if k != "certificate"}
    return shown, files


def _host_cert_path(key: Path, folder: Path) -> Path:
    """sshd's HostCertificate of host key ``key`` in ``folder``: ``<key>-cert.pub``."""
    return folder / f"{key.name.removesuffix('.pub')}-cert.pub"


def _install(folder: Path, files: dict[Path, str | bytes]) -> None:
    """Write ``files`` as a set (all new files written and flushed before any replaces its old one), never
    through a link. sshd reads them as root and nothing in them is secret: mode 0644."""
    try:
        write_all_atomic({path: (data, 0o644) for path, data in files.items()})
    except OSError as exc:
        raise Refused(f"cannot write into {folder}: {exc.strerror or exc}") from None


def _node_cluster(api: Api, args) -> dict:
    """The cluster a node command is for: ``--cluster ID`` as given (what a node token, which reads no cluster
    list, names), or the job's one live cluster."""
    if args.cluster is not None:
        return {"id": args.cluster}
    return _job_cluster(api, args.job)


def node_token(api: Api, args, out: TextIO) -> int:
    """A token for the nodes of the job's live cluster (``cluster:node``: it certifies their host keys and fetches
    who may log in, for that cluster only, until it ends): what their boot script and timer hold instead of the
    scheduler's token — the cluster's people are root on its nodes. With ``--write FILE`` the secret goes into
    FILE (mode 0600, replaced whole) and the output names the file; else it is printed, once."""
    cluster = _job_cluster(api, args.job, what="a node token")
    made = api.call("POST", f"/api/clusters/{cluster['id']}/node-token/", {})
    if args.write:
        target = Path(args.write)
        try:
            write_all_atomic({target: (str(made["token"]) + "\n", 0o600)})
        except OSError as exc:
            raise Refused(f"cannot write {target}: {exc.strerror or exc}") from None
        made = {**{k: v for k, v in made.items() if k != "token"}, "file": str(target)}
    out.write(json.dumps(made, indent=1) + "\n")
    return 0


def host_cert(api: Api, args, out: TextIO) -> int:
    """Certify ``--key`` (a node's host public key) for ``--node`` of the job's live cluster and install what
    the node's sshd needs: the certificate (``HostCertificate``), the user CA (``TrustedUserCAKeys``), the
    principals file (``AuthorizedPrincipalsFile``) and the user CA's KRL (``RevokedKeys``; ``host-access``
    keeps the last three current). Files are replaced whole (a reader never sees half of one); run again, it
    asks for a new certificate (the same key, a later expiry: after the cluster's lifetime was extended)."""
    key_path = Path(args.key)
    public_key = _read_key(key_path)
    cluster = _node_cluster(api, args)
    body = {"cluster": cluster["id"], "node": args.node, "public_key": public_key}
    issued = api.call("POST", "/api/access/host-certificates/", body)
    folder = Path(args.dir) if args.dir else key_path.parent
    _, access = _node_access(api, cluster, args.node, folder)
    written = {_host_cert_path(key_path, folder): issued["certificate"].rstrip("\n") + "\n"}
    written.update(access)
    _install(folder, written)
    shown = {k: v for k, v in issued.items() if k != "certificate"}
    out.write(json.dumps({**shown, "files": [str(p) for p in written]}, indent=1) + "\n")
    return 0


def host_access(api: Api, args, out: TextIO) -> int:
    """Write, as they are now, the files that say who may log in to ``--node`` of the job's live cluster: the
    principals file (who left the group is gone from it), the user CA and its KRL (revoked user certificates);
    with ``--key``, the host certificate of that key when the portal issued it again (the cluster's lifetime was
    extended: the certificate the node has would end before the cluster). Meant for a timer on the node; sshd
    reads the first three at each login (no reload needed), a new host certificate when it starts or reloads."""
    folder = Path(args.dir)
    key = Path(args.key) if args.key else None
    shown, written = _node_access(api, _node_cluster(api, args), args.node, folder, key)
    _install(folder, written)
    out.write(json.dumps({**shown, "files": [str(p) for p in written]}, indent=1) + "\n")
    return 0


def show(api: Api, args, out: TextIO) -> int:
    out.write(json.dumps(api.job_clusters(args.job), indent=1) + "\n")
    return 0


def _cluster_arguments(make) -> None:
    """What ``up`` and ``plan`` take: the cluster asked for."""
    make.add_argument("--job", required=True, type=job_id, help="the scheduler's job id (keys every request)")
    make.add_argument("--name", required=True)
    make.add_argument("--image", required=True)
    make.add_argument("--node", type=parse_node, action="append", required=True, help="name=…,host=…,mac=…[,address=…]")
    make.add_argument("--admin-rights", action="store_true")
    make.add_argument(
        "--connectivity",
        choices=("public", "closed"),
        help="closed: reachable through the access gateway only, whatever the policy decides (default: the policy)",
    )
    make.add_argument("--group")
    make.add_argument("--owner", help="the user the cluster is for (a middleware token, clusters:manage)")
    make.add_argument("--lifetime", type=int, help="seconds")
    make.add_argument(
        "--bastion-address",
        help="closed clusters: the SSH bastion's address, with its prefix length (a clusters:manage token)",
    )


def _node_cluster_arguments(command) -> None:
    """What ``host-cert`` and ``host-access`` take to name the cluster: the job, or the cluster's id (a node
    token's: it reads no cluster list)."""
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=job_id, help="the job whose live cluster the node is in")
    which.add_argument("--cluster", type=int, help="the cluster's id (with a node token: `node-token` prints it)")


def main(argv: list[str] | None = None, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="client.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--url", required=True, help="the portal, e.g. https://portal.example.org")
    token = parser.add_mutually_exclusive_group(required=True)
    token.add_argument(
        "--token-file",
        help="file holding the API token (scope clusters:write or clusters:manage; on a node: a node token)",
    )
    token.add_argument("--token", help="the API token (prefer --token-file: argv is visible)")
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("up", help="create the job's cluster and wait until it is READY")
    dry = sub.add_parser("plan", help="what `up` with these arguments would get now (a dry run: nothing is made)")
    sub.add_parser("status", help="whether the portal provisions now (exit 75 when it does not: hold the job)")
    for command in (make, dry):
        _cluster_arguments(command)
    make.add_argument(
        "--attempt",
        type=int,
        default=0,
        help="the job's run (a requeued job with the same id gets a new cluster: e.g. SLURM_RESTART_COUNT)",
    )
    make.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY")
    make.add_argument(
        "--wait-access",
        action="store_true",
        help="closed clusters: wait (within --timeout) until every access gateway carrying it has installed it",
    )
    end = sub.add_parser("down", help="tear the job's clusters down and wait until they are")
    end.add_argument("--job", required=True, type=job_id)
    end.add_argument("--reason", default="job ended")
    end.add_argument("--timeout", type=float, default=300, help="seconds to wait for TORN_DOWN")
    look = sub.add_parser("show", help="print the job's clusters")
    look.add_argument("--job", required=True, type=job_id)
    longer = sub.add_parser("extend", help="move the expiry of the job's cluster (the job's walltime changed)")
    longer.add_argument("--job", required=True, type=job_id)
    until = longer.add_mutually_exclusive_group(required=True)
    until.add_argument("--lifetime", type=int, help="seconds from now")
    until.add_argument("--until", type=iso_time, help="an ISO 8601 time with its offset, e.g. 2026-12-31T18:00:00Z")
    grow = sub.add_parser("add-node", help="add nodes to the job's cluster and wait until the network reaches them")
    grow.add_argument("--job", required=True, type=job_id)
    grow.add_argument("--node", type=parse_node, action="append", required=True, help="name=…,host=…,mac=…[,address=…]")
    grow.add_argument("--timeout", type=float, default=300, help="seconds to wait for the network")
    shrink = sub.add_parser("remove-node", help="remove nodes from the job's cluster and wait until it is clean")
    shrink.add_argument("--job", required=True, type=job_id)
    shrink.add_argument("--node", action="append", required=True, help="a node's name (repeatable)")
    shrink.add_argument("--timeout", type=float, default=300, help="seconds to wait for the network")
    move = sub.add_parser("migrate", help="prepare the network on a node's target host and wait until it is ready")
    move.add_argument("--job", required=True, type=job_id)
    move.add_argument("--node", required=True, help="the node's name")
    move.add_argument("--target", required=True, help="the target host")
    move.add_argument("--timeout", type=float, default=300)
    moved = sub.add_parser("migrated", help="the VM moved: complete its migration (--cancel: it did not)")
    moved.add_argument("--job", required=True, type=job_id)
    moved.add_argument("--node", required=True, help="the node's name")
    moved.add_argument("--cancel", action="store_true", help="the VM stayed: take the target's network away")
    moved.add_argument("--timeout", type=float, default=300)
    tokens = sub.add_parser(
        "node-token", help="a token for the nodes of the job's cluster (for host-cert, host-access)"
    )
    tokens.add_argument("--job", required=True, type=job_id)
    tokens.add_argument("--write", help="write the secret into this file (mode 0600) instead of printing it")
    cert = sub.add_parser("host-cert", help="certify a node's SSH host key and install what its sshd needs")
    _node_cluster_arguments(cert)
    cert.add_argument("--node", required=True, help="the node's name")
    cert.add_argument("--key", required=True, help="the node's host public key, e.g. /etc/ssh/ssh_host_ed25519_key.pub")
    cert.add_argument("--dir", help="where the certificate, user CA, principals file and KRL go (default: the key's)")
    access = sub.add_parser("host-access", help="write who may log in to a node now (principals, user CA, KRL)")
    _node_cluster_arguments(access)
    access.add_argument("--node", required=True, help="the node's name")
    access.add_argument("--dir", default="/etc/ssh", help="where the user CA, principals file and KRL go")
    access.add_argument(
        "--key",
        help="the host public key host-cert certified (e.g. /etc/ssh/ssh_host_ed25519_key.pub): its certificate, "
        "<key>-cert.pub in --dir, is replaced when the portal issues it again (the cluster's lifetime was extended)",
    )
    args = parser.parse_args(argv)
    try:
        secret = outgoing.read_token(args.token, args.token_file)
    except ValueError as exc:
        err.write(f"virtcloud: {exc}\n")
        return 2
    exposed = "" if args.token else outgoing.exposed_token_file(args.token_file)
    if exposed:
        err.write(f"virtcloud: warning: {exposed}\n")
    api = Api(args.url, secret)
    try:
        actions = {
            "up": functools.partial(up, err=err),
            "plan": plan,
            "status": status,
            "down": down,
            "show": show,
            "extend": extend,
            "add-node": add_node,
            "remove-node": remove_node,
            "migrate": migrate,
            "migrated": migrated,
            "node-token": node_token,
            "host-cert": host_cert,
            "host-access": host_access,
        }
        return actions[args.action](api, args, out)
    except ClusterFailed as exc:
        err.write(f"virtcloud: {exc}\n")
        return 1
    except Refused as exc:
        err.write(f"virtcloud: refused: {exc}\n")
        return 2
    except Unavailable as exc:
        err.write(f"virtcloud: {exc}; run the same command again (it is idempotent)\n")
        return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())

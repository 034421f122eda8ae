"""Helpers of the access app's lab end-to-end tests: the demo topology built as a netns lab, clusters
created through the API and made READY by a real Celery worker, a portal that can be stopped, gateway
tokens.

Imported by ``test_e2e_lab_vpn.py`` and ``test_e2e_lab_ssh.py`` (fixtures are imported into the modules
that use them, as with ``access.tests.fixtures``).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from access.tests._procs import Netns

_macs = itertools.count(1)


@pytest.fixture
def lab_inventory(transactional_db):
    """The demo topology in the database and built as a lab that the inventory points at (closed clusters)."""
    from network.tests.labinventory import demo_lab

    with demo_lab("e2e-access") as lab:
        yield lab


class LabNetns(Netns):
    """A namespace the lab made (a VM's, or its gateway's): used by a test, never created or deleted by it."""

    def __init__(self, name: str):  # no `ip netns add`
        self.name = name

    def delete(self) -> None:
        pass


def mac() -> str:
    n = next(_macs)
    return f"52:54:00:ac:{n // 256:02x}:{n % 256:02x}"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    host: str
    address: str
    mac: str


def cluster_post(
    api, name: str, nodes: list[tuple[str, str]], *, group: str | None = None, bastion_address: str = ""
) -> tuple[int, list]:
    """POST /api/clusters/ with ``nodes`` = [(host, address)]; returns (id, [NodeSpec]) without waiting."""
    specs = [NodeSpec(f"node{i}", host, address, mac()) for i, (host, address) in enumerate(nodes, 1)]
    body = {
        "name": name,
        "image": "my-own",
        "admin_rights": True,
        "nodes": [{"name": n.name, "host": n.host, "mac": n.mac, "address": n.address} for n in specs],
    }
    if group:
        body["group"] = group
    if bastion_address:
        body["bastion_address"] = bastion_address
        # the scheduler gives a bastion address (a clusters:manage token), for the user the client acts as
        from portal.models import TokenScope
        from portal.tokens import token_create

        user = api.handler._force_user
        token, _ = token_create(user=user, name=f"scheduler-{name}", scopes=[TokenScope.CLUSTERS_MANAGE])
        api.force_authenticate(user, token=token)
    r = api.post("/api/clusters/", body, format="json")
    if bastion_address:
        api.force_authenticate(user)
    assert r.status_code == 201, r.content
    return r.data["id"], specs


def wait_ready(*cluster_ids: int, timeout: float = 40.0) -> dict:
    """Wait until every cluster is READY (fail on FAILED); returns {id: cluster}."""
    from clusters.models import ClusterState, VirtualCluster

    deadline = time.monotonic() + timeout
    while True:
        clusters = {c.pk: c for c in VirtualCluster.objects.filter(pk__in=cluster_ids)}
        failed = [c for c in clusters.values() if c.state == ClusterState.FAILED]
        assert not failed, [(c.name, c.state_reason) for c in failed]
        if all(c.state == ClusterState.READY for c in clusters.values()) and len(clusters) == len(cluster_ids):
            return clusters
        assert time.monotonic() < deadline, {c.name: c.state for c in clusters.values()}
        time.sleep(0.05)


class Portal:
    """The portal over real HTTP on 127.0.0.1 (Django's live-server thread), which a test can stop: then
    nothing answers there any more, as when the portal host is down."""

    def __init__(self):
        from pytest_django.live_server_helper import LiveServer

        self.server = LiveServer("127.0.0.1:0")
        self.url = self.server.url
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def request(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, bytes, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as response:  # noqa: S310 - our own http URL
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)


@pytest.fixture
def portal(transactional_db):
    server = Portal()
    try:
        yield server
    finally:
        server.stop()


def user_token(user) -> str:
    """An API token of ``user`` that may issue profiles and revoke (what a user's script holds)."""
    from portal.models import TokenScope
    from portal.tokens import token_create

    _, secret = token_create(user=user, name="e2e", scopes=[TokenScope.CLUSTERS_WRITE])
    return secret


def gateway_token(gateway, owner, path: Path) -> Path:
    """Give ``gateway`` its own pull token (scope gateway:pull), written to ``path`` as the gateway keeps it."""
    from access.services import gateway_token_issue

    secret = gateway_token_issue(gateway=gateway, by=owner)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


class PullFailed(Exception):
    def __init__(self, code: int, output: str):
        super().__init__(f"gateway pull exited {code}: {output}")
        self.code, self.output = code, output


def gateway_pull(url: str, token_file: Path, state_dir: Path) -> str:
    """The pull as the gateway's timer runs it: the standalone agent (``access/gateway/agent.py``, what the
    pull unit starts), in a process of its own without Django's settings or the portal's secrets; its output
    (stdout and stderr). Raises ``PullFailed`` with its exit status when it fails."""
    agent = Path(__file__).resolve().parents[1] / "gateway" / "agent.py"
    argv = [sys.executable, "-I", str(agent), "pull", "--url", url, "--token-file", str(token_file)]
    argv += ["--dir", str(state_dir), "--timeout", "3"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode:
        raise PullFailed(done.returncode, done.stdout + done.stderr)
    return done.stdout + done.stderr

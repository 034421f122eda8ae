"""The scheduler's client (``clusters/client.py``) run as a prologue/epilogue runs it: a process of its own with
no Django, against a live portal and a real Celery worker on Redis (devices: the fake fabric)."""
# ruff: noqa: F401, F811 (the pytest fixture fabric is imported from clusters.tests.helpers)

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clusters.models import ClusterState, Image, VirtualCluster
from clusters.tests.helpers import fabric
from network.models import VlanAllocation
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

CLIENT = Path(__file__).resolve().parents[1] / "client.py"
NODES = ("name=n1,host=brno1,mac=52:54:00:00:00:01", "name=n2,host=prague1,mac=52:54:00:00:00:02,address=10.0.0.2")


@pytest.fixture
def client(alice, live_server, tmp_path):
    _token, secret = token_create(user=alice, name="pbs", scopes=[TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE])
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    token_file.chmod(0o600)  # (as a token file is kept)

    def run(*args: str, url: str = live_server.url, isolated: bool = True) -> tuple[int, object, str]:
        python = [sys.executable, "-I"] if isolated else [sys.executable]
        argv = [*python, str(CLIENT), "--url", url, "--token-file", str(token_file), *args]
        done = subprocess.run(
            argv, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120, check=False
        )
        return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr

    return run


def up(client, job: str, *extra: str, nodes=NODES, **kwargs):
    node_args = [arg for node in nodes for arg in ("--node", node)]
    name = "mpi-" + job.split(".")[0]
    argv = ("up", "--job", job, "--name", name, "--image", "my-own", *node_args, "--timeout", "60", *extra)
    return client(*argv, **kwargs)


def allocated() -> int:
    return VlanAllocation.objects.filter(state="allocated").count()


def test_a_prologue_gets_a_ready_cluster_once_and_the_epilogue_tears_it_down(fabric, celery_worker, client):
    code, cluster, err = up(client, "1234.pbs")
    assert code == 0, err
    assert cluster["state"] == "ready" and cluster["job_id"] == "1234.pbs"
    vid = cluster["vlan_id"]
    assert vid in fabric.host_vlans("brno1") and vid in fabric.host_vlans("prague1")
    by_name = {n["name"]: n for n in cluster["nodes"]}
    assert by_name["n2"]["address"] == "10.0.0.2"
    # what the VM manager plugs each VM with: the libvirt <interface> element, with the node's MAC
    assert "52:54:00:00:00:01" in by_name["n1"]["attachment"]["libvirt"]
    # The prologue runs again (a timeout, a lost answer): the same cluster, never a second one.
    code, again, err = up(client, "1234.pbs")
    assert (code, again["id"]) == (0, cluster["id"]), err
    assert VirtualCluster.objects.filter(job_id="1234.pbs").count() == 1
    # --wait-access against the real access API: no gateway is set up here, so nothing to wait for, and it says so
    code, again, err = up(client, "1234.pbs", "--wait-access")
    assert (code, again["access"]["access_ready"]) == (0, None), err
    assert "no ready access gateway carries cluster mpi-1234" in err
    code, shown, _ = client("show", "--job", "1234.pbs")
    assert code == 0 and [c["id"] for c in shown] == [cluster["id"]]

    code, ended, err = client("down", "--job", "1234.pbs", "--timeout", "60")
    assert code == 0, err
    assert [(c["id"], c["state"]) for c in ended] == [(cluster["id"], "torn_down")]
    assert all(vid not in fabric.host_vlans(h) for h in fabric.hosts)
    assert VlanAllocation.objects.get(vid=vid).state == "quarantined"
    # The epilogue runs again, or for a job whose cluster never came: nothing to do.
    assert client("down", "--job", "1234.pbs")[:2] == (0, [])
    assert client("down", "--job", "no-such-job")[:2] == (0, [])


def test_a_refused_request_exits_2_with_the_field_errors_and_leaves_nothing(fabric, celery_worker, client):
    before = allocated()
    code, out, err = up(client, "77.pbs", nodes=("name=n1,host=atlantis,mac=52:54:00:00:00:01",))
    assert code == 2 and out is None
    assert "refused" in err and "400" in err and "atlantis" in err
    assert not VirtualCluster.objects.filter(job_id="77.pbs").exists()
    assert allocated() == before
    # A malformed node on the command line never reaches the portal.
    code, _, err = up(client, "78.pbs", nodes=("n1:brno1",))
    assert code == 2 and "name=…,host=…,mac=…" in err
    # Public asked for on a user-provided image: the policy makes it closed, the portal refuses (never closed
    # silently instead) and records nothing: the same job, keyed the same, asking for closed gets it.
    code, out, err = up(client, "79.pbs", "--connectivity", "public")
    assert code == 2 and out is None
    assert "400" in err and "connectivity" in err and "the policy makes this cluster closed" in err
    assert not VirtualCluster.objects.filter(job_id="79.pbs").exists() and allocated() == before
    code, cluster, err = up(client, "79.pbs", "--connectivity", "closed")
    assert code == 0 and cluster["connectivity"] == "closed", err
    assert cluster["connectivity_reason"].startswith("closed on request (and by the policy: image my-own")


def test_a_failed_cluster_exits_1_with_its_reason_and_a_requeued_job_gets_a_new_one(fabric, celery_worker, client):
    fabric.set_switch_args("sw-prague", fail_commit="permanent")
    code, cluster, err = up(client, "99.pbs")
    assert code == 1 and cluster["state"] == "failed"
    assert "sw-prague" in err and "failed" in err and "--attempt" in err
    assert VirtualCluster.objects.get(job_id="99.pbs").state == ClusterState.FAILED
    assert client("down", "--job", "99.pbs")[:2] == (0, [])  # it has ended: nothing to tear down
    assert up(client, "99.pbs")[:2][0] == 1  # the same run again: the same (failed) cluster
    fabric.set_switch_args("sw-prague", fail_commit="")
    code, again, err = up(client, "99.pbs", "--attempt", "1")  # requeued under the same id
    assert code == 0 and again["state"] == "ready" and again["id"] != cluster["id"], err
    assert VirtualCluster.objects.filter(job_id="99.pbs").count() == 2


def test_an_unreachable_portal_is_temporary(client):
    code, out, err = up(client, "5.pbs", url="http://127.0.0.1:9")
    assert code == 75 and out is None
    assert "cannot reach the portal" in err and "run the same command again" in err


def test_a_quota_reached_is_temporary_and_the_same_command_later_succeeds(fabric, celery_worker, client, settings):
    settings.CLUSTER_QUOTA_CLUSTERS = 1
    assert up(client, "1.pbs")[0] == 0
    before = allocated()
    other = ("name=n1,host=brno1,mac=52:54:00:00:02:01",)  # (a MAC is one VM's: never in two live clusters)
    code, out, err = up(client, "2.pbs", nodes=other)
    assert code == 75 and out is None, err
    assert "quota_exceeded" in err and "run the same command again" in err
    assert allocated() == before and not VirtualCluster.objects.filter(job_id="2.pbs").exists()
    assert client("down", "--job", "1.pbs")[0] == 0
    # the same request, keyed the same: the refusal recorded nothing
    code, cluster, err = up(client, "2.pbs", nodes=other)
    assert code == 0 and cluster["state"] == "ready", err


def test_a_migration_prepared_completed_and_called_off_through_the_client(fabric, celery_worker, client):
    code, cluster, err = up(client, "9.pbs")
    assert code == 0, err
    vid = cluster["vlan_id"]
    code, node, err = client("migrate", "--job", "9.pbs", "--node", "n2", "--target", "pilsen2", "--timeout", "60")
    assert code == 0, err
    assert (node["host"], node["target_host"], node["state"]) == ("prague1", "pilsen2", "migrating")
    assert "52:54:00:00:00:02" in node["target_attachment"]["libvirt"]
    assert vid in fabric.host_vlans("pilsen2") and vid in fabric.host_vlans("prague1")
    # run again (the hypervisor's hook retried): it waits for the same preparation, nothing twice
    code, again, err = client("migrate", "--job", "9.pbs", "--node", "n2", "--target", "pilsen2")
    assert (code, again["target_host"]) == (0, "pilsen2"), err
    code, node, err = client("migrated", "--job", "9.pbs", "--node", "n2", "--timeout", "60")
    assert code == 0 and (node["host"], node["state"], node["target_host"]) == ("pilsen2", "ready", None), err
    assert vid not in fabric.host_vlans("prague1") and vid in fabric.host_vlans("pilsen2")
    assert client("migrated", "--job", "9.pbs", "--node", "n2")[0] == 0  # done already: nothing to do
    # the host it left cannot be cleaned: the node is moved all the same, and the command says the device's message
    from network.models import Host

    assert client("migrate", "--job", "9.pbs", "--node", "n2", "--target", "prague1")[0] == 0
    Host.objects.filter(name="pilsen2").update(driver_args={**fabric.args, "fail_commit": "permanent"})
    code, _, err = client("migrated", "--job", "9.pbs", "--node", "n2", "--timeout", "60")
    assert code == 1 and "n2 is on prague1, but the network did not converge: pilsen2" in err, err
    Host.objects.filter(name="pilsen2").update(driver_args=fabric.args)  # (repaired)
    assert client("migrated", "--job", "9.pbs", "--node", "n2")[0] == 0  # moved already: nothing to do

    # a migration called off: the VM stayed, the target is cleaned
    assert client("migrate", "--job", "9.pbs", "--node", "n1", "--target", "pilsen2")[0] == 0
    code, node, err = client("migrated", "--job", "9.pbs", "--node", "n1", "--cancel")
    assert code == 0 and (node["host"], node["state"]) == ("brno1", "ready"), err
    assert vid in fabric.host_vlans("brno1")
    # bad input: an unknown node, an unknown host — refused, nothing changed
    assert client("migrate", "--job", "9.pbs", "--node", "n7", "--target", "pilsen2")[0] == 2
    code, _, err = client("migrate", "--job", "9.pbs", "--node", "n1", "--target", "atlantis")
    assert code == 2 and "atlantis" in err
    assert VirtualCluster.objects.get(job_id="9.pbs").nodes.filter(state="migrating").count() == 0


def test_a_job_that_grows_shrinks_and_runs_longer_through_the_client(fabric, celery_worker, client):
    from datetime import UTC, datetime, timedelta

    from network.models import Host

    code, cluster, err = up(client, "11.pbs")
    assert code == 0, err
    vid, job = cluster["vlan_id"], ("--job", "11.pbs")
    n3 = "name=n3,host=pilsen1,mac=52:54:00:00:00:03"
    code, cluster, err = client("add-node", *job, "--node", n3, "--timeout", "60")
    assert code == 0 and cluster["state"] == "ready", err
    assert {n["name"]: n["state"] for n in cluster["nodes"]} == {"n1": "ready", "n2": "ready", "n3": "ready"}
    assert vid in fabric.host_vlans("pilsen1")
    # run again (the hook retried): the node is there already, nothing is added twice
    code, again, err = client("add-node", *job, "--node", n3.replace("52:54:00:00:00:03", "52:54:00:00:00:03".upper()))
    assert code == 0 and [n["name"] for n in again["nodes"]].count("n3") == 1, err
    # the same name elsewhere is a refusal: nothing sent
    code, _, err = client("add-node", *job, "--node", "name=n3,host=pilsen2,mac=52:54:00:00:00:03")
    assert code == 2 and "has a node n3 already, on pilsen1" in err, err
    # a node whose host fails: exit 1 with the device's message, the node left pending, the cluster ready
    Host.objects.filter(name="pilsen2").update(driver_args={**fabric.args, "fail_commit": "permanent"})
    code, _, err = client("add-node", *job, "--node", "name=n4,host=pilsen2,mac=52:54:00:00:00:04", "--timeout", "60")
    assert code == 1 and "pilsen2" in err, err
    live = VirtualCluster.objects.get(job_id="11.pbs")
    assert live.state == ClusterState.READY and live.nodes.get(name="n4").state == "pending"

    Host.objects.filter(name="pilsen2").update(driver_args=fabric.args)  # (repaired)
    # the same add again: the pending node is not added twice, the network converges for it this time
    n4 = "name=n4,host=pilsen2,mac=52:54:00:00:00:04"
    code, cluster, err = client("add-node", *job, "--node", n4, "--timeout", "60")
    assert code == 0 and [n["state"] for n in cluster["nodes"] if n["name"] == "n4"] == ["ready"], err
    assert vid in fabric.host_vlans("pilsen2")
    code, cluster, err = client("remove-node", *job, "--node", "n3", "--node", "n4", "--timeout", "60")
    assert code == 0 and cluster["state"] == "ready", err
    assert {n["name"] for n in cluster["nodes"] if n["state"] != "removed"} == {"n1", "n2"}
    assert vid not in fabric.host_vlans("pilsen1")
    assert client("remove-node", *job, "--node", "n3")[0] == 0  # gone already: nothing to do
    # added again, as before: a new change (not the first one's answer replayed)
    code, cluster, err = client("add-node", *job, "--node", n3, "--timeout", "60")
    assert code == 0 and vid in fabric.host_vlans("pilsen1"), err
    assert [n["state"] for n in cluster["nodes"] if n["name"] == "n3"] == ["ready"]
    # a host that cannot be cleaned: the node is removed, and the command says the device's message
    Host.objects.filter(name="pilsen1").update(driver_args={**fabric.args, "fail_commit": "permanent"})
    code, _, err = client("remove-node", *job, "--node", "n3", "--timeout", "60")
    assert code == 1 and "n3 is removed, but the network did not converge: pilsen1" in err, err

    code, cluster, err = client("extend", *job, "--lifetime", "7200")
    assert code == 0, err
    expires = datetime.fromisoformat(cluster["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(seconds=7200))) < timedelta(seconds=30)
    until = "2026-12-31T18:00:00+01:00"
    later = datetime.now(UTC) + timedelta(days=3)
    code, cluster, err = client("extend", *job, "--until", later.isoformat())
    assert code == 0 and abs(datetime.fromisoformat(cluster["expires_at"]) - later) < timedelta(seconds=1), err
    # to another expiry and back: each a change of its own (the first one's answer is not replayed)
    code, _, err = client("extend", *job, "--until", (later + timedelta(days=1)).isoformat())
    assert code == 0, err
    code, cluster, err = client("extend", *job, "--until", later.isoformat())
    assert code == 0 and abs(datetime.fromisoformat(cluster["expires_at"]) - later) < timedelta(seconds=1), err
    # a time without its offset, or past the longest lifetime: refused, the expiry unchanged
    code, _, err = client("extend", *job, "--until", until[:-6])
    assert code == 2 and "UTC offset" in err, err
    code, _, err = client("extend", *job, "--until", (datetime.now(UTC) + timedelta(days=400)).isoformat())
    assert code == 2 and "expires_at" in err, err
    assert VirtualCluster.objects.get(job_id="11.pbs").expires_at == datetime.fromisoformat(cluster["expires_at"])


def host_key(tmp_path):
    """A node's /etc/ssh with a fresh ed25519 host key: (the directory, the public key's path)."""
    keys = tmp_path / "etc-ssh"
    keys.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "ssh_host_ed25519_key")], check=True
    )
    return keys, str(keys / "ssh_host_ed25519_key.pub")


def test_a_nodes_host_key_certified_through_the_client(fabric, celery_worker, client, tmp_path):
    """The node's boot script (or the prologue that made its keys) certifies its host key: the certificate
    beside the key, the user CA and the principals file for its sshd; ssh-keygen reads a host certificate for
    the names the users' ssh_config reaches the node by."""
    code, cluster, err = up(client, "7.pbs")
    assert code == 0, err
    keys, key = host_key(tmp_path)
    code, issued, err = client("host-cert", "--job", "7.pbs", "--node", "n2", "--key", key)
    assert code == 0, err
    assert "certificate" not in issued and issued["node"] == "n2"
    cert = keys / "ssh_host_ed25519_key-cert.pub"
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True).stdout
    assert "host certificate" in shown
    # the node's alias only, never its address (the owner picks it: it could be the gateway's)
    assert all(name in shown for name in issued["principals"]) and "10.0.0.2" not in issued["principals"]
    assert len(issued["principals"]) == 1 and issued["principals"][0].startswith("n2.")
    assert (keys / "virtcloud-user-ca.pub").read_text().startswith("ssh-")
    principals = (keys / f"virtcloud-principals-{issued['node_user']}").read_text()
    assert principals == issued["authorized_principals"] + ("" if principals.endswith("\n") else "\n")
    assert (keys / "virtcloud-revoked-keys").read_bytes().startswith(b"SSHKRL\n\x00")  # sshd's RevokedKeys
    assert oct(cert.stat().st_mode & 0o777) == "0o644"
    # refused: a node the cluster does not have (nothing written), a key file that is not there
    code, _, err = client("host-cert", "--job", "7.pbs", "--node", "n9", "--key", key)
    assert code == 2 and "n9" in err
    code, _, err = client("host-cert", "--job", "7.pbs", "--node", "n1", "--key", str(keys / "missing.pub"))
    assert code == 2 and "missing.pub" in err
    # the private key by mistake (the .pub forgotten): refused before it leaves the node
    code, _, err = client("host-cert", "--job", "7.pbs", "--node", "n2", "--key", str(keys / "ssh_host_ed25519_key"))
    assert code == 2 and "is not a host public key" in err and "nothing was sent" in err
    assert sorted(p.name for p in keys.iterdir()) == sorted(
        ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", cert.name, "virtcloud-user-ca.pub",
         f"virtcloud-principals-{issued['node_user']}", "virtcloud-revoked-keys"]
    )  # fmt: skip
    # the cluster gone: no certificate for its nodes
    assert client("down", "--job", "7.pbs", "--timeout", "60")[0] == 0
    code, _, err = client("host-cert", "--job", "7.pbs", "--node", "n2", "--key", key)
    assert code == 2 and "0 live clusters" in err


def test_a_node_holds_a_node_token_not_the_schedulers(fabric, celery_worker, client, live_server, tmp_path):
    """The prologue makes a token for the job's cluster's nodes (``node-token --write``: mode 0600, the secret
    never printed); the node's boot script and timer certify its host key and fetch who may log in with it and
    ``--cluster`` (it reads no cluster list: ``--job`` is refused with it)."""
    code, cluster, err = up(client, "8.pbs")
    assert code == 0, err
    secret_file = tmp_path / "node-token"
    code, made, err = client("node-token", "--job", "8.pbs", "--write", str(secret_file))
    assert code == 0, err
    assert "token" not in made and made["file"] == str(secret_file) and made["cluster"] == cluster["id"]
    assert made["scopes"] == ["cluster:node"] and oct(secret_file.stat().st_mode & 0o777) == "0o600"
    assert secret_file.read_text().startswith("vc_")

    def on_the_node(*args: str) -> tuple[int, object, str]:
        argv = [sys.executable, "-I", str(CLIENT), "--url", live_server.url, "--token-file", str(secret_file), *args]
        done = subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
        return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr

    keys, key = host_key(tmp_path)
    code, issued, err = on_the_node("host-cert", "--cluster", str(cluster["id"]), "--node", "n2", "--key", key)
    assert code == 0, err
    assert issued["node"] == "n2" and (keys / "ssh_host_ed25519_key-cert.pub").exists()
    code, _, err = on_the_node("host-access", "--cluster", str(cluster["id"]), "--node", "n2", "--dir", str(keys))
    assert code == 0, err
    code, _, err = on_the_node("host-cert", "--job", "8.pbs", "--node", "n2", "--key", key)
    assert code == 2 and "scope" in err, err  # (the cluster list is not a node token's)
    code, _, err = on_the_node("down", "--job", "8.pbs")
    assert code == 2, err
    assert client("down", "--job", "8.pbs", "--timeout", "60")[0] == 0
    code, _, err = on_the_node("host-access", "--cluster", str(cluster["id"]), "--node", "n2", "--dir", str(keys))
    assert code == 2 and "revoked" in err, err  # (ended with its cluster)


def test_a_nodes_timer_keeps_who_may_log_in_current_through_the_client(
    alice, bob, team, fabric, celery_worker, client, tmp_path
):
    """``host-access`` from a timer on the node: the principals file, the user CA and the KRL, written again as
    they are now (bob left the group: gone from the principals file, his revoked certificate in the KRL)."""
    from access import services
    from access.models import Authority, AuthorityKind
    from access.tests.fixtures import make_gateway

    code, cluster, err = up(client, "8.pbs", "--group", team.name)
    assert code == 0, err
    folder = tmp_path / "etc-ssh"
    folder.mkdir()
    stale = folder / "virtcloud-principals-root"  # another account's, written before: it lists nobody now
    stale.write_text(f"{cluster['name']}.alice\n")
    code, shown, err = client("host-access", "--job", "8.pbs", "--node", "n1", "--dir", str(folder))
    assert code == 0, err
    assert "krl" not in shown and shown["node"] == "n1" and shown["node_user"] == "virtcloud"  # (no admin rights)
    assert [ln for ln in stale.read_text().splitlines() if not ln.startswith("#")] == []
    principals = folder / f"virtcloud-principals-{shown['node_user']}"
    assert [ln for ln in principals.read_text().splitlines() if not ln.startswith("#")] == [
        f"{shown['cluster']}.alice",
        f"{shown['cluster']}.bob",
    ]
    user_ca = Authority.objects.get(kind=AuthorityKind.SSH_USER).public_key
    assert (folder / "virtcloud-user-ca.pub").read_text() == user_ca.rstrip("\n") + "\n"
    krl = folder / "virtcloud-revoked-keys"
    assert krl.read_bytes() == services.krl_current()
    assert (
        sorted(p.name for p in folder.iterdir())
        == sorted(Path(f).name for f in shown["files"])
        == sorted([principals.name, krl.name, "virtcloud-user-ca.pub", stale.name])
    )
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o644"}

    make_gateway("gw1")  # bob's certificate is for its bastion
    bobs = services.ssh_certificate_issue(user=bob, cluster=VirtualCluster.objects.get(pk=cluster["id"]))
    bob.groups.remove(team)  # revokes his certificate
    code, shown, err = client("host-access", "--job", "8.pbs", "--node", "n1", "--dir", str(folder))
    assert code == 0, err
    assert [ln for ln in principals.read_text().splitlines() if not ln.startswith("#")] == [f"{shown['cluster']}.alice"]
    (tmp_path / "bob-cert.pub").write_text(bobs.certificate + "\n")
    checked = subprocess.run(
        ["ssh-keygen", "-Q", "-f", str(krl), str(tmp_path / "bob-cert.pub")], capture_output=True, text=True
    )
    assert checked.returncode != 0 and "REVOKED" in checked.stdout, checked.stdout + checked.stderr
    # refused: a node the cluster does not have; the cluster gone
    code, _, err = client("host-access", "--job", "8.pbs", "--node", "n9", "--dir", str(folder))
    assert code == 2 and "n9" in err
    assert client("down", "--job", "8.pbs", "--timeout", "60")[0] == 0
    code, _, err = client("host-access", "--job", "8.pbs", "--node", "n1", "--dir", str(folder))
    assert code == 2 and "0 live clusters" in err


def test_a_nodes_timer_installs_its_host_certificate_again_once_the_clusters_lifetime_was_extended(
    fabric, celery_worker, client, tmp_path
):
    """The node's host certificate ends with its cluster as it was. The scheduler extends the cluster: the node's
    ``host-access --key`` timer gets a new certificate of the same key, until the new end, and writes it with the
    other files as a set; before the extension, and after it once renewed, it leaves the certificate alone."""
    from datetime import timedelta

    from access import ssh
    from access.models import Credential
    from clusters import services

    code, cluster, err = up(client, "6.pbs")
    assert code == 0, err
    keys, key = host_key(tmp_path)
    code, issued, err = client("host-cert", "--job", "6.pbs", "--node", "n2", "--key", key)
    assert code == 0, err
    cert = keys / "ssh_host_ed25519_key-cert.pub"
    first = cert.read_text()
    timer = ("host-access", "--job", "6.pbs", "--node", "n2", "--dir", str(keys), "--key", key)
    code, shown, err = client(*timer)
    assert code == 0, err
    assert shown["host_certificate"] is None and str(cert) not in shown["files"] and cert.read_text() == first

    extended = services.cluster_extend(
        cluster=VirtualCluster.objects.get(pk=cluster["id"]),
        expires_at=VirtualCluster.objects.get(pk=cluster["id"]).expires_at + timedelta(days=2),
    )
    code, shown, err = client(*timer)
    assert code == 0, err
    assert "certificate" not in shown["host_certificate"] and str(cert) in shown["files"]
    renewed = ssh.load_cert(cert.read_text())
    assert renewed.valid_before == int(extended.expires_at.timestamp()) > ssh.load_cert(first).valid_before
    assert renewed.serial == shown["host_certificate"]["serial"] != issued["serial"]
    assert renewed.valid_principals == [p.encode() for p in issued["principals"]]
    assert ssh.public_key_line(renewed.public_key()) == " ".join(Path(key).read_text().split()[:2])
    listed = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True)
    assert "host certificate" in listed.stdout
    assert oct(cert.stat().st_mode & 0o777) == "0o644"
    assert sorted(Path(f).name for f in shown["files"]) == sorted(
        [cert.name, "virtcloud-user-ca.pub", f"virtcloud-principals-{shown['node_user']}", "virtcloud-revoked-keys"]
    )
    # the next run: nothing new, the certificate stays; a key file that is not there: refused, nothing written
    now = cert.read_text()
    code, shown, err = client(*timer)
    assert code == 0 and shown["host_certificate"] is None and cert.read_text() == now, err
    # the renewal's answer was lost (the node still has the first certificate), or the node has none: the next
    # run installs the newest again, nothing new issued
    for had in (first, ""):
        cert.write_text(had)
        code, shown, err = client(*timer)
        assert code == 0 and cert.read_text() == now and shown["host_certificate"]["serial"] == renewed.serial, err
    assert Credential.objects.filter(kind="ssh_host").count() == 2
    code, _, err = client(*timer[:-1], str(keys / "missing.pub"))
    assert code == 2 and "missing.pub" in err


def test_show_reads_every_page_of_the_jobs_clusters(alice, client):
    """More clusters than one page (50) of the list: all of them, in order, each once."""
    from datetime import timedelta

    from django.utils import timezone

    image = Image.objects.create(name="debian", approved=True)
    ended = timezone.now() - timedelta(hours=1)
    VirtualCluster.objects.bulk_create(
        VirtualCluster(
            name=f"c{i}", owner=alice, image=image, connectivity="closed", connectivity_reason="test",
            state=ClusterState.TORN_DOWN, job_id="many.pbs", expires_at=ended, ended_at=ended,
        )
        for i in range(57)
    )  # fmt: skip
    code, shown, err = client("show", "--job", "many.pbs")
    assert code == 0, err
    assert sorted(c["name"] for c in shown) == sorted(f"c{i}" for i in range(57))
    # nothing live among them: the epilogue has nothing to do
    assert client("down", "--job", "many.pbs")[:2] == (0, [])


def test_bad_arguments_are_refused_before_anything_is_sent(alice, client, tmp_path):
    """An empty job id (an epilogue whose job variable is unset) would select every cluster made without one;
    a token over plain http to another host would be read on the way; a malformed token file."""
    code, _, err = client("down", "--job", "")
    assert code == 2 and "job id" in err
    code, _, err = client("show", "--job", "1.pbs", url="http://198.18.0.9")
    assert code == 2 and "must be https" in err
    bad = tmp_path / "bad-token"
    bad.write_text("vc_a vc_b\n")
    argv = [sys.executable, "-I", str(CLIENT), "--url", "https://p", "--token-file", str(bad), "show", "--job", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "malformed" in done.stderr


def test_it_runs_as_a_plain_script_too(alice, client):
    """``python3 clusters/client.py``: its folder (clusters/selectors.py…) never shadows the standard library."""
    assert client("show", "--job", "1.pbs", isolated=False)[:2] == (0, [])


def waiting_portal(wait_max: float, waits: list, *, ready_from: int = 1) -> type[FakePortal]:
    """A portal that makes cluster 7 and answers its long polls as one whose CLUSTER_WAIT_MAX is ``wait_max``: a
    longer ``timeout`` is refused (400, saying the maximum), any other answered at once — provisioning, ready
    from the ``ready_from``-th wait on. Each wait is recorded in ``waits`` as (when, its timeout)."""
    from urllib.parse import parse_qs, urlsplit

    class Portal(FakePortal):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(201, {"id": 7, "name": "mpi", "state": "requested", "state_reason": "", "nodes": []})

        def do_GET(self):
            query = parse_qs(urlsplit(self.path).query)
            if urlsplit(self.path).path.endswith("/wait/"):
                waits.append((time.monotonic(), query.get("timeout")))
                if float(query.get("timeout", ["0"])[0]) > wait_max:
                    refusal = f"Ensure this value is less than or equal to {float(wait_max)}."
                    return self._send(400, {"timeout": [refusal]})
                state = "ready" if len(waits) >= ready_from else "provisioning"
                return self._send(200, {"id": 7, "name": "mpi", "state": state, "state_reason": "", "nodes": []})
            return self._send(200, {"count": 0, "next": None, "results": []})

    return Portal


UP = ["up", "--job", "1.pbs", "--name", "mpi", "--image", "debian", "--node", "name=n1,host=h1,mac=52:54:00:00:00:01"]


def test_a_portal_that_allows_shorter_waits_is_waited_on_as_long_as_it_allows():
    """A portal whose CLUSTER_WAIT_MAX is below the client's 25 s long poll refuses the wait's ``timeout``
    (400, saying its maximum): the client then asks for that — it exited 2, "refused, nothing left allocated",
    right after the portal had made the cluster."""
    waits = []
    code, err = against(waiting_portal(20, waits), *UP)
    assert code == 0, err
    assert [timeout for _at, timeout in waits] == [["25"], ["20"]]


def test_a_portal_that_allows_no_wait_is_asked_once_a_second_within_the_deadline():
    """CLUSTER_WAIT_MAX=0: every wait answers at once. The client asked again without pausing (hundreds of
    requests a second until its deadline); now at most once a second, and never for longer than its own
    ``--timeout`` leaves (it asked the portal's maximum, overshooting the deadline by up to that)."""
    waits = []
    code, err = against(waiting_portal(0, waits, ready_from=5), *UP, "--timeout", "10")
    assert code == 0, err
    assert [timeout for _at, timeout in waits] == [["10"], ["0"], ["0"], ["0"], ["0"]]
    gaps = [b[0] - a[0] for a, b in zip(waits[1:-1], waits[2:], strict=True)]
    assert all(gap >= 0.9 for gap in gaps), gaps


def test_a_cluster_busy_with_another_change_is_temporary():
    """409 ``busy`` (the cluster is still provisioning or updating; the portal says when to retry) is not a
    refusal: the client exits EX_TEMPFAIL (75) so that the scheduler runs the same command again — it exited
    2, "refused"."""

    class Portal(FakePortal):
        def do_GET(self):  # the job's cluster, found by its job id
            cluster = {"id": 7, "name": "mpi", "state": "updating", "state_reason": "", "job_id": "1.pbs", "nodes": []}
            self._send(200, {"count": 1, "next": None, "results": [cluster]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            detail = "cluster mpi is updating network; this needs it to be ready"
            self._send(409, {"detail": detail, "code": "busy"}, retry_after=2)

    code, err = against(Portal, "down", "--job", "1.pbs")
    assert code == 75, err
    assert "busy" in err


def test_up_waits_until_the_access_gateways_have_a_closed_cluster_when_asked(monkeypatch):
    """--wait-access: READY is not yet "users get in" for a closed cluster; the client looks at the cluster's
    access until every gateway carrying it has installed it, and prints it with the cluster. No gateway carrying
    it is said on stderr (nothing to wait for); gateways still updating at the deadline: EX_TEMPFAIL."""
    from clusters import client as scheduler_client

    monkeypatch.setattr(scheduler_client, "ACCESS_POLL", 0.01)
    cluster = {"id": 7, "name": "mpi", "state": "ready", "state_reason": "", "connectivity": "closed", "nodes": []}

    def portal(*answers):
        seen = []

        class Portal(FakePortal):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(201, cluster)

            def do_GET(self):
                seen.append(self.path)
                self._send(200, answers[min(len(seen), len(answers)) - 1])

        return Portal, seen

    up = ["up", "--job", "1.pbs", "--name", "mpi", "--image", "i", "--node", "name=n1,host=h1,mac=52:54:00:00:00:01"]
    Portal, seen = portal({"access_ready": False}, {"access_ready": False}, {"access_ready": True, "gateways": []})
    code, err = against(Portal, *up, "--wait-access")
    assert code == 0, err
    assert seen == ["/api/access/clusters/7/"] * 3

    Portal, seen = portal({"access_ready": None, "gateways": []})
    code, err = against(Portal, *up, "--wait-access")
    assert code == 0 and "no ready access gateway carries cluster mpi" in err

    Portal, seen = portal({"access_ready": False})
    code, err = against(Portal, *up, "--wait-access", "--timeout", "0.2")
    assert code == 75 and "not every access gateway has it yet" in err

    Portal, seen = portal({"access_ready": False})
    code, err = against(Portal, *up)  # not asked: READY is enough
    assert code == 0 and seen == []


class FakePortal(BaseHTTPRequestHandler):
    """A portal that answers what a test's subclass says (``do_GET``/``do_POST`` with ``_send``)."""

    def _send(self, code: int, body: dict, *, retry_after: int | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def against(handler: type[FakePortal], *command: str) -> tuple[int, str]:
    """``client.py --url <a portal answering with handler> --token … <command>`` in-process: (exit code, stderr)."""
    from clusters import client as scheduler_client

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        err = io.StringIO()
        argv = ["--url", f"http://127.0.0.1:{server.server_port}", "--token", "vc_x_y", *command]
        return scheduler_client.main(argv, out=io.StringIO(), err=err), err.getvalue()
    finally:
        server.shutdown()


def test_a_scheduler_plans_a_job_and_asks_whether_the_portal_provisions(fabric, celery_worker, client, settings):
    """``plan`` answers what ``up`` would get and leaves nothing; a refusal exits as ``up``'s would. ``status``
    exits 0 while the portal provisions, 75 once it does not (hold the job)."""
    before = allocated()
    node_args = [arg for node in NODES for arg in ("--node", node)]
    argv = ("plan", "--job", "5.pbs", "--name", "mpi-5", "--image", "my-own", *node_args)
    code, planned, err = client(*argv)
    assert code == 0, err
    assert planned["connectivity"] == "closed" and planned["sites"] == ["brno", "prague"] and planned["pool"]
    assert allocated() == before and not VirtualCluster.objects.filter(job_id="5.pbs").exists()
    settings.CLUSTER_QUOTA_CLUSTERS = 1
    assert up(client, "6.pbs", nodes=("name=n1,host=brno1,mac=52:54:00:00:03:01",))[0] == 0
    code, _, err = client(*argv)
    assert code == 75 and "quota_exceeded" in err  # what `up` would meet: later
    from django.core.cache import cache

    from portal.status import CACHE_KEY

    cache.delete(CACHE_KEY)  # (the answer is kept 10 s)
    code, status, err = client("status")
    assert code == 0 and status["status"] == "ok", (status, err)
    celery_worker.stop()
    cache.delete(CACHE_KEY)
    code, status, err = client("status")
    assert code == 75 and status["status"] == "down" and "hold the job" in err


def test_a_token_file_others_may_read_is_said_at_every_run(tmp_path):
    """A ``clusters:manage`` token on a shared scheduler host, world-readable: anyone there could act as the
    middleware. The client (and the gateway's pull) says so at every run; a file only its owner reads is fine."""
    from access.gateway import outgoing
    from clusters import client as cli

    token = tmp_path / "token"
    token.write_text("vc_abc_def\n")
    token.chmod(0o644)
    assert "open to others than its owner (mode 644): chmod 600 it" in outgoing.exposed_token_file(str(token))
    out, err = io.StringIO(), io.StringIO()
    cli.main(["--url", "http://127.0.0.1:9", "--token-file", str(token), "status"], out=out, err=err)
    assert f"virtcloud: warning: {token} is open to others than its owner" in err.getvalue()
    token.chmod(0o600)
    assert outgoing.exposed_token_file(str(token)) == ""
    out, err = io.StringIO(), io.StringIO()
    cli.main(["--url", "http://127.0.0.1:9", "--token-file", str(token), "status"], out=out, err=err)
    assert "warning" not in err.getvalue()

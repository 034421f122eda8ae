"""End to end with the real ``openvpn``: everything from the portal — the gateway's configuration and keys
(``manage.py gateway config``), its state (VLAN map, CRL, AA), the user's downloaded profile — and the
gateway's own hooks. A "user workstation" namespace connects to a gateway namespace over a veth pair.

Proves: the downloaded profile connects and lands on the cluster's VLAN (tagged frames on the trunk tap);
asking for a cluster the AC does not cover → AUTH_FAILED; revoking in the portal installs the new CRL at
the (local) gateway, cuts the live session, and the reconnect is refused. All of it with OpenVPN as
``gateway config`` sets it up by default: dropped to nobody:nogroup after start, its hooks unprivileged too
(they read the state as its group, write their records as that user), the session cut by the root pull
through the management socket, the revoked certificate refused by ``crl-verify`` reading the new CRL. After
``gateway config --re-enrol`` and a restart, a profile downloaded before refuses the gateway (it pins the old
certificate) and a new one connects.
"""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command

from access import services
from access.gateway import vpn as vpn_hooks
from access.gateway.state import RunAs
from access.models import Credential
from access.selectors import cluster_label
from access.tests._procs import can_use_netns, gateway_pair, reachable_for, read, stop, tagged_frame_seen, wait_for
from access.tests.fixtures import cluster, gateway, make_cluster

_skip = can_use_netns() or (None if shutil.which("openvpn") else "openvpn binary not installed")
pytestmark = [pytest.mark.lab, pytest.mark.skipif(bool(_skip), reason=_skip or ""), pytest.mark.django_db]

GW_ADDR, WS_ADDR = "198.18.246.1", "198.18.246.2"


@pytest.fixture
def vpn_lab(tmp_path, gateway, cluster):  # the cluster exists before the gateway state is written
    with gateway_pair("ws", GW_ADDR, WS_ADDR) as (_prefix, gw, ws, tap, procs):
        state = tmp_path / "gw"
        gateway.address = GW_ADDR
        gateway.local_state_dir = str(state)  # revocations are installed here at commit
        gateway.save()
        call_command("gateway", "config", gateway.name, "--dir", str(state), "--dev", tap, "--vpn-local", GW_ADDR)
        run_as = RunAs.lookup("nobody", "nogroup")  # gateway config's default
        hooks = (state / "vpn" / "crl.pem", sys.executable, Path(vpn_hooks.__file__))
        log = tmp_path / "server.log"

        def start_server():
            with reachable_for(run_as, hooks) as prefix:  # (its log: a file of this namespace, open on its stdout)
                started = gw.popen(*prefix, "openvpn", "--config", str(state / "openvpn.conf"), log=log)
                procs.append(started)
                wait_for(
                    lambda: read(log).count("Initialization Sequence Completed") > done, 10, what="openvpn server start"
                )
            return started

        done = 0
        server = start_server()
        assert "UID set to nobody" in read(log) and "GID set to nogroup" in read(log), read(log)
        ids = dict(line.split(":\t", 1) for line in Path(f"/proc/{server.pid}/status").read_text().splitlines())
        assert ids["Uid"].split() == [str(run_as.uid)] * 4 and ids["Gid"].split() == [str(run_as.gid)] * 4
        assert "0" not in ids["Groups"].split()  # (no supplementary group of root's is kept)

        class Lab:
            pass

        lab = Lab()
        lab.gw, lab.ws, lab.tap, lab.log, lab.procs, lab.tmp, lab.state = gw, ws, tap, log, procs, tmp_path, state
        lab.run_as = run_as
        lab.gateway = gateway

        def restart_server():  # what the operator does after a re-enrolment
            nonlocal done, server
            done = read(log).count("Initialization Sequence Completed")
            stop(server)
            server = start_server()

        lab.restart_server = restart_server
        yield lab


def _connect(lab, text: str, name: str, dev: str) -> tuple[subprocess.Popen, Path]:
    # A workstation's openvpn 2.x with the downloaded file; only the tap's name is pinned, for the capture.
    path = lab.tmp / f"{name}.ovpn"
    path.write_text(text.replace("\ndev tap\n", f"\ndev {dev}\n"))
    os.chmod(path, 0o600)
    log = lab.tmp / f"{name}.log"
    proc = lab.ws.popen("openvpn", "--config", str(path), "--log", str(log))
    lab.procs.append(proc)
    wait_for(
        lambda: "Initialization Sequence Completed" in read(log) or "AUTH_FAILED" in read(log),
        15,
        what=f"client {name}",
    )
    return proc, log


def test_downloaded_profile_lands_on_the_cluster_vlan_and_revocation_cuts_it(
    vpn_lab, alice, team, cluster, django_capture_on_commit_callbacks
):
    label = cluster_label(cluster)
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    proc, log = _connect(vpn_lab, text, "alice", "vce1")
    assert "Initialization Sequence Completed" in read(log), read(log)[-2000:]
    wait_for(
        lambda: (
            f"ACCEPT cn=alice serial={credential.serial}: cluster {label} -> vlan-pvid {cluster.vlan_id}"
            in read(vpn_lab.log)
        ),
        10,
        what="the gateway's ACCEPT line",
    )
    frame = tagged_frame_seen(
        vpn_lab.gw, vpn_lab.tap, vpn_lab.ws, "vce1", cluster.vlan_id, "198.18.247.1", "198.18.247.250"
    )
    assert f"vlan {cluster.vlan_id}" in frame, frame
    # the hooks ran as nobody: what they wrote is theirs (the AC cache, the session's record)
    written = [vpn_lab.state / "vpn" / "run" / "sessions" / f"{credential.serial}.json"]
    written += list((vpn_lab.state / "vpn" / "run" / "ac-cache").iterdir())
    assert len(written) == 2 and {p.stat().st_uid for p in written} == {vpn_lab.run_as.uid}
    # what the pull reports to the portal: the session, from the workstation, on the cluster (access.gateway.report)
    from access.api.serializers import SessionsReportSerializer
    from access.gateway import report
    from access.models import GatewaySession

    collected = report.collect(vpn_lab.state)
    [up] = collected["vpn"]
    assert (up["serial"], up["cluster"], up["peer"][0]) == (credential.serial, label, WS_ADDR)
    reported = SessionsReportSerializer(data=json.loads(json.dumps(collected)))  # (as it crosses the network)
    assert reported.is_valid(), reported.errors
    assert reported.validated_data["skipped"] == 0
    services.gateway_sessions_report(
        gateway=vpn_lab.gateway, vpn=reported.validated_data["vpn"], ssh=reported.validated_data["ssh"]
    )
    assert GatewaySession.objects.get().credential == credential

    # "I lost my laptop": the portal revokes; the local gateway gets the CRL and cuts the session.
    with django_capture_on_commit_callbacks(execute=True):
        services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    wait_for(lambda: "Halt command was pushed by server" in read(log), 15, what="the live session cut")
    stop(proc)
    again, again_log = _connect_refused(vpn_lab, text, "alice-again")
    assert "Initialization Sequence Completed" not in read(again_log)
    wait_for(lambda: "error=certificate revoked: O=VirtCloud, CN=alice" in read(vpn_lab.log), 10, what="refusal")
    stop(again)


def _connect_refused(lab, text: str, name: str) -> tuple[subprocess.Popen, Path]:
    path = lab.tmp / f"{name}.ovpn"
    path.write_text(text.replace("\ndev tap\n", "\ndev vce9\n") + "connect-retry-max 1\n")
    os.chmod(path, 0o600)
    log = lab.tmp / f"{name}.log"
    proc = lab.ws.popen("openvpn", "--config", str(path), "--log", str(log))
    lab.procs.append(proc)
    time.sleep(3)
    return proc, log


def test_a_cluster_outside_the_ac_is_refused(vpn_lab, alice, team, cluster):
    other = make_cluster(alice, name="other")
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    forged_choice = text.replace(
        f"setenv UV_VCLUSTER {cluster_label(cluster)}", f"setenv UV_VCLUSTER {cluster_label(other)}"
    )
    proc, log = _connect(vpn_lab, forged_choice, "alice-other", "vce2")
    assert "AUTH_FAILED" in read(log), read(log)[-2000:]
    assert f"cluster {cluster_label(other)} is not in the AC" in read(vpn_lab.log)
    stop(proc)


def test_only_root_may_use_the_management_interface(vpn_lab):
    """Its socket is made before OpenVPN drops its privileges, in a directory the unprivileged account may search
    (its hooks' files are below it): OpenVPN answers root's connections only (the pull's, which cut sessions)."""
    sock = vpn_lab.state / "vpn" / "run" / "management.sock"
    banner = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(5)\n"
        "s.connect(sys.argv[1])\n"
        "print(repr(s.recv(100)))\n"
    )
    ids = [f"--reuid={vpn_lab.run_as.uid}", f"--regid={vpn_lab.run_as.gid}", "--clear-groups"]
    with reachable_for(vpn_lab.run_as, [sock, "/usr/bin/python3"]) as prefix:
        as_nobody = subprocess.run(
            [*prefix, "setpriv", *ids, "/usr/bin/python3", "-c", banner, str(sock)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    assert as_nobody.stdout.strip() == "b''", as_nobody  # connected (the directory let it), then hung up on
    as_root = subprocess.run(
        ["/usr/bin/python3", "-c", banner, str(sock)], capture_output=True, text=True, timeout=10, check=True
    )
    assert "OpenVPN Management Interface" in as_root.stdout, as_root


def test_after_a_re_enrolment_the_profiles_made_before_refuse_the_gateway_and_new_ones_connect(vpn_lab, alice, cluster):
    """``gateway config --re-enrol`` (the gateway's key was exposed): once OpenVPN is restarted on the new keys, a
    profile downloaded before no longer reaches the gateway — its tls-crypt key is the old one, which the gateway
    drops unread, and it pins the old certificate, which whoever holds the old keys could still present — and one
    downloaded now connects."""
    from io import StringIO

    before, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    proc, log = _connect(vpn_lab, before, "before", "vce3")
    assert "Initialization Sequence Completed" in read(log), read(log)[-2000:]
    stop(proc)

    out = StringIO()
    call_command(
        "gateway",
        "config",
        "gw1",
        "--dir",
        str(vpn_lab.state),
        "--dev",
        vpn_lab.tap,
        "--vpn-local",
        GW_ADDR,
        "--re-enrol",
        stdout=out,
    )
    assert "re-enrolled: restart its OpenVPN" in out.getvalue()
    vpn_lab.restart_server()
    old, old_log = _connect_refused(vpn_lab, before, "before-again")
    wait_for(lambda: "tls-crypt unwrap error" in read(vpn_lab.log), 10, what="the gateway to drop the old profile")
    assert "Initialization Sequence Completed" not in read(old_log)
    stop(old)

    after, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    proc, log = _connect(vpn_lab, after, "after", "vce4")
    assert "Initialization Sequence Completed" in read(log), read(log)[-2000:]
    stop(proc)

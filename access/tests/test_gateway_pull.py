"""``manage.py gateway config|pull`` against a live portal over HTTP."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import io
import json
import os
import stat

import pytest
from cryptography import x509
from django.core.management import CommandError, call_command

from access import pki, services
from access.gateway.state import write_atomic
from access.models import Authority, AuthorityKind, Credential, RetiredHostKey
from access.selectors import cluster_label
from access.tests.fixtures import cluster, gateway, make_cluster
from access.tests.profile_check import parse_profile
from portal.models import TokenScope
from portal.tokens import token_create


def run(*args) -> str:
    out = io.StringIO()
    call_command("gateway", *args, stdout=out, stderr=out)
    return out.getvalue()


@pytest.mark.django_db
def test_config_prints_both_configs(gateway):
    text = run("config", "gw1", "--state-dir", "/srv/gw")
    assert "vlan-tagging" in text and "crl-verify /srv/gw/vpn/crl.pem" in text
    assert "TrustedUserCAKeys /srv/gw/ssh/user_ca.pub" in text and "AllowUsers virtcloud" in text


@pytest.mark.django_db
def test_config_enrols_and_writes_a_working_state(alice, cluster, gateway, tmp_path):
    run("config", "gw1", "--dir", str(tmp_path))
    key = tmp_path / "vpn" / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(Authority.objects.get(kind=AuthorityKind.VPN).certificate.encode())
    server = x509.load_pem_x509_certificate((tmp_path / "vpn" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    gateway.refresh_from_db()
    assert server.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == gateway.server_name
    assert "PRIVATE KEY" not in gateway.server_certificate
    assert (tmp_path / "vpn" / "tls-crypt.key").read_text() == str(gateway.tls_crypt_key)
    assert json.loads((tmp_path / "vpn" / "vlans.json").read_text())["clusters"] == {
        cluster_label(cluster): cluster.vlan_id
    }
    principals = (tmp_path / "ssh" / "principals" / "virtcloud").read_text()
    assert f'permitopen="node1.{cluster_label(cluster)}:22" {cluster_label(cluster)}.alice' in principals
    assert (tmp_path / "ssh" / "host_key-cert.pub").read_text().startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert (tmp_path / "openvpn.conf").exists() and (tmp_path / "sshd_config").exists()
    # Fail closed: OpenVPN renegotiates (tls-verify again) every GATEWAY_STATE_MAX_AGE; sshd asks the
    # principals command, which reads the same fresh-until as the VPN hooks.
    assert "reneg-sec 600\n" in (tmp_path / "openvpn.conf").read_text()
    command = tmp_path / "ssh" / "principals-command"
    assert f"AuthorizedPrincipalsCommand {command} %u" in (tmp_path / "sshd_config").read_text()
    assert stat.S_IMODE(command.stat().st_mode) == 0o755 and str(tmp_path / "fresh-until") in command.read_text()
    gateway.refresh_from_db()
    assert gateway.state_as_of is not None  # the state written here is installed
    # The profile a user downloads now pins this gateway's certificate name.
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    assert f'verify-x509-name "{gateway.server_name}" name' in text
    # Running config again keeps the keys (no accidental re-enrolment), and says nothing of what the running
    # gateway has installed (this may be a directory copied over later): its next pull does
    before = key.read_bytes()
    as_of = gateway.state_as_of
    services.credential_revoke(credential=Credential.objects.get(user=alice), reason="key_compromise", by=alice)
    run("config", "gw1", "--dir", str(tmp_path))
    assert key.read_bytes() == before
    gateway.refresh_from_db()
    assert gateway.state_as_of == as_of


@pytest.mark.django_db(transaction=True)
def test_pull_with_etag_revocation_and_portal_down(live_server, alice, root, team, gateway, tmp_path):
    cluster = make_cluster(alice, name="mpi", group=team)
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    state = tmp_path / "state"
    args = ("pull", "--url", live_server.url, "--token-file", str(token_file), "--dir", str(state))

    assert "updated" in run(*args)
    crl_path = state / "vpn" / "crl.pem"
    first_crl = crl_path.read_bytes()
    assert json.loads((state / "vpn" / "vlans.json").read_text())["clusters"] == {
        cluster_label(cluster): cluster.vlan_id
    }
    assert "unchanged" in run(*args)  # 304

    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    assert "updated" in run(*args)
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(credential.serial) is not None
    assert json.loads((state / "vpn" / "revoked.json").read_text()) == [credential.serial]

    # Portal unreachable: exit 75 and the last good state stays.
    good = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    down = ("pull", "--url", "http://127.0.0.1:9", "--token", secret, "--dir", str(state), "--timeout", "2")
    with pytest.raises(SystemExit) as info:
        run(*down)
    assert info.value.code == 75
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == good
    assert crl_path.read_bytes() != first_crl

    # An unreadable token file: a clear error, state kept.
    with pytest.raises(CommandError, match="cannot read the gateway token"):
        run("pull", "--url", live_server.url, "--token-file", str(tmp_path / "missing"), "--dir", str(state))
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == good

    # A revoked gateway token: refused, state kept.
    from portal.tokens import token_revoke

    token_revoke(token=token)
    with pytest.raises(SystemExit):
        run(*args)
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == good


@pytest.mark.django_db(transaction=True)
def test_a_state_copied_over_the_installed_one_is_replaced_not_renewed(
    live_server, alice, root, team, gateway, tmp_path
):
    """The README's way: a directory made by ``gateway config --dir`` on the portal's host, copied over the live
    one (again after an upgrade). Its state is older than the one the gateway had pulled since: the next pull
    asks with the etag of what is installed now, and installs the current state again — a separate record of
    the last etag fetched answered 304 and kept the older CRL, renewed as fresh at every pull."""
    import shutil

    from access.gateway import pull as install

    cluster = make_cluster(alice, name="mpi", group=team)
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    state, staged = tmp_path / "state", tmp_path / "staged"
    args = ("pull", "--url", live_server.url, "--token", secret, "--dir", str(state))
    run("config", "gw1", "--dir", str(staged))  # (made now: the state before the revocation)
    assert "updated" in run(*args)
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    assert "updated" in run(*args)
    assert json.loads((state / "vpn" / "revoked.json").read_text()) == [credential.serial]

    shutil.copytree(staged, state, dirs_exist_ok=True)  # the older state is installed again
    assert json.loads((state / "vpn" / "revoked.json").read_text()) == []
    assert "updated" in run(*args)  # (not "unchanged": a 304 would have kept the older state)
    assert json.loads((state / "vpn" / "revoked.json").read_text()) == [credential.serial]
    assert "unchanged" in run(*args)
    assert install.installed(state)["etag"] == services.gateway_state(gateway=gateway)["etag"]


@pytest.mark.django_db
def test_a_failed_rename_leaves_the_record_of_what_is_installed_and_no_temporary_file(
    alice, cluster, gateway, tmp_path, monkeypatch
):
    """The record of what is installed and its freshness replace theirs last: a rename that fails half-way (an
    immutable file, a bind mount) leaves the old record — the half-installed state goes on ageing towards
    refusing everyone, and the next pull reports the state it really had (they were renamed first: a failing
    install made the old CRL fresh again at every pull, and the portal counted the new state as installed) —
    and no temporary file behind."""
    from access.gateway import pull as install
    from access.gateway import state as gw_state

    state = tmp_path / "state"
    first = services.gateway_state(gateway=gateway)
    install.install_state(state, first, fetched_at=None, cut_sessions=False)
    record, fresh = install.installed_path(state).read_bytes(), install.fresh_until_path(state).read_bytes()
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    services.credential_revoke(credential=Credential.objects.get(), reason="key_compromise", by=alice)
    second = services.gateway_state(gateway=gateway)
    assert second["etag"] != first["etag"]
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("revoked.json"):
            raise PermissionError(1, "Operation not permitted", str(dst))
        return real(src, dst)

    monkeypatch.setattr(gw_state.os, "replace", failing)
    with pytest.raises(PermissionError):
        install.install_state(state, second, fetched_at=None, cut_sessions=False)
    assert install.installed_path(state).read_bytes() == record
    assert install.fresh_until_path(state).read_bytes() == fresh
    assert install.installed(state)["etag"] == first["etag"]
    assert [p for p in state.rglob("*") if ".tmp" in p.name] == []


@pytest.mark.django_db
def test_another_gateways_state_is_refused_by_a_state_directory(alice, cluster, gateway, tmp_path):
    """Two gateways set up together, the tokens swapped: gw2's state — its VLAN map for its trunk and site,
    where an id may be another cluster's — is refused by gw1's state directory, and nothing of it written;
    gw1 renamed in the portal is still gw1."""
    from access.gateway import pull as install
    from access.gateway.state import StateError
    from access.tests.fixtures import make_gateway

    state = tmp_path / "state"
    install.install_state(state, services.gateway_state(gateway=gateway), cut_sessions=False)
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    other = make_gateway("gw2", vpn_port=1195)
    with pytest.raises(StateError, match="it is gateway gw2's, and this state directory is gateway gw1's"):
        install.install_state(state, services.gateway_state(gateway=other), cut_sessions=False)
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before
    gateway.name = "gw1-renamed"
    gateway.save()
    make_cluster(alice, name="later")
    report = install.install_state(state, services.gateway_state(gateway=gateway), cut_sessions=False)
    assert report.written and install.installed(state)["gateway"] == "gw1-renamed"


def test_pull_refuses_redirects_and_plain_http_to_another_host():
    """urllib would send the token along a redirect; the state (CA, AA, CRL) is not signed, so plain http is
    only for a portal on this host."""
    import http.server
    import threading

    from access.gateway.agent import PullError, fetch_state

    seen: list[str | None] = []

    class Portal(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            if self.path.startswith("/elsewhere"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")
                return
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere/")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PullError, match="a redirect to http://127.0.0.1:.*/elsewhere/: refused"):
            fetch_state(f"http://127.0.0.1:{server.server_port}", "vc_secret", etag=None, timeout=5)
        assert seen == ["Bearer vc_secret"]  # the redirect target never got the token
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(PullError, match="must be https"):
        fetch_state("http://198.18.0.9", "vc_secret", etag=None)
    with pytest.raises(PullError, match="must be https"):
        fetch_state("ftp://portal.example.org", "vc_secret", etag=None)


@pytest.mark.django_db(transaction=True)
def test_a_cut_that_failed_is_tried_again_by_the_next_pull_even_when_unchanged(
    live_server, alice, root, team, gateway, tmp_path
):
    """The pull that brought a revocation could not reach OpenVPN's management socket: the state is
    installed (new CRL), but the revoked certificate's live session is still up. The next pull finds the
    document unchanged (304) and must still cut it, not wait for the next change of the state."""
    import time

    from access.gateway import vpn
    from access.gateway.state import VpnState, write_atomic
    from access.tests.test_gateway_sessions import FakeManagement

    cluster = make_cluster(alice, name="mpi", group=team)
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    state_dir = tmp_path / "state"
    args = ("pull", "--url", live_server.url, "--token", secret, "--dir", str(state_dir))
    assert "updated" in run(*args)

    # alice's profile is up on this gateway (what tls-verify and client-connect recorded).
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    state = VpnState.at(state_dir)
    fingerprint = credential.fingerprint
    entry = {
        "serial": credential.serial,
        "clusters": {cluster_label(cluster): "member"},
        "not_after": time.time() + 3600,
    }
    write_atomic(state.ac_cache / f"{fingerprint}.json", json.dumps(entry))
    env = {"tls_digest_sha256_0": fingerprint, "common_name": "alice", "trusted_ip": "203.0.113.5", "trusted_port": "4"}
    vpn.client_connect(state, str(tmp_path / "ccd"), {**env, "UV_VCLUSTER": cluster_label(cluster)})

    services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    assert "could not cut" in run(*args)  # no management socket at this moment
    fake = FakeManagement(state.management, {1: ("alice", "203.0.113.5:4"), 2: ("bob", "198.51.100.7:9")})
    try:
        out = run(*args)
        assert "unchanged" in out
        assert fake.sessions == {2: ("bob", "198.51.100.7:9")}, out
        assert f"cut the sessions of serials {credential.serial}" in out
        assert "cut the sessions" not in run(*args)  # once
    finally:
        fake.close()


@pytest.mark.django_db(transaction=True)
def test_each_pull_keeps_the_state_fresh_and_tells_the_portal_what_it_installed(
    live_server, alice, root, gateway, tmp_path, settings
):
    """fresh-until = the start of the last successful pull + max_age (a 304 too); each pull reports the
    generated_at of the installed state, which is what lets the portal hand out again the VLAN ids released
    before it."""
    import datetime as dt
    import time

    from django.utils import timezone

    from access.gateway import pull
    from access.gateway.state import fresh_until_path, fresh_until_text, write_atomic

    def made(doc: dict) -> dt.datetime:
        return dt.datetime.fromisoformat(doc["generated_at"])

    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    state = tmp_path / "state"
    args = ("pull", "--url", live_server.url, "--token", secret, "--dir", str(state))
    fresh = fresh_until_path(state)

    before = time.time()
    assert "updated" in run(*args)
    installed = pull.installed(state)
    assert installed["max_age"] == settings.GATEWAY_STATE_MAX_AGE
    assert before - 1 <= int(fresh.read_text()) - settings.GATEWAY_STATE_MAX_AGE <= time.time()
    gateway.refresh_from_db()
    assert gateway.state_as_of is None  # it got a state; the portal does not know yet that it installed it

    write_atomic(fresh, fresh_until_text(time.time() + 5), 0o644)  # (as if the last pull were long ago)
    before = time.time()
    assert "unchanged" in run(*args)  # 304: the installed state is current
    assert int(fresh.read_text()) >= int(before) + settings.GATEWAY_STATE_MAX_AGE - 1
    gateway.refresh_from_db()
    # the current state's generated_at (made for this request: after the installed one)
    as_of = gateway.state_as_of
    assert made(installed) <= as_of <= timezone.now()

    make_cluster(alice, name="new")  # the state changes: the next pull is a 200 that says what it had
    time.sleep(0.1)  # (a state made later than the last one)
    assert "updated" in run(*args)
    gateway.refresh_from_db()
    assert gateway.state_as_of == as_of  # it reported the state it had: nothing newer (and as_of never goes back)
    assert made(pull.installed(state)) > as_of
    assert "unchanged" in run(*args)
    gateway.refresh_from_db()
    assert made(pull.installed(state)) <= gateway.state_as_of <= timezone.now()


@pytest.mark.django_db(transaction=True)
def test_a_gateway_cut_off_from_the_portal_fails_closed_once_its_state_expires(
    live_server, alice, root, team, gateway, tmp_path
):
    """Until max_age after its last good pull it keeps authorizing from that state; then the pull that fails
    cuts every live session it recorded (the hooks already refuse everyone: see test_openvpn_gateway)."""
    import time

    from access.gateway import vpn
    from access.gateway.state import VpnState, fresh_until_path, fresh_until_text, write_atomic
    from access.tests.test_gateway_sessions import FakeManagement

    cluster = make_cluster(alice, name="mpi", group=team)
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    state_dir = tmp_path / "state"
    assert "updated" in run("pull", "--url", live_server.url, "--token", secret, "--dir", str(state_dir))
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    state = VpnState.at(state_dir)
    entry = {"serial": credential.serial, "clusters": {cluster_label(cluster): "member"}, "not_after": time.time() + 60}
    write_atomic(state.ac_cache / f"{credential.fingerprint}.json", json.dumps(entry))
    env = {"tls_digest_sha256_0": credential.fingerprint, "common_name": "alice", "trusted_ip": "203.0.113.5"}
    env["UV_VCLUSTER"] = cluster_label(cluster)
    vpn.client_connect(state, str(tmp_path / "ccd"), {**env, "trusted_port": "4"})

    status = run("status", "--dir", str(state_dir))
    assert "current: trusted for" in status and "recorded sessions: 1 VPN certificate(s), 0 SSH" in status

    down = ("pull", "--url", "http://127.0.0.1:9", "--token", secret, "--dir", str(state_dir), "--timeout", "2")
    fake = FakeManagement(state.management, {1: ("alice", "203.0.113.5:4"), 2: ("bob", "198.51.100.7:9")})
    try:
        out = io.StringIO()
        with pytest.raises(SystemExit) as info:
            call_command("gateway", *down, stdout=out, stderr=out)
        assert info.value.code == 75 and "keeping the last good state" in out.getvalue()
        assert len(fake.sessions) == 2  # still fresh: nothing cut

        write_atomic(fresh_until_path(state_dir), fresh_until_text(time.time() - 1), 0o644)
        out = io.StringIO()
        with pytest.raises(SystemExit) as info:
            call_command("gateway", *down, stdout=out, stderr=out)
        assert info.value.code == 75
        assert "has expired: refusing everyone" in out.getvalue()
        assert f"cut the sessions of serials {credential.serial}" in out.getvalue()
        assert fake.sessions == {2: ("bob", "198.51.100.7:9")}  # (bob's was not recorded here)
        with pytest.raises(vpn.Refused, match="the pulled state expired"):
            vpn.client_connect(state, str(tmp_path / "ccd"), {**env, "trusted_port": "5"})
        out = io.StringIO()
        with pytest.raises(SystemExit) as info:  # what a monitoring check sees
            call_command("gateway", "status", "--dir", str(state_dir), stdout=out)
        assert info.value.code == 1 and "REFUSING everyone: the pulled state expired" in out.getvalue()
    finally:
        fake.close()
    # The portal is back: the next pull makes the state fresh again.
    assert "unchanged" in run("pull", "--url", live_server.url, "--token", secret, "--dir", str(state_dir))
    vpn.client_connect(state, str(tmp_path / "ccd"), {**env, "trusted_port": "6"})


@pytest.mark.django_db(transaction=True)
def test_on_change_hook_gets_each_clusters_vlan_and_nodes_and_runs_until_it_succeeds(
    live_server, alice, root, team, gateway, tmp_path
):
    """The bastion needs a leg in each closed cluster: the pull writes ssh/clusters.json (VLAN and nodes per
    cluster) and runs the operator's --on-change hook after a change; a hook that failed runs again at the next
    pull, even an unchanged one (and the pull exits 1 meanwhile), then only after changes."""
    from clusters.models import Node, VirtualCluster

    cluster = make_cluster(alice, name="mpi", group=team, nodes=("node1", "node2"))
    Node.objects.filter(cluster=cluster, name="node1").update(address="10.0.0.5")
    VirtualCluster.objects.filter(pk=cluster.pk).update(bastion_address="10.0.0.254/24")
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    state = tmp_path / "state"
    calls = tmp_path / "calls"
    hook = tmp_path / "legs.sh"
    hook.write_text(
        '#!/bin/sh\necho "$VIRTCLOUD_STATE_DIR" >> "$1"\n[ -e "$2" ] && { echo "no trunk" >&2; exit 3; }\nexit 0\n'
    )
    hook.chmod(0o755)
    broken = tmp_path / "broken"
    broken.touch()
    args = ("pull", "--url", live_server.url, "--token", secret, "--dir", str(state))
    on_change = ("--on-change", f"{hook} {calls} {broken}")

    with pytest.raises(SystemExit) as exited:
        run(*args, *on_change)
    assert exited.value.code == 1
    label = cluster_label(cluster)
    legs = json.loads((state / "ssh" / "clusters.json").read_text())["clusters"]
    assert legs == {
        label: {
            "vlan": cluster.vlan_id,
            "bastion_address": "10.0.0.254/24",
            "nodes": [
                {"name": "node1", "alias": f"node1.{label}", "address": "10.0.0.5"},
                {"name": "node2", "alias": f"node2.{label}", "address": f"node2.{label}"},
            ],
        }
    }
    assert "no trunk" in (state / ".on-change-failed").read_text()
    assert calls.read_text().splitlines() == [str(state.absolute())]
    out = io.StringIO()
    with pytest.raises(SystemExit) as status:  # what a monitoring check sees: current, but the hook failed
        call_command("gateway", "status", "--dir", str(state), stdout=out)
    assert (
        status.value.code == 2 and "the --on-change hook failed at the last pull (exit 3: no trunk)" in out.getvalue()
    )

    broken.unlink()  # the operator fixed it: the unchanged state's pull runs the hook again, once
    out = run(*args, *on_change)
    assert "unchanged" in out and "--on-change ran" in out
    assert not (state / ".on-change-failed").exists()
    assert "current" in run("status", "--dir", str(state))  # (no exit: all is well)
    assert "--on-change ran" not in run(*args, *on_change)
    assert len(calls.read_text().splitlines()) == 2

    make_cluster(alice, name="other")  # a change: the hook runs
    assert "--on-change ran" in run(*args, *on_change)
    assert len(calls.read_text().splitlines()) == 3
    assert len(json.loads((state / "ssh" / "clusters.json").read_text())["clusters"]) == 2

    # The gateway reboots: its legs are gone, the state on disk is not (the pull gets a 304). The hook runs
    # once in the new boot.
    (state / ".on-change-ran").write_text("an-earlier-boot\n")
    out = run(*args, *on_change)
    assert "unchanged" in out and "--on-change ran" in out
    assert len(calls.read_text().splitlines()) == 4
    assert "--on-change ran" not in run(*args, *on_change)


@pytest.mark.django_db(transaction=True)
def test_a_pull_killed_while_its_hook_runs_leaves_the_hook_due(live_server, root, gateway, tmp_path):
    """The state was installed, the hook was running when the pull was killed (its unit's time limit, a
    shutdown): the next pull, a 304, runs it again."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from access.services import gateway_token_issue

    token_file = tmp_path / "token"
    token_file.write_text(gateway_token_issue(gateway=gateway, by=root) + "\n")
    state = tmp_path / "state"
    started = tmp_path / "started"
    hook = tmp_path / "slow.sh"
    hook.write_text(f"#!/bin/sh\necho run >> {started}\n[ -e {tmp_path}/fast ] && exit 0\nexec sleep 60\n")
    hook.chmod(0o755)
    agent = Path(__file__).resolve().parents[1] / "gateway" / "agent.py"
    argv = [sys.executable, "-I", str(agent), "pull", "--url", live_server.url, "--token-file", str(token_file)]
    argv += ["--dir", str(state), "--on-change", str(hook)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.stderr.read() if proc.poll() is not None else "the hook never started"
        status = [sys.executable, "-I", str(agent), "status", "--dir", str(state)]
        running = subprocess.run(status, capture_output=True, text=True, timeout=30, check=False)
        # a monitoring check meanwhile: not a failure
        assert running.returncode == 0 and f"the --on-change hook is running (the pull of pid {proc.pid})" in (
            running.stdout
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the pull and its hook, as systemd's time limit does
        proc.wait()
    assert (state / ".on-change-failed").exists()
    killed = subprocess.run(status, capture_output=True, text=True, timeout=30, check=False)
    assert killed.returncode == 2 and "the --on-change hook failed at the last pull" in killed.stdout
    (tmp_path / "fast").touch()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "unchanged" in done.stdout and "--on-change ran" in done.stdout, done.stderr
    assert started.read_text().splitlines() == ["run", "run"]
    assert not (state / ".on-change-failed").exists()


def test_fetch_state_survives_a_broken_answer_and_a_path_without_its_slash(monkeypatch):
    """An answer that is not HTTP at all is the portal being unavailable (exit 75, the state kept), not a crash;
    the state's URL given without its trailing slash is still the state's URL; a proxy of the environment is
    never used for this host (it would get the token of a plain-http pull)."""
    import socket
    import threading

    from access.gateway.agent import PullError, fetch_state

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    paths: list[bytes] = []

    def serve(answers):
        for answer in answers:
            conn, _ = listener.accept()
            paths.append(conn.recv(4096).split(b"\r\n", 1)[0])
            conn.sendall(answer)
            conn.close()

    ok = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nETag: "e1"\r\n\r\n{}'
    thread = threading.Thread(target=serve, args=([b"garbage\r\n\r\n", ok],), daemon=True)
    thread.start()
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that would refuse: never asked
    try:
        with pytest.raises(PullError, match="cannot reach the portal"):
            fetch_state(f"http://127.0.0.1:{port}", "vc_secret", etag=None, timeout=5)
        doc, etag = fetch_state(f"http://127.0.0.1:{port}/api/access/gateway/state", "vc_secret", etag=None)
        assert (doc, etag) == ({}, '"e1"')
        assert paths[1] == b"GET /api/access/gateway/state/ HTTP/1.1"
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("suffix", ["", "/", "/api/access/gateway/state", "/api/access/gateway/state/"])
def test_the_sessions_report_goes_to_the_portal_whatever_url_the_pull_was_given(suffix, monkeypatch):
    """``--url`` may be the portal or the state's whole URL (the pull takes both): the sessions' report goes to
    the portal's sessions endpoint either way (it went to …/gateway/state/api/access/gateway/sessions/, a 404 at
    every pull: nobody saw who was connected)."""
    from access.gateway import outgoing, report

    sent: list[str] = []

    def send(method, url, token, **kwargs):
        sent.append(url)
        return outgoing.Answer(status=200, headers={}, body=b"{}")

    monkeypatch.setattr(report.outgoing, "send_with_token", send)
    monkeypatch.setattr(report, "collect", lambda state_dir: {"vpn": [], "ssh": []})
    report.report(url=f"https://portal.example.org{suffix}", token="vc_secret", state_dir="/nonexistent")
    assert sent == ["https://portal.example.org/api/access/gateway/sessions/"]


def test_a_malformed_token_is_refused_before_anything_is_sent(tmp_path):
    from access.gateway import agent

    token = tmp_path / "token"
    token.write_text("vc_abc\nvc_def\n")
    err = io.StringIO()
    options = {"action": "pull", "token": None, "token_file": str(token), "url": "http://127.0.0.1:9"}
    options |= {"dir": str(tmp_path / "state"), "timeout": 2, "on_change": None, "on_change_timeout": 5}
    assert agent.run(options, out=io.StringIO(), err=err) == 2
    assert "malformed" in err.getvalue() and not (tmp_path / "state").exists()


@pytest.mark.django_db
def test_re_enrolment_records_the_new_keys_only_once_they_are_written(alice, cluster, gateway, tmp_path, monkeypatch):
    """``config --re-enrol`` makes new keys; the portal pins them in new profiles, so it records them only with the
    files written: a failure on the way leaves the portal on the old ones (profiles keep working). It tells the
    operator to restart the daemons that still hold the old keys."""
    from access.management.commands import gateway as command

    run("config", "gw1", "--dir", str(tmp_path))
    gateway.refresh_from_db()
    first = services.gateway_fingerprint(gateway)
    key = tmp_path / "vpn" / "server.key"
    before = key.read_bytes()

    real = command.write_all_atomic

    def fail_on_the_host_key(files):
        denied = [path for path in files if path.name == "host_key"]
        if denied and any(path.name == "server.key" for path in files):  # (the enrolment's, not the put-back)
            raise PermissionError(f"cannot write {denied[0]}")
        return real(files)

    monkeypatch.setattr(command, "write_all_atomic", fail_on_the_host_key)
    with pytest.raises(CommandError, match="cannot write"):
        run("config", "gw1", "--dir", str(tmp_path), "--re-enrol")
    gateway.refresh_from_db()
    assert services.gateway_fingerprint(gateway) == first and not RetiredHostKey.objects.exists()
    assert key.read_bytes() == before  # (not a new key the portal never recorded)
    monkeypatch.undo()

    out = run("config", "gw1", "--dir", str(tmp_path), "--re-enrol")
    assert "re-enrolled: restart its OpenVPN and its bastion's sshd now" in out
    gateway.refresh_from_db()
    assert key.read_bytes() != before and services.gateway_fingerprint(gateway) != first
    assert RetiredHostKey.objects.count() == 1
    on_disk = pki.pem_fingerprint((tmp_path / "vpn" / "server.pem").read_text())
    parsed = parse_profile(
        services.vpn_profile_issue(user=alice, clusters=[cluster]).text,
        aa_pem=Authority.objects.get(kind=AuthorityKind.AA).certificate,
    )
    assert parsed.pinned == {on_disk}


@pytest.mark.django_db
def test_a_bastion_account_renamed_in_the_portal_leaves_the_old_accounts_principals_empty(
    alice, cluster, gateway, tmp_path
):
    """The sshd still running as the old account (until restarted) reads the old account's principals file: kept,
    its last grants stayed valid with every pull renewing the state's freshness — ended clusters' included. The
    rename empties it: nobody logs in through the old account; the new one's file has the grants."""
    from access.gateway import pull
    from access.gateway.state import SshState

    pull.install_state(tmp_path, services.gateway_state(gateway=gateway), cut_sessions=False)
    ssh = SshState.at(tmp_path)
    label = cluster_label(cluster)
    assert f"{label}.alice" in ssh.principals("virtcloud").read_text()
    gateway.ssh_user = "bastion"
    gateway.save()
    pull.install_state(tmp_path, services.gateway_state(gateway=gateway), cut_sessions=False)
    assert ssh.principals("virtcloud").read_text() == ""
    assert f"{label}.alice" in ssh.principals("bastion").read_text()

"""Who is connected through the access gateways: each pull's report (``access.gateway.report``, posted to
``/api/access/gateway/sessions/`` with the gateway's token) replaces the gateway's sessions; operators see them in
the admin and the metrics, each user next to their credentials ("is my lost laptop still connected?")."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import io
import json
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from access import services
from access.gateway import vpn
from access.gateway.state import VpnState, write_atomic
from access.models import Credential, Gateway, GatewaySession
from access.selectors import cluster_label
from access.tests.fixtures import cluster, gateway, make_cluster
from portal.models import TokenScope
from portal.tests.helpers import logged_in
from portal.tokens import token_create

pytestmark = pytest.mark.django_db


def _gateway_token(gateway) -> str:
    """``gateway``'s pull token (as ``gateway token`` makes it): its secret."""
    token, secret = token_create(user=services.gateway_account(), name=gateway.name, scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    return secret


def _gateway_api(gateway) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {_gateway_token(gateway)}")
    return api


def _puller(gateway, live_server, state_dir):
    """``manage.py gateway pull`` of ``gateway`` against the live portal, into ``state_dir``: what it printed."""
    args = ("pull", "--url", live_server.url, "--token", _gateway_token(gateway), "--dir", str(state_dir))

    def pull() -> str:
        out = io.StringIO()
        call_command("gateway", *args, stdout=out, stderr=out)
        return out.getvalue()

    return pull


def test_a_report_replaces_the_gateways_sessions_and_names_the_credentials(alice, cluster, gateway):
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    api = _gateway_api(gateway)
    now = time.time()
    label = cluster_label(cluster)
    report = {
        "vpn": [
            {"serial": credential.serial, "peer": ["203.0.113.5", "4"], "since": now - 60, "cluster": label},
            {"serial": credential.serial, "peer": ["2001:db8::7", "1194"], "since": now - 5, "cluster": label},
            {"serial": 99, "peer": ["198.51.100.9", "5"], "since": None, "cluster": ""},  # not ours
        ],
        "ssh": [{"serial": 77, "count": 2, "since": now - 5}],
    }
    r = api.post("/api/access/gateway/sessions/", report, format="json")
    assert (r.status_code, r.data) == (200, {"recorded": 4, "skipped": 0})
    rows = {(r.kind, r.peer): r for r in GatewaySession.objects.all()}
    assert set(rows) == {
        ("vpn", "203.0.113.5:4"),
        ("vpn", "[2001:db8::7]:1194"),
        ("vpn", "198.51.100.9:5"),
        ("ssh", ""),
    }
    mine = rows[("vpn", "203.0.113.5:4")]
    assert (mine.credential, mine.cluster, mine.gateway) == (credential, cluster_label(cluster), gateway)
    assert abs(mine.since.timestamp() - (now - 60)) < 1 and rows[("vpn", "198.51.100.9:5")].credential is None
    assert rows[("ssh", "")].count == 2
    gateway.refresh_from_db()
    assert gateway.sessions_reported_at is not None
    # the next report replaces the last: alice disconnected
    assert api.post("/api/access/gateway/sessions/", {"vpn": [], "ssh": []}, format="json").status_code == 200
    assert not GatewaySession.objects.exists()


@pytest.mark.parametrize("report", [{"ssh": []}, {"vpn": {}, "ssh": []}, [], {"vpn": [{}] * 5001, "ssh": []}])
def test_a_malformed_report_is_a_400_that_changes_nothing(gateway, report):
    api = _gateway_api(gateway)
    good = {"vpn": [{"serial": 5, "peer": ["198.51.100.9", "5"]}], "ssh": []}
    assert api.post("/api/access/gateway/sessions/", good, format="json").status_code == 200
    r = api.post("/api/access/gateway/sessions/", report, format="json")
    assert r.status_code == 400, r.content
    assert list(GatewaySession.objects.values_list("serial", flat=True)) == [5]


def test_an_entry_that_is_not_valid_is_left_out_not_the_whole_report(gateway):
    """One record the gateway could not make sense of must not hide everyone else's sessions."""
    api = _gateway_api(gateway)
    bad = [
        {"serial": -1, "peer": ["198.51.100.9", "5"]},
        {"serial": 2**70, "peer": ["198.51.100.9", "5"]},
        {"serial": 1, "peer": ["198.51.100.9"]},
        {"serial": 1, "peer": ["198.51.100.9", "5"], "since": 1e30},
        {"serial": 1, "peer": ["x" * 46, "5"]},
        "not an entry",
    ]
    report = {"vpn": [*bad, {"serial": 6, "peer": ["198.51.100.9", "5"]}], "ssh": [{"serial": 1, "count": 0}]}
    r = api.post("/api/access/gateway/sessions/", report, format="json")
    assert (r.status_code, r.data) == (200, {"recorded": 1, "skipped": 7})
    assert list(GatewaySession.objects.values_list("serial", flat=True)) == [6]


def test_only_an_enabled_gateways_own_token_reports(alice, gateway):
    _, user_secret = token_create(user=alice, name="mine", scopes=[TokenScope.CLUSTERS_MANAGE])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {user_secret}")
    assert api.post("/api/access/gateway/sessions/", {"vpn": [], "ssh": []}, format="json").status_code == 403
    gw_api = _gateway_api(gateway)
    Gateway.objects.filter(pk=gateway.pk).update(enabled=False)
    assert gw_api.post("/api/access/gateway/sessions/", {"vpn": [], "ssh": []}, format="json").status_code == 403


def test_the_user_sees_where_a_credential_is_connected_while_the_report_is_fresh(alice, cluster, gateway, settings):
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    api = _gateway_api(gateway)
    report = {"vpn": [{"serial": credential.serial, "peer": ["203.0.113.5", "4"], "since": time.time()}], "ssh": []}
    api.post("/api/access/gateway/sessions/", report, format="json")
    page = logged_in(alice).get("/access/").content.decode()
    row = page.split(f'data-serial="{credential.serial}"')[1].split("</tr>")[0]
    assert "connected from 203.0.113.5:4 through gw1 since" in row
    Gateway.objects.filter(pk=gateway.pk).update(
        sessions_reported_at=timezone.now() - timedelta(seconds=settings.GATEWAY_STATE_MAX_AGE + 1)
    )
    page = logged_in(alice).get("/access/").content.decode()
    assert "connected from" not in page  # that gateway stopped reporting: no longer taken as now


def test_the_admin_and_the_metrics_list_them(alice, root, cluster, gateway):
    services.vpn_profile_issue(user=alice, clusters=[cluster], label="work laptop")
    credential = Credential.objects.get()
    api = _gateway_api(gateway)
    report = {
        "vpn": [
            {"serial": credential.serial, "peer": ["203.0.113.5", "4"]},
            {"serial": credential.serial, "peer": ["203.0.113.6", "5"]},
        ],
        "ssh": [{"serial": 12, "count": 3}],
    }
    api.post("/api/access/gateway/sessions/", report, format="json")
    page = logged_in(root).get("/admin/access/gatewaysession/").content.decode()
    assert "alice (work laptop)" in page and "203.0.113.6:5" in page
    from portal.metrics import collect, render

    text = render(collect())
    assert 'virtcloud_gateway_sessions{gateway="gw1",kind="vpn"} 2' in text
    assert 'virtcloud_gateway_sessions{gateway="gw1",kind="ssh"} 3' in text


def test_each_pull_reports_the_sessions_the_hooks_recorded(live_server, alice, team, gateway, tmp_path):
    """The agent's pull, against a live portal: the sessions client-connect recorded — one profile up from two
    places, on two clusters, each with its own time — are reported after the pull; once client-disconnect dropped
    one, the next pull reports the other only."""
    first = make_cluster(alice, name="mpi", group=team)
    second = make_cluster(alice, name="web", group=team)
    state_dir = tmp_path / "state"
    pull = _puller(gateway, live_server, state_dir)
    assert "updated" in pull() and not GatewaySession.objects.exists()

    services.vpn_profile_issue(user=alice, clusters=[first, second])
    credential = Credential.objects.get()
    state = VpnState.at(state_dir)
    grants = {cluster_label(first): "member", cluster_label(second): "member"}
    entry = {"serial": credential.serial, "clusters": grants, "not_after": time.time() + 60}
    write_atomic(state.ac_cache / f"{credential.fingerprint}.json", json.dumps(entry))

    def env(ip: str, port: str) -> dict:
        return {
            "tls_digest_sha256_0": credential.fingerprint,
            "common_name": "alice",
            "trusted_ip": ip,
            "trusted_port": port,
        }

    vpn.client_connect(state, str(tmp_path / "ccd1"), {**env("203.0.113.5", "4"), "UV_VCLUSTER": cluster_label(first)})
    time.sleep(0.05)
    vpn.client_connect(state, str(tmp_path / "ccd2"), {**env("203.0.113.6", "5"), "UV_VCLUSTER": cluster_label(second)})
    out = pull()
    assert "sessions" not in out, out  # (reported quietly)
    rows = {r.peer: r for r in GatewaySession.objects.all()}
    assert {p: (r.credential, r.cluster) for p, r in rows.items()} == {
        "203.0.113.5:4": (credential, cluster_label(first)),
        "203.0.113.6:5": (credential, cluster_label(second)),
    }
    assert rows["203.0.113.5:4"].since < rows["203.0.113.6:5"].since  # each its own connect time

    vpn.client_disconnect(state, {**env("203.0.113.5", "4"), "tls_serial_0": str(credential.serial)})
    pull()
    assert [(r.peer, r.cluster) for r in GatewaySession.objects.all()] == [("203.0.113.6:5", cluster_label(second))]


def test_a_record_the_gateway_cannot_read_fails_no_pull(live_server, gateway, tmp_path):
    state_dir = tmp_path / "state"
    pull = _puller(gateway, live_server, state_dir)
    pull()
    sessions = VpnState.at(state_dir).sessions
    sessions.mkdir(parents=True, exist_ok=True)
    (sessions / "7.json").write_text(json.dumps({"serial": 7, "peers": [["203.0.113.5"]]}))  # not a pair
    (sessions / "\u00b2.json").write_text("{}")  # a name that looks like a number
    (sessions / "8.json").write_text(json.dumps({"serial": 8, "peers": [["203.0.113.8", "9"]]}))
    assert "unchanged" in pull()
    assert [(r.serial, r.peer) for r in GatewaySession.objects.all()] == [(8, "203.0.113.8:9")]


def test_an_agent_of_the_release_before_is_understood(alice, cluster, gateway):
    """Gateways upgrade apart from the portal: a report in the release before's shape (``peers``, a list per
    certificate) is taken as one entry per peer; a report of which nothing is valid is a 400 that keeps the last."""
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    api = _gateway_api(gateway)
    old = {"serial": credential.serial, "peers": [["203.0.113.5", "4"], ["203.0.113.6", "5"]], "since": time.time()}
    r = api.post("/api/access/gateway/sessions/", {"vpn": [old], "ssh": []}, format="json")
    assert (r.status_code, r.data) == (200, {"recorded": 2, "skipped": 0})
    r = api.post("/api/access/gateway/sessions/", {"vpn": [{"serial": "x"}], "ssh": []}, format="json")
    assert r.status_code == 400 and GatewaySession.objects.count() == 2


def test_a_record_of_the_release_before_keeps_its_peers_time_and_cluster(tmp_path):
    state = VpnState.at(tmp_path)
    state.sessions.mkdir(parents=True)
    write_atomic(
        state.sessions / "9.json",
        json.dumps({"serial": 9, "common_name": "a", "peers": [["203.0.113.5", "4"]], "since": 1000.0, "cluster": "x"}),
    )
    vpn._record_session(state, 9, "a", {"trusted_ip": "203.0.113.6", "trusted_port": "5"}, cluster="y")
    up = {tuple(s["peer"]): (s["since"], s["cluster"]) for s in vpn.sessions(state)}
    assert up[("203.0.113.5", "4")] == (1000.0, "x") and up[("203.0.113.6", "5")][1] == "y"

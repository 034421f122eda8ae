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


def _gateway_api(gateway) -> APIClient:
    token, secret = token_create(user=gateway_owner(), name=gateway.name, scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return api


def gateway_owner():
    return services.gateway_account()


def test_a_report_replaces_the_gateways_sessions_and_names_the_credentials(alice, cluster, gateway):
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    api = _gateway_api(gateway)
    now = time.time()
    report = {
        "vpn": [
            {
                "serial": credential.serial,
                "peers": [["203.0.113.5", "4"], ["2001:db8::7", "1194"]],
                "since": now - 60,
                "cluster": cluster_label(cluster),
            },
            {"serial": 99, "peers": [["198.51.100.9", "5"]], "since": None, "cluster": ""},  # not ours
        ],
        "ssh": [{"serial": 77, "count": 2, "since": now - 5}],
    }
    assert api.post("/api/access/gateway/sessions/", report, format="json").status_code == 204
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
    assert api.post("/api/access/gateway/sessions/", {"vpn": [], "ssh": []}, format="json").status_code == 204
    assert not GatewaySession.objects.exists()


@pytest.mark.parametrize(
    "report",
    [
        {"vpn": [{"serial": -1, "peers": []}], "ssh": []},
        {"vpn": [{"serial": 1, "peers": [["198.51.100.9"]]}], "ssh": []},
        {"vpn": [{"serial": 1, "peers": [], "since": 1e30}], "ssh": []},
        {"vpn": [], "ssh": [{"serial": 1, "count": 0}]},
        {"vpn": [{"serial": 1, "peers": []}] * 5001, "ssh": []},
        {"ssh": []},
        [],
    ],
)
def test_a_malformed_report_is_a_400_that_changes_nothing(gateway, report):
    api = _gateway_api(gateway)
    good = {"vpn": [{"serial": 5, "peers": [["198.51.100.9", "5"]]}], "ssh": []}
    assert api.post("/api/access/gateway/sessions/", good, format="json").status_code == 204
    r = api.post("/api/access/gateway/sessions/", report, format="json")
    assert r.status_code == 400, r.content
    assert list(GatewaySession.objects.values_list("serial", flat=True)) == [5]


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
    report = {"vpn": [{"serial": credential.serial, "peers": [["203.0.113.5", "4"]], "since": time.time()}], "ssh": []}
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
        "vpn": [{"serial": credential.serial, "peers": [["203.0.113.5", "4"], ["203.0.113.6", "5"]]}],
        "ssh": [{"serial": 12, "count": 3}],
    }
    api.post("/api/access/gateway/sessions/", report, format="json")
    page = logged_in(root).get("/admin/access/gatewaysession/").content.decode()
    assert "alice (work laptop)" in page and "203.0.113.6:5" in page
    from portal.metrics import collect, render

    text = render(collect())
    assert 'virtcloud_gateway_sessions{gateway="gw1",kind="vpn"} 2' in text
    assert 'virtcloud_gateway_sessions{gateway="gw1",kind="ssh"} 3' in text


def test_each_pull_reports_the_sessions_the_hooks_recorded(live_server, alice, root, team, gateway, tmp_path):
    """The agent's pull, against a live portal: the session client-connect recorded (its peer, its cluster) is
    reported after the pull; once client-disconnect dropped it, the next pull reports none."""
    cluster = make_cluster(alice, name="mpi", group=team)
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = token
    gateway.save()
    state_dir = tmp_path / "state"
    args = ("pull", "--url", live_server.url, "--token", secret, "--dir", str(state_dir))
    out = io.StringIO()
    call_command("gateway", *args, stdout=out, stderr=out)
    assert "updated" in out.getvalue() and not GatewaySession.objects.exists()

    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    state = VpnState.at(state_dir)
    entry = {"serial": credential.serial, "clusters": {cluster_label(cluster): "member"}, "not_after": time.time() + 60}
    write_atomic(state.ac_cache / f"{credential.fingerprint}.json", json.dumps(entry))
    env = {
        "tls_digest_sha256_0": credential.fingerprint,
        "common_name": "alice",
        "trusted_ip": "203.0.113.5",
        "trusted_port": "4",
    }
    vpn.client_connect(state, str(tmp_path / "ccd"), {**env, "UV_VCLUSTER": cluster_label(cluster)})
    out = io.StringIO()
    call_command("gateway", *args, stdout=out, stderr=out)
    assert "sessions" not in out.getvalue(), out.getvalue()  # (reported quietly)
    [row] = GatewaySession.objects.all()
    assert (row.credential, row.peer, row.cluster) == (credential, "203.0.113.5:4", cluster_label(cluster))

    vpn.client_disconnect(state, {**env, "tls_serial_0": str(credential.serial)})
    call_command("gateway", *args, stdout=io.StringIO(), stderr=io.StringIO())
    assert not GatewaySession.objects.exists()

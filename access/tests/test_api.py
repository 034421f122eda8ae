"""Access API: downloads, statuses for what a user can get wrong, scopes, gateway pull with ETag."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from django.utils import timezone
from rest_framework.test import APIClient

from access import services
from access.models import Authority, AuthorityKind, Credential
from access.selectors import cluster_label
from access.tests.fixtures import client_for, cluster, gateway, make_cluster, other_cluster
from access.tests.profile_check import parse_profile
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db


def aa_pem() -> str:
    return Authority.objects.get(kind=AuthorityKind.AA).certificate


def test_vpn_profile_download(bob, cluster, gateway):
    response = client_for(bob).post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/x-openvpn-profile"
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Disposition"] == f'attachment; filename="virtcloud-{cluster_label(cluster)}.ovpn"'
    parsed = parse_profile(response.content.decode(), aa_pem=aa_pem())
    assert parsed.fqans == [f"/virtcloud/{cluster_label(cluster)}/Role=member"]
    assert response["X-Credential-Id"] == str(Credential.objects.get(serial=parsed.cert.serial_number).pk)


def test_vpn_profile_for_a_non_ascii_user_and_two_clusters(gateway):
    """A user name Django allows (``jörg``), an internationalised e-mail domain, and the download's file
    name made of the user name (several clusters): a profile, not a 500."""
    from django.contrib.auth.models import User

    user = User.objects.create_user("jörg", "jorg@bücher.de", "pw")
    first, second = make_cluster(user, name="one"), make_cluster(user, name="two")
    response = client_for(user).post("/api/access/vpn-profiles/", {"clusters": [first.pk, second.pk]}, format="json")
    assert response.status_code == 200, response.content
    assert response["Content-Disposition"] == "attachment; filename*=utf-8''virtcloud-j%C3%B6rg.ovpn"
    parsed = parse_profile(response.content.decode(), aa_pem=aa_pem())
    san = parsed.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["jorg@xn--bcher-kva.de"]


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"clusters": []}, 400, None),
        ({"clusters": ["x"]}, 400, None),
        ({"clusters": [2**70]}, 400, None),  # no such row id: a field error, not a database error (500)
        ({}, 400, None),
    ],
)
def test_vpn_profile_bad_input_is_400(alice, cluster, gateway, payload, status, code):
    response = client_for(alice).post("/api/access/vpn-profiles/", payload, format="json")
    assert response.status_code == status
    assert "clusters" in response.json()


def test_vpn_profile_statuses(alice, charlie, team, cluster, other_cluster, gateway):
    api = client_for(alice)
    response = api.post("/api/access/vpn-profiles/", {"clusters": [other_cluster.pk]}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    provisioning = make_cluster(alice, name="new", state="provisioning")
    response = api.post("/api/access/vpn-profiles/", {"clusters": [provisioning.pk]}, format="json")
    assert response.status_code == 409
    assert "new" in response.json()["detail"]
    gateway.delete()
    response = api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json")
    assert response.status_code == 503
    assert not Credential.objects.exists()
    assert client_for().post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json").status_code in (
        401,
        403,
    )


def test_token_scopes(alice, cluster, gateway):
    _, read_only = token_create(user=alice, name="ro", scopes=[TokenScope.CLUSTERS_READ])
    _, writer = token_create(user=alice, name="rw", scopes=[TokenScope.CLUSTERS_WRITE])
    payload = {"clusters": [cluster.pk]}
    assert client_for(token=read_only).post("/api/access/vpn-profiles/", payload, format="json").status_code == 403
    assert client_for(token=read_only).get("/api/access/credentials/").status_code == 200
    assert client_for(token=writer).post("/api/access/vpn-profiles/", payload, format="json").status_code == 200


def test_the_access_api_refuses_a_field_it_does_not_know(alice, cluster, gateway):
    """``publickey`` for ``public_key`` gave a fresh key pair the caller never asked for, ``Publish`` a
    short-lived profile: now a 400 naming the field, and nothing is issued."""
    api = client_for(alice)
    r = api.post(
        "/api/access/ssh-certificates/", {"cluster": cluster.pk, "publickey": "ssh-ed25519 AAAA"}, format="json"
    )
    assert (r.status_code, r.data) == (400, {"publickey": ["unknown field"]}), r.content
    r = api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk], "Publish": True}, format="json")
    assert (r.status_code, r.data) == (400, {"Publish": ["unknown field"]}), r.content
    assert not Credential.objects.exists()


def test_a_name_no_certificate_can_hold_is_a_422_for_vpn_and_ssh_alike_and_records_nothing(django_user_model, gateway):
    """Directories and Django allow names an SSH principal cannot hold (``jiří``): asking again cannot help, so it
    is the 422 ``cannot_issue`` the VPN profile gives for a name its certificate cannot hold — not a 400 that
    reads as a mistake in the request — and no credential is recorded."""
    user = django_user_model.objects.create_user("jiří")
    theirs = make_cluster(user, name="mpi")
    response = client_for(user).post("/api/access/ssh-certificates/", {"cluster": theirs.pk}, format="json")
    assert response.status_code == 422 and response.json()["code"] == "cannot_issue", response.json()
    assert "jiří" in response.json()["detail"]
    assert not Credential.objects.filter(user=user).exists()


def test_ssh_certificate_endpoint(alice, cluster, gateway):
    from access import ssh

    response = client_for(alice).post("/api/access/ssh-certificates/", {"cluster": cluster.pk}, format="json")
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert body["principal"] == f"{cluster_label(cluster)}.alice"
    assert ssh.load_cert(body["certificate"]).valid_principals == [body["principal"].encode()]
    assert f"Host *.{cluster_label(cluster)}" in body["ssh_config"]
    assert body["known_hosts"].startswith(f"@cert-authority 198.18.100.1,node1.{cluster_label(cluster)} ")
    assert body["withheld_nodes"] == []  # the bastion relays to every node (see test_services for the others)

    pasted = ssh.generate_user_key().public_line
    response = client_for(alice).post(
        "/api/access/ssh-certificates/", {"cluster": cluster.pk, "public_key": pasted}, format="json"
    )
    assert response.status_code == 201
    assert response.json()["private_key"] is None


def test_a_credential_is_labelled_through_the_api_and_listed_with_its_label(alice, cluster, gateway):
    api = client_for(alice)
    vpn = api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk], "label": "router at home"}, format="json")
    assert vpn.status_code == 200 and vpn["X-Credential-Id"], vpn.status_code
    ssh_access = api.post("/api/access/ssh-certificates/", {"cluster": cluster.pk, "label": "cron"}, format="json")
    assert ssh_access.status_code == 201, ssh_access.content
    listed = {row["kind"]: row["label"] for row in api.get("/api/access/credentials/").json()["results"]}
    assert listed == {"vpn": "router at home", "ssh": "cron"}
    bad = api.post("/api/access/ssh-certificates/", {"cluster": cluster.pk, "label": "a\u0007b"}, format="json")
    assert bad.status_code == 400 and bad.json()["label"] == ["a label is one line of text, without control characters"]
    assert api.get("/api/access/credentials/").json()["count"] == 2


def test_ssh_certificate_statuses(alice, cluster, other_cluster, gateway):
    api = client_for(alice)
    bad = api.post(
        "/api/access/ssh-certificates/", {"cluster": cluster.pk, "public_key": "ssh-dss AAAA"}, format="json"
    )
    assert bad.status_code == 400
    assert "DSA" in bad.json()["public_key"][0]
    assert api.post("/api/access/ssh-certificates/", {"cluster": other_cluster.pk}, format="json").status_code == 403
    huge = api.post("/api/access/ssh-certificates/", {"cluster": 2**70}, format="json")
    assert (huge.status_code, list(huge.json())) == (400, ["cluster"])
    ending = make_cluster(alice, name="bye", state="tearing_down")
    assert api.post("/api/access/ssh-certificates/", {"cluster": ending.pk}, format="json").status_code == 409


def test_credentials_list_and_revoke(alice, bob, root, cluster, gateway, django_assert_max_num_queries):
    for user in (alice, alice, bob):
        services.vpn_profile_issue(user=user, clusters=[cluster])
    services.ssh_certificate_issue(user=alice, cluster=cluster)
    with django_assert_max_num_queries(6):
        mine = client_for(alice).get("/api/access/credentials/").json()
    assert mine["count"] == 3
    assert {c["user"] for c in mine["results"]} == {"alice"}
    assert {c["kind"] for c in mine["results"]} == {"vpn", "ssh"}
    assert all(c["status"] == "valid" and c["clusters"] == [cluster_label(cluster)] for c in mine["results"])
    with django_assert_max_num_queries(6):
        everyone = client_for(root).get("/api/access/credentials/").json()
    assert everyone["count"] == 4
    assert client_for(alice).get("/api/access/credentials/?kind=ssh").json()["count"] == 1

    bobs = Credential.objects.get(user=bob)
    # Not yours: not even visible.
    assert client_for(alice).post(f"/api/access/credentials/{bobs.pk}/revoke/").status_code == 404
    response = client_for(bob).post(f"/api/access/credentials/{bobs.pk}/revoke/", {}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"
    assert response.json()["revocation_reason"] == "key_compromise"
    assert response.json()["revoked_by"] == "bob"
    # An admin revokes anyone's; the default reason says it was withdrawn.
    theirs = Credential.objects.filter(user=alice).first()
    response = client_for(root).post(f"/api/access/credentials/{theirs.pk}/revoke/", {"note": "audit"}, format="json")
    assert response.json()["revocation_reason"] == "privilege_withdrawn"
    assert response.json()["revocation_note"] == "audit"
    bad = client_for(root).post(f"/api/access/credentials/{theirs.pk}/revoke/", {"reason": "bored"}, format="json")
    assert bad.status_code == 400
    # a note is kept and logged: one line (a forged log line is a 400, and revokes nothing)
    other = Credential.objects.filter(user=alice, revoked_at=None).first()
    forged = "x\n2026-12-07 INFO access.services access: issued VPN profile serial=1"
    bad = client_for(root).post(f"/api/access/credentials/{other.pk}/revoke/", {"note": forged}, format="json")
    assert bad.status_code == 400 and "note" in bad.json(), bad.json()
    other.refresh_from_db()
    assert other.revoked_at is None
    assert client_for(alice).get("/api/access/credentials/?status=revoked").json()["count"] == 1

    # One of alice's runs out: listed as expired, not valid.
    expired = Credential.objects.filter(user=alice, revoked_at__isnull=True).first()
    Credential.objects.filter(pk=expired.pk).update(not_after=timezone.now() - dt.timedelta(seconds=1))
    listed = client_for(alice).get("/api/access/credentials/?status=expired").json()
    assert [(c["id"], c["status"]) for c in listed["results"]] == [(expired.pk, "expired")]
    valid = client_for(alice).get("/api/access/credentials/?status=valid").json()["results"]
    assert len(valid) == 1 and valid[0]["status"] == "valid" and valid[0]["id"] != expired.pk


def test_credential_filters_the_database_cannot_compare_are_a_400(alice, root):
    """A NUL character in ``kind`` or ``user`` (PostgreSQL text cannot hold one) is a 400 naming the
    parameter, as for every other list filter of the API; it was a 500."""
    for caller in (alice, root):
        for param in ("kind", "user"):
            response = client_for(caller).get(f"/api/access/credentials/?{param}=a%00b")
            assert response.status_code == 400, response.content
            assert param in response.json()


def test_a_credential_filter_the_api_does_not_know_is_a_400_not_a_silent_list(alice):
    """``status=Revoked`` listed every credential, valid ones included, and ``kind=VPN`` none: a filter
    value the API does not know is a 400 naming the choices, as in the clusters API."""
    for query, choices in (("status=Revoked", "valid, revoked, expired"), ("kind=VPN", "vpn, ssh, ssh_host")):
        response = client_for(alice).get(f"/api/access/credentials/?{query}")
        param = query.split("=")[0]
        assert response.status_code == 400 and choices in response.json()[param][0], response.content


def test_public_crl(alice, cluster, gateway):
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    response = client_for().get("/api/access/crl.pem")
    assert response.status_code == 200
    crl = x509.load_pem_x509_crl(response.content)
    assert crl.get_revoked_certificate_by_serial_number(credential.serial) is not None


def test_gateway_state_needs_the_gateways_own_token(alice, root, cluster, gateway):
    _, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    gateway.token = root.api_tokens.get()
    gateway.save()
    _, other_scope = token_create(user=root, name="not-gw", scopes=[TokenScope.CLUSTERS_MANAGE])
    _, unlinked = token_create(user=root, name="gw-unlinked", scopes=[TokenScope.GATEWAY])
    assert client_for(root).get("/api/access/gateway/state/").status_code == 403  # a session is not a gateway
    assert client_for(token=other_scope).get("/api/access/gateway/state/").status_code == 403
    assert client_for(token=unlinked).get("/api/access/gateway/state/").status_code == 403
    # A gateway token cannot issue profiles for its user.
    payload = {"clusters": [cluster.pk]}
    assert client_for(token=secret).post("/api/access/vpn-profiles/", payload, format="json").status_code == 403

    response = client_for(token=secret).get("/api/access/gateway/state/")
    assert response.status_code == 200
    state = response.json()
    assert state["vpn"]["vlans"] == {cluster_label(cluster): cluster.vlan_id}
    assert response["ETag"] == f'"{state["etag"]}"'
    unchanged = client_for(token=secret).get("/api/access/gateway/state/", HTTP_IF_NONE_MATCH=response["ETag"])
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    services.credential_revoke(credential=Credential.objects.get(), reason="key_compromise", by=alice)
    changed = client_for(token=secret).get("/api/access/gateway/state/", HTTP_IF_NONE_MATCH=response["ETag"])
    assert changed.status_code == 200
    assert changed.json()["vpn"]["revoked_sessions"][0]["common_name"] == "alice"
    gateway.enabled = False
    gateway.save()
    assert client_for(token=secret).get("/api/access/gateway/state/").status_code == 403


def test_schema_documents_every_endpoint(root):
    response = client_for(root).get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path, method, codes in [
        ("/api/access/vpn-profiles/", "post", {"200", "400", "403", "409", "503"}),
        ("/api/access/ssh-certificates/", "post", {"201", "400", "403", "409"}),
        ("/api/access/host-certificates/", "post", {"201", "400", "403", "404", "409"}),
        ("/api/access/host-certificates/access/", "get", {"200", "400", "403", "404", "409"}),
        ("/api/access/credentials/", "get", {"200"}),
        ("/api/access/credentials/{id}/revoke/", "post", {"200", "404"}),
        ("/api/access/gateway/state/", "get", {"200", "304", "403"}),
        ("/api/access/crl.pem", "get", {"200"}),
    ]:
        assert codes <= set(paths[path][method]["responses"]), path
    assert "application/x-openvpn-profile" in paths["/api/access/vpn-profiles/"]["post"]["responses"]["200"]["content"]


def test_revoke_with_a_non_numeric_id_is_404_not_500(client, alice):
    client.force_login(alice)
    assert client.post("/api/access/credentials/true/revoke/").status_code == 404


def test_an_admins_token_acts_on_everyones_credentials_only_with_clusters_manage(alice, root, cluster, gateway):
    """As in the clusters API, an admin's token is only as strong as its scopes: with clusters:read or
    clusters:write it lists and revokes its owner's own credentials, like anyone's token; everyone's takes
    clusters:manage (an admin in the browser sees and revokes everyone's)."""
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    alices = Credential.objects.get(user=alice)
    _, reader = token_create(user=root, name="script", scopes=[TokenScope.CLUSTERS_READ])
    _, writer = token_create(user=root, name="script", scopes=[TokenScope.CLUSTERS_WRITE])
    _, manager = token_create(user=root, name="ops", scopes=[TokenScope.CLUSTERS_MANAGE])
    assert client_for(token=reader).get("/api/access/credentials/").json()["count"] == 0
    assert client_for(token=reader).get(f"/api/access/credentials/{alices.pk}/").status_code == 404
    assert client_for(token=writer).post(f"/api/access/credentials/{alices.pk}/revoke/").status_code == 404
    alices.refresh_from_db()
    assert alices.revoked_at is None
    assert client_for(token=manager).get("/api/access/credentials/").json()["count"] == 1
    assert client_for(root).get("/api/access/credentials/").json()["count"] == 1
    response = client_for(token=manager).post(f"/api/access/credentials/{alices.pk}/revoke/")
    assert response.status_code == 200 and response.json()["revocation_reason"] == "privilege_withdrawn"


def test_a_user_name_too_long_for_a_certificate_is_a_422_naming_it(team, cluster, gateway):
    from django.contrib.auth.models import User

    long = User.objects.create_user("b" * 65)
    long.groups.add(team)
    response = client_for(long).post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json")
    assert response.status_code == 422 and response.json()["code"] == "user_name_too_long", response.content
    accented = User.objects.create_user("ž" * 33)  # 33 characters, 66 bytes: cryptography's ValueError was a 500
    accented.groups.add(team)
    response = client_for(accented).post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json")
    assert response.status_code == 422 and response.json()["code"] == "user_name_too_long", response.content


# --- host certificates of cluster nodes -------------------------------------------------------------------------


def _host_key(kind: str = "ed25519") -> str:
    """A node's host public key line, as in /etc/ssh/ssh_host_*_key.pub."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from access import ssh

    keys = {
        "ed25519": lambda: ssh.generate_user_key().public_line.split()[0:2],
        "ecdsa": lambda: ssh.public_key_line(ec.generate_private_key(ec.SECP384R1())).split(),
        "rsa2048": lambda: ssh.public_key_line(rsa.generate_private_key(65537, 2048)).split(),
        "dsa": lambda: ["ssh-dss", "AAAAB3NzaC1kc3MAAACBAP"],  # refused by its type, before it is read
    }
    return " ".join(keys[kind]()) + " root@node1"


def _host_cert_post(client, cluster, node, public_key):
    body = {"cluster": getattr(cluster, "pk", cluster), "node": node, "public_key": public_key}
    return client.post("/api/access/host-certificates/", body, format="json")


def test_a_clusters_owner_certifies_a_nodes_host_key(alice, bob, cluster, tmp_path):
    """The owner (a clusters:write token) certifies node1's host key: a host certificate from the portal's host CA
    for exactly the names the users' ssh_config reaches it by, valid until the cluster ends, recorded for
    revocation; and what the node's sshd needs to let the cluster's people in."""
    import shutil
    import subprocess

    from cryptography.hazmat.primitives import serialization

    from access import ssh
    from clusters.models import Node

    Node.objects.filter(cluster=cluster, name="node1").update(address="10.0.0.1")
    _, secret = token_create(user=alice, name="boot", scopes=[TokenScope.CLUSTERS_WRITE])
    key = _host_key()
    response = _host_cert_post(client_for(token=secret), cluster, "node1", key)
    assert response.status_code == 201, response.content
    body = response.json()
    label = cluster_label(cluster)
    assert body["principals"] == [f"node1.{label}"]  # its alias, never its address (the owner picks that)
    assert (body["cluster"], body["node"], body["node_user"]) == (label, "node1", "root")

    cert = ssh.load_cert(body["certificate"])
    assert cert.type == serialization.SSHCertificateType.HOST
    assert cert.valid_principals == [p.encode() for p in body["principals"]]
    assert ssh.public_key_line(cert.public_key()) == " ".join(key.split()[:2])
    cert.verify_cert_signature()
    host_ca = Authority.objects.get(kind=AuthorityKind.SSH_HOST).public_key
    assert ssh.public_key_line(cert.signature_key()) == " ".join(host_ca.split()[:2])
    cluster.refresh_from_db()
    assert cert.valid_before == int(cluster.expires_at.timestamp())  # the cluster's end, not a year
    assert dt.datetime.fromisoformat(body["valid_before"]) == cluster.expires_at.replace(microsecond=0)
    # and the same seen by OpenSSH itself
    if shutil.which("ssh-keygen"):
        (tmp_path / "host-cert.pub").write_text(body["certificate"] + "\n")
        shown = subprocess.run(["ssh-keygen", "-L", "-f", tmp_path / "host-cert.pub"], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        assert "ssh-ed25519-cert-v01@openssh.com host certificate" in shown.stdout
        assert f"Principals: \n                node1.{label}\n        Critical" in shown.stdout  # the alias only
        until = cluster.expires_at.astimezone().replace(microsecond=0).isoformat(timespec="seconds")[:19]
        assert f" to {until}\n" in shown.stdout, shown.stdout

    # what the node's sshd needs: the user CA and root's principals (the owner and the group's members)
    assert body["user_ca"] == Authority.objects.get(kind=AuthorityKind.SSH_USER).public_key
    lines = [ln for ln in body["authorized_principals"].splitlines() if not ln.startswith("#")]
    assert lines == [f"{label}.alice", f"{label}.bob"]

    credential = Credential.objects.get(pk=body["credential"])
    assert (credential.kind, credential.serial, credential.user) == ("ssh_host", cert.serial, alice)
    assert credential.cluster_labels() == [label] and credential.principals == body["principals"]
    assert credential.public_key == " ".join(key.split()[:2]) and credential.key_id == cert.key_id.decode()
    assert credential.key_id == f"virtcloud-host:node1.{label}:serial={cert.serial}"

    # by the node's id too, and an ECDSA key; a node without an address: its alias only (the ssh_config's HostName)
    node2 = Node.objects.create(cluster=cluster, name="node2", host=cluster.nodes.first().host, mac="52:54:00:aa:00:02")
    response = _host_cert_post(client_for(token=secret), cluster, node2.pk, _host_key("ecdsa"))
    assert response.status_code == 201, response.content
    assert response.json()["principals"] == [f"node2.{label}"]


def test_the_middleware_certifies_any_clusters_nodes_and_public_ones_too(alice, charlie, cluster):
    from access import ssh

    public = make_cluster(alice, name="web", connectivity="public")
    _, manage = token_create(user=charlie, name="scheduler", scopes=[TokenScope.CLUSTERS_MANAGE])
    for target in (cluster, public):
        response = _host_cert_post(client_for(token=manage), target, "node1", _host_key())
        assert response.status_code == 201, response.content
        assert ssh.load_cert(response.json()["certificate"]).valid_principals == [
            f"node1.{cluster_label(target)}".encode()
        ]
    assert Credential.objects.filter(kind="ssh_host", user=charlie).count() == 2


def test_a_nodes_host_certificate_is_revoked_by_its_clusters_owner_not_by_whoever_asked_for_it(alice, charlie, cluster):
    """A node's host key revoked is certified never again and every bundle of the cluster says ``@revoked`` for it:
    the middleware account that asked for the certificate (with a token that no longer acts on every cluster)
    may not revoke it; the cluster's owner revokes the one it asked for."""
    _, manage = token_create(user=charlie, name="scheduler", scopes=[TokenScope.CLUSTERS_MANAGE])
    asked = _host_cert_post(client_for(token=manage), cluster, "node1", _host_key()).json()["credential"]
    _, write = token_create(user=charlie, name="old", scopes=[TokenScope.CLUSTERS_WRITE])
    response = client_for(token=write).post(f"/api/access/credentials/{asked}/revoke/", {}, format="json")
    assert response.status_code == 403 and "its cluster's owner or an administrator" in response.content.decode()
    assert Credential.objects.get(pk=asked).revoked_at is None
    _, own = token_create(user=alice, name="boot", scopes=[TokenScope.CLUSTERS_WRITE])
    mine = _host_cert_post(client_for(token=own), cluster, "node1", _host_key()).json()["credential"]
    response = client_for(token=own).post(f"/api/access/credentials/{mine}/revoke/", {}, format="json")
    assert response.status_code == 200 and Credential.objects.get(pk=mine).revoked_at is not None, response.content


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("rsa2048", "too weak"),
        ("dsa", "DSA"),
        ("two lines", "exactly one"),
        ("options", "unsupported key type"),
        ("private", "PRIVATE"),
        ("certificate", "certificate"),
    ],
)
def test_a_host_key_that_cannot_be_certified_is_a_400(alice, cluster, key, message):
    from access import ssh

    text = {
        "two lines": _host_key() + "\n" + _host_key(),
        "options": 'from="10.0.0.0/8" ' + _host_key(),
        "private": ssh.generate_user_key().private_openssh.decode(),
        "certificate": "ssh-ed25519-cert-v01@openssh.com AAAA root@node1",
    }.get(key) or _host_key(key)
    response = _host_cert_post(client_for(alice), cluster, "node1", text)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "bad_public_key" and message in response.json()["public_key"][0]
    assert not Credential.objects.exists()


def test_host_certificates_refused_with_the_right_status(alice, bob, charlie, cluster, other_cluster):
    from clusters.models import VirtualCluster

    key = _host_key()
    # not the caller's cluster: 404, whether it exists or not
    for target in (other_cluster.pk, 999999):
        response = _host_cert_post(client_for(alice), target, "node1", key)
        assert (response.status_code, response.json()["code"]) == (404, "not_found"), response.content
    assert _host_cert_post(client_for(charlie), cluster, "node1", key).status_code == 404
    # a node the cluster does not have (or no longer has)
    for node in ("node9", "99999999999999999999", "²"):
        assert _host_cert_post(client_for(alice), cluster, node, key).status_code == 404, node
    cluster.nodes.update(state="removed")
    assert _host_cert_post(client_for(alice), cluster, "node1", key).status_code == 404
    cluster.nodes.update(state="ready")
    # bob, of the cluster's group, may enter it, not vouch for its nodes
    response = _host_cert_post(client_for(bob), cluster, "node1", key)
    assert (response.status_code, response.json()["code"]) == (403, "forbidden")
    # nodes going or gone, or a lifetime over: 409
    for state in ("tearing_down", "torn_down", "failed"):
        VirtualCluster.objects.filter(pk=cluster.pk).update(state=state)
        response = _host_cert_post(client_for(alice), cluster, "node1", key)
        assert (response.status_code, response.json()["code"]) == (409, "cluster_not_ready"), state
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="ready", expires_at=timezone.now())
    assert _host_cert_post(client_for(alice), cluster, "node1", key).status_code == 409
    # input missing
    response = client_for(alice).post("/api/access/host-certificates/", {"cluster": cluster.pk}, format="json")
    assert response.status_code == 400 and set(response.json()) >= {"node", "public_key"}
    _, reader = token_create(user=alice, name="ro", scopes=[TokenScope.CLUSTERS_READ])
    assert _host_cert_post(client_for(token=reader), cluster, "node1", key).status_code == 403
    assert not Credential.objects.exists()


def _host_access_get(client, cluster, node):
    query = {"cluster": getattr(cluster, "pk", cluster), "node": node}
    return client.get("/api/access/host-certificates/access/", query)


def test_a_node_learns_who_may_log_in_now(alice, bob, team, cluster, gateway, tmp_path):
    """A timer on the node asks again: bob, who left the cluster's group, is gone from the principals file, and
    bob's revoked SSH certificate is in the KRL its sshd reads (RevokedKeys)."""
    import base64
    import shutil
    import subprocess

    label = cluster_label(cluster)
    _, secret = token_create(user=alice, name="node timer", scopes=[TokenScope.CLUSTERS_WRITE])
    issued = services.ssh_certificate_issue(user=bob, cluster=cluster)
    response = _host_access_get(client_for(token=secret), cluster, "node1")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["cluster"], body["node"], body["node_user"]) == (label, "node1", "root")
    assert body["user_ca"] == Authority.objects.get(kind=AuthorityKind.SSH_USER).public_key
    lines = [ln for ln in body["authorized_principals"].splitlines() if not ln.startswith("#")]
    assert lines == [f"{label}.alice", f"{label}.bob"]
    krl = base64.b64decode(body["krl"])
    assert krl.startswith(b"SSHKRL\n\x00") and issued.credential.serial.to_bytes(8, "big") not in krl
    # the same as a host certificate's answer gives (one function renders both)
    certified = _host_cert_post(client_for(token=secret), cluster, "node1", _host_key()).json()
    assert certified["authorized_principals"] == body["authorized_principals"]

    bob.groups.remove(team)  # revokes bob's certificate (he may no longer enter the cluster)
    body = _host_access_get(client_for(token=secret), cluster, "node1").json()
    lines = [ln for ln in body["authorized_principals"].splitlines() if not ln.startswith("#")]
    assert lines == [f"{label}.alice"]
    krl = base64.b64decode(body["krl"])
    assert krl == services.krl_current()
    assert Credential.objects.get(pk=issued.credential.pk).revoked_at is not None
    if shutil.which("ssh-keygen"):
        (tmp_path / "krl").write_bytes(krl)
        (tmp_path / "bob-cert.pub").write_text(issued.certificate + "\n")
        shown = subprocess.run(
            ["ssh-keygen", "-Q", "-f", tmp_path / "krl", tmp_path / "bob-cert.pub"], capture_output=True, text=True
        )
        assert shown.returncode != 0 and "REVOKED" in shown.stdout, shown.stdout + shown.stderr
    else:
        assert issued.credential.serial.to_bytes(8, "big") in krl


def test_users_of_a_cluster_without_admin_rights_log_in_as_the_unprivileged_account(alice, cluster, gateway, settings):
    """Admin rights make the cluster's people root on its nodes; without them, on the provider's images, they log
    in as ACCESS_SSH_NODE_USER: the account the node's principals file is for, and the ssh_config's User."""
    from clusters.models import VirtualCluster

    _, secret = token_create(user=alice, name="boot", scopes=[TokenScope.CLUSTERS_WRITE])
    api = client_for(token=secret)
    assert _host_access_get(api, cluster, "node1").json()["node_user"] == "root"
    assert "  User root\n" in services.ssh_certificate_issue(user=alice, cluster=cluster).ssh_config
    VirtualCluster.objects.filter(pk=cluster.pk).update(admin_rights=False)
    cluster.refresh_from_db()
    settings.ACCESS_SSH_NODE_USER = "cloud"
    assert _host_access_get(api, cluster, "node1").json()["node_user"] == "cloud"
    assert _host_cert_post(api, cluster, "node1", _host_key()).json()["node_user"] == "cloud"
    config = services.ssh_certificate_issue(user=alice, cluster=cluster).ssh_config
    assert "  User cloud\n" in config and "User root" not in config
    # an image a user registered: its owner made it, root there is theirs (and the provider's account may not exist)
    cluster.image.owner = alice
    cluster.image.save()
    assert _host_access_get(api, cluster, "node1").json()["node_user"] == "root"
    cluster.image.approved = True  # approved, its closed clusters' people stay root (their account)
    cluster.image.save()
    assert _host_access_get(api, cluster, "node1").json()["node_user"] == "root"
    # public (the policy, or an override): nobody is root there
    VirtualCluster.objects.filter(pk=cluster.pk).update(connectivity="public")
    assert _host_access_get(api, cluster, "node1").json()["node_user"] == "cloud"


def test_a_nodes_access_refused_as_its_host_certificate_is(alice, bob, charlie, root, cluster, other_cluster):
    from clusters.models import Node, VirtualCluster

    # the middleware (clusters:manage) and an admin in the browser, for anyone's cluster, by the node's id too
    _, manage = token_create(user=charlie, name="scheduler", scopes=[TokenScope.CLUSTERS_MANAGE])
    node1 = Node.objects.get(cluster=cluster, name="node1")
    for client in (client_for(token=manage), client_for(root)):
        response = _host_access_get(client, cluster, node1.pk)
        assert (response.status_code, response.json().get("node")) == (200, "node1"), response.content
    # not the caller's cluster (or none), a node it does not have (or no longer has): 404
    for target in (other_cluster.pk, 999999):
        response = _host_access_get(client_for(alice), target, "node1")
        assert (response.status_code, response.json()["code"]) == (404, "not_found"), response.content
    assert _host_access_get(client_for(charlie), cluster, "node1").status_code == 404
    for node in ("node9", "99999999999999999999"):
        assert _host_access_get(client_for(alice), cluster, node).status_code == 404, node
    cluster.nodes.update(state="removed")
    assert _host_access_get(client_for(alice), cluster, "node1").status_code == 404
    cluster.nodes.update(state="ready")
    # a group member may enter the cluster, not speak for its nodes; a token without the scope
    response = _host_access_get(client_for(bob), cluster, "node1")
    assert (response.status_code, response.json()["code"]) == (403, "forbidden")
    _, reader = token_create(user=alice, name="ro", scopes=[TokenScope.CLUSTERS_READ])
    assert _host_access_get(client_for(token=reader), cluster, "node1").status_code == 403
    # input missing or malformed
    response = client_for(alice).get("/api/access/host-certificates/access/", {"cluster": "x"})
    assert response.status_code == 400 and set(response.json()) >= {"cluster", "node"}
    # nodes going or gone, or a lifetime over: 409
    for state in ("tearing_down", "torn_down", "failed"):
        VirtualCluster.objects.filter(pk=cluster.pk).update(state=state)
        response = _host_access_get(client_for(alice), cluster, "node1")
        assert (response.status_code, response.json()["code"]) == (409, "cluster_not_ready"), state
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="ready", expires_at=timezone.now())
    assert _host_access_get(client_for(alice), cluster, "node1").status_code == 409


def _host_access_with_key(client, cluster, node, public_key):
    query = {"cluster": getattr(cluster, "pk", cluster), "node": node, "public_key": public_key}
    return client.get("/api/access/host-certificates/access/", query)


def test_a_node_gets_its_host_certificate_again_once_the_clusters_lifetime_was_extended(alice, cluster):
    """The node's host certificate ends with the cluster as it was when issued. Once the cluster's lifetime is
    extended, the node's timer (with its host key) gets a new one: the same key and names, until the cluster now
    ends, recorded and audited as any issuance; the old one is left to expire. Asked again, nothing new."""
    from access import ssh
    from clusters import services as cluster_services
    from portal.models import AuditEntry

    _, secret = token_create(user=alice, name="node timer", scopes=[TokenScope.CLUSTERS_WRITE])
    api = client_for(token=secret)
    key = _host_key()
    first = _host_cert_post(api, cluster, "node1", key).json()
    response = _host_access_with_key(api, cluster, "node1", key)
    assert response.status_code == 200, response.content
    assert response.json()["host_certificate"] is None  # it lasts as long as the cluster

    cluster = cluster_services.cluster_extend(cluster=cluster, expires_at=cluster.expires_at + dt.timedelta(days=2))
    assert _host_access_get(api, cluster, "node1").json()["host_certificate"] is None  # no key: nothing to renew
    body = _host_access_with_key(api, cluster, "node1", key).json()
    renewed = body["host_certificate"]
    assert renewed is not None and body["node"] == "node1" and body["authorized_principals"]
    cert = ssh.load_cert(renewed["certificate"])
    cert.verify_cert_signature()
    host_ca = Authority.objects.get(kind=AuthorityKind.SSH_HOST).public_key
    assert ssh.public_key_line(cert.signature_key()) == " ".join(host_ca.split()[:2])
    assert ssh.public_key_line(cert.public_key()) == " ".join(key.split()[:2])
    assert (
        cert.valid_principals == [p.encode() for p in first["principals"]]
        and renewed["principals"] == first["principals"]
    )
    assert cert.valid_before == int(cluster.expires_at.timestamp())  # the new end
    assert dt.datetime.fromisoformat(renewed["valid_before"]) == cluster.expires_at.replace(microsecond=0)
    new = Credential.objects.get(pk=renewed["credential"])
    assert (new.kind, new.serial, new.user, new.principals) == ("ssh_host", cert.serial, alice, first["principals"])
    assert new.serial != first["serial"] and new.cluster_labels() == [cluster_label(cluster)]
    assert AuditEntry.objects.filter(object_id=str(new.pk), content_type__model="credential", action="create").exists()
    old = Credential.objects.get(pk=first["credential"])
    assert old.revoked_at is None and old.not_after < new.not_after

    # asked again: the certificate it now has lasts as long as the cluster
    assert _host_access_with_key(api, cluster, "node1", key).json()["host_certificate"] is None
    # a key of the node's never certified: nothing to renew; a key that is not one: 400
    assert _host_access_with_key(api, cluster, "node1", _host_key("ecdsa")).json()["host_certificate"] is None
    response = _host_access_with_key(api, cluster, "node1", "ssh-ed25519 AAAA-not-base64")
    assert (response.status_code, response.json()["code"]) == (400, "bad_public_key"), response.content
    # another node's certificate is not this one's
    assert _host_access_with_key(api, cluster, "node2", key).status_code == 404
    assert Credential.objects.filter(kind="ssh_host").count() == 2


def test_a_node_whose_answer_was_lost_gets_its_newest_host_certificate_again(alice, cluster):
    """The renewal is issued and recorded inside the timer's GET: an answer lost on its way (a timeout, a file
    that could not be written) left the node with the old certificate, and every later request answered null —
    it expired before the cluster. The node says which certificate it has (certificate_sha256): one that is not
    the newest for its key there gets the newest again, the same one (nothing new issued); so does a node whose
    POST answer was lost (it has none). Without the digest, or with the newest's, nothing is sent."""
    from access.gateway.state import certificate_digest
    from clusters import services as cluster_services

    key = _host_key()
    api = client_for(alice)
    first = _host_cert_post(api, cluster, "node1", key).json()

    def access(has: str | None):
        query = {"cluster": cluster.pk, "node": "node1", "public_key": key}
        if has is not None:
            query["certificate_sha256"] = has
        response = api.get("/api/access/host-certificates/access/", query)
        assert response.status_code == 200, response.content
        return response.json()["host_certificate"]

    nothing = certificate_digest("")
    assert access(certificate_digest(first["certificate"])) is None  # it has the newest
    again = access(nothing)  # the POST's answer was lost: it has none
    assert again["serial"] == first["serial"] and again["certificate"] == first["certificate"]

    cluster = cluster_services.cluster_extend(cluster=cluster, expires_at=cluster.expires_at + dt.timedelta(days=2))
    renewed = access(certificate_digest(first["certificate"]))  # issued; this answer is lost
    assert renewed["serial"] != first["serial"]
    assert access(None) is None  # (without the digest: as before)
    resent = access(certificate_digest(first["certificate"]))
    assert (resent["serial"], resent["certificate"]) == (renewed["serial"], renewed["certificate"])
    assert access(certificate_digest(renewed["certificate"])) is None
    assert Credential.objects.filter(kind="ssh_host").count() == 2
    response = api.get(
        "/api/access/host-certificates/access/",
        {"cluster": cluster.pk, "node": "node1", "public_key": key, "certificate_sha256": "not-hex"},
    )
    assert response.status_code == 400 and "certificate_sha256" in response.json(), response.content


def test_a_host_certificate_of_a_cluster_that_outlives_its_lifetime_is_renewed_once_half_is_left(
    alice, cluster, settings
):
    """A cluster that lives longer than ACCESS_SSH_HOST_CERT_LIFETIME: its nodes' certificates end before it,
    whatever is done. The node's timer gets a new one once less than half of that lifetime is left, not at every
    request; a revoked key never again."""
    settings.ACCESS_SSH_HOST_CERT_LIFETIME = 3600  # the cluster lives a day
    key = _host_key()
    first = _host_cert_post(client_for(alice), cluster, "node1", key).json()
    assert _host_access_with_key(client_for(alice), cluster, "node1", key).json()["host_certificate"] is None
    Credential.objects.filter(pk=first["credential"]).update(not_after=timezone.now() + dt.timedelta(minutes=29))
    renewed = _host_access_with_key(client_for(alice), cluster, "node1", key).json()["host_certificate"]
    assert renewed is not None
    made = dt.datetime.fromisoformat(renewed["valid_before"]) - dt.datetime.fromisoformat(renewed["valid_after"])
    assert dt.timedelta(minutes=60) <= made <= dt.timedelta(minutes=66)  # (valid_after: the clock skew before now)
    assert _host_access_with_key(client_for(alice), cluster, "node1", key).json()["host_certificate"] is None
    # a revoked host certificate: its key gets none again, though the older one of it was not revoked
    services.credential_revoke(credential=Credential.objects.get(pk=renewed["credential"]), reason="key_compromise")
    Credential.objects.update(not_after=timezone.now() + dt.timedelta(minutes=29))  # both due
    assert _host_access_with_key(client_for(alice), cluster, "node1", key).json()["host_certificate"] is None
    assert Credential.objects.filter(kind="ssh_host").count() == 2


def _node_token(client, cluster) -> str:
    made = client.post(f"/api/clusters/{cluster.pk}/node-token/", format="json")
    assert made.status_code == 201, made.content
    assert made["Cache-Control"] == "no-store"
    assert made.data["scopes"] == [TokenScope.CLUSTER_NODE] and made.data["cluster"] == cluster.pk
    return made.data["token"]


def test_a_node_token_admits_to_its_clusters_node_endpoints_and_nothing_else(
    alice, bob, team, cluster, other_cluster, gateway
):
    """The cluster's people are root on its nodes and read whatever token a node holds: a node token certifies
    the cluster's nodes' host keys and tells who may log in to them — for that cluster only — and opens nothing
    else: not the owner's clusters, not their VPN profiles, not another cluster's nodes (404, as for a cluster
    not among yours). Made by the owner, not by a group member; revoked when the cluster ends."""
    from portal.models import ApiToken

    _, write = token_create(user=alice, name="laptop", scopes=[TokenScope.CLUSTERS_WRITE])
    assert client_for(token=write).post(f"/api/clusters/{cluster.pk}/node-token/").status_code == 201
    assert client_for(bob).post(f"/api/clusters/{cluster.pk}/node-token/").status_code == 403  # a group member
    _, reader = token_create(user=alice, name="ro", scopes=[TokenScope.CLUSTERS_READ])
    assert client_for(token=reader).post(f"/api/clusters/{cluster.pk}/node-token/").status_code == 403
    secret = _node_token(client_for(alice), cluster)
    node = client_for(token=secret)

    issued = _host_cert_post(node, cluster, "node1", _host_key("ed25519"))
    assert issued.status_code == 201, issued.content
    assert Credential.objects.get(serial=issued.data["serial"]).user == alice  # (acting as the owner)
    assert _host_access_get(node, cluster, "node1").status_code == 200
    # another cluster's nodes: alice's own other cluster too
    mine_too = make_cluster(alice, name="second")
    assert _host_cert_post(node, mine_too, "node1", _host_key("ed25519")).status_code == 404
    assert _host_access_get(node, mine_too, "node1").status_code == 404
    assert _host_access_get(node, other_cluster, "node1").status_code == 404
    # nothing else
    for method, path, body in (
        ("get", "/api/clusters/", None),
        ("get", f"/api/clusters/{cluster.pk}/", None),
        ("post", f"/api/clusters/{cluster.pk}/teardown/", {}),
        ("post", f"/api/clusters/{cluster.pk}/node-token/", {}),
        ("post", "/api/access/vpn-profiles/", {"clusters": [cluster.pk]}),
        ("get", "/api/access/credentials/", None),
        ("get", "/api/access/clusters/", None),
        ("get", "/api/images/", None),
    ):
        response = getattr(node, method)(path, body, format="json") if body is not None else node.get(path)
        assert response.status_code == 403, (path, response.status_code)

    # the cluster ends: its node tokens are revoked
    from clusters import services as cluster_services

    cluster_services.cluster_teardown(cluster=cluster, reason="done")
    from clusters.signals import cluster_ended

    cluster.refresh_from_db()
    cluster_ended.send(type(cluster), cluster=cluster)
    assert not ApiToken.objects.filter(cluster=cluster, revoked_at=None).exists()
    assert _host_access_get(node, cluster, "node1").status_code == 401


def test_a_node_token_ends_with_its_owner(alice, charlie, cluster, gateway):
    """A node token acts as the owner it was made for: the cluster given to another owner revokes it."""
    from portal.models import ApiToken

    secret = _node_token(client_for(alice), cluster)
    cluster.owner = charlie
    cluster.group = None
    cluster.save()
    assert ApiToken.objects.get(cluster=cluster).revoked_at is not None
    assert _host_access_get(client_for(token=secret), cluster, "node1").status_code == 401


def test_a_node_token_outlives_its_owners_account(alice, bob, root, team, cluster, gateway):
    """A cluster whose owner is deactivated runs on, entered by its group: its nodes' token (the cluster's, acting
    as the owner) keeps fetching who may log in — without the owner now — and certifying host keys, and the
    middleware can still make one for a job's nodes; the owner's own tokens are refused."""
    secret = _node_token(client_for(alice), cluster)
    _, own = token_create(user=alice, name="laptop", scopes=[TokenScope.CLUSTERS_READ])
    _, manager = token_create(user=root, name="ops", scopes=[TokenScope.CLUSTERS_MANAGE])
    alice.is_active = False
    alice.save()
    node = client_for(token=secret)
    access = _host_access_get(node, cluster, "node1")
    assert access.status_code == 200, access.content
    assert "alice" not in access.data["authorized_principals"] and "bob" in access.data["authorized_principals"]
    assert _host_cert_post(node, cluster, "node1", _host_key("ed25519")).status_code == 201
    assert client_for(token=own).get("/api/clusters/").status_code == 401
    # the account made active again does not bring back its own tokens: revoked with the deactivation
    alice.is_active = True
    alice.save()
    assert client_for(token=own).get("/api/clusters/").status_code == 401
    alice.is_active = False
    alice.save()
    made = client_for(token=manager).post(f"/api/clusters/{cluster.pk}/node-token/", format="json")
    assert made.status_code == 201, made.content
    assert _host_access_get(client_for(token=made.data["token"]), cluster, "node1").status_code == 200


def test_node_tokens_are_bounded_and_only_for_active_clusters(alice, cluster, gateway, monkeypatch):
    monkeypatch.setattr(services, "NODE_TOKENS_PER_CLUSTER", 2)
    _node_token(client_for(alice), cluster)
    _node_token(client_for(alice), cluster)
    refused = client_for(alice).post(f"/api/clusters/{cluster.pk}/node-token/")
    assert refused.status_code == 409 and "2 live node tokens already" in refused.data["detail"]
    from clusters.models import VirtualCluster

    VirtualCluster.objects.filter(pk=cluster.pk).update(state="torn_down")
    ended = client_for(alice).post(f"/api/clusters/{cluster.pk}/node-token/")
    assert ended.status_code in (404, 409), ended.content

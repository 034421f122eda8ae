"""The "my clusters" page with Django's test client: what a logged-in user sees and downloads."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import datetime as dt
import io
import zipfile

import pytest
from django.test import Client

from access.models import Authority, AuthorityKind, Credential
from access.selectors import cluster_label
from access.tests.fixtures import cluster, gateway, make_cluster, other_cluster
from access.tests.profile_check import parse_profile

pytestmark = pytest.mark.django_db


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_page_needs_login(cluster):
    response = Client().get("/access/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_page_lists_enterable_clusters_and_the_client_note(alice, bob, charlie, team, cluster, other_cluster, gateway):
    provisioning = make_cluster(alice, name="soon", state="provisioning")
    page = logged_in(bob).get("/access/").content.decode()
    assert cluster_label(cluster) in page
    assert cluster_label(other_cluster) not in page
    assert "OpenVPN 2.x" in page and "OpenVPN Connect" in page and "Android" in page
    assert "virtcloud-bob.ovpn" in page  # the name a profile for several clusters gets
    assert f"ssh -F virtcloud.conf {cluster_label(cluster)}-node1" in page
    assert 'href="/access/"' in page  # the nav link
    alice_page = logged_in(alice).get("/access/").content.decode()
    assert "soon" in alice_page and "not enterable yet" in alice_page
    assert f'value="{provisioning.pk}"' not in alice_page  # no checkbox for it
    charlie_page = logged_in(charlie).get("/access/").content.decode()
    assert cluster_label(cluster) not in charlie_page


def test_vpn_download_from_the_page(bob, cluster, gateway):
    response = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Disposition"].startswith("attachment;")
    both = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk, make_cluster(bob, name="two").pk]})
    assert 'filename="virtcloud-bob.ovpn"' in both["Content-Disposition"]  # as the page says
    aa = Authority.objects.get(kind=AuthorityKind.AA).certificate
    assert parse_profile(response.content.decode(), aa_pem=aa).fqans == [
        f"/virtcloud/{cluster_label(cluster)}/Role=member"
    ]


def test_vpn_download_for_a_foreign_cluster_is_refused_with_a_message(charlie, cluster, gateway):
    client = logged_in(charlie)
    response = client.post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True)
    assert response.redirect_chain[-1][0] == "/access/"
    assert "Select a valid choice" in response.content.decode()
    assert f"cluster {cluster.pk} cannot be entered now" in response.content.decode()
    assert not Credential.objects.exists()


def test_no_gateway_is_a_message_not_a_500(alice, cluster):
    response = logged_in(alice).post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True)
    assert "no enabled OpenVPN access gateway" in response.content.decode()


def test_ssh_zip_download(alice, cluster, gateway):
    response = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk, "public_key": ""})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert response["Cache-Control"] == "no-store"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    config = archive.read(f"virtcloud-{cluster_label(cluster)}/virtcloud.conf").decode()
    assert f"Host {cluster_label(cluster)}-*" in config and "ProxyJump" in config


def test_ssh_bad_key_is_a_message(alice, cluster, gateway):
    response = logged_in(alice).post(
        "/access/ssh/", {"cluster": cluster.pk, "public_key": "ssh-rsa AAAAB3Nza"}, follow=True
    )
    assert response.status_code == 200
    assert "not a valid OpenSSH public key (ssh-rsa)" in response.content.decode()
    assert not Credential.objects.exists()


def test_lost_my_laptop(alice, bob, cluster, gateway):
    client = logged_in(alice)
    client.post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    credential = Credential.objects.get()
    page = client.get("/access/").content.decode()
    assert f'data-serial="{credential.serial}"' in page and "Revoke (lost my laptop)" in page
    # Every row has such a button: its accessible name says which credential it revokes.
    assert f'aria-label="Revoke OpenVPN profile {credential.serial} (lost my laptop)"' in page
    # Someone else cannot revoke it.
    assert logged_in(bob).post(f"/access/credentials/{credential.pk}/revoke/").status_code == 404
    # GET does nothing (it leads back to the page).
    assert client.get(f"/access/credentials/{credential.pk}/revoke/").url == "/access/"
    credential.refresh_from_db()
    assert credential.revoked_at is None
    response = client.post(f"/access/credentials/{credential.pk}/revoke/", follow=True)
    assert "Revoked" in response.content.decode()
    credential.refresh_from_db()
    assert credential.revocation_reason == "key_compromise" and credential.revoked_by == alice
    assert f"revoked {credential.revoked_at:%Y-%m-%d %H:%M} UTC (" in response.content.decode()  # as "valid until"


def test_an_expired_credential_shows_as_expired_without_a_revoke_button(alice, cluster, gateway):
    from django.utils import timezone

    client = logged_in(alice)
    client.post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    credential = Credential.objects.get()
    Credential.objects.filter(pk=credential.pk).update(
        not_before=timezone.now() - dt.timedelta(days=4), not_after=timezone.now() - dt.timedelta(days=1)
    )
    page = client.get("/access/").content.decode()
    row = page.split(f'data-serial="{credential.serial}"')[1].split("</tr>")[0]
    assert "<td>expired</td>" in row
    assert "Revoke" not in row


# --- admin ---------------------------------------------------------------------------------------------------------


def test_admin_shows_no_ca_key(root, gateway):
    from access import services
    from access.models import Authority

    services.ca_ensure()
    client = logged_in(root)
    vpn = Authority.objects.get(kind=AuthorityKind.VPN)
    for url in ("/admin/access/authority/", f"/admin/access/authority/{vpn.pk}/change/"):
        page = client.get(url)
        assert page.status_code == 200
        assert "PRIVATE KEY" not in page.content.decode()
    assert "BEGIN CERTIFICATE" in client.get(f"/admin/access/authority/{vpn.pk}/change/").content.decode()


def test_admin_revoke_action(root, alice, bob, cluster, gateway):
    from access import services

    services.vpn_profile_issue(user=alice, clusters=[cluster])
    services.vpn_profile_issue(user=bob, clusters=[cluster])
    services.vpn_profile_issue(user=bob, clusters=[cluster])
    services.ssh_certificate_issue(user=bob, cluster=cluster)
    kept = services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    chosen = list(Credential.objects.exclude(pk=kept.pk).order_by("pk"))
    client = logged_in(root)
    assert client.get("/admin/access/credential/").status_code == 200
    assert client.get(f"/admin/access/credential/{chosen[0].pk}/change/").status_code == 200
    services.credential_revoke(credential=chosen[0], reason="key_compromise", by=alice)
    crl_number = Authority.objects.get(kind=AuthorityKind.VPN).revocation_number
    response = client.post(
        "/admin/access/credential/",
        {"action": "revoke", "_selected_action": [c.pk for c in chosen]},
        follow=True,
    )
    assert "Revoked 3 credential" in response.content.decode()  # the one revoked before is left as it was
    revoked = Credential.objects.filter(pk__in=[c.pk for c in chosen]).order_by("pk")
    assert [(c.revocation_reason, c.revoked_by) for c in revoked] == [
        ("key_compromise", alice),
        ("privilege_withdrawn", root),
        ("privilege_withdrawn", root),
        ("privilege_withdrawn", root),
    ]
    assert Authority.objects.get(kind=AuthorityKind.VPN).revocation_number == crl_number + 1  # signed once
    kept.refresh_from_db()
    assert kept.revoked_at is None


def test_admin_makes_a_gateway_token_once(root, gateway):
    from portal.models import ApiToken

    client = logged_in(root)
    response = client.post(
        "/admin/access/gateway/", {"action": "make_token", "_selected_action": [gateway.pk]}, follow=True
    )
    gateway.refresh_from_db()
    page = response.content.decode()
    assert gateway.token is not None and gateway.token.scopes == ["gateway:pull"]
    secret = page.split("not shown again: ")[1].split("<")[0].strip()
    assert secret.startswith(f"vc_{gateway.token.prefix}_")
    first = gateway.token
    client.post("/admin/access/gateway/", {"action": "make_token", "_selected_action": [gateway.pk]})
    first.refresh_from_db()
    assert first.revoked_at is not None  # the old token stops working
    assert ApiToken.objects.filter(revoked_at__isnull=True, scopes=["gateway:pull"]).count() == 1


def test_admin_sets_a_bastion_per_cluster_and_refuses_a_port_base_without_room_for_every_vlan(root, gateway):
    client = logged_in(root)
    page = client.get(f"/admin/access/gateway/{gateway.pk}/change/").content.decode()
    assert 'name="ssh_port_base"' in page
    form = {
        "name": gateway.name,
        "kind": gateway.kind,
        "address": gateway.address,
        "vpn_port": 1194,
        "vpn_proto": "udp",
        "ssh_port": 22,
        "ssh_user": "virtcloud",
        "enabled": "on",
    }
    too_high = client.post(f"/admin/access/gateway/{gateway.pk}/change/", {**form, "ssh_port_base": 62000})
    assert too_high.status_code == 200 and "less than or equal to 61441" in too_high.content.decode()
    done = client.post(f"/admin/access/gateway/{gateway.pk}/change/", {**form, "ssh_port_base": 30000})
    assert done.status_code == 302, done.content.decode()[:2000]
    gateway.refresh_from_db()
    assert gateway.ssh_port_base == 30000 and gateway.ssh_port_for(142) == 30142 and gateway.ssh_port_for(None) == 22


def test_a_form_address_opened_goes_back_to_the_page(alice, cluster, gateway):
    """The forms' addresses only take POST; opened in the address bar (or a download's address reloaded)
    they lead back to the page, not to Django's blank 405 — and issue or revoke nothing."""
    client = logged_in(alice)
    for path in ("/access/vpn-profile/", "/access/ssh/", "/access/credentials/1/revoke/"):
        response = client.get(path)
        assert (response.status_code, response.url) == (302, "/access/"), path
        assert client.put(path).status_code == 405
    assert not Credential.objects.exists()
    assert Client().get("/access/vpn-profile/").url == "/access/"  # then the page asks to log in


def test_a_gateway_that_fails_closed_is_named_on_the_page_and_a_current_one_is_preferred(bob, cluster, gateway):
    """A gateway whose state has not been brought up to date for GATEWAY_STATE_MAX_AGE refuses everyone: the
    page says so (a user's AUTH_FAILED has a reason), and profiles point at a gateway that is current."""
    from access.models import Gateway, GatewayKind

    Gateway.objects.filter(pk=gateway.pk).update(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    page = logged_in(bob).get("/access/").content.decode()
    assert 'id="stale-gateways"' in page and "<strong>gw1</strong>" in page and "for 60 minutes" in page
    profile = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]}).content.decode()
    assert "remote 198.18.100.1 1194" in profile  # the only one: still named in the profile

    Gateway.objects.create(name="gw2", kind=GatewayKind.BOTH, address="198.18.100.2", vpn_port=1194)
    profile = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]}).content.decode()
    assert "remote 198.18.100.2 1194" in profile and "198.18.100.1" not in profile
    Gateway.objects.filter(pk=gateway.pk).update(state_as_of=dt.datetime.now(dt.UTC))  # gw1 caught up
    page = logged_in(bob).get("/access/").content.decode()
    assert 'id="stale-gateways"' not in page


def test_the_page_names_nodes_the_bastion_does_not_relay_to(alice, charlie, cluster, other_cluster, gateway):
    """Another closed cluster uses the address of one of alice's nodes: the bastion relays to neither, and the
    page says which node and what to use instead; the download's ssh_config says it too."""
    from clusters.models import Node

    Node.objects.filter(cluster__in=[cluster, other_cluster]).update(address="10.0.0.5")
    page = logged_in(alice).get("/access/").content.decode()
    assert 'id="ssh-withheld"' in page
    assert f"<code>{cluster_label(cluster)}-node1</code> (10.0.0.5)" in page
    assert cluster_label(other_cluster) not in page  # charlie's cluster is not named to alice
    download = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk})
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        config = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("virtcloud.conf"))
    assert f"#   {cluster_label(cluster)}-node1 (10.0.0.5)" in config
    assert f"Host {cluster_label(cluster)}-node1" not in config

    Node.objects.filter(cluster=other_cluster).update(address="10.0.0.6")
    assert 'id="ssh-withheld"' not in logged_in(alice).get("/access/").content.decode()


def test_lost_my_laptop_signs_out_the_laptop_too(team, cluster, gateway):
    """The laptop's browser may still be signed in: it could download a new profile. Revoking from the phone ends
    every other session of a directory account (no password here); this one stays."""
    from django.contrib.auth.models import User

    from access import services

    dora = User.objects.create_user("dora")  # as django-auth-ldap makes them: no usable password
    dora.groups.add(team)
    assert not dora.has_usable_password()
    laptop, phone = logged_in(dora), logged_in(dora)
    services.vpn_profile_issue(user=dora, clusters=[cluster])
    credential = Credential.objects.get(user=dora)
    r = phone.post(f"/access/credentials/{credential.pk}/revoke/", follow=True)
    assert "Every other browser session of yours is signed out" in r.content.decode()
    assert laptop.get("/access/").status_code == 302  # to the login page
    assert phone.get("/access/").status_code == 200
    # Revoking it again (already revoked) signs nobody out.
    dora.refresh_from_db()  # (signed in after the sign-out)
    tablet = logged_in(dora)
    r = phone.post(f"/access/credentials/{credential.pk}/revoke/", follow=True)
    assert "was already revoked" in r.content.decode() and "signed out" not in r.content.decode()
    assert tablet.get("/access/").status_code == 200


def test_lost_my_laptop_with_a_local_password_says_to_change_it(alice, cluster, gateway):
    from access import services

    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get(user=alice)
    laptop, phone = logged_in(alice), logged_in(alice)
    r = phone.post(f"/access/credentials/{credential.pk}/revoke/", follow=True)
    assert "Change your password" in r.content.decode()
    assert laptop.get("/access/").status_code == 200  # (Django cannot end it without the password changing)

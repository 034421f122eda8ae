"""The "VPN and SSH access" page (/access/) with Django's test client: what a logged-in user sees and downloads."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import datetime as dt
import io
import re
import zipfile

import pytest
from django.test import Client

from access.models import Authority, AuthorityKind, Credential
from access.selectors import cluster_label
from access.tests.fixtures import cluster, gateway, make_cluster, make_gateway, other_cluster
from access.tests.profile_check import parse_profile
from portal.tests.helpers import logged_in
from portal.tokens import token_create

pytestmark = pytest.mark.django_db


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
    assert f"ssh -F virtcloud.conf node1.{cluster_label(cluster)}" in page
    assert 'href="/access/"' in page  # the nav link
    alice_page = logged_in(alice).get("/access/").content.decode()
    assert "soon" in alice_page and "not enterable yet" in alice_page
    assert f'value="{provisioning.pk}"' not in alice_page  # no checkbox for it
    charlie_page = logged_in(charlie).get("/access/").content.decode()
    assert cluster_label(cluster) not in charlie_page


def test_vpn_download_from_the_page(bob, cluster, gateway):
    response = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"].split(", ")
    assert response["Content-Disposition"].startswith("attachment;")
    both = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk, make_cluster(bob, name="two").pk]})
    assert 'filename="virtcloud-bob.ovpn"' in both["Content-Disposition"]  # as the page says
    aa = Authority.objects.get(kind=AuthorityKind.AA).certificate
    assert parse_profile(response.content.decode(), aa_pem=aa).fqans == [
        f"/virtcloud/{cluster_label(cluster)}/Role=member"
    ]


def test_vpn_download_for_a_cluster_not_enterable_any_more_is_refused_under_the_field(alice, bob, cluster, gateway):
    """Offered when the page was loaded, then torn down: the form comes back saying so under the field."""
    make_cluster(bob, name="other")  # bob still has a cluster to enter: the form is on the page
    cluster.state = "tearing_down"
    cluster.save()
    response = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    assert response.status_code == 400
    errors = response.content.decode().split('id="vpn-clusters_error"')[1].split("</ul>")[0]
    assert "Select a valid choice" in errors and f"cluster {cluster.pk} cannot be entered now" in errors
    assert not Credential.objects.exists()


def test_vpn_download_for_a_foreign_cluster_is_refused_with_a_message(charlie, cluster, gateway):
    """charlie can enter no cluster: the page has no form to show the error in, so it is a message."""
    response = logged_in(charlie).post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    assert response.status_code == 400
    page = response.content.decode()
    alert = page.split('<p class="message error" role="alert">')[1].split("</p>")[0]
    assert f"cluster {cluster.pk} cannot be entered now" in alert
    assert not Credential.objects.exists()


def test_no_gateway_is_a_message_not_a_500(alice, cluster):
    response = logged_in(alice).post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True)
    assert "no OpenVPN access gateway is ready" in response.content.decode()


def test_ssh_zip_download(alice, cluster, gateway):
    response = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk, "public_key": ""})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert "no-store" in response["Cache-Control"].split(", ")
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    config = archive.read(f"virtcloud-{cluster_label(cluster)}/virtcloud.conf").decode()
    assert f"Host *.{cluster_label(cluster)}" in config and "ProxyJump" in config


def test_ssh_bad_key_is_said_under_the_field_and_the_key_is_kept(alice, cluster, gateway):
    """The service refuses the key (not the form): the page comes back with the key as pasted, the error under
    the field (which is marked invalid and described by it), and no message above the page repeating the label."""
    response = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk, "public_key": "ssh-rsa AAAAB3Nza"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "<title>Error: VPN and SSH access · VirtCloud portal</title>" in page
    textarea = page.split('<textarea name="public_key"')[1].split("</textarea>")[0]
    assert textarea.endswith(">\nssh-rsa AAAAB3Nza")  # kept
    assert 'aria-invalid="true"' in textarea and "autofocus" in textarea
    assert 'aria-describedby="ssh-public_key_helptext ssh-public_key_error"' in textarea
    errors = page.split('<ul class="errorlist" id="ssh-public_key_error">')[1].split("</ul>")[0]
    assert "Not a valid OpenSSH public key (ssh-rsa)" in errors
    assert 'id="ssh-public_key_helptext"' in page
    assert 'class="messages"' not in page and "Your public key (optional):" not in page
    assert f'<option value="{cluster.pk}" selected>' in page  # the cluster chosen, too
    assert 'id="vpn-form"' in page and "aria-invalid" not in page.split('id="vpn-form"')[1].split("</form>")[0]
    assert not Credential.objects.exists()


def test_a_cluster_no_bastion_relays_to_is_said_under_the_cluster_and_the_key_is_kept(alice, cluster, gateway):
    """A bastion per cluster and no bastion address for this one (its scheduler gave none): the refusal is the
    cluster's, under its field — the pasted key and the label stay (a redirect lost them)."""
    from access import ssh

    gateway.ssh_port_base = 30000
    gateway.save()
    key = ssh.generate_user_key().public_line
    response = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk, "public_key": key, "label": "desk"})
    assert response.status_code == 400
    page = response.content.decode()
    errors = page.split('<ul class="errorlist" id="ssh-cluster_error">')[1].split("</ul>")[0]
    assert "no address for the SSH bastion" in errors
    assert key in page and 'value="desk"' in page
    assert not Credential.objects.exists()


def test_lost_my_laptop(alice, bob, cluster, gateway):
    client = logged_in(alice)
    client.post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    credential = Credential.objects.get()
    page = client.get("/access/").content.decode()
    assert f'data-serial="{credential.serial}"' in page and "Revoke (lost my laptop)" in page
    # Every row has such a link: its accessible name says which credential it revokes.
    assert f'aria-label="Revoke OpenVPN profile {credential.serial} (lost my laptop)"' in page
    assert f'href="/access/credentials/{credential.pk}/revoke/"' in page
    # Someone else cannot revoke it, nor see the confirmation page.
    assert logged_in(bob).post(f"/access/credentials/{credential.pk}/revoke/").status_code == 404
    assert logged_in(bob).get(f"/access/credentials/{credential.pk}/revoke/").status_code == 404
    # GET asks first, saying what will happen; it revokes nothing.
    confirm = client.get(f"/access/credentials/{credential.pk}/revoke/")
    assert confirm.status_code == 200
    text = confirm.content.decode()
    assert f"<h1>Revoke OpenVPN profile {credential.serial}?</h1>" in text
    assert f'<button type="submit" class="danger">Revoke OpenVPN profile {credential.serial}</button>' in text
    assert "the access gateways refuse it from their next" in text and "cannot\n  be undone" in text
    assert "Every other browser session of yours is signed out (the lost device's too)" in text
    assert f'<form method="post" action="/access/credentials/{credential.pk}/revoke/">' in text
    assert client.head(f"/access/credentials/{credential.pk}/revoke/").status_code == 200
    credential.refresh_from_db()
    assert credential.revoked_at is None
    response = client.post(f"/access/credentials/{credential.pk}/revoke/", follow=True)
    page = response.content.decode()
    # said to alice herself, by the number the table shows
    assert f'<p class="message success" role="status">Revoked your OpenVPN profile {credential.serial}:' in page
    assert " of alice" not in page and f"#{credential.serial}" not in page
    credential.refresh_from_db()
    assert credential.revocation_reason == "key_compromise" and credential.revoked_by == alice
    assert f">{credential.revoked_at:%Y-%m-%d %H:%M} UTC</time> (" in page  # as "valid until"
    # Its page again: headed as what it is now, with nothing to press.
    again = client.get(f"/access/credentials/{credential.pk}/revoke/").content.decode()
    assert f"<h1>OpenVPN profile {credential.serial} is revoked</h1>" in again
    assert "Revoke OpenVPN profile" not in again and "<button" not in again.split("</header>")[1]


def test_lost_my_laptop_revokes_the_api_tokens_ticked(alice, bob, cluster, gateway, settings):
    """The laptop may hold API tokens too (client.py's): the page lists the live ones with their last use, and
    revokes those ticked — only the user's own, even when the credential was revoked before."""
    from django.utils import timezone

    from portal.models import ApiToken
    from portal.tokens import token_create, token_revoke

    laptop, _ = token_create(user=alice, name="laptop client.py", scopes=["clusters:write"])
    ApiToken.objects.filter(pk=laptop.pk).update(last_used_at=timezone.now(), last_used_ip="198.18.7.7")
    desktop, _ = token_create(user=alice, name="desktop", scopes=["clusters:read"])
    gone, _ = token_create(user=alice, name="old one", scopes=["clusters:read"])
    token_revoke(token=gone)
    bobs, _ = token_create(user=bob, name="bob's", scopes=["clusters:read"])
    client = logged_in(alice)
    client.post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    credential = Credential.objects.get()
    url = f"/access/credentials/{credential.pk}/revoke/"
    page = client.get(url).content.decode()
    listed = page.split('<fieldset id="tokens">')[1].split("</fieldset>")[0]
    assert f'value="{laptop.pk}"' in listed and f'value="{desktop.pk}"' in listed
    assert f'value="{gone.pk}"' not in listed and f'value="{bobs.pk}"' not in listed
    assert "laptop client.py" in listed and "from 198.18.7.7" in listed and "never used" in listed
    assert "signs in to this portal again" not in page  # no single sign-on here
    page = client.post(url, {"tokens": [str(laptop.pk), str(bobs.pk), "x", "9" * 40, "\u00b2"]}, follow=True)
    page = page.content.decode()
    assert f"Revoked API token laptop client.py ({laptop.prefix}…): refused from now on." in page
    assert ApiToken.objects.get(pk=laptop.pk).revoked_at is not None
    assert ApiToken.objects.get(pk=desktop.pk).revoked_at is None  # not ticked
    assert ApiToken.objects.get(pk=bobs.pk).revoked_at is None  # not hers
    credential.refresh_from_db()
    assert credential.revoked_at is not None
    # The credential already revoked (she comes back for the token she forgot): the token still goes.
    page = client.post(url, {"tokens": [str(desktop.pk)]}, follow=True).content.decode()
    assert "Revoked API token desktop" in page and "was already revoked" in page
    assert ApiToken.objects.get(pk=desktop.pk).revoked_at is not None


def test_lost_my_laptop_says_to_end_the_single_sign_on_session(alice, cluster, gateway, settings):
    settings.SSO_HEADER = "X-Remote-User"
    alice.set_unusable_password()  # a directory account: no password here
    alice.save(update_fields=["password"])
    client = logged_in(alice)
    client.post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    page = client.get(f"/access/credentials/{Credential.objects.get().pk}/revoke/").content.decode()
    assert "end its session there too" in page and 'id="tokens"' not in page  # (she has no token)


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
    assert '<td data-label="Status">expired</td>' in row
    assert "Revoke" not in row
    confirm = client.get(f"/access/credentials/{credential.pk}/revoke/").content.decode()
    assert f"<h1>OpenVPN profile {credential.serial} has expired</h1>" in confirm and 'class="danger"' not in confirm


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


def test_admin_shows_retired_host_keys_and_lets_nobody_remove_one(root, gateway):
    """A retired host key stays listed until its certificate ends: deleting it would let the old key answer for the
    gateway again, so the admin shows it and offers neither delete nor change nor add, even to a superuser."""
    from access import services
    from access.models import RetiredHostKey

    services.gateway_enrol(gateway=gateway)
    services.gateway_enrol(gateway=gateway)
    retired = RetiredHostKey.objects.get()
    client = logged_in(root)
    assert "gw1" in client.get("/admin/access/retiredhostkey/").content.decode()
    page = client.get(f"/admin/access/retiredhostkey/{retired.pk}/change/").content.decode()
    assert retired.key.split()[1] in page and 'name="_save"' not in page
    assert client.post(f"/admin/access/retiredhostkey/{retired.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.get("/admin/access/retiredhostkey/add/").status_code == 403
    assert RetiredHostKey.objects.filter(pk=retired.pk).exists()


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
    secret = page.split('<code class="secret">')[1].split("<")[0].strip()
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
    for path in ("/access/vpn-profile/", "/access/ssh/"):
        response = client.get(path)
        assert (response.status_code, response.url) == (302, "/access/"), path
        assert client.put(path).status_code == 405
    assert client.put("/access/credentials/1/revoke/").status_code == 405
    assert not Credential.objects.exists()
    assert Client().get("/access/vpn-profile/").url == "/access/"  # then the page asks to log in


def test_a_gateway_that_fails_closed_is_named_on_the_page_and_a_current_one_is_preferred(bob, cluster, gateway):
    """A gateway whose state has not been brought up to date for GATEWAY_STATE_MAX_AGE refuses everyone: the
    page says so (a user's AUTH_FAILED has a reason), and profiles point at a gateway that is current."""
    from access.models import Gateway

    Gateway.objects.filter(pk=gateway.pk).update(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    page = logged_in(bob).get("/access/").content.decode()
    assert 'id="stale-gateways"' in page and "<strong>gw1</strong>" in page and "for 60 minutes" in page
    profile = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]}).content.decode()
    assert "remote 198.18.100.1 1194" in profile  # the only one: still named in the profile

    make_gateway("gw2", address="198.18.100.2", vpn_port=1194)
    profile = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]}).content.decode()
    # the current one first; the stale one stays in the profile as its fallback (it may come back)
    assert re.findall(r"^remote (\S+) 1194", profile, re.M) == ["198.18.100.2", "198.18.100.1"]
    Gateway.objects.filter(pk=gateway.pk).update(state_as_of=dt.datetime.now(dt.UTC))  # gw1 caught up
    page = logged_in(bob).get("/access/").content.decode()
    assert 'id="stale-gateways"' not in page


def test_the_page_names_nodes_the_bastion_does_not_relay_to(alice, charlie, cluster, other_cluster, gateway):
    """Another closed cluster uses the address of one of alice's nodes: the bastion relays to neither, and the
    page says which node and what to use instead; the download's ssh_config says it too."""
    from clusters.models import Node

    type(cluster).objects.filter(pk__in=[cluster.pk, other_cluster.pk]).update(bastion_address="10.0.0.254/24")
    Node.objects.filter(cluster__in=[cluster, other_cluster]).update(address="10.0.0.5")
    page = logged_in(alice).get("/access/").content.decode()
    assert 'id="ssh-withheld"' in page
    assert f"<code>node1.{cluster_label(cluster)}</code> (10.0.0.5)" in page
    assert cluster_label(other_cluster) not in page  # charlie's cluster is not named to alice
    download = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk})
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        config = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("virtcloud.conf"))
    assert f"#   node1.{cluster_label(cluster)} (10.0.0.5)" in config
    assert f"Host node1.{cluster_label(cluster)}" not in config

    # charlie's cluster on a network of its own (one bastion stack: overlapping networks withhold too)
    type(cluster).objects.filter(pk=other_cluster.pk).update(bastion_address="10.0.1.254/24")
    Node.objects.filter(cluster=other_cluster).update(address="10.0.1.6")
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


# --- the review's findings ----------------------------------------------------------------------------------------

GATEWAY_FORM = {
    "name": "gw1",
    "kind": "both",
    "address": "198.18.100.1",
    "vpn_port": 1194,
    "vpn_proto": "udp",
    "ssh_port": 22,
    "ssh_port_base": 0,
    "ssh_user": "virtcloud",
    "server_name": "",
    "local_state_dir": "",
    "enabled": "on",
}


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("ssh_user", "root\nProxyCommand x", "A POSIX user name"),
        ("ssh_user", "Root", "A POSIX user name"),
        ("address", "gw.example.org\nProxyCommand x", "Enter a host name"),
        ("address", "gw example.org", "Enter a host name"),
        ("address", "fe80::1%eth0 x", "Enter a host name"),
        ("vpn_port", "0", "greater than or equal to 1"),
        ("ssh_port", "65536", "less than or equal to 65535"),
        ("vpn_proto", "tcp-server", "Select a valid choice"),
        ("server_name", "gw 1", "no spaces"),
        ("local_state_dir", "/var/lib/gw\nx", "control characters"),
        ("local_state_dir", "var/lib/gw", "absolute path"),
    ],
)
def test_admin_refuses_gateway_settings_that_would_go_into_downloads_broken(root, gateway, field, value, says):
    """Each setting goes verbatim into users' profiles and ssh_config: admin says what is wrong and keeps the row."""
    client = logged_in(root)
    response = client.post(f"/admin/access/gateway/{gateway.pk}/change/", {**GATEWAY_FORM, field: value})
    assert response.status_code == 200
    assert says in response.content.decode()
    before = {f: getattr(gateway, f) for f in GATEWAY_FORM if f != "enabled"}
    gateway.refresh_from_db()
    assert {f: getattr(gateway, f) for f in before} == before


def test_an_enrolled_gateway_given_another_address_or_name_is_told_to_enrol_again(root, gateway):
    """Its certificates name what it was enrolled with: the admin hears that the profiles issued from now on will
    not reach it until it is enrolled again (a port changed is nothing to say)."""
    from access import services

    if gateway.enrolled_at is None:
        services.gateway_enrol(gateway=gateway)
        gateway.refresh_from_db()
    client = logged_in(root)
    url = f"/admin/access/gateway/{gateway.pk}/change/"
    form = {**GATEWAY_FORM, "name": gateway.name, "address": gateway.address, "server_name": gateway.server_name}
    page = client.post(url, {**form, "vpn_port": 1195}, follow=True).content.decode()
    assert "--re-enrol" not in page and "changed successfully" in page
    page = client.post(url, {**form, "address": "198.18.100.9"}, follow=True).content.decode()
    assert f"Gateway {gateway.name}: its address changed" in page
    assert f"gateway config {gateway.name} --re-enrol" in page
    gateway.enrolled_at = None  # never enrolled: its first enrolment takes whatever it is given
    gateway.save(update_fields=["enrolled_at"])
    page = client.post(url, {**form, "server_name": "gw9.example.org"}, follow=True).content.decode()
    assert "--re-enrol" not in page


def test_admin_accepts_sound_gateway_settings(root, gateway):
    client = logged_in(root)
    good = {
        **GATEWAY_FORM,
        "address": "gw-1.example.org",
        "vpn_proto": "tcp",
        "ssh_user": "vc_bastion",
        "server_name": "gw1.example.org",
        "local_state_dir": "/var/lib/virtcloud-gateway",
    }
    response = client.post(f"/admin/access/gateway/{gateway.pk}/change/", good)
    assert response.status_code == 302, response.content.decode()[:2000]
    gateway.refresh_from_db()
    assert (gateway.address, gateway.vpn_proto, gateway.ssh_user) == ("gw-1.example.org", "tcp", "vc_bastion")
    for address in ("2001:db8::1", "198.18.100.1"):
        assert (
            client.post(f"/admin/access/gateway/{gateway.pk}/change/", {**good, "address": address}).status_code == 302
        )


def test_a_tcp_gateway_gives_clients_the_client_side_of_tcp(bob, cluster, gateway):
    """vpn_proto is one transport: the server config says tcp-server (manage.py gateway config), a profile
    tcp-client; before, only one of the two renderers accepted whichever spelling was stored."""
    from access import openvpn

    gateway.vpn_proto = "tcp"
    gateway.save()
    profile = logged_in(bob).post("/access/vpn-profile/", {"clusters": [cluster.pk]}).content.decode()
    assert "\nproto tcp-client\n" in profile and "explicit-exit-notify" not in profile
    assert "\nproto tcp-server\n" in openvpn.render_server_config(state_dir="/var/lib/gw", dev="tap-vc", proto="tcp")


def test_a_gateway_row_with_injected_values_is_a_message_not_a_download(alice, cluster, gateway):
    """Rows written around the validators (an old row, a shell, a bulk update) are refused again where the files
    are written: no ProxyCommand line reaches a user, the user gets a message (not a 500), and nothing is recorded."""
    from access.models import Gateway

    client = logged_in(alice)
    Gateway.objects.filter(pk=gateway.pk).update(ssh_user="root\nProxyCommand touch /tmp/x")
    response = client.post("/access/ssh/", {"cluster": cluster.pk}, follow=True)
    assert response.status_code == 200 and response.redirect_chain[-1][0] == "/access/"
    page = response.content.decode()
    assert (
        "a setting of access gateway gw1 cannot be written into an ssh_config" in page
        and "Tell your administrator" in page
    )
    assert "ProxyCommand" not in page  # (the admin finds the setting at fault in the log)

    Gateway.objects.filter(pk=gateway.pk).update(ssh_user="virtcloud", address="198.18.100.1\nup /bin/sh")
    response = client.post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True)
    assert response.status_code == 200 and response.redirect_chain[-1][0] == "/access/"
    assert "a setting of access gateway gw1 cannot be written into a VPN profile" in response.content.decode()
    assert not Credential.objects.exists()


def test_an_attribute_certificate_that_cannot_be_made_is_a_message_not_a_500(alice, cluster, gateway, monkeypatch):
    from access import attrcerts

    def refuse(*args, **kwargs):
        raise attrcerts.ACError("cluster 'x' / role 'member' do not make a valid FQAN")

    monkeypatch.setattr(attrcerts, "fqan", refuse)
    response = logged_in(alice).post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True)
    assert response.status_code == 200 and response.redirect_chain[-1][0] == "/access/"
    assert "cannot issue a VPN certificate for alice: cluster &#x27;x&#x27;" in response.content.decode()
    assert not Credential.objects.exists()


def test_a_gateway_never_set_up_is_not_offered(alice, cluster, gateway):
    """A gateway without a server certificate or that never pulled refuses everyone: profiles never point at it,
    and when no other is ready the page says so instead of offering downloads that cannot work."""
    from django.utils import timezone

    from access import selectors
    from access.models import Gateway

    # a newer gateway at the cluster's own site, enrolled but never pulled, and one never enrolled
    site = cluster.nodes.get().host.site
    make_gateway("aa-unpulled", site=site, address="198.18.100.7", last_pull_at=None)
    make_gateway("ab-unenrolled", site=site, address="198.18.100.8", server_certificate="")
    profile = logged_in(alice).post("/access/vpn-profile/", {"clusters": [cluster.pk]}).content.decode()
    assert "remote 198.18.100.1 1194" in profile and "198.18.100.7" not in profile and "198.18.100.8" not in profile
    assert [g.name for g in selectors.gateways_for(kind="ssh")] == ["gw1"]

    # Made a second ago and never pulled: not "fresh" — it has no state at all.
    fresh = Gateway.objects.get(name="aa-unpulled")
    assert selectors.gateway_state_age(fresh, timezone.now()).total_seconds() < 60
    assert selectors.gateway_is_stale(fresh, timezone.now())

    Gateway.objects.filter(pk=gateway.pk).update(last_pull_at=None)
    issued = Credential.objects.count()
    page = logged_in(alice).get("/access/").content.decode()
    assert 'id="no-vpn-gateway"' in page and 'id="no-ssh-gateway"' in page
    assert "No OpenVPN access gateway is ready yet" in page
    assert 'id="vpn-form"' not in page and 'id="ssh-form"' not in page
    assert 'id="stale-gateways"' not in page  # (not offered: not named as one that refuses everyone)
    response = logged_in(alice).post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True)
    assert "no OpenVPN access gateway is ready" in response.content.decode()
    assert Credential.objects.count() == issued

    Gateway.objects.filter(pk=gateway.pk).update(last_pull_at=timezone.now())
    page = logged_in(alice).get("/access/").content.decode()
    assert 'id="vpn-form"' in page and 'id="no-vpn-gateway"' not in page


def _credential(user, serial, *, days_ago, valid=True, revoked=False):
    from django.utils import timezone

    now = timezone.now()
    row = Credential.objects.create(
        kind="ssh",
        serial=serial,
        user=user,
        key_id=f"k{serial}",
        fingerprint=f"f{serial}",
        not_before=now - dt.timedelta(days=days_ago),
        not_after=now + dt.timedelta(days=1) if valid else now - dt.timedelta(days=days_ago) + dt.timedelta(hours=1),
        revoked_at=now if revoked else None,
        revocation_reason="superseded" if revoked else "",
    )
    Credential.objects.filter(pk=row.pk).update(created_at=now - dt.timedelta(days=days_ago))
    return row


def test_every_valid_credential_is_listed_however_old_with_the_newest_ended_ones(
    alice, cluster, gateway, django_assert_max_num_queries
):
    """60 valid credentials (the oldest issued long before 30 that ended since): each can still be revoked from
    the page; of the ended ones, the newest 20 are shown."""
    from access.views import ENDED_CREDENTIALS_SHOWN

    valid = [_credential(alice, 1000 + i, days_ago=100 + i) for i in range(60)]
    ended = [_credential(alice, 2000 + i, days_ago=i + 1, valid=False) for i in range(25)]
    ended += [_credential(alice, 3000 + i, days_ago=i + 30, revoked=True) for i in range(5)]
    client = logged_in(alice)
    with django_assert_max_num_queries(20):
        page = client.get("/access/").content.decode()
    for credential in valid:
        assert f'data-serial="{credential.serial}"' in page
        assert f'href="/access/credentials/{credential.pk}/revoke/"' in page
    shown = {c.serial for c in ended if f'data-serial="{c.serial}"' in page}
    assert ENDED_CREDENTIALS_SHOWN == 20
    newest = Credential.objects.filter(pk__in=[c.pk for c in ended]).order_by("-created_at")[:20]
    assert shown == {c.serial for c in newest} == set(range(2000, 2020))
    # the Issued column: the oldest valid one was issued 159 days ago
    oldest = Credential.objects.get(pk=valid[-1].pk)
    assert "<th>Issued</th>" in page
    row = page.split(f'data-serial="{oldest.serial}"')[1].split("</tr>")[0]
    assert f'<td data-label="Issued"><time datetime="{oldest.created_at.isoformat()}">' in row
    assert f">{oldest.created_at:%Y-%m-%d %H:%M} UTC</time></td>" in row


def test_the_forms_tell_clusters_of_the_same_name_apart(alice, bob, team, gateway):
    mine = make_cluster(alice, name="alpha", group=team)
    theirs = make_cluster(bob, name="alpha", group=team)
    page = logged_in(bob).get("/access/").content.decode()
    assert f"{cluster_label(mine)} (alice, physics)" in page
    assert f"{cluster_label(theirs)} (bob, physics)" in page


def test_form_errors_are_under_their_field(alice, cluster, gateway):
    client = logged_in(alice)
    response = client.post("/access/vpn-profile/", {"publish": "on"})
    assert response.status_code == 400
    page = response.content.decode()
    fieldset = page.split('id="vpn-form"')[1].split("</fieldset>")[0]
    assert '<fieldset aria-describedby="vpn-clusters_helptext vpn-clusters_error" class="invalid">' in fieldset
    assert '<ul class="errorlist" id="vpn-clusters_error"><li>Choose at least one cluster.</li></ul>' in fieldset
    assert 'aria-invalid="true"' in fieldset
    assert 'name="publish" id="vpn-publish" checked' in page  # what was sent is kept
    assert 'class="messages"' not in page


def test_the_page_answers_head_and_messages_are_announced(alice, cluster):
    """An error message is an alert (read at once); others are a status."""
    client = logged_in(alice)
    assert client.head("/access/").status_code == 200
    page = client.post("/access/vpn-profile/", {"clusters": [cluster.pk]}, follow=True).content.decode()
    assert '<div class="messages">' in page and '<ul class="messages"' not in page
    alert = page.split('<p class="message error" role="alert">')[1].split("</p>")[0]
    assert "no OpenVPN access gateway is ready" in alert


def test_the_page_is_headed_as_its_nav_link_and_the_link_is_marked_current(alice, cluster, gateway):
    page = logged_in(alice).get("/access/").content.decode()
    assert "<title>VPN and SSH access · VirtCloud portal</title>" in page and "<h1>VPN and SSH access</h1>" in page
    assert '<a href="/access/" aria-current="page">VPN and SSH access</a>' in page
    assert '<a href="/">Clusters</a>' in page
    home = logged_in(alice).get("/").content.decode()
    assert '<a href="/" aria-current="page">Clusters</a>' in home and '<a href="/access/">VPN' in home


def test_the_page_speaks_plainly(alice, bob, cluster, gateway):
    """No "name at the gateway": the access name, what it is used for; the UV_VCLUSTER hint is help text; the key
    is made once; the only cluster one can enter is ticked already."""
    page = logged_in(alice).get("/access/").content.decode()
    assert "Name at the gateway" not in page
    assert "<th>Access name <small>(used in file and SSH host names)</small></th>" in page
    assert "<legend>Clusters this profile admits to</legend>" in page
    help_text = page.split('<small id="vpn-clusters_helptext">')[1].split("</small>")[0]
    assert "setenv UV_VCLUSTER" in help_text
    assert "The portal keeps no copy of the private key: downloading again makes a new credential." in page
    assert f'name="clusters" value="{cluster.pk}" id="vpn-clusters_0" checked>' in page
    make_cluster(alice, name="second")
    page = logged_in(alice).get("/access/").content.decode()
    assert "checked" not in page.split('id="vpn-form"')[1].split("</fieldset>")[0]  # two: the user chooses


def test_no_closed_cluster_says_where_clusters_come_from(charlie, gateway):
    page = logged_in(charlie).get("/access/").content.decode()
    assert "You have no closed clusters. Clusters are created by your batch jobs; public clusters need no VPN." in page
    assert 'id="clusters"' not in page and 'id="vpn-form"' not in page
    assert 'id="no-credentials"' in page


def test_the_credentials_section_is_refreshed_after_a_download(alice, cluster, gateway):
    """The download forms ask the small script to fetch the page again and replace #credentials (which says
    where from); without it, nothing else depends on it."""
    page = logged_in(alice).get("/access/").content.decode()
    assert '<form method="post" action="/access/vpn-profile/" id="vpn-form" data-refreshes="credentials">' in page
    assert '<form method="post" action="/access/ssh/" id="ssh-form" data-refreshes="credentials">' in page
    assert '<section id="credentials" data-source="/access/">' in page
    assert 'src="/static/js/credentials-refresh.js" defer' in page


def test_a_refusal_not_about_a_field_stays_a_message(alice, cluster, gateway):
    from access.models import Gateway

    Gateway.objects.filter(pk=gateway.pk).update(ssh_user="root\nProxyCommand touch /tmp/x")
    response = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk, "public_key": ""})
    assert (response.status_code, response.url) == (302, "/access/")


def test_an_ending_cluster_is_not_called_not_enterable_yet(alice, team, gateway):
    make_cluster(alice, name="ending", group=team, state="tearing_down")
    page = logged_in(alice).get("/access/").content.decode()
    row = page.split('<td data-label="Cluster">ending</td>')[1].split("</tr>")[0]
    assert "tearing down (ending: it cannot be entered any more)" in row and "not enterable yet" not in row


def test_credential_admin_is_view_only(root, alice, cluster, gateway):
    from access import services

    credential = services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    client = logged_in(root)
    page = client.get(f"/admin/access/credential/{credential.pk}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert 'name="_save"' not in text and 'name="_continue"' not in text
    assert client.post(f"/admin/access/credential/{credential.pk}/change/", {}).status_code == 403
    assert "Revoke selected credentials" in client.get("/admin/access/credential/").content.decode()


def test_a_gateway_token_secret_is_never_in_a_cookie_or_the_session_store(root, gateway):
    """The secret is shown once, in the action's own answer (not cached): never in a cookie, nor in the session
    store (a message would wait there in clear until the next page)."""
    from django.contrib.sessions.models import Session

    client = logged_in(root)
    response = client.post("/admin/access/gateway/", {"action": "make_token", "_selected_action": [gateway.pk]})
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    cookies = [morsel.OutputString() for morsel in response.cookies.values()]
    page = response.content.decode()
    secret = page.split('<code class="secret">')[1].split("<")[0].strip()
    assert secret.startswith("vc_") and gateway.name in page
    # vc_<prefix>_<random>: the random part whole (it may itself hold "_", and a fragment after its last one
    # could be a character or two that a CSRF or session cookie holds by chance)
    assert not any(secret.split("_", 2)[2] in c for c in cookies)
    assert not any(secret in str(s.get_decoded()) for s in Session.objects.all())


def test_the_ssh_form_says_where_the_config_expects_a_pasted_keys_private_half(client, alice, cluster, gateway):
    client.force_login(alice)
    page = client.get("/access/").content.decode()
    assert 'aria-describedby="ssh-public_key_helptext"' in page
    assert '<small id="ssh-public_key_helptext">' in page
    assert "~/.ssh/id_ed25519, ~/.ssh/id_rsa or ~/.ssh/id_ecdsa" in page


def _row(page: str, marker: str) -> str:
    return page.split(marker)[1].split("</tr>")[0]


def test_a_cluster_just_ready_shows_gateways_updating_until_every_gateway_that_carries_it_has_it(
    bob, root, cluster, gateway
):
    """A cluster that has just become ready: the gateway's state predates it, so the page says "gateways
    updating…" beside it. The gateway's pull brings it (a 200: it has not installed it yet), the next one says it
    has it (304): "gateways ready". A gateway at a site the cluster's network does not reach never carries it and
    is never waited for."""
    from django.utils import timezone
    from rest_framework.test import APIClient

    from access.models import Gateway
    from clusters.models import VirtualCluster
    from network.tests.factories import SiteFactory
    from portal.models import TokenScope
    from portal.tokens import token_create

    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    ready = timezone.now()
    Gateway.objects.filter(pk=gateway.pk).update(token=token, state_as_of=ready - dt.timedelta(minutes=1))
    VirtualCluster.objects.filter(pk=cluster.pk).update(ready_at=ready)
    make_gateway("far", site=SiteFactory(name="ostrava"), address="198.18.100.9")  # never pulled a state since
    marker = f'id="cluster-{cluster.pk}"'
    page = logged_in(bob).get("/access/").content.decode()
    assert '<span data-access="updating">— gateways updating…</span>' in _row(page, marker)
    assert 'id="gateways-updating"' in page and "connect again in a minute" in page

    pulls = APIClient()
    pulls.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    first = pulls.get("/api/access/gateway/state/")
    assert first.status_code == 200 and first.json()["vpn"]["vlans"][cluster_label(cluster)] == cluster.vlan_id
    page = logged_in(bob).get("/access/").content.decode()
    assert "gateways updating…" in _row(page, marker)  # it has the state; it has not said it installed it
    assert pulls.get("/api/access/gateway/state/", HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    page = logged_in(bob).get("/access/").content.decode()
    assert '<span data-access="ready">— gateways ready</span>' in _row(page, marker)
    assert "gateways updating" not in page.lower()


def test_a_credential_that_ends_before_its_cluster_now_ends_is_marked(alice, cluster, gateway):
    """Credentials end by their cluster's expiry as it was when they were made. Once the cluster's lifetime is
    extended, those that were cut short by it are marked: a new download lasts longer. One that runs its full
    lifetime is not, nor one whose cluster was not extended."""
    from django.utils import timezone

    from access import services
    from clusters import services as cluster_services
    from clusters.models import VirtualCluster

    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + dt.timedelta(hours=2))
    cluster.refresh_from_db()
    vpn = services.vpn_profile_issue(user=alice, clusters=[cluster]).credential  # 2 h, not the 3 days of a profile
    ssh = services.ssh_certificate_issue(user=alice, cluster=cluster).credential  # 2 h, not 12
    long = make_cluster(alice, name="long")
    VirtualCluster.objects.filter(pk=long.pk).update(expires_at=timezone.now() + dt.timedelta(days=10))
    full = services.vpn_profile_issue(user=alice, clusters=[long]).credential  # its 3 days
    short = make_cluster(alice, name="short")  # a day: cut short, not extended
    kept = services.vpn_profile_issue(user=alice, clusters=[short]).credential
    mark = '<strong class="ends-early">ends before your cluster — download again</strong>'
    page = logged_in(alice).get("/access/").content.decode()
    assert all(f'data-serial="{c.serial}"' in page for c in (vpn, ssh, full, kept)) and mark not in page

    for target in (cluster, long):
        target.refresh_from_db()
        cluster_services.cluster_extend(cluster=target, expires_at=target.expires_at + dt.timedelta(days=5))
    page = logged_in(alice).get("/access/").content.decode()
    for credential in (vpn, ssh):
        assert mark in _row(page, f'data-serial="{credential.serial}"'), credential
    for credential in (full, kept):
        assert mark not in _row(page, f'data-serial="{credential.serial}"'), credential
    # revoked, it is not marked (nothing to download again for)
    services.credential_revoke(credential=vpn, reason="key_compromise", by=alice)
    page = logged_in(alice).get("/access/").content.decode()
    assert mark not in _row(page, f'data-serial="{vpn.serial}"') and mark in _row(page, f'data-serial="{ssh.serial}"')


def test_a_vpn_profile_whose_gateway_was_re_enrolled_since_is_marked(alice, cluster, gateway):
    """A profile pins its gateways' certificates: once one of them is re-enrolled, the page says the profile is
    refused there and to download again (the new download pins the new certificate and is not marked). SSH
    credentials, a revoked profile and one made after the re-enrolment are not marked; the API lists the pins."""
    from access import services

    mark = "a gateway it names was re-enrolled since and is refused — download again"
    before = services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    ssh = services.ssh_certificate_issue(user=alice, cluster=cluster).credential
    revoked = services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    services.credential_revoke(credential=revoked, reason="key_compromise", by=alice)
    page = logged_in(alice).get("/access/").content.decode()
    assert f'data-serial="{before.serial}"' in page and mark not in page

    services.gateway_enrol(gateway=gateway)
    after = services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    page = logged_in(alice).get("/access/").content.decode()
    assert mark in _row(page, f'data-serial="{before.serial}"')
    for credential in (ssh, revoked, after):
        assert mark not in _row(page, f'data-serial="{credential.serial}"'), credential
    gateway.refresh_from_db()
    listed = logged_in(alice).get(f"/api/access/credentials/{after.pk}/").json()
    assert listed["pinned_gateways"] == [services.gateway_fingerprint(gateway)]

    # a profile from before profiles pinned certificates (no pins: the gateway's old key could answer for it) is
    # marked once any gateway is enrolled after it was made
    Credential.objects.filter(pk=after.pk).update(pinned_gateways=[])
    page = logged_in(alice).get("/access/").content.decode()
    assert mark not in _row(page, f'data-serial="{after.serial}"')
    services.gateway_enrol(gateway=gateway)
    page = logged_in(alice).get("/access/").content.decode()
    assert mark in _row(page, f'data-serial="{after.serial}"')


def test_a_labelled_credential_is_named_by_its_label_wherever_it_is_revoked(alice, bob, cluster, gateway):
    """A label says where a download went ("work laptop"): the list, the revoke page and its message name it."""
    client = logged_in(alice)
    client.post("/access/vpn-profile/", {"clusters": [cluster.pk], "label": "  work laptop "})
    client.post("/access/ssh/", {"cluster": cluster.pk, "public_key": ""})  # no label: as before
    vpn, ssh = Credential.objects.order_by("pk")
    assert (vpn.label, ssh.label) == ("work laptop", "")
    page = client.get("/access/").content.decode()
    assert '<td data-label="Label">work laptop</td>' in page and '<td data-label="Label">—</td>' in page
    assert f'aria-label="Revoke OpenVPN profile {vpn.serial} (work laptop) (lost my laptop)"' in page
    confirm = client.get(f"/access/credentials/{vpn.pk}/revoke/").content.decode()
    assert f"<h1>Revoke OpenVPN profile {vpn.serial} (work laptop)?</h1>" in confirm
    done = client.post(f"/access/credentials/{vpn.pk}/revoke/", follow=True).content.decode()
    assert f"Revoked your OpenVPN profile {vpn.serial} (work laptop):" in done


@pytest.mark.parametrize(
    "label, error",
    [
        ("x" * 61, "Ensure this value has at most 60 characters"),
        ("two\nlines", "without control characters"),
        ("laptop\u202egnp.exe", "without control characters"),  # a bidi override: reads as another name
        ("one\u2028two", "without control characters"),  # a line separator
    ],
)
def test_a_label_that_cannot_be_shown_is_refused_under_its_field_and_issues_nothing(
    alice, cluster, gateway, label, error
):
    response = logged_in(alice).post("/access/ssh/", {"cluster": cluster.pk, "public_key": "", "label": label})
    assert response.status_code == 400
    page = response.content.decode()
    assert error in page.split('id="ssh-label_error"')[1].split("</ul>")[0]
    assert not Credential.objects.exists()


def test_a_private_key_pasted_for_the_public_one_is_refused_and_never_sent_back(alice, cluster, gateway):
    """The page says never to share a private key: refused under the field, it is not put back in the textarea
    (the answer is not stored either), and error reports would not show it."""
    from access import ssh

    private = ssh.generate_user_key().private_openssh
    private = private.decode() if isinstance(private, bytes) else private
    assert "PRIVATE KEY" in private
    client = logged_in(alice)
    response = client.post("/access/ssh/", {"cluster": cluster.pk, "public_key": private, "label": "desk"})
    page = response.content.decode()
    assert response.status_code == 400 and "PRIVATE" in page  # (the refusal says what it was)
    assert "PRIVATE KEY" not in page and private.splitlines()[1] not in page
    assert 'value="desk"' in page  # the rest of what was typed stays
    assert "no-store" in response["Cache-Control"]
    assert not Credential.objects.exists()
    # PuTTY's private key file has no "PRIVATE KEY" in it: refused as one all the same, and not sent back
    from access.tests.test_ssh import PPK

    response = client.post("/access/ssh/", {"cluster": cluster.pk, "public_key": PPK, "label": "desk"})
    page = response.content.decode()
    assert response.status_code == 400 and "This is a PRIVATE key" in page
    assert "Private-Lines" not in page and PPK.splitlines()[6] not in page


def test_node_tokens_are_not_on_the_lost_laptop_page_nor_the_tokens_page(alice, cluster, gateway):
    """A cluster's node token is its nodes', not one of the user's devices': it is not among the tokens "lost my
    laptop" offers to revoke, nor on the tokens page (it ends with the cluster)."""
    from access import services

    token, _ = services.node_token_issue(cluster=cluster)
    mine, _ = token_create(user=alice, name="laptop", scopes=["clusters:read"])
    credential = services.vpn_profile_issue(user=alice, clusters=[cluster.pk]).credential
    client = logged_in(alice)
    page = client.get(f"/access/credentials/{credential.pk}/revoke/").content.decode()
    assert f'value="{mine.pk}"' in page and token.name not in page
    tokens_page = client.get("/tokens/").content.decode()
    assert "laptop" in tokens_page and token.name not in tokens_page and token.prefix not in tokens_page


def test_lost_my_laptop_signs_the_laptop_out_for_an_account_with_a_password_of_its_own(alice, cluster, gateway):
    """It used to say "change your password": the laptop stayed signed in until then."""
    from django.urls import reverse

    from access import services

    def browser():
        client = Client()
        assert client.post(reverse("login"), {"username": "alice", "password": "alice-password"}).status_code == 302
        return client

    def signed_in(client) -> bool:
        return client.get("/access/").status_code == 200

    laptop, phone = browser(), browser()
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get(user=alice)
    page = phone.get(f"/access/credentials/{credential.pk}/revoke/").content.decode()
    assert "Every other browser session of yours is signed out (the lost device's too)" in page
    r = phone.post(f"/access/credentials/{credential.pk}/revoke/", follow=True)
    assert "Every other browser session of yours is signed out." in r.content.decode()
    assert not signed_in(laptop) and signed_in(phone)

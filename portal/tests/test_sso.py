"""Single sign-on through an authenticating proxy (``portal.sso``): ``/sso/login/``, which the proxy protects,
signs in the user the proxy names in its header — the account and its groups from the LDAP directory (a real,
throwaway slapd) — only when the request comes from the proxy; another realm, a name the directory does not
know, or the header from anywhere else signs nobody in, and on any other path the header means nothing."""
# ruff: noqa: F401, F811 (the pytest fixture directory is imported from portal.tests.test_auth)

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from unittest import mock

import pytest
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.urls import reverse

from portal.auth import ldap_settings
from portal.tests.test_auth import directory  # a throwaway slapd (the demo's users and groups)
from portal.tests.test_settings import loaded, refused

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not shutil.which("slapd") and not os.path.exists("/usr/sbin/slapd"), reason="needs slapd"),
]

HEADER = "HTTP_X_REMOTE_USER"
SSO = "/sso/login/"


@pytest.fixture
def sso(directory):
    with mock.patch.dict(os.environ, directory.env()):
        values = ldap_settings()
    with override_settings(
        AUTHENTICATION_BACKENDS=[
            "portal.auth.ActiveLDAPBackend",
            "portal.backends.LocalAccountBackend",
            "portal.sso.DirectoryRemoteUserBackend",
        ],
        SSO_HEADER="X-Remote-User",
        SSO_PROXY_NETWORKS=[ipaddress.ip_network("127.0.0.0/8")],  # the test client's address
        SSO_USERNAME_SUFFIX="@virtcloud.test",
        SSO_LOGOUT_URL="",
        **values,
    ):
        yield directory


def whoami(client: Client) -> str | None:
    """Who the home page is for (None: sent to the login page)."""
    response = client.get(reverse("home"))
    if response.status_code == 302:
        return None
    assert response.status_code == 200
    return response.context["user"].get_username()


def test_the_user_the_proxy_names_is_signed_in_with_the_directorys_groups(sso):
    client = Client()
    assert b'id="sso-login"' in client.get(reverse("login")).content
    response = client.get(SSO, {"next": "/access/"}, **{HEADER: "Alice@VirtCloud.test"})
    assert response.status_code == 302 and response["Location"] == "/access/"
    assert whoami(client) == "alice"  # the session carries her: the header is for /sso/login/ only
    alice = User.objects.get(username="alice")
    assert set(alice.groups.values_list("name", flat=True)) == {"physics"}
    assert (alice.email, alice.has_usable_password()) == ("alice@virtcloud.test", False)
    # the browser's user changed at the identity provider: the session is bob's, never both
    assert client.get(SSO, **{HEADER: "bob@virtcloud.test"}).status_code == 302
    assert whoami(client) == "bob"
    # somewhere else than the portal: the default page
    elsewhere = client.get(SSO, {"next": "https://evil.example.org/"}, **{HEADER: "bob@virtcloud.test"})
    assert elsewhere["Location"] == reverse("home")


@pytest.mark.parametrize(
    "value, address, why",
    [
        ("alice@virtcloud.test", "198.51.100.9", "not behind the organization"),  # anyone could send it
        ("alice@elsewhere.org", "127.0.0.1", "names an account this portal does not serve"),
        ("alice", "127.0.0.1", "names an account this portal does not serve"),
        ("al ice@virtcloud.test", "127.0.0.1", "names an account this portal does not serve"),
        ("mallory@virtcloud.test", "127.0.0.1", "no active account mallory in the directory"),
        (None, "127.0.0.1", "not behind the organization"),  # the proxy set no header
    ],
)
def test_nobody_is_signed_in_otherwise(sso, value, address, why, caplog):
    caplog.set_level(logging.WARNING, logger="portal.sso")
    client = Client(REMOTE_ADDR=address)
    response = client.get(SSO, **({HEADER: value} if value else {}))
    assert response.status_code == 403 and why in response.content.decode()
    assert whoami(client) is None
    assert not User.objects.filter(username__in=["alice", "mallory"]).exists()
    assert caplog.records, "a refusal is logged"


def test_the_header_means_nothing_on_any_other_path(sso):
    """A path the proxy leaves open (the API, the pages): a client's own header names nobody."""
    client = Client()
    assert client.get(reverse("home"), **{HEADER: "alice@virtcloud.test"}).status_code == 302
    assert client.get("/api/clusters/", **{HEADER: "alice@virtcloud.test"}).status_code in (401, 403)
    assert not User.objects.filter(username="alice").exists()


def test_a_session_of_someone_the_directory_does_not_have_ends(sso):
    client = Client()
    client.get(SSO, **{HEADER: "alice@virtcloud.test"})
    assert client.get(SSO, **{HEADER: "mallory@virtcloud.test"}).status_code == 403
    assert whoami(client) is None  # not alice any more, and nobody


def test_a_local_account_is_never_signed_in_by_the_proxy(sso):
    """A local account (a password of its own) named like a directory user: the proxy naming it signs nobody in,
    and it stays the local account it was, its password login working."""
    User.objects.create_user("alice", password="local-password")
    client = Client()
    assert client.get(SSO, **{HEADER: "alice@virtcloud.test"}).status_code == 403
    assert whoami(client) is None
    alice = User.objects.get(username="alice")
    assert alice.check_password("local-password") and not alice.groups.exists()  # not filled from the directory
    assert client.post(reverse("login"), {"username": "alice", "password": "local-password"}).status_code == 302


def test_the_sso_backend_never_takes_a_password(sso):
    from django.contrib.auth import authenticate

    with override_settings(AUTHENTICATION_BACKENDS=["portal.sso.DirectoryRemoteUserBackend"]):
        assert authenticate(None, username="alice", password=sso.passwords["alice"]) is None
        assert authenticate(None, username="alice", password="") is None


def test_log_out_ends_at_the_proxys_logout_for_whom_the_proxy_signed_in(sso, settings, root):
    settings.SSO_LOGOUT_URL = "https://idp.example.org/logout"
    client = Client()
    client.get(SSO, **{HEADER: "alice@virtcloud.test"})
    response = client.post(reverse("logout"))
    assert response.status_code == 302 and response["Location"] == "https://idp.example.org/logout"
    assert whoami(client) is None
    # a password login (the break-glass superuser) logs out here, as without SSO
    client.post(reverse("login"), {"username": "root", "password": "root-password"})
    response = client.post(reverse("logout"))
    assert response.status_code == 302 and response["Location"] == reverse("login")


def test_sso_needs_the_proxy_the_realm_and_the_directory(tmp_path):
    problem = refused(tmp_path, DEBUG="true", SSO_HEADER="X-Remote-User")
    assert "SSO_HEADER needs SSO_PROXIES" in problem
    assert "SSO_USERNAME_SUFFIX" in problem and "LDAP_SERVER_URI" in problem
    ldap = {"LDAP_SERVER_URI": "ldap://127.0.0.1", "LDAP_USER_BASE": "ou=p,dc=x", "LDAP_GROUP_BASE": "ou=g,dc=x"}
    on = {"DEBUG": "true", "SSO_HEADER": "X-Remote-User", "SSO_USERNAME_SUFFIX": "@example.org", **ldap}
    assert "is not an IP address or network" in refused(tmp_path, **on, SSO_PROXIES="proxy")
    assert "is not an IP address or network" in refused(tmp_path, **on, SSO_PROXIES="10.0.0.5/8")  # a typo
    assert "is every address" in refused(tmp_path, **on, SSO_PROXIES="0.0.0.0/0")
    assert "is not a header name" in refused(tmp_path, **{**on, "SSO_HEADER": "X_Remote_User"}, SSO_PROXIES="10.0.0.5")
    fine = loaded(tmp_path, **on, SSO_PROXIES="10.0.0.5, 192.0.2.0/24")
    assert fine["BACKENDS"][-1] == "portal.sso.DirectoryRemoteUserBackend"


def test_a_single_sign_on_login_is_in_the_audit_log(sso):
    from portal.models import AuditEntry

    assert Client().get(SSO, **{HEADER: "alice@virtcloud.test"}).status_code == 302
    entry = AuditEntry.objects.filter(message__startswith="logged in").get()
    assert (entry.actor, entry.object_repr) == ("alice", "alice")
    assert entry.message.startswith("logged in (single sign-on) from ")


def test_a_directory_outage_is_said_as_one_not_as_an_unknown_account():
    """The proxy names a user while the directory is down: the portal cannot tell whether the account exists.
    It answers 503 saying the directory is unavailable (try again), not 403 "no such account" — which sent users
    to the helpdesk about an account that was fine."""
    from portal.auth import LDAP_UNAVAILABLE_MESSAGE
    from portal.ldapserver import DEMO_USERS, LdapServer

    server = LdapServer(users=DEMO_USERS[:1], groups=())
    server.start()
    with mock.patch.dict(os.environ, server.env()):
        values = ldap_settings()
    server.stop()  # down from here on
    with override_settings(
        AUTHENTICATION_BACKENDS=["portal.auth.ActiveLDAPBackend", "portal.sso.DirectoryRemoteUserBackend"],
        SSO_HEADER="X-Remote-User",
        SSO_PROXY_NETWORKS=[ipaddress.ip_network("127.0.0.0/8")],
        SSO_USERNAME_SUFFIX="@virtcloud.test",
        SSO_LOGOUT_URL="",
        **values,
    ):
        client = Client()
        answer = client.get(SSO, **{HEADER: "alice@virtcloud.test"})
        assert answer.status_code == 503, answer.status_code
        assert LDAP_UNAVAILABLE_MESSAGE in answer.content.decode().replace("&#x27;", "'")
        assert "no active account" not in answer.content.decode()
        assert whoami(client) is None


def test_a_link_from_another_site_asks_before_it_ends_another_users_session(sso, root):
    """A link on another site to /sso/login/ ended whatever session the browser had — an administrator's password
    session — at a click there. From another site it asks first; the click on this page goes on."""
    client = Client()
    client.force_login(root)
    page = client.get(SSO, {"next": "/access/"}, HTTP_SEC_FETCH_SITE="cross-site", **{HEADER: "alice@virtcloud.test"})
    assert page.status_code == 200 and "Continue as alice?" in page.content.decode()
    assert 'href="/sso/login/?next=/access/"' in page.content.decode()
    assert whoami(client) == "root"
    switched = client.get(
        SSO, {"next": "/access/"}, HTTP_SEC_FETCH_SITE="same-origin", **{HEADER: "alice@virtcloud.test"}
    )
    assert switched.status_code == 302 and switched["Location"] == "/access/" and whoami(client) == "alice"
    # nobody signed in yet: a link from anywhere signs in at once (nothing to lose)
    fresh = Client()
    assert fresh.get(SSO, HTTP_SEC_FETCH_SITE="cross-site", **{HEADER: "bob@virtcloud.test"}).status_code == 302
    assert whoami(fresh) == "bob"

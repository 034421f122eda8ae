"""Single sign-on behind an authenticating proxy (``portal.sso``): the user the proxy names in its header is
signed in — the account and its groups from the LDAP directory (a real, throwaway slapd) — only when the
request comes from the proxy; another realm, a name the directory does not know, or the header from anywhere
else signs nobody in."""

from __future__ import annotations

import logging
import os
import shutil
from unittest import mock

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.urls import reverse

from portal.auth import ldap_settings
from portal.ldapserver import DEMO_GROUPS, DEMO_USERS, LdapServer
from portal.tests.test_settings import loaded, refused

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not shutil.which("slapd") and not os.path.exists("/usr/sbin/slapd"), reason="needs slapd"),
]

PROXY = "127.0.0.1"  # the test client's address
HEADER = "HTTP_X_REMOTE_USER"


@pytest.fixture(scope="module")
def directory():
    with LdapServer(users=DEMO_USERS, groups=DEMO_GROUPS) as server:
        yield server


@pytest.fixture
def sso(directory):
    import ipaddress

    with mock.patch.dict(os.environ, directory.env()):
        values = ldap_settings()
    middleware = list(settings.MIDDLEWARE)
    middleware.insert(
        middleware.index("django.contrib.auth.middleware.AuthenticationMiddleware") + 1,
        "portal.sso.TrustedHeaderMiddleware",
    )
    with override_settings(
        AUTHENTICATION_BACKENDS=[
            "portal.auth.ActiveLDAPBackend",
            "portal.backends.LocalAccountBackend",
            "portal.sso.DirectoryRemoteUserBackend",
        ],
        MIDDLEWARE=middleware,
        SSO_HEADER="X-Remote-User",
        SSO_PROXY_NETWORKS=[ipaddress.ip_network("127.0.0.0/8")],
        SSO_USERNAME_SUFFIX="@virtcloud.test",
        SSO_LOGOUT_URL="",
        **values,
    ):
        yield directory


def whoami(client: Client, **headers) -> str | None:
    """Who the home page is for (None: sent to the login page)."""
    response = client.get(reverse("home"), **headers)
    if response.status_code == 302:
        return None
    assert response.status_code == 200
    return response.context["user"].get_username()


def test_the_user_the_proxy_names_is_signed_in_with_the_directorys_groups(sso):
    client = Client()
    assert whoami(client, **{HEADER: "alice@virtcloud.test"}) == "alice"
    alice = User.objects.get(username="alice")
    assert set(alice.groups.values_list("name", flat=True)) == {"physics"}
    assert (alice.email, alice.has_usable_password()) == ("alice@virtcloud.test", False)
    assert whoami(client) == "alice"  # a request without the header keeps the session (the proxy's own pages)
    # the proxy names someone else now (the browser's user changed): never both
    assert whoami(client, **{HEADER: "bob@virtcloud.test"}) == "bob"
    assert client.session["_auth_user_backend"] == "portal.sso.DirectoryRemoteUserBackend"


@pytest.mark.parametrize(
    "value, address",
    [
        ("alice@virtcloud.test", "198.51.100.9"),  # not from the proxy: anyone could send the header
        ("alice@elsewhere.org", PROXY),  # another realm
        ("alice", PROXY),  # no realm
        ("mallory@virtcloud.test", PROXY),  # not in the directory
        ("al ice@virtcloud.test", PROXY),
        ("@virtcloud.test", PROXY),
    ],
)
def test_nobody_is_signed_in_otherwise(sso, value, address, caplog):
    caplog.set_level(logging.WARNING, logger="portal.sso")
    client = Client(REMOTE_ADDR=address)
    assert whoami(client, **{HEADER: value}) is None
    assert not User.objects.filter(username__in=["alice", "mallory"]).exists()
    assert caplog.records, "a refusal is logged"


def test_a_session_the_proxy_no_longer_vouches_for_ends(sso):
    client = Client()
    assert whoami(client, **{HEADER: "alice@virtcloud.test"}) == "alice"
    assert whoami(client, **{HEADER: "mallory@virtcloud.test"}) is None  # not alice any more, and nobody


def test_the_sso_backend_never_takes_a_password(sso):
    from django.contrib.auth import authenticate

    with override_settings(AUTHENTICATION_BACKENDS=["portal.sso.DirectoryRemoteUserBackend"]):
        assert authenticate(None, username="alice", password=sso.passwords["alice"]) is None
        assert authenticate(None, username="alice", password="") is None


def test_log_out_ends_at_the_proxys_logout(sso, settings):
    settings.SSO_LOGOUT_URL = "https://idp.example.org/logout"
    client = Client()
    assert whoami(client, **{HEADER: "alice@virtcloud.test"}) == "alice"
    response = client.post(reverse("logout"))
    assert response.status_code == 302 and response["Location"] == "https://idp.example.org/logout"
    assert whoami(client) is None


def test_sso_needs_the_proxys_addresses(tmp_path):
    assert "SSO_HEADER needs SSO_PROXIES" in refused(tmp_path, DEBUG="true", SSO_HEADER="X-Remote-User")
    assert "SSO_PROXIES: 'proxy' is not an IP address or network" in refused(
        tmp_path, DEBUG="true", SSO_HEADER="X-Remote-User", SSO_PROXIES="proxy"
    )
    on = loaded(tmp_path, DEBUG="true", SSO_HEADER="X-Remote-User", SSO_PROXIES="10.0.0.5, 192.0.2.0/24")
    assert on["BACKENDS"][-1] == "portal.sso.DirectoryRemoteUserBackend"

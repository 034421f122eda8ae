"""Browser pages of the portal itself, with Django's test client: the login page, API tokens and users in admin."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from portal.models import ApiToken, DirectoryAccount, TokenScope
from portal.tests.helpers import logged_in
from portal.tokens import token_create

pytestmark = pytest.mark.django_db

INVALID_LOGIN = "Please enter a correct username and password."


def directory_account(username: str, password: str) -> User:
    """A directory (LDAP) account to which an administrator gave a local password as well."""
    user = User.objects.create_user(username, f"{username}@example.org", password)
    DirectoryAccount.objects.create(user=user, dn=f"uid={username},ou=people,dc=virtcloud,dc=test")
    return user


# --- login --------------------------------------------------------------------------------------------------------


def test_a_directory_account_never_logs_in_with_a_local_password(alice):
    """The directory checks its accounts' passwords: a local one set in admin would outlive the directory's
    disabling the account. A local account (alice, root's break-glass) still logs in with its own."""
    directory_account("dora", "a-local-password")
    response = Client().post("/login/", {"username": "dora", "password": "a-local-password"})
    assert response.status_code == 200 and INVALID_LOGIN in response.content.decode()
    assert "_auth_user_id" not in response.wsgi_request.session
    response = Client().post("/login/", {"username": "alice", "password": "alice-password"})
    assert response.status_code == 302 and response.url == "/"


def test_the_login_page_shows_each_fields_error_where_the_field_says(db):
    page = Client().post("/login/", {"username": "", "password": ""}).content.decode()
    assert '<div class="error" id="id_username_error"><p>This field is required.</p></div>' in page
    assert '<div class="error" id="id_password_error"><p>This field is required.</p></div>' in page
    assert 'aria-describedby="id_username_error"' in page  # the field points at a text that is there


def test_a_logged_in_user_at_the_login_page_goes_home(alice):
    response = logged_in(alice).get("/login/")
    assert response.status_code == 302 and response.url == "/"
    assert Client().get("/login/").status_code == 200


# --- admin: users -------------------------------------------------------------------------------------------------


def test_admin_gives_no_local_password_to_a_directory_account(root, alice):
    dora = directory_account("dora", "a-local-password")
    client = logged_in(root)
    response = client.get(f"/admin/auth/user/{dora.pk}/password/", follow=True)
    assert response.redirect_chain[-1][0] == f"/admin/auth/user/{dora.pk}/change/"
    assert (
        "The account dora is a directory (LDAP) account: its password is set in the directory"
        in response.content.decode()
    )
    response = client.post(
        f"/admin/auth/user/{dora.pk}/password/",
        {"password1": "Another-pass-123", "password2": "Another-pass-123", "usable_password": "true"},
    )
    assert response.status_code == 302
    dora.refresh_from_db()
    assert dora.check_password("a-local-password") and not dora.check_password("Another-pass-123")
    # a local account's page is Django's own
    assert client.get(f"/admin/auth/user/{alice.pk}/password/").status_code == 200


# --- admin: API tokens --------------------------------------------------------------------------------------------


def test_a_new_tokens_secret_is_in_the_page_and_in_no_cookie_or_session(root, alice):
    """Shown once, in the answer to the save itself (not cached): never in a cookie, nor in the session store (a
    message would wait there in clear until the next page)."""
    from django.contrib.sessions.models import Session

    client = logged_in(root)
    response = client.post(
        "/admin/portal/apitoken/add/", {"user": alice.pk, "name": "scheduler", "scopes": ["clusters:read"]}
    )
    assert response.status_code == 200 and "no-store" in response["Cache-Control"], response.content.decode()[:2000]
    page = response.content.decode()
    secret = page.split('<code class="secret">')[1].split("<")[0].strip()
    assert secret.startswith("vc_") and "scheduler (alice" in page
    for morsel in response.cookies.values():
        assert secret not in morsel.OutputString()
    assert not any(secret in str(s.get_decoded()) for s in Session.objects.all())
    # a change is saved as before: back to the list
    token = ApiToken.objects.get(name="scheduler")
    response = client.post(f"/admin/portal/apitoken/{token.pk}/change/", {"name": "pbs", "scopes": ["clusters:read"]})
    assert response.status_code == 302 and ApiToken.objects.get(pk=token.pk).name == "pbs"


def test_token_admin_refuses_an_expiry_in_the_past_and_shows_scopes_readably(root, alice):
    client = logged_in(root)
    past = timezone.now() - timedelta(days=1)
    response = client.post(
        "/admin/portal/apitoken/add/",
        {
            "user": alice.pk,
            "name": "old",
            "scopes": ["clusters:read"],
            "expires_at_0": past.strftime("%Y-%m-%d"),
            "expires_at_1": past.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 200 and "This time has passed" in response.content.decode()
    assert not ApiToken.objects.exists()
    token_create(user=alice, name="reader", scopes=[TokenScope.CLUSTERS_READ, TokenScope.METRICS])
    page = client.get("/admin/portal/apitoken/").content.decode()
    assert "read clusters, monitoring: scrape /metrics (Prometheus)" in page
    assert "[&#x27;clusters:read&#x27;" not in page


def test_revoking_tokens_in_admin_says_so(root, alice):
    tokens = [token_create(user=alice, name=f"t{i}", scopes=[TokenScope.CLUSTERS_READ])[0] for i in range(3)]
    client = logged_in(root)
    client.post("/admin/portal/apitoken/", {"action": "revoke", "_selected_action": [tokens[0].pk]})
    response = client.post(
        "/admin/portal/apitoken/", {"action": "revoke", "_selected_action": [t.pk for t in tokens]}, follow=True
    )
    assert "Revoked 2 token(s); they stop working at once (1 revoked before, left as they were)." in (
        response.content.decode()
    )
    assert ApiToken.objects.filter(revoked_at__isnull=True).count() == 0


# --- admin: names and dates ---------------------------------------------------------------------------------------


def test_admin_names_acronyms_as_written(root):
    page = logged_in(root).get("/admin/").content.decode()
    for name in ("VLAN pools", "VLAN allocations", "API tokens"):
        assert f">{name}<" in page, name
    assert "Vlan" not in page and "Api tokens" not in page


def test_admin_shows_iso_dates_with_the_zone_as_the_portal_does(root, alice):
    token, _ = token_create(user=alice, name="reader", scopes=[TokenScope.CLUSTERS_READ])
    ApiToken.objects.filter(pk=token.pk).update(expires_at=datetime(2026, 12, 6, 21, 49, tzinfo=UTC))
    page = logged_in(root).get("/admin/portal/apitoken/").content.decode()
    assert '<td class="field-expires_at nowrap">2026-12-06 21:49 UTC</td>' in page
    assert "Dec. 6, 2026" not in page


def test_every_admin_action_says_which_permission_it_needs():
    """An action without ``permissions`` is offered to anyone who may view the list: a view-only staff member
    could tear clusters down, repair devices or mint tokens. Each one names what it needs."""
    from django.contrib import admin

    missing = []
    for model, model_admin in admin.site._registry.items():
        for func, name, _description in model_admin._get_base_actions():
            if not getattr(func, "allowed_permissions", ()):
                missing.append(f"{model._meta.label}.{name}")
    assert missing == []


@pytest.mark.django_db
def test_a_view_only_admin_is_offered_only_the_read_only_actions(rf):
    from django.contrib import admin
    from django.contrib.auth.models import Permission

    from network.models import Switch

    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_switch"))
    request = rf.get("/admin/network/switch/")
    request.user = User.objects.get(pk=viewer.pk)  # permissions cached afresh
    assert set(admin.site._registry[Switch].get_actions(request)) == {"plan_dry_run"}

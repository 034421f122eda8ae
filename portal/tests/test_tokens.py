"""API tokens: what the admin does to them is audited (made, changed, revoked, deleted), and a malformed
token is a 401 whatever it holds."""

from __future__ import annotations

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from portal.models import ApiToken, AuditEntry, TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db


def test_changing_and_deleting_a_token_in_admin_is_audited(client, root, alice):
    token, secret = token_create(user=alice, name="ro", scopes=[TokenScope.CLUSTERS_READ])
    client.force_login(root)
    form = {"name": "ro", "scopes": [TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_MANAGE], "expires_at": ""}
    r = client.post(reverse("admin:portal_apitoken_change", args=[token.pk]), form)
    assert r.status_code == 302, r.content[:2000]
    entry = AuditEntry.objects.get(content_type__model="apitoken", object_id=str(token.pk), action="update")
    assert entry.actor == "root"
    assert entry.changes == {"scopes": [["clusters:read"], ["clusters:read", "clusters:manage"]]}
    assert secret not in str(entry.changes) and token.key_hash not in str(entry.changes)
    r = client.post(
        reverse("admin:portal_apitoken_changelist"),
        {"action": "delete_selected", "_selected_action": [token.pk], "post": "yes"},
    )
    assert r.status_code == 302 and not ApiToken.objects.filter(pk=token.pk).exists()
    gone = AuditEntry.objects.get(content_type__model="apitoken", object_id=str(token.pk), action="delete")
    assert gone.changes == {"scopes": [["clusters:read", "clusters:manage"], None]}


def test_only_a_superuser_makes_tokens_or_widens_them_in_admin(client, root, alice):
    """A staff member who may add and change tokens (the help desk, to revoke them) cannot make one for
    someone else, nor give one more scopes or a longer life: the token would act as its user."""
    from portal.tests.test_staff_permissions import staff

    helpdesk = staff("helpdesk", "portal.add_apitoken", "portal.change_apitoken", "portal.view_apitoken")
    token, _ = token_create(user=helpdesk, name="own", scopes=[TokenScope.CLUSTERS_READ])
    client.force_login(helpdesk)
    assert client.get(reverse("admin:portal_apitoken_add")).status_code == 403
    form = {"user": root.pk, "name": "mine", "scopes": [TokenScope.CLUSTERS_MANAGE], "expires_at": ""}
    assert client.post(reverse("admin:portal_apitoken_add"), form).status_code == 403
    assert list(ApiToken.objects.values_list("name", flat=True)) == ["own"]
    form = {"name": "renamed", "scopes": [TokenScope.CLUSTERS_MANAGE], "expires_at": ""}
    assert client.post(reverse("admin:portal_apitoken_change", args=[token.pk]), form).status_code == 302
    token.refresh_from_db()
    assert (token.name, token.scopes, token.expires_at) == ("renamed", [TokenScope.CLUSTERS_READ], None)
    r = client.post(reverse("admin:portal_apitoken_changelist"), {"action": "revoke", "_selected_action": [token.pk]})
    assert r.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    client.force_login(root)  # a superuser does both
    form = {"user": alice.pk, "name": "scheduler", "scopes": [TokenScope.CLUSTERS_MANAGE], "expires_at": ""}
    assert client.post(reverse("admin:portal_apitoken_add"), form).status_code == 200  # (the page with its secret)
    assert ApiToken.objects.get(name="scheduler").scopes == [TokenScope.CLUSTERS_MANAGE]


@pytest.mark.parametrize("raw", ["vc_\x00abc_secret", "vc_abc\x00_secret", "vc_abc_sec\x00ret"])
def test_a_token_with_a_nul_is_refused_not_a_500(alice, raw):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/clusters/").status_code == 401


def test_a_view_that_names_no_scope_refuses_every_token(alice):
    """Scope checks fail closed: a view that forgot ``required_scopes`` for a method it answers is open to no
    token (not to a gateway's, a router's or the metrics' scraper); a session acts as its user; a method the view
    does not answer is still DRF's 405."""
    from rest_framework.response import Response
    from rest_framework.test import APIRequestFactory, force_authenticate
    from rest_framework.views import APIView

    class Forgot(APIView):
        required_scopes = {"read": (TokenScope.CLUSTERS_READ,)}  # nothing for writes

        def get(self, request):
            return Response({"ok": True})

        def post(self, request):
            return Response({"ok": True})

    class Nothing(APIView):
        def get(self, request):
            return Response({"ok": True})

    factory = APIRequestFactory()
    view, bare = Forgot.as_view(), Nothing.as_view()
    for scopes in ([TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_MANAGE], [TokenScope.GATEWAY]):
        token, _ = token_create(user=alice, name="t", scopes=scopes)
        for request, expected in (
            (factory.post("/"), 403),
            (factory.put("/"), 405),
            (factory.get("/"), 200 if TokenScope.CLUSTERS_READ in scopes else 403),
        ):
            force_authenticate(request, user=alice, token=token)
            assert view(request).status_code == expected, (scopes, request.method)
        request = factory.get("/")
        force_authenticate(request, user=alice, token=token)
        assert bare(request).status_code == 403
    request = factory.post("/")
    force_authenticate(request, user=alice)  # a browser session: as alice
    assert view(request).status_code == 200


def test_options_and_the_api_root_answer_a_token(alice):
    """OPTIONS says what a view takes to a token with any scope the view names (a write-only view too); the API's
    root pages, links only, to any token."""
    _, secret = token_create(user=alice, name="w", scopes=[TokenScope.CLUSTERS_WRITE])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert api.options("/api/access/vpn-profiles/").status_code == 200
    assert api.options("/api/clusters/").status_code == 200
    assert api.options("/api/network/sites/").status_code == 403  # network:read it does not have
    for root in ("/api/", "/api/network/"):
        assert api.get(root).status_code == 200, root


def test_a_tokens_last_use_names_the_client_behind_the_tls_proxy(alice, settings):
    """Where a token was last used from is how its owner spots misuse: behind the TLS proxy that is the address the
    proxy appended, as for logins, not the proxy's own (every token showed "from 127.0.0.1")."""
    settings.BEHIND_TLS_PROXY = True
    token, secret = token_create(user=alice, name="pbs", scopes=[TokenScope.CLUSTERS_READ])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    answer = api.get("/api/clusters/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.7, 203.0.113.9")
    assert answer.status_code == 200
    token.refresh_from_db()
    assert token.last_used_ip == "203.0.113.9" and token.last_used_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_prefix_already_taken_is_drawn_again(alice, monkeypatch):
    """Prefixes are random and tokens never deleted: one drawn twice is drawn again (an IntegrityError was a
    500), inside the caller's transaction too; each token authenticates as itself."""
    from django.db import transaction

    import portal.tokens

    first, first_secret = token_create(user=alice, name="first", scopes=[TokenScope.CLUSTERS_READ])
    draws = iter([first.prefix, first.prefix, "0123456789ab"])
    real = portal.tokens.secrets.token_hex
    monkeypatch.setattr(portal.tokens.secrets, "token_hex", lambda n: next(draws) if n in (4, 6) else real(n))
    with transaction.atomic():
        second, second_secret = token_create(user=alice, name="second", scopes=[TokenScope.CLUSTERS_READ])
        assert second.prefix == "0123456789ab"
    for secret, token in ((first_secret, first), (second_secret, second)):
        response = APIClient().get("/api/clusters/", HTTP_AUTHORIZATION=f"Bearer {secret}")
        assert response.status_code == 200, response.content
        token.refresh_from_db()
        assert token.last_used_at is not None  # found by its own prefix
    assert ApiToken.objects.count() == 2
    assert AuditEntry.objects.filter(action="create").count() == 2

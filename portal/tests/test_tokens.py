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


@pytest.mark.parametrize("raw", ["vc_\x00abc_secret", "vc_abc\x00_secret", "vc_abc_sec\x00ret"])
def test_a_token_with_a_nul_is_refused_not_a_500(alice, raw):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/clusters/").status_code == 401

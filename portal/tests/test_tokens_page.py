"""The "API tokens" page: a user makes tokens for their own scripts (the scopes, lifetime and number a user may
give themselves), sees the secret once, and revokes them; nobody else's tokens are reachable."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from portal.models import ApiToken, AuditEntry, TokenScope
from portal.tokens import SELF_SERVICE_LIMIT, token_create

pytestmark = pytest.mark.django_db


def _make(client, *, follow: bool = False, **form):
    data = {"name": "laptop", "scopes": ["clusters:read"], "days": 30, **form}
    return client.post(reverse("tokens"), data, follow=follow)


def _works(secret: str) -> int:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return api.get("/api/clusters/").status_code


def test_a_user_makes_a_token_sees_it_once_uses_it_and_revokes_it(client, alice):
    client.force_login(alice)
    page = client.get(reverse("tokens"))
    assert page.status_code == 200 and b'id="token-form"' in page.content and b'id="no-tokens"' in page.content
    assert "no-store" in page["Cache-Control"]
    r = _make(client, name="laptop: client.py", scopes=["clusters:read", "clusters:write"], days=7)
    assert r.status_code == 302 and r["Location"] == reverse("tokens")  # a reload of the page makes none again
    from django.contrib.sessions.models import Session

    stored = [str(s.get_decoded()) for s in Session.objects.all()]  # (the database session store)
    r = client.get(r["Location"])
    assert r.status_code == 200 and "no-store" in r["Cache-Control"]
    secret = re.search(rb'<code id="token-secret">(vc_[^<]+)</code>', r.content)[1].decode()
    # until its page was shown the secret waited in the session store, as ciphertext only (a redirect never
    # followed left it there, readable to whoever reads the sessions table)
    assert any("portal.new_token" in text for text in stored)
    assert not any(secret.split("_", 2)[2] in text for text in stored)  # (the random part whole: it may hold "_")
    token = ApiToken.objects.get(user=alice)
    assert token.scopes == ["clusters:read", "clusters:write"] and token.name == "laptop: client.py"
    assert abs(token.expires_at - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)
    assert AuditEntry.objects.filter(content_type__model="apitoken", object_id=str(token.pk), action="create").exists()
    assert _works(secret) == 200
    # shown once: the list names it by its prefix only
    again = client.get(reverse("tokens"))
    assert secret.encode() not in again.content and f"vc_{token.prefix}_…".encode() in again.content

    confirm = client.get(reverse("token-revoke", args=[token.pk]))
    assert confirm.status_code == 200 and b"Revoke token laptop: client.py?" in confirm.content
    assert _works(secret) == 200  # looking at the page revokes nothing
    r = client.post(reverse("token-revoke", args=[token.pk]), follow=True)
    assert b"Revoked token laptop: client.py" in r.content
    assert _works(secret) == 401
    assert b"revoked" in client.get(reverse("tokens")).content
    r = client.post(reverse("token-revoke", args=[token.pk]), follow=True)
    assert b"was already revoked" in r.content


@pytest.mark.parametrize(
    "form, field, message",
    [
        ({"scopes": ["clusters:manage"]}, "scopes", "Select a valid choice"),
        ({"scopes": ["network:read"]}, "scopes", "Select a valid choice"),
        ({"scopes": []}, "scopes", "This field is required"),
        ({"days": 400}, "days", "Select a valid choice"),
        ({"name": ""}, "name", "This field is required"),
        ({"name": "x" * 101}, "name", "at most 100 characters"),
    ],
)
def test_what_a_user_may_not_give_a_token_is_refused_and_makes_none(client, alice, form, field, message):
    client.force_login(alice)
    r = _make(client, **form)
    assert r.status_code == 400
    assert message in str(r.context["form"].errors[field])
    assert not ApiToken.objects.exists()


def test_the_service_refuses_what_the_form_would_not_offer(alice, settings):
    from portal.tokens import TokenRefused, token_create_own

    with pytest.raises(TokenRefused, match="choose among clusters:read, clusters:write"):
        token_create_own(user=alice, name="x", scopes=["clusters:manage"], days=1)
    with pytest.raises(TokenRefused, match="1 to 365 days"):
        token_create_own(user=alice, name="x", scopes=["clusters:read"], days=366)
    settings.USER_TOKEN_MAX_DAYS = 0
    with pytest.raises(TokenRefused, match="made by the administrators"):
        token_create_own(user=alice, name="x", scopes=["clusters:read"], days=1)
    assert not ApiToken.objects.exists()


def test_a_user_holds_a_limited_number_of_live_tokens(client, alice):
    for i in range(SELF_SERVICE_LIMIT - 1):
        token_create(user=alice, name=f"t{i}", scopes=[TokenScope.CLUSTERS_READ])
    expired = token_create(user=alice, name="old", scopes=[TokenScope.CLUSTERS_READ])[0]
    ApiToken.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
    client.force_login(alice)
    assert _make(client).status_code == 302  # the expired one does not count: the 20th live one
    r = _make(client, name="one more")
    assert r.status_code == 400 and b"you hold 20 live tokens already" in r.content
    assert not ApiToken.objects.filter(name="one more").exists()


def test_someone_elses_token_is_not_reachable(client, alice, bob):
    theirs, secret = token_create(user=bob, name="bob's", scopes=[TokenScope.CLUSTERS_READ])
    client.force_login(alice)
    assert b"bob&#x27;s" not in client.get(reverse("tokens")).content
    assert client.get(reverse("token-revoke", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("token-revoke", args=[theirs.pk])).status_code == 404
    assert _works(secret) == 200


def test_where_only_admins_make_tokens_the_page_says_so_and_lists_the_users_tokens(client, alice, settings):
    settings.USER_TOKEN_MAX_DAYS = 0
    token_create(user=alice, name="from the admins", scopes=[TokenScope.CLUSTERS_READ])
    client.force_login(alice)
    page = client.get(reverse("tokens"))
    assert b'id="admins-only"' in page.content and b'id="token-form"' not in page.content
    assert b"from the admins" in page.content
    r = _make(client, name="mine", follow=True)
    assert b"made by the administrators here" in r.content and not ApiToken.objects.filter(name="mine").exists()


def test_the_page_needs_a_login(client):
    r = client.get(reverse("tokens"))
    assert r.status_code == 302 and r["Location"].startswith(reverse("login"))


def test_the_page_lists_the_accounts_recent_sign_ins(client, alice, bob):
    """The holder spots a sign-in that was not theirs: the latest, with their address; never someone else's."""
    for address in ("198.18.5.1", "198.18.5.2"):
        client.post(reverse("login"), {"username": "alice", "password": "wrong"}, REMOTE_ADDR=address)
    client.post(reverse("login"), {"username": "bob", "password": "wrong"}, REMOTE_ADDR="198.18.5.9")
    assert client.post(reverse("login"), {"username": "alice", "password": "alice-password"}, REMOTE_ADDR="198.18.5.3")[
        "Location"
    ]
    page = client.get("/tokens/").content.decode()
    section = page.split('<section id="sign-ins">')[1].split("</section>")[0]
    signed_in = section.split('id="signed-in"')[1].split("</ul>")[0]
    failed = section.split('id="failed"')[1].split("</ul>")[0]
    assert "logged in (password) from 198.18.5.3" in signed_in and "failed" not in signed_in
    assert failed.index("failed login from 198.18.5.2") < failed.index("failed login from 198.18.5.1")
    assert "198.18.5.9" not in section


def test_failed_logins_are_never_another_accounts(client, alice, django_user_model):
    """Accounts "Alice" and "alice" both exist: a failure of the name "alice" is alice's, not the older account's;
    a name two accounts share in other cases names neither."""
    from portal.models import AuditEntry

    other = django_user_model.objects.create_user("ALICE2")
    django_user_model.objects.filter(pk=other.pk).update(username="Alice")  # (an older account, another case)
    client.post(reverse("login"), {"username": "alice", "password": "wrong"}, REMOTE_ADDR="198.18.5.1")
    entries = AuditEntry.objects.filter(message__startswith="failed login")
    assert list(entries.values_list("object_id", flat=True)) == [str(alice.pk)]


def test_a_secret_the_session_holds_in_another_form_is_not_shown_and_no_500(client, alice):
    """A session from before the secret was stored encrypted (or under another SECRETS_KEY): the page shows the
    token without its secret (its prefix; the user makes another), never a 500."""
    import time

    client.force_login(alice)
    token, secret = token_create(user=alice, name="old", scopes=["clusters:read"])
    session = client.session
    session["portal.new_token"] = [token.pk, secret, time.time()]
    session.save()
    page = client.get(reverse("tokens"))
    assert page.status_code == 200 and secret.encode() not in page.content and b"old" in page.content
    assert b'id="token-secret"' not in page.content


def test_every_aria_reference_on_the_users_pages_names_an_element_of_the_page(client, alice):
    """A form field with help text gets aria-describedby="<id>_helptext" from Django: the tokens page's name hint had
    no such id, so a screen reader never read it. Every id an aria-describedby or aria-labelledby names is on the
    page, and every id is there once (the access page's two forms each had an ``id_label``: the SSH form's label
    named the VPN form's field), on each page a user fills in — with its forms shown, and refused."""
    from access.tests.fixtures import make_cluster, make_gateway

    make_gateway("gw1")
    make_cluster(alice, name="mpi")
    client.force_login(alice)
    pages = [client.get(url) for url in ("/tokens/", "/access/", "/clusters/images/", "/")]
    pages.append(client.post("/access/ssh/", {"cluster": "", "public_key": "ssh-ed25519 nope", "label": "x"}))
    pages.append(client.post("/access/vpn-profile/", {"label": "x"}))
    pages.append(client.post("/tokens/", {"name": ""}))
    for response in pages:
        url = response.request["PATH_INFO"]
        assert response.status_code in (200, 400), (url, response.status_code)
        page = response.content.decode()
        found = re.findall(r'\bid="([^"]+)"', page)
        assert len(found) == len(set(found)), (url, sorted({i for i in found if found.count(i) > 1}))
        named = {ref for refs in re.findall(r'aria-(?:describedby|labelledby)="([^"]+)"', page) for ref in refs.split()}
        assert named <= set(found), (url, sorted(named - set(found)))
        labels = set(re.findall(r'<label for="([^"]+)"', page))
        assert labels <= set(found), (url, sorted(labels - set(found)))

"""Where an account is signed in: every browser's login is recorded (``portal.sessions``), the account page lists
them, and "Sign out all other sessions" ends every other one in the session store — for an account with a
password of its own as for a directory account (no password here to change) — and so does "lost my laptop"."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.test import Client
from django.urls import reverse

from portal.models import AuditEntry, BrowserSession

pytestmark = pytest.mark.django_db

LAPTOP_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
PHONE_UA = "Mozilla/5.0 (Android 15; Mobile; rv:140.0) Gecko/140.0 Firefox/140.0"


def browser(name: str, password: str, address: str, agent: str) -> Client:
    client = Client(REMOTE_ADDR=address, HTTP_USER_AGENT=agent)
    assert client.post(reverse("login"), {"username": name, "password": password}).status_code == 302
    return client


def signed_in(client) -> bool:
    return client.get(reverse("tokens")).status_code == 200


@pytest.mark.parametrize("directory_account", [False, True], ids=["own-password", "directory"])
def test_the_account_page_lists_the_browsers_and_signs_the_others_out(alice, directory_account, monkeypatch):
    laptop = browser("alice", "alice-password", "198.18.5.1", LAPTOP_UA)
    phone = browser("alice", "alice-password", "2001:db8::5", PHONE_UA)
    if directory_account:  # (as django-auth-ldap makes them: no usable password; both still signed in)
        User.objects.filter(pk=alice.pk).update(password="!unusable")
        for client in (laptop, phone):
            session = client.session
            session["_auth_user_hash"] = User.objects.get(pk=alice.pk).get_session_auth_hash()
            session.save()
    assert signed_in(laptop) and signed_in(phone)
    page = phone.get(reverse("tokens")).content.decode()
    section = re.search(r'<section id="sessions">.*?</section>', page, re.S)[0]
    assert "198.18.5.1" in section and "2001:db8::5" in section and "Firefox/140.0" in section
    assert section.count("this browser") == 1 and section.index("2001:db8::5") < section.index("this browser")
    assert phone.get(reverse("sign-out-others")).status_code == 405 and signed_in(laptop)  # (a GET does nothing)

    r = phone.post(reverse("sign-out-others"), follow=True)
    assert "Every other browser session of yours is signed out; this one stays." in r.content.decode()
    assert r.redirect_chain[-1][0] == reverse("tokens") + "#sessions"
    assert not signed_in(laptop) and signed_in(phone)
    assert list(BrowserSession.objects.values_list("address", flat=True)) == ["2001:db8::5"]
    assert AuditEntry.objects.filter(object_id=str(alice.pk), message__startswith="signed out of every other session")
    assert Session.objects.count() == 1


def test_a_logged_out_or_expired_session_is_not_listed_and_is_pruned(alice, bob):
    from portal.tasks import prune_sessions

    laptop = browser("alice", "alice-password", "198.18.5.1", LAPTOP_UA)
    phone = browser("alice", "alice-password", "198.18.5.2", PHONE_UA)
    tablet = browser("bob", "bob-password", "198.18.5.3", PHONE_UA)
    assert laptop.post(reverse("logout")).status_code == 302
    assert not BrowserSession.objects.filter(address="198.18.5.1").exists()  # (logged out: gone at once)
    Session.objects.filter(session_key=tablet.session.session_key).delete()  # (expired and cleared, say)
    assert BrowserSession.objects.count() == 2
    assert prune_sessions() == 1
    assert list(BrowserSession.objects.values_list("address", flat=True)) == ["198.18.5.2"]
    assert signed_in(phone)


def test_a_head_request_does_not_take_the_new_tokens_secret_away(client, alice):
    """A link checker or a prefetch sending HEAD after the form's redirect used to pop the secret shown once."""
    client.force_login(alice)
    r = client.post(reverse("tokens"), {"name": "laptop", "scopes": ["clusters:read"], "days": 30})
    assert r.status_code == 302
    assert client.head(reverse("tokens")).status_code == 200
    assert re.search(rb'<code id="token-secret">vc_', client.get(reverse("tokens")).content)


def test_every_signed_in_session_is_recorded_whatever_changed_its_key(alice, bob):
    """Sessions without a record were not signed out by "sign out all other sessions": one from before the
    records existed, one whose key a password change gave anew (Django cycles it), one signed in over another
    account's session (``login`` flushed it: no key yet when the signal came). Each is recorded at its next
    request at the latest."""
    from django.contrib.auth import update_session_auth_hash

    # from before the records: a signed-in session with none
    old = browser("alice", "alice-password", "198.18.5.1", LAPTOP_UA)
    BrowserSession.objects.all().delete()
    session = old.session
    del session["portal.sessions.recorded"]
    session.save()
    assert signed_in(old)
    assert list(BrowserSession.objects.values_list("session_key", flat=True)) == [old.session.session_key]

    # a password changed: the session's key is new, its record follows
    class Request:  # (as Django's password-change views call it)
        pass

    request = Request()
    request.session, request.user = old.session, alice
    before = request.session.session_key
    update_session_auth_hash(request, alice)
    request.session.save()
    old.cookies["sessionid"] = request.session.session_key
    assert request.session.session_key != before and signed_in(old)
    assert list(BrowserSession.objects.values_list("session_key", flat=True)) == [request.session.session_key]

    # bob, an administrator, signs in over alice's session in the same browser (the admin's login page offers it)
    User.objects.filter(pk=bob.pk).update(is_staff=True)
    r = old.post("/admin/login/?next=/admin/", {"username": "bob", "password": "bob-password"})
    assert r.status_code == 302 and r["Location"] == "/admin/"
    assert BrowserSession.objects.filter(user=bob, session_key=old.session.session_key).exists()
    phone = browser("bob", "bob-password", "198.18.5.2", PHONE_UA)
    phone.post(reverse("sign-out-others"))
    assert not signed_in(old) and signed_in(phone)

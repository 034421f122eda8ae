"""Failed logins of one account are limited: ``LOGIN_FAILURES_MAX`` within ``LOGIN_FAILURE_WINDOW`` refuse its
logins, the right password too, until the oldest failure leaves the window; a success clears them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from portal.models import LoginFailure

pytestmark = pytest.mark.django_db


def log_in(client, username: str, password: str):
    return client.post(reverse("login"), {"username": username, "password": password})


def test_five_wrong_passwords_refuse_the_account_for_the_window(client, alice, bob, settings):
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURE_WINDOW = 5, 900
    for _ in range(5):
        r = log_in(client, "Alice", "wrong")  # (any case: one account)
        assert r.status_code == 200 and "Please enter a correct username and password" in r.content.decode()
    r = log_in(client, "alice", "alice-password")
    assert r.status_code == 200 and "Too many failed logins for this account: try again in 15 minute(s)" in (
        r.content.decode()
    )
    assert "_auth_user_id" not in client.session
    assert log_in(client, "bob", "bob-password").status_code == 302  # another account is not concerned
    # The oldest failure leaves the window: one more try.
    LoginFailure.objects.filter(username="alice").update(at=timezone.now() - timedelta(seconds=901))
    client.logout()
    assert log_in(client, "alice", "alice-password").status_code == 302
    assert not LoginFailure.objects.filter(username="alice").exists()  # a success clears them


def test_a_success_before_the_limit_starts_the_count_again(client, alice, settings):
    settings.LOGIN_FAILURES_MAX = 3
    for _ in range(2):
        log_in(client, "alice", "wrong")
    assert log_in(client, "alice", "alice-password").status_code == 302
    client.logout()
    for _ in range(2):
        log_in(client, "alice", "wrong")
    assert log_in(client, "alice", "alice-password").status_code == 302


def test_zero_turns_the_limit_off(client, alice, settings):
    settings.LOGIN_FAILURES_MAX = 0
    for _ in range(8):
        log_in(client, "alice", "wrong")
    assert log_in(client, "alice", "alice-password").status_code == 302


def test_an_admin_lets_a_locked_account_in_again(client, alice, root, settings):
    settings.LOGIN_FAILURES_MAX = 2
    for _ in range(2):
        log_in(client, "alice", "wrong")
    client.force_login(root)
    assert "alice" in client.get("/admin/portal/loginfailure/").content.decode()
    ids = list(LoginFailure.objects.filter(username="alice").values_list("pk", flat=True))
    r = client.post(
        "/admin/portal/loginfailure/", {"action": "delete_selected", "_selected_action": ids, "post": "yes"}
    )
    assert r.status_code == 302 and not LoginFailure.objects.exists()
    client.logout()
    assert log_in(client, "alice", "alice-password").status_code == 302

"""Failed logins of one account are limited: ``LOGIN_FAILURES_MAX`` from one address within
``LOGIN_FAILURE_WINDOW`` refuse its logins from that address, the right password too, until the oldest failure
leaves the window; ``LOGIN_FAILURES_ACCOUNT_MAX`` from all addresses refuse them from everywhere; a success
clears its address's failures."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from portal.models import LoginFailure

pytestmark = pytest.mark.django_db


def log_in(client, username: str, password: str, **extra):
    return client.post(reverse("login"), {"username": username, "password": password}, **extra)


def logged_in(response) -> bool:
    return response.status_code == 302


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


STRANGER, ADMIN_DESK = "203.0.113.66", "198.51.100.7"


def test_a_stranger_locks_only_their_own_address_out(client, root, settings):
    """Anyone can type wrong passwords at the break-glass superuser: that must not keep the administrators out."""
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 5, 50
    for _ in range(5):
        assert not logged_in(log_in(client, "root", "guess", REMOTE_ADDR=STRANGER))
    refused = log_in(client, "root", "root-password", REMOTE_ADDR=STRANGER)
    assert "Too many failed logins for this account: try again in 15 minute(s)" in refused.content.decode()
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR=ADMIN_DESK))
    client.logout()
    # the administrator's success clears only the desk's failures: the stranger stays locked out
    assert LoginFailure.objects.filter(username="root", address=STRANGER).count() == 5
    assert not logged_in(log_in(client, "root", "root-password", REMOTE_ADDR=STRANGER))


def test_the_ceiling_across_addresses_locks_the_account_everywhere(client, root, settings):
    """Guessing from many addresses, each under the per-address limit, still ends at the account's ceiling."""
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 2, 20
    for n in range(20):
        assert not logged_in(log_in(client, "root", "guess", REMOTE_ADDR=f"203.0.113.{n + 1}"))
    refused = log_in(client, "root", "root-password", REMOTE_ADDR=ADMIN_DESK)
    assert "Too many failed logins for this account from many addresses: try again in 15 minute(s)" in (
        refused.content.decode()
    )
    assert "_auth_user_id" not in client.session
    LoginFailure.objects.filter(address="203.0.113.1").update(at=timezone.now() - timedelta(seconds=901))
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR=ADMIN_DESK))  # 19 left: under it


def test_an_ipv6_clients_addresses_in_one_64_count_as_one_client(client, root, settings):
    """A host is given a /64: counted per address, it had the per-address tries once per address, and alone set
    off the account-wide ceiling, which refuses the account from everywhere (the break-glass superuser too).
    Its /64 is one client: locked out after the per-address limit, whichever of its addresses it uses; an
    administrator's desk in another /64 still gets in."""
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 5, 50
    for n in range(5):
        assert not logged_in(log_in(client, "root", "guess", REMOTE_ADDR=f"2001:db8:1:2::{n + 1:x}"))
    refused = log_in(client, "root", "root-password", REMOTE_ADDR="2001:db8:1:2:ffff::9")
    assert "Too many failed logins for this account: try again" in refused.content.decode()
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR="2001:db8:1:3::1"))
    client.logout()
    # a success from the /64 clears its failures, whichever address failed
    LoginFailure.objects.update(at=timezone.now() - timedelta(seconds=901))
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR="2001:db8:1:2::77"))
    assert not LoginFailure.objects.filter(username="root").exists()


def test_ipv4_clients_of_a_dual_stack_listener_count_each_as_its_own_ipv4_address(client, root, settings):
    """Behind a listener on [::] (gunicorn) an IPv4 client's address is ::ffff:a.b.c.d: each is its IPv4
    address — read as IPv6 they were one /64, so five guesses from anywhere locked the break-glass admin out
    for every IPv4 client, and any success cleared every IPv4 client's failures."""
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 5, 50
    for _ in range(5):
        assert not logged_in(log_in(client, "root", "guess", REMOTE_ADDR="::ffff:203.0.113.9"))
    assert (
        "Too many failed logins" in log_in(client, "root", "root-password", REMOTE_ADDR="203.0.113.9").content.decode()
    )
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR="::ffff:198.51.100.20"))


def test_behind_the_tls_proxy_the_client_is_the_address_the_proxy_appended(client, root, settings):
    """Behind the proxy every request comes from the proxy: the client is the last X-Forwarded-For entry (the
    one the proxy appended; what the client sent itself comes before it) — for a request from the proxy
    (``TRUSTED_PROXIES``) only: a client that reaches the portal directly is counted by its own address, whatever
    X-Forwarded-For it sends."""
    import ipaddress

    settings.BEHIND_TLS_PROXY = True
    settings.TRUSTED_PROXY_NETWORKS = [ipaddress.ip_network("10.0.0.0/29")]
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 3, 30
    proxy = {"REMOTE_ADDR": "10.0.0.2"}
    for _ in range(3):
        log_in(client, "root", "guess", **proxy, HTTP_X_FORWARDED_FOR=f"{ADMIN_DESK}, {STRANGER}")
    assert set(LoginFailure.objects.values_list("address", flat=True)) == {STRANGER}
    assert not logged_in(log_in(client, "root", "root-password", **proxy, HTTP_X_FORWARDED_FOR=STRANGER))
    assert logged_in(log_in(client, "root", "root-password", **proxy, HTTP_X_FORWARDED_FOR=ADMIN_DESK))
    client.logout()
    direct = {"REMOTE_ADDR": "10.0.0.9"}  # (not the proxy: past its /29)
    for forged in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):  # a new address each time: not believed
        log_in(client, "root", "guess", **direct, HTTP_X_FORWARDED_FOR=forged)
    assert LoginFailure.objects.filter(address="10.0.0.9").count() == 3
    assert not logged_in(log_in(client, "root", "root-password", **direct, HTTP_X_FORWARDED_FOR=ADMIN_DESK))


def test_logins_and_failed_logins_are_in_the_audit_log(client, alice, settings):
    """Who logged in, how and from where stays in the audit log (``AUDIT_RETENTION``), after the failures' count
    left its window; a refused login (too many failures) writes nothing more; a name with no account, nothing."""
    from portal.models import AuditEntry

    settings.LOGIN_FAILURES_MAX = 2

    def entries():
        return list(
            AuditEntry.objects.filter(content_type__model="user", object_id=str(alice.pk))
            .order_by("pk")
            .values_list("actor", "message")
        )

    log_in(client, "Alice", "wrong", REMOTE_ADDR="198.18.9.9")
    log_in(client, "alice", "wrong", REMOTE_ADDR="198.18.9.9")
    log_in(client, "alice", "alice-password", REMOTE_ADDR="198.18.9.9")  # refused: over the limit
    log_in(client, "nobody", "wrong", REMOTE_ADDR="198.18.9.9")
    assert entries() == [
        ("login from 198.18.9.9", "failed login from 198.18.9.9"),
        ("login from 198.18.9.9", "failed login from 198.18.9.9 (2 in a row: refused from there for the window)"),
    ]
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR="198.18.9.10"))
    assert entries()[-1] == ("alice", "logged in (password) from 198.18.9.10")
    assert not AuditEntry.objects.filter(message__contains="nobody").exists()


def test_the_audit_log_keeps_audit_retention_days(alice, settings):
    from portal import audit
    from portal.models import AuditEntry
    from portal.tasks import prune_audit

    audit.record(alice, "action", message="old")
    audit.record(alice, "action", message="recent")
    AuditEntry.objects.filter(message="old").update(timestamp=timezone.now() - timedelta(days=401))
    settings.AUDIT_RETENTION = 0  # kept for good
    assert prune_audit() == 0 and AuditEntry.objects.filter(message="old").exists()
    settings.AUDIT_RETENTION = 400
    assert prune_audit() == 1
    assert list(AuditEntry.objects.filter(message__in=["old", "recent"]).values_list("message", flat=True)) == [
        "recent"
    ]


def test_a_guessers_flood_writes_two_audit_entries_a_window(client, alice, settings):
    from portal.models import AuditEntry

    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 0, 0  # no limit at all
    for _ in range(12):
        log_in(client, "alice", "wrong", REMOTE_ADDR="198.18.9.9")
    assert AuditEntry.objects.filter(message__startswith="failed login").count() == 1  # (MAX 0: only the first)
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 5, 50
    for _ in range(12):
        log_in(client, "alice", "wrong", REMOTE_ADDR="198.18.9.10")
    assert AuditEntry.objects.filter(message__startswith="failed login from 198.18.9.10").count() == 2


def test_a_blank_password_does_not_clear_the_failures(client, alice, settings):
    """A form with the password left out is no success: it must not wipe the count a guesser has run up."""
    settings.LOGIN_FAILURES_MAX = 3
    for _ in range(2):
        log_in(client, "alice", "wrong")
    log_in(client, "alice", "")
    log_in(client, "alice", "wrong")
    r = log_in(client, "alice", "alice-password")
    assert r.status_code == 200 and "Too many failed logins" in r.content.decode()


def sign_out(client) -> None:
    """Log out as the browser does (``Client.logout`` forgets every cookie, the known-browser one too)."""
    assert client.post(reverse("logout")).status_code == 302


def known_cookie(client) -> str:
    from portal.logins import KNOWN_BROWSER_COOKIE

    return client.cookies[KNOWN_BROWSER_COOKIE].value


def test_the_owners_known_browser_gets_in_past_a_ceiling_set_off_from_a_48(client, root, settings):
    """An IPv6 /48 is 65536 clients: ten of its /64s set off the account-wide ceiling, which refused the account
    from everywhere — the break-glass superuser too. The browser its owner signed in with before (a signed cookie)
    still gets in, from any address; a browser that never did, or one with a forged cookie or the cookie of
    another account, does not."""
    from django.test import Client

    from portal.logins import KNOWN_BROWSER_COOKIE

    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 5, 50
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR=ADMIN_DESK))
    cookie = known_cookie(client)
    assert "root" not in cookie  # (the account's digest, not its name)
    sign_out(client)
    guesser = Client()
    for subnet in range(10):
        for n in range(5):
            log_in(guesser, "root", "guess", REMOTE_ADDR=f"2001:db8:77:{subnet:x}::{n + 1:x}")
    stranger_desk = Client()
    refused = log_in(stranger_desk, "root", "root-password", REMOTE_ADDR="198.51.100.99")
    assert "Too many failed logins for this account from many addresses" in refused.content.decode()
    forged = Client()
    forged.cookies[KNOWN_BROWSER_COOKIE] = cookie[:-3] + ("abc" if not cookie.endswith("abc") else "abd")
    assert not logged_in(log_in(forged, "root", "root-password", REMOTE_ADDR="198.51.100.99"))
    # the owner's browser, from a new address (a train's wifi): in, and the cookie is renewed
    assert logged_in(log_in(client, "root", "root-password", REMOTE_ADDR="198.51.100.100"))
    assert known_cookie(client)
    # its own address's limit still holds: five wrong passwords from there refuse it there
    sign_out(client)
    for _ in range(5):
        log_in(client, "root", "wrong", REMOTE_ADDR="198.51.100.100")
    refused = log_in(client, "root", "root-password", REMOTE_ADDR="198.51.100.100")
    assert "Too many failed logins for this account: try again" in refused.content.decode()


def test_a_known_browser_is_known_to_its_own_accounts_only(client, alice, bob, settings):
    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX = 2, 4
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR=ADMIN_DESK))
    sign_out(client)
    for n in range(4):
        for name in ("alice", "bob"):
            log_in(client, name, "guess", REMOTE_ADDR=f"203.0.113.{n + 1}")
    assert "from many addresses" in log_in(client, "bob", "bob-password", REMOTE_ADDR=ADMIN_DESK).content.decode()
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR=ADMIN_DESK))
    sign_out(client)
    # signed in to bob from elsewhere once the ceiling has passed: the browser is known to both
    LoginFailure.objects.update(at=timezone.now() - timedelta(seconds=901))
    assert logged_in(log_in(client, "bob", "bob-password", REMOTE_ADDR=ADMIN_DESK))
    sign_out(client)
    for n in range(4):
        for name in ("alice", "bob"):
            log_in(client, name, "guess", REMOTE_ADDR=f"203.0.113.{n + 1}")
    for name in ("alice", "bob"):
        assert logged_in(log_in(client, name, f"{name}-password", REMOTE_ADDR=ADMIN_DESK))
        sign_out(client)


def test_a_browser_is_known_for_login_known_browser_days_since_its_last_login(client, alice, settings, monkeypatch):
    import time

    from django.core import signing

    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX, settings.LOGIN_KNOWN_BROWSER_DAYS = 2, 4, 30
    then = time.time() - 31 * 86400
    monkeypatch.setattr(signing.time, "time", lambda: then)
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR=ADMIN_DESK))
    monkeypatch.undo()
    sign_out(client)
    for n in range(4):
        log_in(client, "alice", "guess", REMOTE_ADDR=f"203.0.113.{n + 1}")
    assert "from many addresses" in log_in(client, "alice", "alice-password", REMOTE_ADDR=ADMIN_DESK).content.decode()
    settings.LOGIN_KNOWN_BROWSER_DAYS = 32
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR=ADMIN_DESK))
    sign_out(client)
    settings.LOGIN_KNOWN_BROWSER_DAYS = 0  # no browser is known
    assert "from many addresses" in log_in(client, "alice", "alice-password", REMOTE_ADDR=ADMIN_DESK).content.decode()


def test_spraying_many_names_from_one_client_refuses_that_client(client, alice, bob, settings):
    """A few guesses at each of many names stays under every account's limits: ``LOGIN_FAILURES_CLIENT_MAX``
    failures from one client (an IPv6 /64 as one), whatever the names — names with no account too — refuse that
    client's logins; other clients, and the client's own known browsers at their accounts, are not refused."""
    from django.test import Client

    settings.LOGIN_FAILURES_MAX, settings.LOGIN_FAILURES_ACCOUNT_MAX, settings.LOGIN_FAILURES_CLIENT_MAX = 5, 50, 20
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR="2001:db8:5:5::1"))
    sign_out(client)
    sprayer = Client()
    for n in range(20):
        log_in(sprayer, f"user{n}", "Winter2026!", REMOTE_ADDR=f"2001:db8:5:5::{n + 100:x}")
    refused = log_in(sprayer, "bob", "bob-password", REMOTE_ADDR="2001:db8:5:5::2")
    assert "Too many failed logins from this address: try again in 15 minute(s)" in refused.content.decode()
    assert logged_in(log_in(Client(), "bob", "bob-password", REMOTE_ADDR="2001:db8:5:6::1"))
    assert logged_in(log_in(client, "alice", "alice-password", REMOTE_ADDR="2001:db8:5:5::1"))
    sign_out(client)
    settings.LOGIN_FAILURES_CLIENT_MAX = 0  # no limit
    assert logged_in(log_in(sprayer, "bob", "bob-password", REMOTE_ADDR="2001:db8:5:5::2"))


def test_the_admin_login_page_makes_a_browser_known_too(client, root, settings):
    r = client.post("/admin/login/?next=/admin/", {"username": "root", "password": "root-password"})
    assert r.status_code == 302 and known_cookie(client)

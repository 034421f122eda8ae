"""The "API tokens" page in headless Chromium (Debian's, driven by Playwright): a user makes a token through the
menu and the form, copies the secret the page shows once, uses it against the live API, reloads (no second
token, no secret), and revokes it; the secret is nowhere in the database; on a phone the page does not scroll
sideways."""
# ruff: noqa: F401, F811 (the pytest fixture browser_page is imported from access.tests.browser)

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from django.db import connection

from access.tests.browser import browser_page, log_in
from portal.models import ApiToken

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _api(live_server, secret: str) -> int:
    request = urllib.request.Request(f"{live_server.url}/api/clusters/", headers={"Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - the test's own live server
            json.loads(answer.read())
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


def _in_database(text: str) -> bool:
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from introspection
            if any(text in repr(row) for row in cursor.fetchall()):
                return True
    return False


def test_a_user_makes_uses_and_revokes_a_token_in_the_browser(browser_page, live_server, alice):
    page = browser_page
    log_in(page, live_server, "alice", "alice-password")
    page.click("nav >> text=API tokens")
    page.wait_for_url(f"{live_server.url}/tokens/")
    page.fill("#id_name", "laptop: client.py")
    page.check("input[name=scopes][value='clusters:write']")
    page.select_option("#id_days", "7")
    page.click("#token-form button[type=submit]")
    page.wait_for_url(f"{live_server.url}/tokens/")
    secret = page.inner_text("#token-secret").strip()
    assert secret.startswith("vc_") and page.locator("#new-token").is_visible()
    token = ApiToken.objects.get(user=alice)
    assert sorted(token.scopes) == ["clusters:read", "clusters:write"]
    assert _api(live_server, secret) == 200
    assert not _in_database(secret)  # a hash only; the page had it from the session, once

    page.reload()  # no second token, and the secret is gone
    assert page.locator("#token-secret").count() == 0
    assert ApiToken.objects.filter(user=alice).count() == 1

    page.set_viewport_size({"width": 390, "height": 800})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow

    page.click("a[aria-label='Revoke token laptop: client.py']")
    page.click("button.danger")
    page.wait_for_url(f"{live_server.url}/tokens/")
    assert "Revoked token laptop: client.py" in page.inner_text(".messages")
    assert _api(live_server, secret) == 401

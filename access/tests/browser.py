"""Headless Chromium for browser tests (Debian's, driven by Playwright): the page fixture and the login."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# LAB.md §11: without the background-networking flags Chromium keeps trying to reach the outside.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser_page(tmp_path, monkeypatch):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements/dev.txt)")
    # Playwright's sync API keeps an event loop in this thread; the ORM calls the test makes between browser
    # steps are plain synchronous code, which Django's async guard cannot tell apart.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
        )
        page = context.new_page()
        # every browser test checks the portal's Content-Security-Policy too: a script or style it blocks is a
        # broken page (portal.security)
        blocked: list[str] = []
        page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
        try:
            yield page
        finally:
            context.close()
        assert not blocked, f"the Content-Security-Policy blocked: {blocked}"


def log_in(page, live_server, username: str, password: str, *, next_url: str = "/") -> None:
    """Through the login form, as a user does; lands on ``next_url``."""
    page.goto(f"{live_server.url}/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{live_server.url}{next_url}")

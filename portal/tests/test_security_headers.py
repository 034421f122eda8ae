"""Every response carries the portal's Content-Security-Policy and Permissions-Policy (``portal.security``); the
browser tests (``access.tests.browser``) fail on anything the policy blocks."""

from __future__ import annotations

import pytest
from django.test import Client

from access.tests.browser import browser_page, log_in  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db


def policy(response) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))


def test_pages_and_the_api_carry_the_policy(client, alice):
    for url in ("/login/", "/healthz", "/api/clusters/", "/static/css/portal.css"):
        response = client.get(url)
        found = policy(response)
        assert found["script-src"] == "'self'" and found["object-src"] == "'none'", url
        assert found["frame-ancestors"] == "'none'" and found["base-uri"] == "'none'", url
        assert found["default-src"] == "'self'" and found["img-src"] == "'self' data:", url
        assert found["style-src"] == "'self' 'unsafe-inline'", url
        assert "'unsafe-eval'" not in response["Content-Security-Policy"], url
        assert "camera=()" in response["Permissions-Policy"], url


def test_no_form_action_so_logging_out_through_the_single_sign_on_is_never_blocked(settings):
    """Browsers check ``form-action`` against every redirect after a form's POST: the logout's way through the
    single sign-on's logout on to the identity provider's would be blocked, leaving the user signed in there."""
    settings.SSO_LOGOUT_URL = "https://proxy.example.org/oauth2/sign_out?rd=https://idp.example.org/logout"
    assert "form-action" not in policy(Client().get("/login/"))


@pytest.mark.django_db(transaction=True)
def test_the_api_documentation_runs_under_the_policy(browser_page, live_server, alice):  # noqa: F811
    """Swagger UI's start-up script was inline (drf-spectacular's plain view): the policy would have blocked it."""
    page = browser_page
    log_in(page, live_server, "alice", "alice-password")
    page.goto(f"{live_server.url}/api/docs/")
    page.wait_for_selector(".swagger-ui .info .title", timeout=15000)
    assert "VirtCloud" in page.inner_text(".swagger-ui .info .title")


@pytest.mark.django_db(transaction=True)
def test_the_admin_runs_under_the_policy(browser_page, live_server, root):  # noqa: F811
    """Django's admin pages (their widgets' scripts, the portal's own change forms) load nothing the policy
    blocks: the browser fixture fails the test on any violation."""
    from network.tests.factories import SwitchFactory

    switch = SwitchFactory(name="sw-csp")
    page = browser_page
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", "root")
    page.fill("#id_password", "root-password")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
    for path in (
        "/admin/network/switch/",
        f"/admin/network/switch/{switch.pk}/change/",
        "/admin/clusters/virtualcluster/",
        "/admin/auth/user/add/",
    ):
        page.goto(f"{live_server.url}{path}")
        page.wait_for_selector("#content")

"""Error pages in the browser (DEBUG off, as in production): the portal's layout, a way back, no debug detail."""

from __future__ import annotations

import pytest
from django.test import Client, RequestFactory
from django.views.defaults import server_error

pytestmark = pytest.mark.django_db


def test_page_not_found_has_the_portal_layout_and_a_way_back(client, alice):
    client.force_login(alice)
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    page = response.content.decode()
    assert "<title>Page not found · VirtCloud portal</title>" in page
    assert 'href="/"' in page and 'href="/access/"' in page  # home and the nav, as on every page
    assert "URLconf" not in page and "Traceback" not in page


def test_api_paths_still_answer_json(client, alice):
    client.force_login(alice)
    response = client.get("/api/no-such-endpoint/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_a_form_posted_from_a_stale_page_says_to_reload(alice):
    """The CSRF token changes when one logs in again (in another tab): the old page's buttons then fail."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    response = client.post("/access/credentials/1/revoke/")
    assert response.status_code == 403
    page = response.content.decode()
    assert "<title>Page out of date · VirtCloud portal</title>" in page
    assert "Reload the page" in page
    assert "DEBUG=True" not in page


def test_server_error_page_has_the_portal_layout():
    response = server_error(RequestFactory().get("/access/"))
    assert response.status_code == 500
    page = response.content.decode()
    assert "<title>Server error · VirtCloud portal</title>" in page
    assert 'href="/"' in page


def test_permission_denied_has_the_portal_layout(client, django_user_model):
    staff = django_user_model.objects.create_user("helpdesk", is_staff=True)  # staff without model permissions
    client.force_login(staff)
    response = client.get("/admin/network/switch/")
    assert response.status_code == 403
    assert "<title>Not allowed · VirtCloud portal</title>" in response.content.decode()

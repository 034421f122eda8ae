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


@pytest.mark.urls("portal.tests.failing_urls")
def test_a_server_error_names_the_request_id_on_the_page_and_in_the_api(alice, settings):
    """The page (HTML) and the API (JSON) name the request's id: the logs carry it on every line of that
    request, so a user can quote it to the operators."""
    settings.DEBUG = False
    settings.BEHIND_TLS_PROXY = True  # the proxy names the request (portal.audit.RequestIdMiddleware)
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    page = client.get("/boom/", HTTP_X_REQUEST_ID="req-1234abcd")
    assert page.status_code == 500 and "<code>req-1234abcd</code>" in page.content.decode()
    api = client.get("/api/boom/", HTTP_X_REQUEST_ID="req-5678abcd")
    assert api.status_code == 500
    assert api.json() == {"detail": "Server error.", "code": "server_error", "request_id": "req-5678abcd"}


def test_a_bad_request_has_the_portal_layout(alice, settings):
    settings.DEBUG = False
    response = Client().get("/access/", HTTP_HOST="bad host name")
    assert response.status_code == 400
    assert "<title>Bad request · VirtCloud portal</title>" in response.content.decode()


def test_permission_denied_has_the_portal_layout(client, django_user_model):
    staff = django_user_model.objects.create_user("helpdesk", is_staff=True)  # staff without model permissions
    client.force_login(staff)
    response = client.get("/admin/network/switch/")
    assert response.status_code == 403
    assert "<title>Not allowed · VirtCloud portal</title>" in response.content.decode()


@pytest.mark.parametrize("next_url", ["/login/", "/login/?next=/login/", "http://testserver/login/"])
def test_a_signed_in_user_sent_to_the_login_page_with_itself_as_next_goes_home(client, alice, next_url):
    """``/login/?next=/login/`` for someone signed in: Django's redirect-loop check was a 500 (and a ``next``
    of the login page with a query string went round in the browser); now the home page."""
    client.force_login(alice)
    response = client.get("/login/", {"next": next_url})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/login/", {"next": "/access/"})["Location"] == "/access/"  # any other next still goes there
    client.logout()
    assert client.get("/login/", {"next": next_url}).status_code == 200  # signed out: the form

"""Requests whose text the views could not decode or the database could not take are a 400 before any view
(``portal.requests``): a charset other than UTF-8/ASCII/Latin-1, and outside the API a query parameter with a NUL
or a lone surrogate — never a 500, also without logging in."""

from __future__ import annotations

import json

import pytest
from django.test import Client, RequestFactory
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request

from portal.api import query_param

pytestmark = pytest.mark.django_db


def through_the_portals_handler(method: str, path: str, *, query: str = "", body: bytes = b"", content_type: str = ""):
    """(status, body) of a request through the handler gunicorn and runserver run (``portal.wsgi``): the test
    client builds its requests itself, with Django's class."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections
    from django.test.client import FakePayload

    from portal.requests import PortalWSGIHandler

    environ = RequestFactory()._base_environ(
        PATH_INFO=path,
        REQUEST_METHOD=method,
        QUERY_STRING=query,
        CONTENT_TYPE=content_type,
        CONTENT_LENGTH=str(len(body)),
        **{"wsgi.input": FakePayload(body)},
    )
    statuses = []
    # (the test's transaction holds its connection: the handler must not close it, as the test client does not)
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        response = PortalWSGIHandler()(environ, lambda status, headers, exc_info=None: statuses.append(status))
        content = b"".join(response)
        response.close()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return int(statuses[0].split()[0]), content


@pytest.mark.parametrize("charset", ["punycode", "utf-7", "rot13", "no-such-codec"])
def test_a_request_in_an_odd_charset_is_a_400_not_a_500(charset):
    status, content = through_the_portals_handler(
        "GET", "/login/", query="next=/", content_type=f"text/plain; charset={charset}"
    )
    assert status == 400 and b"send UTF-8" in content
    status, _ = through_the_portals_handler(
        "POST",
        "/login/",
        body=b"username=+2AA-&password=x",
        content_type=f"application/x-www-form-urlencoded; charset={charset}",
    )
    assert status == 400
    status, content = through_the_portals_handler(
        "GET", "/api/clusters/", query="limit=1", content_type=f"application/json; charset={charset}"
    )
    assert status == 400 and json.loads(content)["code"] == "bad_request" and b"charset" in content


def test_django_s_own_request_class_fails_on_such_a_charset():
    """(Why the portal has its own handler: Django's request raises while it is built, before any middleware.)"""
    from django.core.handlers.wsgi import WSGIRequest

    environ = RequestFactory()._base_environ(QUERY_STRING="next=/", CONTENT_TYPE="text/plain; charset=punycode")
    with pytest.raises(UnicodeError):
        WSGIRequest(environ)


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "us-ascii", "iso-8859-1", "latin-1", "windows-1252"])
def test_the_usual_charsets_pass(charset):
    status, _ = through_the_portals_handler(
        "GET", "/login/", query="next=/", content_type=f"text/plain; charset={charset}"
    )
    assert status == 200


def test_a_nul_in_the_admins_query_parameters_is_a_400(root):
    client = Client()
    client.force_login(root)
    for url in (
        "/admin/autocomplete/?app_label=network&model_name=host&field_name=switch_port&term=%00",
        "/admin/clusters/virtualcluster/?state__exact=%00",
        "/admin/clusters/virtualcluster/?q=a%00b",
    ):
        response = client.get(url)
        assert response.status_code == 400, url
        assert b"NUL" in response.content
    assert client.get("/admin/clusters/virtualcluster/?state__exact=ready").status_code == 200


def test_the_apis_filters_say_which_parameter_holds_what_the_database_cannot_compare():
    """(Under ``/api/`` the views answer, naming the parameter: ``query_param``.)"""
    for raw, message in (("a\x00b", "NUL"), ("a\ud800b", "surrogate")):
        request = Request(RequestFactory().get("/api/clusters/"))
        request._request.GET = request._request.GET.copy()
        request._request.GET["name"] = raw
        with pytest.raises(ValidationError) as info:
            query_param(request, "name")
        assert message in str(info.value.detail["name"][0])


def test_the_asgi_entry_point_refuses_such_a_charset_too():
    """``portal.asgi`` (uvicorn, daphne) builds its requests as ``portal.wsgi`` does: 400, not Django's 500."""
    import asyncio

    from asgiref.testing import ApplicationCommunicator

    from portal.requests import PortalASGIHandler

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/login/",
        "query_string": b"next=%C3%A9",
        "headers": [(b"content-type", b"text/plain; charset=punycode"), (b"host", b"testserver")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
    }

    async def call():
        app = ApplicationCommunicator(PortalASGIHandler(), scope)
        await app.send_input({"type": "http.request", "body": b""})
        start = await app.receive_output(10)
        body = await app.receive_output(10)
        await app.wait(10)
        return start["status"], body.get("body", b"")

    status, body = asyncio.run(call())
    assert status == 400 and b"send UTF-8" in body

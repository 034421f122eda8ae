"""Requests refused before any view reads them: text the views could not decode or the database could not take.

- A ``Content-Type`` charset other than UTF-8, ASCII or Latin-1: Django decodes the query string and form bodies
  with whatever codec the header names, and some (``punycode``) raise where Django expects a
  ``UnicodeDecodeError`` — already while it builds the request, before any middleware: the server's bare 500 —,
  others (``utf-7``) yield lone surrogates that no database stores or compares: a 500 from the login page on,
  without logging in. Browsers and the API's clients send UTF-8. The portal's WSGI and ASGI handlers
  (``portal.wsgi``: gunicorn, runserver; ``portal.asgi``) build their requests with ``TakenCharsetOnly``, which
  decodes only with a charset taken, and the middleware refuses the others.
- Outside the API, a query parameter holding a NUL character or a lone surrogate (the admin's filters and
  autocomplete pass them to PostgreSQL, which refuses them: a 500). The API's views say which parameter, in
  their own 400 (``portal.api.query_param``).

Both are a 400: JSON under ``/api/`` like every API error, Django's page elsewhere.
"""

from __future__ import annotations

import codecs

from django.core.handlers.asgi import ASGIHandler, ASGIRequest
from django.core.handlers.wsgi import WSGIHandler, WSGIRequest
from django.http import HttpResponseBadRequest, JsonResponse
from django.utils.http import parse_header_parameters

from portal.text import storable

#: the request charsets taken (as ``codecs`` names them)
CHARSETS = frozenset({"utf-8", "ascii", "iso8859-1", "cp1252"})


def charset_taken(charset: str | None) -> bool:
    """Whether a request in ``charset`` (a ``Content-Type`` parameter; None: none given) is decoded."""
    if not charset:
        return True
    try:
        return codecs.lookup(charset).name in CHARSETS
    except LookupError:
        return False


class TakenCharsetOnly:
    """A request that decodes with the ``Content-Type``'s charset only when ``charset_taken``; with any other it
    keeps the default (UTF-8) and ``request_text_middleware`` answers 400."""

    def _set_content_type_params(self, meta):
        self.content_type, self.content_params = parse_header_parameters(meta.get("CONTENT_TYPE", ""))
        charset = self.content_params.get("charset")
        if charset and charset_taken(charset):
            self.encoding = charset


class PortalWSGIRequest(TakenCharsetOnly, WSGIRequest):
    pass


class PortalWSGIHandler(WSGIHandler):
    request_class = PortalWSGIRequest


class PortalASGIRequest(TakenCharsetOnly, ASGIRequest):
    pass


class PortalASGIHandler(ASGIHandler):
    """(``portal.asgi``: uvicorn, daphne.)"""

    request_class = PortalASGIRequest


def _refusal(request, message: str):
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": message, "code": "bad_request"}, status=400)
    return HttpResponseBadRequest(message, content_type="text/plain; charset=utf-8")


def _charset_refused(request) -> str | None:
    charset = getattr(request, "content_params", {}).get("charset")
    if not charset_taken(charset):
        return f"unsupported charset {charset[:40]!r} in Content-Type: send UTF-8"
    return None


def _query_refused(request) -> str | None:
    for key, values in request.GET.lists():
        for text in (key, *values):
            if not storable(text):
                return "query parameters must not hold NUL characters or lone surrogates"
    return None


def request_text_middleware(get_response):
    def middleware(request):
        refused = _charset_refused(request)
        if refused is None and not request.path.startswith("/api/"):
            try:
                refused = _query_refused(request)
            except UnicodeError:  # (a charset taken above decodes every byte; a defence, not a path)
                refused = "the query string cannot be decoded"
        if refused is not None:
            return _refusal(request, refused)
        return get_response(request)

    return middleware

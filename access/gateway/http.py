"""Outgoing HTTP (a gateway's pull, the portal's webhooks): an opener that never follows a redirect.

Standard library only, so that the gateway agent (:mod:`access.gateway.agent`) runs without Django.

urllib follows redirects by itself, carrying the request's headers (a token, a signature) to wherever they
point, and turning a POST's 301/302/303 into a GET without its body. Here a redirect is the server's answer:
``open`` raises ``urllib.error.HTTPError`` with the 3xx code and its ``Location`` header, for the caller to
report.
"""

from __future__ import annotations

import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx


def opener() -> urllib.request.OpenerDirector:
    """An opener like ``urlopen``'s, redirects refused."""
    return urllib.request.build_opener(_NoRedirect)


def redirected(code: int) -> bool:
    """Whether an HTTP status is a redirect (refused by :func:`opener`)."""
    return 300 <= code < 400 and code != 304

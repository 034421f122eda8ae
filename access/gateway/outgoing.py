"""Outgoing HTTP (a gateway's pull, the scheduler's client, the portal's webhooks): an opener that never
follows a redirect, and the rule for where a bearer token may be sent in the clear.

Standard library only, so that the gateway agent (:mod:`access.gateway.agent`) and the scheduler's client
(``clusters/client.py``) run without Django. (Not named ``http``: run as scripts, the folder of a script comes
first on the import path, and this module would shadow the standard library's ``http``.)

urllib follows redirects by itself, carrying the request's headers (a token, a signature) to wherever they
point, and turning a POST's 301/302/303 into a GET without its body. Here a redirect is the server's answer:
``open`` raises ``urllib.error.HTTPError`` with the 3xx code and its ``Location`` header, for the caller to
report.
"""

from __future__ import annotations

import http.client
import ipaddress
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx


def opener(*, direct: bool = False, handlers: tuple = ()) -> urllib.request.OpenerDirector:
    """An opener like ``urlopen``'s, redirects refused; ``direct``: never through a proxy of the environment
    (``http_proxy``…: a plain-http request to this host would hand its token to the proxy); ``handlers``: more
    of them (they replace urllib's of the same kind)."""
    chain: list = [_NoRedirect, *handlers]
    if direct:
        chain.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*chain)


def redirected(code: int) -> bool:
    """Whether an HTTP status is a redirect (refused by :func:`opener`)."""
    return 300 <= code < 400 and code != 304


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_url_problem(url: str) -> str | None:
    """Why a bearer token must not be sent to ``url`` (None: it may): https, or plain http only to this host
    (anyone on the path of plain http would read the token, and could answer in the portal's place)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and is_loopback(url)):
        return None
    if scheme == "http":
        return f"the portal URL must be https (plain http only to this host): {url}"
    return f"the portal URL must be https: {url}"


class NotSent(ValueError):
    """The request was not sent: the token would have gone somewhere it must not (see ``token_url_problem``)."""


class Unreachable(OSError):
    """No HTTP answer: the server could not be reached, or what came back was not HTTP (``http.client``)."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Message
    body: bytes


def send_with_token(
    method: str, url: str, token: str, *, headers: dict | None = None, data: bytes | None = None, timeout: float
) -> Answer:
    """One request carrying ``token`` as a bearer token, answered with whatever status the server gave (a 3xx
    is never followed, a 4xx or 5xx is an ``Answer`` too); ``NotSent`` or ``Unreachable`` otherwise. The one
    place the gateway agent and the scheduler's client send their tokens from."""
    problem = token_url_problem(url)
    if problem:
        raise NotSent(problem)
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        url, data=data, method=method, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with opener(direct=is_loopback(url)).open(request, timeout=timeout) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        except (OSError, http.client.HTTPException):
            body = b""
        return Answer(exc.code, exc.headers, body)
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        raise Unreachable(str(exc)) from None


def exposed_token_file(token_file: str | None) -> str:
    """What is wrong with where ``token_file`` lies ("": nothing, or no file): readable or writable by others than its
    owner — on a shared scheduler or gateway host anyone could read the token and act as its holder (ssh refuses
    a private key so kept). Said, not refused: a setup that keeps its tokens so goes on working."""
    if not token_file:
        return ""
    try:
        mode = Path(token_file).stat().st_mode
    except OSError:
        return ""
    if mode & 0o077:
        return f"{token_file} is open to others than its owner (mode {mode & 0o777:o}): chmod 600 it"
    return ""


def read_token(token: str | None, token_file: str | None, *, what: str = "token") -> str:
    """The token given, or the one in ``token_file``; ``ValueError`` saying why there is none usable."""
    try:
        token = token or Path(token_file or "").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the {what}: {exc}") from None
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"the {what} is empty or malformed (one word, as the portal showed it)")
    return token

"""Pushing the cluster event feed to webhooks (outgoing requests through ``access.gateway.outgoing``).

``deliver(webhook)`` POSTs the next batch of events after the webhook's cursor as JSON::

    {"webhook": "accounting", "events": [{"id": 41, "cluster": 7, "cluster_name": "mpi", "state": "ready",
                                          "at": "2026-11-27T00:00:00.123456Z"}, …]}

(each event as ``GET /api/clusters/events/`` gives it)
with ``X-VirtCloud-Signature: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>``,
``X-VirtCloud-Webhook: <name>``, ``X-VirtCloud-Timestamp: <unix seconds>`` and
``X-VirtCloud-Signature-Timestamped: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>`` — a receiver that
checks the latter and refuses an old timestamp (and de-duplicates by event id) cannot be fed a recorded
delivery again.

The endpoint's host is resolved before each POST and the POST goes to the addresses checked, each in turn until
one answers (no second lookup a DNS answer could change in between): loopback, link-local (cloud metadata
services), multicast, unspecified and reserved addresses are refused, and for a webhook registered through the API
anything not public, unless the networks it may use list them (``reach``) — a webhook is not a way to reach the
portal's own services. Through an environment proxy the proxy connects, but a webhook registered through the API
is sent only when its host resolves to addresses it may reach.

A 2xx answer moves the cursor past the batch; anything else (or no complete answer within ``WEBHOOK_TIMEOUT``
from the connect on: the whole exchange, not each read — an endpoint that trickles its answer a byte at a time
is cut then, and never holds a worker's thread longer) leaves it, so the same events are sent again (at least
once, in commit order) after a backoff of 2^failures seconds (at most ``WEBHOOK_MAX_BACKOFF``), in batches
halved after each failure in a row (``BATCH`` events, then 50, 25 … down to one: an endpoint whose answer takes
longer the more events it gets still gets through). Events of states the webhook does not want are skipped,
the cursor moving past them.

Events are kept ``CLUSTER_EVENT_RETENTION`` days. A webhook whose cursor is behind events pruning deleted (its
endpoint failed, or it was disabled, that long) gets a batch that says so first, ``"missed": {"after": <its
cursor>, "through": <the highest id deleted>}``, with the events left after it (perhaps none): its endpoint
reads the clusters again. A webhook failing for ``WEBHOOK_ALERT_AFTER`` seconds has its owner mailed, once per
run of failures (``clusters.services.webhooks_mail_failing``).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connections, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from access.gateway import outgoing
from clusters.api.serializers import EventSerializer
from clusters.models import ClusterEvent, EventHorizon, Webhook
from clusters.selectors import shared_with

BATCH = 100
logger = logging.getLogger(__name__)


@dataclass
class Delivery:
    webhook: str
    sent: int  # events in the POST (0: nothing to send or not due)
    status: int | None = None
    error: str = ""


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def refused_address(address: str, *, public_only: bool = False, listed: bool = True) -> bool:
    """Whether a webhook must not be sent to ``address`` (an IP): this machine's own or its network's special
    ranges — and with ``public_only`` (a webhook registered through the API) anything not public (the provider's
    private networks) — unless the networks it may use list it: ``WEBHOOK_ALLOWED_NETWORKS`` for the
    administrators' and the middleware's webhooks (``listed``), ``WEBHOOK_USER_ALLOWED_NETWORKS`` for a user's
    own. The administrators' list (a receiver on the portal's machine, ``127.0.0.0/8``) opened the portal's own
    services to every user's webhook."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    networks = settings.WEBHOOK_ALLOWED_NETWORKS if listed else settings.WEBHOOK_USER_ALLOWED_NETWORKS
    if any(ip in ipaddress.ip_network(net, strict=False) for net in networks):
        return False
    if public_only and (not ip.is_global or ip in _NAT64):
        return True
    return ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved


# the well-known NAT64 prefix: an address in it is any IPv4 address behind the provider's NAT64, its private ones
# too (is_global says yes to it)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def reach(hook) -> dict[str, bool]:
    """How ``refused_address`` judges ``hook``'s addresses: an administrator's (admin: no owner) may reach what
    ``WEBHOOK_ALLOWED_NETWORKS`` lists, private networks included; the middleware's (the feed of every cluster)
    public addresses and that list; a user's own, public addresses and ``WEBHOOK_USER_ALLOWED_NETWORKS``."""
    return {"public_only": hook.owner_id is not None, "listed": hook.owner_id is None or hook.all_clusters}


def _resolve(host: str, port: int, timeout: float) -> list:
    """``getaddrinfo`` within ``timeout`` s (it has no timeout of its own: a resolver that does not answer would
    hold the delivery's thread for as long as the system's retries last); ``TimeoutError`` past it. Each lookup
    has a daemon thread of its own, left to end with the system's retries: no shared pool that one endpoint's
    hanging lookups could fill for everyone else's."""
    done: dict = {}

    def look() -> None:
        try:
            done["answer"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done["error"] = exc

    thread = threading.Thread(target=look, name="webhook-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in done:
        raise done["error"]
    return done["answer"]


def _checked_addresses(url: str, *, public_only: bool = False, listed: bool = True) -> tuple[list[str], str]:
    """(the addresses to POST to, in the resolver's order, "") or ([], why not): the host resolved once (within
    ``WEBHOOK_TIMEOUT``), every answer checked. A user's webhook (``public_only``) is told neither the addresses
    refused nor whether the name resolves at all: its ``last_error`` would map the provider's internal DNS for
    anyone."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    unreachable = f"{host} does not resolve to an address webhooks may reach: not delivered to"
    try:
        answers = _resolve(host, port, settings.WEBHOOK_TIMEOUT)
    except (OSError, UnicodeError) as exc:
        return [], unreachable if public_only else f"cannot resolve {host}: {exc}"
    addresses = list(dict.fromkeys(info[4][0] for info in answers))
    refused = [a for a in addresses if refused_address(a, public_only=public_only, listed=listed)]
    if refused or not addresses:
        if public_only:
            return [], unreachable
        listed = ", ".join(refused) or "nothing"
        return [], f"{host} resolves to {listed}: not delivered to (WEBHOOK_ALLOWED_NETWORKS)"
    return addresses, ""


class _Deadline:
    """The connections one POST opens, cut when its time is up (a socket timeout bounds each read, not the
    exchange: an endpoint sending a byte every few seconds would hold the worker's thread for good — Celery's
    threads pool enforces no task time limit)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False  # cut before the answer was complete
        self._finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def connected(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if not self.expired:
                self._sockets.append(sock)
                return sock
        sock.close()
        raise TimeoutError(f"no complete answer within {self.seconds:g} s")

    def in_time(self) -> bool:
        """The answer is read: whether before the cut (from now on nothing is cut)."""
        with self._lock:
            self._finished = True
            return not self.expired

    def expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
                except OSError:
                    pass


def _connection(connection_class, deadline: _Deadline, addresses: list[str] | None):
    """A connection class of urllib's handlers whose sockets ``deadline`` cuts, connecting to ``addresses`` (when
    given: the checked ones, each in turn until one answers — a dual-stack endpoint whose IPv6 address this host
    cannot reach failed every delivery on it, the first) whatever the host resolves to now (TLS still checks the
    certificate against the host's name)."""

    def connect_to(host, **kwargs):
        connection = connection_class(host, **kwargs)
        create, connect = connection._create_connection, connection.connect

        def create_connection(target, *args, **kw):  # the TCP socket: cut during the TLS handshake too
            if not addresses:
                return deadline.connected(create(target, *args, **kw))
            failed: OSError | None = None
            for address in addresses:
                try:
                    return deadline.connected(create((address, target[1]), *args, **kw))
                except OSError as exc:  # (refused, unreachable): the next one, while there is time
                    failed = exc
                    if deadline.expired:
                        break
            raise failed

        def connect_and_watch():  # the socket the exchange goes on: HTTPS wraps the TCP one (which it detaches)
            connect()
            deadline.connected(connection.sock)

        connection._create_connection = create_connection
        connection.connect = connect_and_watch
        return connection

    return connect_to


class _DeadlineHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline, addresses: list[str] | None):
        super().__init__()
        self.deadline, self.addresses = deadline, addresses

    def http_open(self, req):
        return self.do_open(_connection(http.client.HTTPConnection, self.deadline, self.addresses), req)


class _DeadlineHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline, addresses: list[str] | None):
        super().__init__()
        self.deadline, self.addresses = deadline, addresses

    def https_open(self, req):
        connection = _connection(http.client.HTTPSConnection, self.deadline, self.addresses)
        return self.do_open(connection, req, context=self._context)


def _opener(
    url: str, deadline: _Deadline, *, public_only: bool, listed: bool = True
) -> tuple[urllib.request.OpenerDirector | None, str]:
    parts = urllib.parse.urlsplit(url)
    # the proxy is used exactly when urllib's own proxy handler will use it: it asks proxy_bypass of the request's
    # host WITH its port (a no_proxy entry "host:port" bypasses the proxy there, not for the bare host name: asked
    # of the name alone, the address went unchecked and the handler connected directly)
    host = urllib.request.Request(url).host or ""  # noqa: S310 - nothing is opened (http/https only: _post)
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        addresses = None  # the proxy connects, and decides — for the administrators' webhooks
        if public_only:  # a user's: the name is checked all the same (a proxy fetches internal addresses gladly)
            checked, why = _checked_addresses(url, public_only=True, listed=listed)
            if not checked:
                return None, why
    else:
        addresses, why = _checked_addresses(url, public_only=public_only, listed=listed)
        if not addresses:
            return None, why
    handlers = (_DeadlineHTTP(deadline, addresses), _DeadlineHTTPS(deadline, addresses))
    return outgoing.opener(handlers=handlers), ""


def _post(
    url: str, body: bytes, headers: dict[str, str], *, public_only: bool = False, listed: bool = True
) -> tuple[int | None, str]:
    """(the HTTP status or None, what went wrong); never raises for anything the endpoint or its URL does."""
    if not url.startswith(("http://", "https://")):
        return None, "only http and https URLs are delivered to"
    timeout = settings.WEBHOOK_TIMEOUT
    cut = f"no complete answer within {timeout:g} s (WEBHOOK_TIMEOUT)"
    with _Deadline(timeout) as deadline:
        try:
            opener, why = _opener(url, deadline, public_only=public_only, listed=listed)
            if opener is None:
                return None, why
            request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
            # a redirect is not followed (it turned the POST into a bodiless GET whose 200 lost the batch)
            with opener.open(request, timeout=timeout) as response:
                status = response.status
            if not deadline.in_time():  # what the cut left may parse as a whole answer: it is not one
                return None, cut
            return status, ""
        except urllib.error.HTTPError as exc:
            if not deadline.in_time():
                return None, cut
            if outgoing.redirected(exc.code):
                return (
                    exc.code,
                    f"HTTP {exc.code} {exc.reason}: a redirect (to {exc.headers.get('Location')}) is not followed",
                )
            return exc.code, f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            if deadline.expired:
                return None, cut
            reason = getattr(exc, "reason", None) or exc
            return None, (str(reason) or type(exc).__name__)[:500]


_SCOPE_LOST = "not sent: the token it was registered with no longer has the scope for this feed"


def deliver(webhook_id: int) -> Delivery:
    """Send the webhook's next batch if it is due. The attempt is claimed first, in a short transaction of its
    own (the row locked meanwhile: another worker skips it), and counted as a failure with its backoff until
    the endpoint answers 2xx — so batches never overlap, and an endpoint that hangs (or a worker cut by its
    time limit) still backs off; the POST itself holds no lock and no transaction open."""
    with transaction.atomic():
        hook = (
            Webhook.deliverable()
            .select_related("token")
            .select_for_update(skip_locked=True, of=("self",))
            .filter(pk=webhook_id)
            .first()
        )
        if hook is None or hook.next_attempt_at > timezone.now():
            return Delivery(webhook=hook.name if hook else "", sent=0)
        if not hook.token_allows():  # said where its owner and the admin look, once
            if hook.last_error != _SCOPE_LOST:
                Webhook.objects.filter(pk=hook.pk).update(last_error=_SCOPE_LOST)
            return Delivery(webhook=hook.name, sent=0)
        if hook.last_error == _SCOPE_LOST:  # the scope is back: so is the feed
            Webhook.objects.filter(pk=hook.pk).update(last_error="")
        size = max(1, BATCH >> min(hook.failures, 7))  # halved after each failure in a row
        events = ClusterEvent.objects.filter(id__gt=hook.last_event_id)
        newest = hook.last_event_id
        if not hook.all_clusters or hook.states or hook.kinds:
            # only the events it gets, in the query: a user's only the clusters its owner sees now (own, groups'),
            # one with a states or kinds filter only those — a batch of others would hold it back for nothing
            # (after failures a batch is one event: one skipped per round). The newest event is read first and
            # bounds the query: one it gets committed between the two reads (each sees the commits before it) is
            # above the bound, never skipped by moving past it.
            last = events.order_by("-id").values_list("id", flat=True).first()
            newest = last if last is not None else newest
            events = events.filter(id__lte=newest)
            if not hook.all_clusters:
                shared = shared_with(hook.owner, "cluster__") if hook.owner_id else Q(pk__in=[])
                events = events.filter(Q(cluster__owner_id=hook.owner_id or 0) | shared)
            if hook.states:
                events = events.filter(state__in=hook.states)
            if hook.kinds:
                events = events.filter(kind__in=hook.kinds)
        batch = list(events.select_related("cluster").order_by("id")[:size])
        # the horizon after the batch: a prune that committed meanwhile deleted some the batch skips, and records
        # its horizon in the same transaction
        through = EventHorizon.through()
        missed = {"after": hook.last_event_id, "through": through} if hook.last_event_id < through else None
        if not batch and not missed:
            if newest > hook.last_event_id:  # nothing for it up to the newest: past them, without a request —
                # and nothing is being tried any more: no run of failures goes on (nor is its owner mailed about one)
                Webhook.objects.filter(pk=hook.pk).update(last_event_id=newest, **Webhook.KEEPING_UP)
            return Delivery(webhook=hook.name, sent=0)
        cursor = max(batch[-1].id if batch else 0, missed["through"] if missed else 0)  # once delivered
        failures = hook.failures + 1
        backoff = min(settings.WEBHOOK_MAX_BACKOFF, 2**failures)
        claimed_at = timezone.now()
        Webhook.objects.filter(pk=hook.pk).update(  # the claim: due again only after the backoff
            failures=failures,
            next_attempt_at=claimed_at + timedelta(seconds=max(backoff, _claim_seconds())),
            failing_since=Coalesce(F("failing_since"), Value(claimed_at)),
        )
    payload = {"webhook": hook.name, "events": EventSerializer(batch, many=True).data}
    if missed:
        payload["missed"] = missed  # a gap first, then what is left (even nothing): the endpoint reads again
    body = json.dumps(payload).encode()
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "VirtCloud-portal-webhook",
        "X-VirtCloud-Webhook": hook.name,
        "X-VirtCloud-Signature": signature(str(hook.secret), body),
        "X-VirtCloud-Timestamp": stamp,
        "X-VirtCloud-Signature-Timestamped": signature(str(hook.secret), stamp.encode() + b"." + body),
    }
    status, error = _post(hook.url, body, headers, **reach(hook))
    now = timezone.now()
    # the result is this URL's: one the owner changed meanwhile starts afresh (webhook_update), and the old
    # endpoint's answer neither moves its cursor past a batch it never got nor gives it the old one's backoff
    sent_to = Webhook.objects.filter(pk=hook.pk, last_event_id=hook.last_event_id, url=hook.url)
    if status is not None and 200 <= status < 300:
        sent_to.update(
            last_event_id=cursor,
            last_delivered_at=now,
            last_status=status,
            last_error="",
            next_attempt_at=now,
            **Webhook.KEEPING_UP,
        )
    else:
        sent_to.update(
            last_status=status,
            last_error=error or f"HTTP {status}",
            next_attempt_at=now + timedelta(seconds=backoff),
        )
    return Delivery(webhook=hook.name, sent=len(batch), status=status, error=error)


def _claim_seconds() -> float:
    """How long a claimed attempt keeps others off at least: as long as the task sending it may run (a POST
    trickled by a slow endpoint outlasts any per-read timeout, never the task's time limit)."""
    return settings.CELERY_TASK_TIME_LIMIT + 5


DELIVERY_THREADS = 8  # webhooks sent to at once (PostgreSQL): a slow endpoint holds up only its own thread


_ROUND_LOCK = 0x5643_0057  # PostgreSQL advisory lock: one delivery round at a time


def deliver_due() -> list[Delivery]:
    """One round: every enabled webhook whose next attempt is due gets its next batch (one that fails in a way
    ``deliver`` did not foresee is logged, and the others still get theirs). On PostgreSQL ``DELIVERY_THREADS`` at
    once — users register webhooks too, and one whose endpoint answers at the last moment of ``WEBHOOK_TIMEOUT``
    must not make everyone else's events wait — each thread with one database connection for the round, and one
    round at a time (a round that finds another running does nothing: that one sends what is due); SQLite (one
    writer) sends them one after the other. A time limit that cuts the round stops the threads taking more."""
    from django.db import connection

    due = list(Webhook.deliverable().filter(next_attempt_at__lte=timezone.now()).values_list("pk", "name"))
    if connection.vendor != "postgresql" or len(due) < 2:
        return [_deliver_logged(pk, name) for pk, name in due]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [_ROUND_LOCK])
        if not cursor.fetchone()[0]:
            return []
    try:
        return _deliver_at_once(due)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [_ROUND_LOCK])


def _deliver_logged(pk: int, name: str) -> Delivery:
    try:
        return deliver(pk)
    except Exception as exc:  # noqa: BLE001 - logged; the next webhooks still get theirs
        logger.exception("webhook %s: delivery failed", name)
        return Delivery(webhook=name, sent=0, error=f"{type(exc).__name__}: {exc}"[:500])


def _deliver_at_once(due: list[tuple[int, str]]) -> list[Delivery]:
    """``_deliver_logged`` of each of ``due`` by up to ``DELIVERY_THREADS`` threads, each with one connection."""

    todo: queue.SimpleQueue = queue.SimpleQueue()
    for row in due:
        todo.put(row)
    results: list[Delivery] = []
    stop = threading.Event()

    def work() -> None:
        try:
            while not stop.is_set():
                try:
                    pk, name = todo.get_nowait()
                except queue.Empty:
                    return
                results.append(_deliver_logged(pk, name))
        finally:
            connections.close_all()  # (this thread's own connection, once for the round)

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name="webhook", daemon=True)
        for _ in range(min(DELIVERY_THREADS, len(due)))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # the task's soft time limit: take no more; those under way finish by WEBHOOK_TIMEOUT
        stop.set()
        raise
    return results

"""The provider's router for public clusters: the reference hook, run as root on a Linux router.

A public cluster's VLAN reaches the switch port facing the provider's router (role ``router_trunk``); the
cluster's nodes use the first address of its public subnet as their gateway. This makes the router hold that
address on that VLAN, and nothing more, from what the portal says (``GET /api/public-networks/``, a token with
scope ``router:pull``)::

    python3 -I /opt/virtcloud/access/gateway/router.py --portal https://portal.example.org \\
        --token-file /etc/virtcloud/router.token --trunk eth1 [--site prague] [--interval 10] [--once]

For each public cluster whose network is set up or being set up: a VLAN sub-interface ``<prefix><vid>`` of
``--trunk``, up, holding exactly the router's address in the cluster's subnet (its global-scope addresses). A
sub-interface with the prefix that the portal no longer names — the cluster ended, or the link was made by hand
with another VLAN or parent — is deleted. Nothing else is touched: routing between the subnets and the
provider's network, forwarding and filtering are the router's own configuration. ``--site``: only clusters
whose core joins that site (the router trunk there carries only their VLANs; the same ids may be other cores'
clusters elsewhere).

It polls every ``--interval`` seconds with ``If-None-Match`` (the portal answers 304 while nothing changed) and
makes the links match again every ``--resync`` seconds even so (a link deleted by hand comes back). When the
portal cannot be reached the links stay as they are: a router keeps routing the clusters it knows. ``--once``:
one sync, exit 1 when the portal or the system refused something (for a systemd timer). Prints each change.
Standalone: the standard library and ``legs.py`` beside it (no Django).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from access.gateway import outgoing  # noqa: E402
from access.gateway.legs import (  # noqa: E402
    IFNAME_RE,
    PREFIX_RE,
    LegsError,
    Link,
    Runner,
    address_and_up,
    current,
    overlaps,
    run_command,
    vlan_link,
)
from access.gateway.state import bastion_address_problem as address_problem  # noqa: E402

USER_AGENT = "virtcloud-router/1"


class RouterError(Exception):
    """What the portal or the system refused (the message says which); ``done``: the changes made all the same."""

    def __init__(self, message: str, done: list[str] | None = None):
        super().__init__(message)
        self.done = done or []


def wanted(doc: dict) -> tuple[dict[int, str], list[str]]:
    """({VLAN id: the router's address there}, problems) from the portal's answer. A network that is not what a
    router can hold (a VLAN id out of range, an address that is not one, two clusters on one VLAN) is left out
    and named in ``problems``; the others are kept."""
    legs: dict[int, str] = {}
    problems = []
    networks = doc.get("networks") if isinstance(doc, dict) else None
    if not isinstance(networks, list):
        raise RouterError("the portal's answer has no list of networks")
    for item in networks:
        try:
            vid = int(item["vlan_id"])
            address = ipaddress.ip_interface(str(item["router_address"]))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"skipped a network the portal sent ({exc!r}): {item!r}"[:300])
            continue
        if not 1 <= vid <= 4094 or address_problem(str(address)):
            # (a unicast host address of a subnet of sane length: never a loopback, multicast or /1 one, which
            # would route half the router's traffic into a cluster's VLAN)
            problems.append(f"skipped VLAN {vid} ({address}): not a VLAN id and a subnet a router can hold")
            continue
        if vid in legs and legs[vid] != str(address):
            problems.append(f"skipped VLAN {vid}: the portal names two addresses for it ({legs[vid]}, {address})")
            legs[vid] = ""
            continue
        legs[vid] = str(address)
    kept = {vid: a for vid, a in legs.items() if a}
    for a_vid, b_vid in overlaps(kept):  # one subnet on two VLANs: the router could not tell them apart
        problems.append(f"skipped VLANs {a_vid} and {b_vid}: their subnets overlap ({kept[a_vid]}, {kept[b_vid]})")
    clash = {vid for pair in overlaps(kept) for vid in pair}
    return {vid: a for vid, a in kept.items() if vid not in clash}, problems


def plan(legs: dict[int, str], links: dict[str, Link], *, trunk: str, prefix: str) -> list[list[list[str]]]:
    """The ``ip`` commands that make ``links`` what ``legs`` asks for, one list per link (none when they already
    are): a link's later commands make no sense once one of them was refused."""
    per_link: list[list[list[str]]] = []
    keep = set()
    for vid, address in sorted(legs.items()):
        name = f"{prefix}{vid}"
        commands, link = vlan_link(name, vid, trunk, links.get(name))
        keep.add(name)
        commands += address_and_up(["ip"], name, link, address, [])
        if commands:
            per_link.append(commands)
    return per_link + [[["ip", "link", "del", name]] for name in sorted(set(links) - keep)]


def sync(doc: dict, *, trunk: str, prefix: str = "vcr", run: Runner = run_command) -> list[str]:
    """Make the router's links match the portal's answer ``doc``; the changes made, as lines for the log. Raises
    ``RouterError`` (with the changes made all the same) when a network or a command was refused."""
    if not PREFIX_RE.match(prefix) or not IFNAME_RE.match(trunk) or trunk.startswith(prefix):
        raise RouterError(f"bad --prefix {prefix!r} or --trunk {trunk!r}")
    legs, failed = wanted(doc)
    try:
        run(["ip", "link", "show", "dev", trunk])  # no such trunk: an error before anything changes
        links = current(run, prefix)
    except LegsError as exc:
        raise RouterError(str(exc)) from None
    done = []
    for commands in plan(legs, links, trunk=trunk, prefix=prefix):
        for argv in commands:
            try:
                run(argv)
            except LegsError as exc:  # one link the system refuses: the others are still made (stale ones removed)
                failed.append(str(exc))
                break
            done.append(" ".join(argv[1:]))
    if failed:
        raise RouterError("; ".join(failed), done)
    return done


class Portal:
    """``GET /api/public-networks/`` with the router's token, remembering the last answer's ETag. Sent the way the
    gateway agent sends its token (``outgoing.send_with_token``): https (plain http to this host only), no
    redirect followed, no proxy for this host — the token never goes anywhere else, and an answer from
    anywhere else is never taken for the portal's. (A private CA: ``SSL_CERT_FILE``.)"""

    def __init__(self, url: str, token: str, *, site: str | None = None, timeout: float = 20.0):
        query = f"?{urllib.parse.urlencode({'site': site})}" if site is not None else ""
        self.url = url.rstrip("/") + "/api/public-networks/" + query
        self.token = token
        self.timeout = timeout
        self.etag = ""

    def fetch(self) -> dict | None:
        """The networks, or None when unchanged since the last answer (304). ``RouterError`` when the portal
        cannot be reached, refuses, redirects or answers something else (the router then keeps its links)."""
        headers = {"User-Agent": USER_AGENT, **({"If-None-Match": self.etag} if self.etag else {})}
        try:
            answer = outgoing.send_with_token("GET", self.url, self.token, headers=headers, timeout=self.timeout)
        except outgoing.NotSent as exc:
            raise RouterError(str(exc)) from None
        except outgoing.Unreachable as exc:
            raise RouterError(f"cannot read {self.url}: {exc}") from None
        if answer.status == 304:
            return None
        if outgoing.redirected(answer.status):  # (not followed: the token stays with the portal)
            raise RouterError(f"the portal answered {answer.status}, a redirect to {answer.headers.get('Location')}")
        if answer.status != 200:
            raise RouterError(f"the portal answered {answer.status}: {answer.body[:300]!r}")
        try:
            doc = json.loads(answer.body)
        except ValueError as exc:
            raise RouterError(f"the portal's answer is not JSON: {exc}") from None
        self.etag = answer.headers.get("ETag", "")
        return doc


def follow(
    portal: Portal,
    apply: Callable[[dict], list[str]],
    *,
    interval: float,
    resync: float,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> None:
    """Poll ``portal`` every ``interval`` s, ``apply`` a changed answer, and the last answer again every ``resync``
    s (a link deleted by hand comes back) or after a refused change; an unreachable portal changes nothing.
    ``rounds``: stop after that many polls (tests)."""
    last: dict | None = None
    synced_at = 0.0
    retry = False
    n = 0
    while rounds is None or n < rounds:
        n += 1
        try:
            doc = portal.fetch()
        except RouterError as exc:
            log(f"error: {exc}")
            doc = None
        if doc is not None or (last is not None and (retry or time.monotonic() - synced_at >= resync)):
            last = doc if doc is not None else last
            try:
                for line in apply(last):
                    log(line)
                retry = False
            except RouterError as exc:
                for line in exc.done:
                    log(line)
                log(f"error: {exc}")
                retry = True
            synced_at = time.monotonic()
        sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="router.py", description=__doc__.splitlines()[0])
    parser.add_argument("--portal", required=True, help="the portal's base URL, e.g. https://portal.example.org")
    parser.add_argument("--token-file", required=True, help="a file holding an API token with scope router:pull")
    parser.add_argument("--trunk", required=True, help="the interface facing the site switch's router trunk")
    parser.add_argument("--site", help="only the clusters whose core joins this site (the portal's site name)")
    parser.add_argument("--prefix", default="vcr", help="name prefix of the links (vcr<vid>); nothing else is touched")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    parser.add_argument("--resync", type=float, default=300.0, help="make the links match again at least this often")
    parser.add_argument("--once", action="store_true", help="one sync, then exit (1 when something was refused)")
    args = parser.parse_args(argv)
    try:
        token = outgoing.read_token(None, args.token_file, what="--token-file")
    except ValueError as exc:
        parser.error(str(exc))
    portal = Portal(args.portal, token, site=args.site)

    def apply(doc: dict) -> list[str]:
        return sync(doc, trunk=args.trunk, prefix=args.prefix)

    def log(line: str) -> None:
        print(f"virtcloud-router: {line}", flush=True)

    if not args.once:
        follow(portal, apply, interval=args.interval, resync=args.resync, log=log)
        return 0
    try:
        for line in apply(portal.fetch() or {"networks": []}):
            log(line)
    except RouterError as exc:
        for line in exc.done:
            log(line)
        print(f"virtcloud-router: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

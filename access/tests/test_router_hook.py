"""The provider router's reference hook (access/gateway/router.py): what it asks of the portal, what it makes of the
answer, how it follows changes, and, in a kernel with 802.1Q (the QEMU guest of scripts/vm-lane.sh), the real
links a router pings a public cluster's node through. Standalone like the hook: no Django here (the portal side
is clusters/tests/test_public_networks.py)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from access.gateway import router
from access.gateway.legs import LegsError
from access.tests._procs import vmlane_fabric

ROUTER = Path(router.__file__).resolve()


def doc(*networks: tuple[int, str]) -> dict:
    return {"networks": [{"vlan_id": vid, "router_address": address} for vid, address in networks]}


def _vlan_info(vid: int) -> dict:
    return {"linkinfo": {"info_kind": "vlan", "info_data": {"id": vid}}}


class FakeKernel:
    """Enough of ``ip`` for the hook: links with a VLAN and parent, global addresses, up or down."""

    def __init__(self, *trunks: str):
        self.links: dict[str, dict] = {t: {"vid": None, "parent": "", "addrs": set(), "up": True} for t in trunks}
        self.refuse: set[str] = set()
        self.calls: list[list[str]] = []

    def __call__(self, argv) -> str:
        argv = list(argv)
        self.calls.append(argv)
        if " ".join(argv) in self.refuse:
            raise LegsError(f"{' '.join(argv)}: RTNETLINK answers: Operation not permitted")
        match argv[1:]:
            case ["-j", "-d", "link", "show"]:
                return json.dumps(
                    [
                        {
                            "ifname": name,
                            "link": link["parent"],
                            "flags": ["UP"] if link["up"] else [],
                            **(_vlan_info(link["vid"]) if link["vid"] else {}),
                        }
                        for name, link in self.links.items()
                    ]
                )
            case ["-j", "addr", "show"]:
                return json.dumps(
                    [
                        {
                            "ifname": name,
                            "addr_info": [
                                {
                                    "family": "inet6" if ":" in a else "inet",
                                    "local": a.split("/")[0],
                                    "prefixlen": int(a.split("/")[1]),
                                    "scope": "global",
                                }
                                for a in sorted(link["addrs"])
                            ],
                        }
                        for name, link in self.links.items()
                    ]
                )
            case ["link", "show", "dev", name]:
                if name not in self.links:
                    raise LegsError(f'ip link show dev {name}: Device "{name}" does not exist.')
                return ""
            case ["link", "add", "link", parent, "name", name, "type", "vlan", "id", vid]:
                self.links[name] = {"vid": int(vid), "parent": parent, "addrs": set(), "up": False}
            case ["link", "del", name]:
                del self.links[name]
            case ["link", "set", name, "up"]:
                self.links[name]["up"] = True
            case ["addr", "add", address, "dev", name]:
                self.links[name]["addrs"].add(address)
            case ["addr", "del", address, "dev", name]:
                self.links[name]["addrs"].discard(address)
            case _:
                raise AssertionError(f"unexpected command {argv}")
        return ""

    def vlan_links(self) -> dict[str, tuple[int, str, set[str], bool]]:
        return {n: (lk["vid"], lk["parent"], lk["addrs"], lk["up"]) for n, lk in self.links.items() if lk["vid"]}


def test_the_portals_answer_becomes_one_address_per_vlan_and_bad_entries_are_named():
    legs, problems = router.wanted(
        {
            "networks": [
                {"vlan_id": 100, "router_address": "198.18.20.1/24"},
                {"vlan_id": 200, "router_address": "fd00:20::1/64"},
                {"vlan_id": 5000, "router_address": "198.18.21.1/24"},  # no VLAN id
                {"vlan_id": 300, "router_address": "198.18.22.1/32"},  # no subnet to route
                {"vlan_id": 400, "router_address": "not an address"},
                {"vlan_id": 500, "router_address": "198.18.23.1/24"},
                {"vlan_id": 500, "router_address": "198.18.24.1/24"},  # two clusters on one VLAN: neither
                {"router_address": "198.18.25.1/24"},
                # what a broken portal might send: half the Internet, a loopback, a multicast address, the
                # network's own address — none routed into a cluster's VLAN
                {"vlan_id": 600, "router_address": "10.0.0.1/1"},
                {"vlan_id": 601, "router_address": "127.0.0.1/24"},
                {"vlan_id": 602, "router_address": "224.0.0.1/24"},
                {"vlan_id": 603, "router_address": "198.18.26.0/24"},
                # one subnet on two VLANs: the router could not tell them apart, so neither
                {"vlan_id": 700, "router_address": "198.18.27.1/24"},
                {"vlan_id": 701, "router_address": "198.18.27.129/25"},
            ]
        }
    )
    assert legs == {100: "198.18.20.1/24", 200: "fd00:20::1/64"}
    assert len(problems) == 10
    assert any("VLAN 5000" in p for p in problems) and any("two addresses" in p for p in problems)
    assert any("VLANs 700 and 701: their subnets overlap" in p for p in problems)
    assert all(any(f"VLAN {vid} " in p for p in problems) for vid in (600, 601, 602, 603))
    with pytest.raises(router.RouterError, match="no list of networks"):
        router.wanted({"detail": "Authentication credentials were not provided."})


def test_sync_makes_exactly_the_portals_links_and_touches_nothing_else():
    kernel = FakeKernel("eth1", "eth0")
    kernel.links["vcr300"] = {"vid": 301, "parent": "eth1", "addrs": {"198.18.30.1/24"}, "up": True}  # by hand, wrong
    kernel.links["vcr400"] = {"vid": 400, "parent": "eth1", "addrs": set(), "up": True}  # an ended cluster's
    kernel.links["other.7"] = {"vid": 7, "parent": "eth0", "addrs": {"192.0.2.1/24"}, "up": True}  # not ours
    done = router.sync(doc((100, "198.18.20.1/24"), (300, "198.18.30.1/24")), trunk="eth1", run=kernel)
    assert kernel.vlan_links() == {
        "vcr100": (100, "eth1", {"198.18.20.1/24"}, True),
        "vcr300": (300, "eth1", {"198.18.30.1/24"}, True),
        "other.7": (7, "eth0", {"192.0.2.1/24"}, True),
    }
    assert "link add link eth1 name vcr100 type vlan id 100" in done and "link del vcr400" in done
    kernel.calls.clear()
    assert router.sync(doc((100, "198.18.20.1/24"), (300, "198.18.30.1/24")), trunk="eth1", run=kernel) == []
    assert all(c[1:3] in (["-j", "-d"], ["-j", "addr"], ["link", "show"]) for c in kernel.calls)  # reads only

    # the portal moves nothing but the address of VLAN 100 (a new subnet after a re-create)
    done = router.sync(doc((100, "198.18.40.1/24")), trunk="eth1", run=kernel)
    assert done == [
        "addr del 198.18.20.1/24 dev vcr100",
        "addr add 198.18.40.1/24 dev vcr100",
        "link del vcr300",
    ]


def test_a_refused_link_does_not_stop_the_others_and_a_missing_trunk_changes_nothing():
    kernel = FakeKernel("eth1")
    kernel.refuse.add("ip link add link eth1 name vcr100 type vlan id 100")
    with pytest.raises(router.RouterError) as refused:
        router.sync(doc((100, "198.18.20.1/24"), (200, "198.18.21.1/24")), trunk="eth1", run=kernel)
    assert "Operation not permitted" in str(refused.value)
    assert "link add link eth1 name vcr200 type vlan id 200" in refused.value.done
    assert "vcr200" in kernel.links and "vcr100" not in kernel.links

    kernel = FakeKernel("eth1")
    with pytest.raises(router.RouterError, match='Device "eth9" does not exist'):
        router.sync(doc((100, "198.18.20.1/24")), trunk="eth9", run=kernel)
    assert kernel.vlan_links() == {}
    with pytest.raises(router.RouterError, match="bad --prefix"):
        router.sync(doc(), trunk="vcr1", run=kernel)  # the trunk would be one of its own links


class _Portal(http.server.BaseHTTPRequestHandler):
    answers: list[tuple[int, dict | None]] = []
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        code, body = type(self).answers.pop(0)
        self.send_response(code)
        self.send_header("ETag", '"v1"')
        if code == 302:  # (to this very server: a client that followed it would be seen asking there)
            self.send_header("Location", "/elsewhere")
        self.end_headers()
        if body is not None:
            self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def portal():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Portal)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Portal.answers, _Portal.seen = [], []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_portal_is_asked_with_the_token_the_site_and_the_last_etag(portal):
    _Portal.answers = [(200, doc((100, "198.18.20.1/24"))), (304, None), (403, {"detail": "no"})]
    client = router.Portal(portal, "s3cret", site="prague east")
    assert client.fetch() == doc((100, "198.18.20.1/24"))
    assert client.fetch() is None  # unchanged
    with pytest.raises(router.RouterError, match="the portal answered 403"):
        client.fetch()
    first, second, _ = _Portal.seen
    assert first["path"] == "/api/public-networks/?site=prague+east"
    assert first["authorization"] == "Bearer s3cret" and "if-none-match" not in first
    assert second["if-none-match"] == '"v1"'
    with pytest.raises(router.RouterError, match="cannot read"):
        router.Portal("http://127.0.0.1:9", "t", timeout=2).fetch()  # nobody listens: the links stay
    with pytest.raises(router.RouterError, match="must be https"):
        router.Portal("http://portal.example.org", "t").fetch()  # the token is never sent in the clear


def test_a_redirect_is_not_followed_and_the_token_stays_with_the_portal(portal):
    """A redirect is the portal's answer, refused: the token is not sent where it points, and an empty list from
    there is never taken for the portal's (it would delete every link)."""
    _Portal.answers = [(302, None), (200, {"networks": []})]
    with pytest.raises(router.RouterError, match="a redirect to"):
        router.Portal(portal, "s3cret").fetch()
    assert [seen["path"] for seen in _Portal.seen] == ["/api/public-networks/"]  # the target was never asked


def test_follow_applies_changes_repairs_after_a_refusal_and_keeps_the_links_when_the_portal_is_away():
    class Script:
        def __init__(self, *answers):
            self.answers = list(answers)

        def fetch(self):
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    applied, logged = [], []
    failures = [router.RouterError("RTNETLINK answers: File exists", ["link add …"])]

    def apply(d):
        applied.append(d)
        if failures:
            raise failures.pop()
        return [f"synced {len(d['networks'])}"]

    first, second = doc((100, "198.18.20.1/24")), doc()
    script = Script(first, None, router.RouterError("cannot read portal"), None, second, None)
    router.follow(script, apply, interval=0, resync=3600, log=logged.append, sleep=lambda s: None, rounds=6)
    # refused at first: applied again at the next poll though unchanged; then only when the answer changes
    assert applied == [first, first, second]
    assert "error: RTNETLINK answers: File exists" in logged and "error: cannot read portal" in logged
    assert logged[-1] == "synced 0"


# --- the real thing (a kernel with 802.1Q: the QEMU guest) -----------------------------------------------------


fabric = vmlane_fabric()
PREFIX = fabric.make_prefix("rt")
_missing = fabric.kernel_8021q_missing(PREFIX)


@pytest.fixture
def trunk():
    """The router's namespace with trunk t0, wired to a "switch" namespace where a node of each of two public
    clusters answers on VLANs 100 (198.18.20.10) and 200 (198.18.21.10), its gateway the router's address."""
    if _missing:
        if os.environ.get("VIRTCLOUD_VMLANE"):
            pytest.fail(f"the QEMU guest must have 802.1Q: {_missing}")
        pytest.skip(f"{_missing}; these tests run in the QEMU guest of scripts/vm-lane.sh (make test runs it)")
    fabric.remove_stale()
    with fabric.trunk_pair(f"{PREFIX}rt", f"{PREFIX}sw", {100: "198.18.20.10/24", 200: "198.18.21.10/24"}) as rt:
        yield rt


def _once(ns: str, portal: str, token: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-I", str(ROUTER), "--portal", portal, "--token-file", str(token), "--trunk", "t0"]
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv, "--once", *extra], capture_output=True, text=True, timeout=60, check=False
    )


def _reaches(ns: str, address: str) -> bool:
    done = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", address], capture_output=True)
    return done.returncode == 0


@pytest.mark.vmlane
def test_the_router_reaches_each_public_clusters_node_and_follows_the_portal(trunk, tmp_path):
    """The hook run as the script in the router's namespace; a tiny HTTP server on that namespace's loopback
    stands in for the portal (its answers are the files the test writes)."""
    rt = trunk
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    answer = tmp_path / "answer.json"
    serve = (
        "import http.server,sys,pathlib\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body=pathlib.Path(sys.argv[1]).read_bytes(); self.send_response(200); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "    def log_message(self,*a): pass\n"
        "http.server.HTTPServer(('127.0.0.1',8765),H).serve_forever()\n"
    )
    server = subprocess.Popen(["ip", "netns", "exec", rt, sys.executable, "-c", serve, str(answer)])
    try:
        answer.write_text(json.dumps(doc((100, "198.18.20.1/24"), (200, "198.18.21.1/24"))))
        probe = (
            "import socket,time\nfor _ in range(100):\n"
            "    try: socket.create_connection(('127.0.0.1',8765),1); break\n"
            "    except OSError: time.sleep(0.1)\n"
        )
        subprocess.run(["ip", "netns", "exec", rt, sys.executable, "-c", probe], check=True, timeout=30)
        done = _once(rt, "http://127.0.0.1:8765", token)
        assert done.returncode == 0, done.stderr
        assert "link add link t0 name vcr100 type vlan id 100" in done.stdout
        assert _reaches(rt, "198.18.20.10") and _reaches(rt, "198.18.21.10")  # each cluster's node, on its VLAN

        again = _once(rt, "http://127.0.0.1:8765", token)
        assert (again.returncode, again.stdout) == (0, "")  # nothing to change

        answer.write_text(json.dumps(doc((100, "198.18.20.1/24"))))  # the second cluster ended
        done = _once(rt, "http://127.0.0.1:8765", token)
        assert done.returncode == 0 and "link del vcr200" in done.stdout, done
        assert _reaches(rt, "198.18.20.10") and not _reaches(rt, "198.18.21.10")
    finally:
        server.kill()
        server.wait()

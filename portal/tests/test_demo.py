"""`manage.py demo` end to end, as `make demo` runs it: embedded SQLite and broker, a real slapd, web
server, worker and beat. An LDAP demo user logs in, an administrator sees the imported topology in admin,
and Ctrl-C stops every process the demo started."""

import http.cookiejar
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from portal.ldapserver import free_port

ROOT = Path(__file__).resolve().parents[2]

needs_slapd = pytest.mark.skipif(
    not shutil.which("slapd") and not os.path.exists("/usr/sbin/slapd"), reason="needs slapd"
)


class Browser:
    """Just enough of a browser: cookies, CSRF token, form posts."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[str, str]:
        with self.opener.open(self.base + path, timeout=20) as response:
            return response.geturl(), response.read().decode()

    def log_in(self, path: str, username: str, password: str) -> str:
        self.get(path)
        token = next(c.value for c in self.jar if c.name == "csrftoken")
        body = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token})
        request = urllib.request.Request(self.base + path, data=body.encode(), headers={"Referer": self.base + path})
        with self.opener.open(request, timeout=20) as response:
            return response.geturl()


def read_until(proc, pattern: str, timeout: float) -> str:
    """Read the demo's output until a line matches. Reads the pipe's file descriptor directly: select() on
    a buffered text stream misses lines that already sit in Python's buffer (a burst of output)."""
    out = ""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, out):
            return out
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk.decode(errors="replace")
        elif proc.poll() is not None:
            break
    if re.search(pattern, out):
        return out
    raise AssertionError(f"demo did not print {pattern!r}; output so far:\n{out}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie not yet reaped by its parent counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@needs_slapd
def test_demo_comes_up_and_stops_everything(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(DEBUG="true", DATA_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--addr", f"127.0.0.1:{port}", "--no-lab"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        try:
            out = read_until(proc, r"demo: ready", timeout=240)
        except AssertionError:
            for log in sorted((tmp_path / "logs").glob("*.log")):
                print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
            raise
        assert "24 created" in out
        assert "alice logs in through LDAP: ok" in out
        # A cluster provisioned through the embedded broker, SQLite and a real worker (simulated fabric).
        assert "alice's closed cluster demo-alpha is ready" in out
        assert "demo: --no-lab: a SIMULATED fabric is used" in out
        pids = [int(p) for p in re.findall(r"started \w+ \(pid (\d+)\)", out)]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        passwords = dict(re.findall(r"^\s{4}(\w+)\s+(\S+)\s+groups:", out, re.M))
        ldap_port = int(re.search(r"LDAP directory ldap://127.0.0.1:(\d+)", out).group(1))
        admin_password = re.search(r"break-glass superuser: admin\s+(\S+)", out).group(1)

        base = f"http://127.0.0.1:{port}"
        alice = Browser(base)
        assert alice.log_in("/login/", "alice", passwords["alice"]) == base + "/"
        assert "physics" in alice.get("/")[1]
        dave = Browser(base)  # staff and superuser through his LDAP groups
        dave.log_in("/admin/login/?next=/admin/", "dave", passwords["dave"])
        url, page = dave.get("/admin/network/switch/")
        assert url.endswith("/admin/network/switch/")
        assert all(name in page for name in ("brno-sw", "pilsen-sw", "prague-sw"))
        assert "3 switches" in page
        admin = Browser(base)
        admin.log_in("/admin/login/?next=/admin/", "admin", admin_password)
        assert "brno-h1" in admin.get("/admin/network/host/")[1]
        # What an administrator reads of the demo cluster's device work: every diff says it was simulated.
        changes = json.loads(admin.get("/api/network/changes/?status=ok")[1])["results"]
        diffs = [change["diff"] for change in changes]
        assert diffs and all(diff.startswith("(simulated) ") for diff in diffs), diffs
    finally:
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        rest, _ = proc.communicate(timeout=90)
    took = time.monotonic() - started
    assert proc.returncode == 0, rest
    assert "stopped the LDAP directory" in rest
    assert not [p for p in pids if alive(p)], rest
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ldap_port), timeout=1).close()
    assert took < 60


@pytest.mark.django_db
def test_the_simulated_fabric_goes_through_the_audit_log(tmp_path, settings):
    """The demo's switch to the simulated fabric changes what every device is driven with: each change is in
    the audit log under the demo's name, as any other change of a device is."""
    from network.tests.factories import HostFactory, SwitchFactory
    from portal.audit import audit_actor
    from portal.management.commands.demo import Command
    from portal.models import AuditEntry

    settings.DATA_DIR = tmp_path
    devices = [SwitchFactory(name="brno-sw"), HostFactory(name="brno-h1")]
    command = Command(stdout=io.StringIO())
    with audit_actor("manage.py demo"):  # as its handle() runs every step
        command._lab(True, {})  # --no-lab
    expected = {"simulated": True, "state_dir": str(tmp_path / "simulated")}
    for device in devices:
        device.refresh_from_db()
        assert device.driver_args == expected
        entry = AuditEntry.objects.filter(content_type__model=device._meta.model_name, object_id=str(device.pk)).latest(
            "id"
        )
        assert (entry.actor, entry.action, entry.changes) == (
            "manage.py demo",
            "update",
            {"driver_args": [{}, expected]},
        )
    assert "SIMULATED fabric" in command.stdout.getvalue()


def test_the_demo_opened_to_other_machines_asks_itself_over_loopback_by_the_name_it_serves():
    """``demo --addr 0.0.0.0:8000`` with ALLOWED_HOSTS naming the machine (README): its own readiness and login
    checks asked http://0.0.0.0:8000/ with that Host — Django answered 400, and the demo gave up after a minute."""
    from portal.management.commands.demo import probe_address

    assert probe_address("0.0.0.0:8000", ["portal.example.org"]) == (
        "http://127.0.0.1:8000/",
        "portal.example.org:8000",
    )
    assert probe_address("[::]:8080", ["*", ".example.org", "demo.example.org"]) == (
        "http://[::1]:8080/",
        "demo.example.org:8080",
    )
    assert probe_address("127.0.0.1:8000", []) == ("http://127.0.0.1:8000/", None)


@pytest.mark.django_db
def test_the_demo_refuses_a_database_whose_inventory_it_did_not_make(settings):
    """An exported DATABASE_URL (the operator ran topology commands) and `manage.py demo`: it put every real
    switch and host on the simulated fabric (their undo templates and secrets rewritten) and added a superuser.
    It refuses unless the database is new or its own, with DEBUG; --force says the operator means it."""
    from django.core.management import CommandError, call_command

    from network.models import Switch
    from network.tests.factories import SwitchFactory
    from portal.management.commands.demo import DEMO_TOPOLOGY, refuse_a_real_inventory

    settings.DEBUG = True
    refuse_a_real_inventory(str(DEMO_TOPOLOGY))  # an empty database: a demo's
    call_command("topology", "import", str(DEMO_TOPOLOGY), stdout=io.StringIO())
    refuse_a_real_inventory(str(DEMO_TOPOLOGY))  # its own from before
    real = SwitchFactory(name="prod-core-1")
    with pytest.raises(CommandError, match=r"holds devices the demo did not make \(prod-core-1\).*--force"):
        refuse_a_real_inventory(str(DEMO_TOPOLOGY))
    # the command itself asks before it starts anything: the switch is as it was
    args = dict(Switch.objects.filter(pk=real.pk).values("driver_args", "platform").get())
    with pytest.raises(CommandError, match="prod-core-1"):
        call_command("demo", "--no-lab", stdout=io.StringIO())
    assert Switch.objects.filter(pk=real.pk).values("driver_args", "platform").get() == args
    Switch.objects.filter(name="prod-core-1").delete()
    settings.DEBUG = False
    with pytest.raises(CommandError, match="runs with DEBUG=true"):
        refuse_a_real_inventory(str(DEMO_TOPOLOGY))

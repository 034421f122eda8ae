"""`manage.py demo`: the whole portal on one machine, for trying it out (`make demo`).

Migrates the database, imports the demo topology (idempotent), starts a throwaway slapd with demo users,
makes sure a local break-glass superuser ``admin`` exists, and starts the web server, a Celery worker (also
consuming the hosts' agent queues) and Celery beat, all with the directory's LDAP settings in their
environment. As root, and when the netns lab is available, it builds the lab for the demo topology
(``manage.py lab up --name demo``). Ctrl-C (or SIGTERM) stops everything it started, by PID, and takes the lab down.
"""

from __future__ import annotations

import http.cookiejar
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command, get_commands
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from network.models import Host, Site
from network.selectors import device_queues
from network.topology import TopologyError, load_topology, topology_import
from portal.audit import audit_actor
from portal.ldapserver import LdapServer, LdapServerError

DEMO_TOPOLOGY = Path(settings.BASE_DIR) / "network" / "topologies" / "demo.yaml"
LAB_NAME = "demo"  # its own lab: never the one a test or an engineer runs as "default"


class _Stop(Exception):
    pass


def probe_address(addr: str, allowed_hosts) -> tuple[str, str | None]:
    """Where the demo asks its own web server (``http://…/``), and the Host it names (None: the address's own).
    Serving every address (``0.0.0.0``, ``::``), it asks over loopback; and with ALLOWED_HOSTS naming the
    machine (the demo opened to others), it names that — Django refuses any other Host with a 400."""
    host, _, port = addr.rpartition(":")
    local = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)  # noqa: S104
    names = [h for h in allowed_hosts if h not in ("*", "") and not h.startswith(".")]
    return f"http://{local}:{port}/", (f"{names[0]}:{port}" if names else None)


def refuse_a_real_inventory(topology: str) -> None:
    """``CommandError`` unless this is a demo's database: DEBUG on, and no switch or host but the demo topology's
    (a database that is new, or the demo's from before). The demo puts every switch and host on a simulated
    fabric (their driver arguments — undo templates, an enable secret — rewritten), imports its topology and
    makes a superuser: pointed at a production database by an exported ``DATABASE_URL``, it would wreck it."""
    from django.db import DatabaseError

    from network.models import Switch

    why = "run it on a database of its own (DATA_DIR, DATABASE_URL), or pass --force"
    if not settings.DEBUG:
        raise CommandError(f"manage.py demo runs with DEBUG=true (make demo does): it rewrites the inventory; {why}")
    try:
        stored = set(Switch.objects.values_list("name", flat=True)) | set(Host.objects.values_list("name", flat=True))
    except DatabaseError:  # not migrated yet: a new database
        return
    try:
        data, _lines = load_topology(Path(topology).read_text(), source=topology)
    except (OSError, TopologyError) as exc:
        raise CommandError(f"cannot read the topology {topology}: {exc}") from None
    entries = [e for section in ("switches", "hosts") for e in (data.get(section) or [])]
    demo = {entry.get("name") for entry in entries if isinstance(entry, dict)}
    foreign = sorted(stored - demo)
    if foreign:
        listed = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise CommandError(
            f"the database {settings.DATABASES['default']['NAME']} holds devices the demo did not make ({listed}): "
            f"the demo would put every device on a simulated fabric; {why}"
        )


class Command(BaseCommand):
    help = "Run the portal with a demo topology, a throwaway LDAP directory, a Celery worker and beat."

    def add_arguments(self, parser):
        parser.add_argument("--addr", default="127.0.0.1:8000", help="address:port of the web server")
        parser.add_argument("--topology", default=str(DEMO_TOPOLOGY), help="topology file to import")
        parser.add_argument("--no-lab", action="store_true", help="do not build the netns lab even as root")
        parser.add_argument("--ready-timeout", type=float, default=60.0)
        parser.add_argument(
            "--force",
            action="store_true",
            help="run on a database whose inventory the demo did not make, or without DEBUG (it rewrites every "
            "device's driver arguments and adds a superuser)",
        )

    def handle(self, *args, addr: str, topology: str, no_lab: bool, ready_timeout: float, force: bool, **options):
        if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", addr):
            raise CommandError(f"--addr {addr!r}: use host:port, e.g. 127.0.0.1:8000")
        if not force:
            refuse_a_real_inventory(topology)
        self.children: list[tuple[str, subprocess.Popen, Path]] = []
        self.directory: LdapServer | None = None
        self.lab_up = False
        self.simulated = False
        self.log_dir = Path(settings.DATA_DIR) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with audit_actor("manage.py demo"):  # its changes (seed data, the simulated fabric) say whose they are
                self._run(addr, topology, no_lab, ready_timeout)
        except _Stop:
            self.stdout.write("\ndemo: stopping ...")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._shutdown()

    def _on_signal(self, signum, frame):
        raise _Stop

    # --- the steps ------------------------------------------------------------------------------------------

    def _run(self, addr: str, topology: str, no_lab: bool, ready_timeout: float) -> None:
        self.stdout.write(f"demo: data in {settings.DATA_DIR}, database {settings.DATABASES['default']['NAME']}")
        call_command("migrate", interactive=False, verbosity=0)
        self._import(topology)
        self._seed()
        try:
            self.directory = LdapServer().start()
        except LdapServerError as exc:
            raise CommandError(f"cannot start the demo LDAP directory: {exc}") from None
        env = {**os.environ, **self.directory.env(), "PYTHONUNBUFFERED": "1"}
        # This process's own children (the lab, any command run from here) see the directory as well.
        os.environ.update(self.directory.env())
        admin_password = self._break_glass_admin()

        manage = str(Path(settings.BASE_DIR) / "manage.py")
        celery = shutil.which("celery", path=str(Path(sys.executable).parent)) or "celery"
        queues = sorted(
            {settings.CELERY_TASK_DEFAULT_QUEUE, *device_queues(), *filter(None, [settings.PERIODIC_QUEUE])}
        )
        self._start("web", [sys.executable, manage, "runserver", addr, "--noreload"], env)
        self._start(
            "worker",
            [celery, "-A", "portal", "worker", "-l", "INFO", "-Q", ",".join(queues), "-c", "2", "-n", "demo@%h"],
            env,
        )
        self._start(
            "beat", [celery, "-A", "portal", "beat", "-l", "INFO", "-s", settings.CELERY_BEAT_SCHEDULE_FILENAME], env
        )
        url = f"http://{addr}/"
        probe, host = probe_address(addr, settings.ALLOWED_HOSTS)
        self._wait_ready(probe, ready_timeout, host)
        self._lab(no_lab, env)
        login_ok = self._check_login(probe, host, "alice", self.directory.passwords["alice"])
        demo_cluster = self._demo_cluster() if (self.lab_up or self.simulated) and login_ok else None

        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS(f"demo: the portal is up at {url}  (admin: {url}admin/)"))
        self.stdout.write(f"demo: LDAP directory {self.directory.uri} ({self.directory.base}); demo users:")
        groups = {u.uid: [] for u in self.directory.users}
        for group in self.directory.groups:
            for uid in group.members:
                groups.setdefault(uid, []).append(group.cn)
        for uid, password in self.directory.passwords.items():
            self.stdout.write(f"    {uid:8} {password:24} groups: {', '.join(groups.get(uid, [])) or '-'}")
        self.stdout.write(
            f"demo: local break-glass superuser: admin  {admin_password}"
            if admin_password
            else "demo: local break-glass superuser 'admin' exists (password unchanged)"
        )
        self.stdout.write(f"demo: alice logs in through LDAP: {'ok' if login_ok else 'FAILED (see logs)'}")
        if demo_cluster is not None:
            self.stdout.write(
                f"demo: alice's closed cluster {demo_cluster.name} is {demo_cluster.get_state_display()} on VLAN "
                f"{demo_cluster.vlan_id} (nodes at brno, pilsen, prague{'; SIMULATED' if self.simulated else ''}); "
                "log in as alice and open VPN and SSH access"
            )
        self.stdout.write(f"demo: worker queues {', '.join(queues)}; logs in {self.log_dir}")
        self.stdout.write("demo: ready — press Ctrl-C to stop everything")
        self.stdout.flush()
        while True:
            for name, proc, log in self.children:
                if proc.poll() is not None:
                    raise CommandError(f"{name} exited with status {proc.returncode}:\n{_tail(log)}")
            time.sleep(0.5)

    def _seed(self) -> None:
        """What an operator adds besides the topology: the image catalogue, the provider's public prefix
        (lab addresses only) and an access gateway at brno, enrolled so that profiles can be downloaded."""
        from clusters.models import Image, PublicPrefix

        for name, approved, description in (
            ("debian-12", True, "Debian 12, maintained by the provider"),
            ("alma-9", True, "AlmaLinux 9, maintained by the provider"),
            ("user-upload", False, "an image the user brought"),
        ):
            Image.objects.get_or_create(name=name, defaults={"approved": approved, "description": description})
        PublicPrefix.objects.get_or_create(name="provider", defaults={"prefix": "198.19.0.0/16", "subnet_length": 26})
        from access.models import Gateway

        gateway, created = Gateway.objects.get_or_create(
            name="brno-gw",
            defaults={
                "site_id": Site.objects.filter(name="brno").values_list("pk", flat=True).first(),
                "address": "198.18.255.1",
                "server_name": "brno-gw",
            },
        )
        if created or not gateway.server_certificate:
            call_command(
                "gateway",
                "config",
                "brno-gw",
                "--dir",
                str(settings.DATA_DIR / "gateway"),
                # the demo runs no OpenVPN (it only enrols, for the downloads), and may run without root: no chown
                "--vpn-user",
                "",
                verbosity=0,
                stdout=io.StringIO(),
            )
        self.stdout.write(
            "demo: images debian-12, alma-9 (approved), user-upload; public prefix 198.19.0.0/16; "
            "gateway brno-gw enrolled"
        )

    def _demo_cluster(self):
        """A closed cluster for alice across the three sites, provisioned for real on the lab."""
        from django.contrib.auth.models import Group, User

        from clusters import services
        from clusters.models import ClusterState, Image, VirtualCluster

        alice = User.objects.get(username="alice")
        existing = VirtualCluster.objects.filter(owner=alice, name="demo-alpha", state=ClusterState.READY).first()
        if existing is not None:
            return existing
        hosts = {h.name: h for h in Host.objects.filter(name__in=["brno-h1", "pilsen-h1", "prague-h1"])}
        try:
            cluster, _ = services.cluster_create(
                owner=alice,
                name="demo-alpha",
                image=Image.objects.get(name="user-upload"),
                admin_rights=True,
                nodes=[
                    services.NodeRequest(f"node{i}", hosts[h], f"52:54:00:de:00:{i:02x}", f"198.18.100.{i}")
                    for i, h in enumerate(sorted(hosts), 1)
                ],
                expires_at=timezone.now() + timedelta(days=1),
                group=Group.objects.filter(name="physics").first(),
            )
        except Exception as exc:  # the demo goes on without it, and says why
            self.stdout.write(self.style.WARNING(f"demo: could not create the demo cluster: {exc}"))
            return None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cluster.refresh_from_db()
            if cluster.state in (ClusterState.READY, ClusterState.FAILED):
                break
            time.sleep(0.2)
        return cluster

    def _import(self, topology: str) -> None:
        path = Path(topology)
        try:
            data, lines = load_topology(path.read_text(), source=str(path))
            report = topology_import(data=data, source=path.name, lines=lines)
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        except TopologyError as exc:
            raise CommandError(f"{path}: {exc}") from None
        self.stdout.write(f"demo: {report.summary()}")

    def _break_glass_admin(self) -> str | None:
        users = get_user_model()
        if users.objects.filter(username="admin").exists():
            return None
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser("admin", "admin@localhost", password)
        return password

    def _start(self, name: str, argv: list[str], env: dict) -> None:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            # Its own session: Ctrl-C reaches only this command, which stops the children in order.
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.children.append((name, proc, log))
        self.stdout.write(f"demo: started {name} (pid {proc.pid})")

    def _wait_ready(self, url: str, timeout: float, host: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Host": host} if host else {}
        while time.monotonic() < deadline:
            for name, proc, log in self.children:
                if proc.poll() is not None:
                    raise CommandError(f"{name} exited with status {proc.returncode}:\n{_tail(log)}")
            try:
                request = urllib.request.Request(url + "healthz", headers=headers)  # noqa: S310 (our own URL)
                with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 (our own URL)
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise CommandError(f"the web server did not answer at {url} within {timeout:.0f}s")

    def _check_login(self, url: str, host: str | None, username: str, password: str) -> bool:
        """Log in through the real login page, as a browser would: proves the server sees the directory."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        named = {"Host": host} if host else {}
        try:
            opener.open(urllib.request.Request(url + "login/", headers=named), timeout=10).read()  # noqa: S310
            token = next(c.value for c in jar if c.name == "csrftoken")
            body = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token})
            request = urllib.request.Request(  # noqa: S310 (our own http URL)
                url + "login/", data=body.encode(), headers={"Referer": url + "login/", **named}
            )
            with opener.open(request, timeout=15) as response:
                return response.geturl().rstrip("/") == url.rstrip("/") and "sessionid" in {c.name for c in jar}
        except (urllib.error.URLError, OSError, StopIteration):
            return False

    def _lab(self, no_lab: bool, env: dict) -> None:
        if no_lab:
            self._simulate("--no-lab")
            return
        if os.geteuid() != 0:
            self._simulate("not root (run as root for the netns lab)")
            return
        if "lab" not in get_commands():
            self._simulate("the netns lab (network.lab) is not available here")
            return
        self.stdout.write("demo: building the netns lab for the demo topology (manage.py lab up) ...")
        result = self._manage(["lab", "up", "--name", LAB_NAME], env, timeout=300)
        if result.returncode != 0:
            self.stdout.write(self.style.WARNING(f"demo: lab up failed; going on without it:\n{result.stdout}"))
            self._manage(["lab", "down", "--name", LAB_NAME], env, timeout=120)
            self._simulate("the lab did not come up")
            return
        self.lab_up = True
        self.stdout.write("demo: " + (result.stdout.strip().splitlines() or ["lab up"])[-1])

    def _simulate(self, why: str) -> None:
        """Put every switch and host on the simulated fabric (JSON files; every diff says "(simulated)"). Each
        device is saved, not updated in bulk: its driver arguments are what it is driven with, and their change
        goes to the audit log like any other (a bulk update writes no entry)."""
        from network.models import Switch

        folder = settings.DATA_DIR / "simulated"
        args = {"simulated": True, "state_dir": str(folder)}
        for device in (*Switch.objects.all(), *Host.objects.all()):
            if device.driver_args != args:
                device.driver_args = args
                device.save(update_fields=["driver_args"])
        self.simulated = True
        self.stdout.write(
            self.style.WARNING(f"demo: {why}: a SIMULATED fabric is used — devices are JSON files in {folder}")
        )

    def _manage(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        # Its own session: a second Ctrl-C must not interrupt "lab down" half way.
        return subprocess.run(
            [sys.executable, manage, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    # --- shutdown -------------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        # Ignore a second Ctrl-C while cleaning up: a half-stopped demo leaves daemons behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for name, proc, _log in reversed(self.children):
                _stop_group(proc)
                self.stdout.write(f"demo: stopped {name} (pid {proc.pid})")
            if self.lab_up:
                result = self._manage(["lab", "down", "--name", LAB_NAME], dict(os.environ), timeout=300)
                self.stdout.write(f"demo: lab down ({'ok' if result.returncode == 0 else result.stderr.strip()})")
            if self.directory is not None:
                self.directory.stop()
                self.stdout.write("demo: stopped the LDAP directory")
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the child (a Celery worker then stops its own pool: warm shutdown), SIGKILL to its whole
    process group (its own session) if it does not stop in time, and to whatever it left behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

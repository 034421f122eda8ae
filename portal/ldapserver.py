"""A throwaway OpenLDAP server (slapd) for the tests and the demo (LAB.md §8).

A temporary directory holds a static ``slapd.conf`` (core, cosine, inetorgperson and nis schemas; back_mdb
with ``dbnosync``), the database is bulk-loaded with ``slapadd`` and ``slapd -d 0`` runs in the foreground
as a child process on ``ldap://127.0.0.1:<free port>``. ``stop()`` terminates that process by its PID and
removes the directory. Start-up takes well under a second.

This is a test and demo utility, not part of the portal's runtime: it imports python-ldap to poll the new
server (an anonymous bind), which is otherwise reserved to ``portal/auth.py``.

    with LdapServer() as server:
        os.environ.update(server.env())
        ...  # alice logs in with server.passwords["alice"]
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_DIR = Path("/etc/ldap/schema")
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap", "/usr/lib/aarch64-linux-gnu/ldap")
BASE_DN = "dc=virtcloud,dc=test"


class LdapServerError(RuntimeError):
    """slapd could not be prepared or did not come up; the message carries slapd's own output."""


@dataclass(frozen=True)
class DirectoryUser:
    """A person in the throwaway directory (posixAccount + inetOrgPerson)."""

    uid: str
    given_name: str
    surname: str
    uid_number: int


@dataclass(frozen=True)
class DirectoryGroup:
    """A posixGroup with its members' uids."""

    cn: str
    gid_number: int
    members: tuple[str, ...] = ()


DEMO_USERS = (
    DirectoryUser("alice", "Alice", "Physicist", 10001),
    DirectoryUser("bob", "Bob", "Physicist", 10002),
    DirectoryUser("charlie", "Charlie", "Chemist", 10003),
    DirectoryUser("dave", "Dave", "Operator", 10004),
)
DEMO_GROUPS = (
    DirectoryGroup("physics", 20001, ("alice", "bob")),
    DirectoryGroup("chemistry", 20002, ("charlie",)),
    DirectoryGroup("virtcloud-staff", 20003, ("dave",)),
    DirectoryGroup("virtcloud-admins", 20004, ("dave",)),
)
# Every user's primary group: one no directory group carries, so membership comes only from memberUid.
USERS_GID = 20000
STAFF_GROUP = "virtcloud-staff"
SUPERUSER_GROUP = "virtcloud-admins"


def ssha(password: str) -> str:
    """An OpenLDAP ``{SSHA}`` userPassword value (salted SHA-1, the format slapd checks natively)."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 (the format slapd expects)
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _module_dir() -> str:
    for candidate in MODULE_DIRS:
        if Path(candidate, "back_mdb.la").exists() or Path(candidate, "back_mdb.so").exists():
            return candidate
    return MODULE_DIRS[0]


@dataclass
class LdapServer:
    """One slapd with a small directory: ``ou=people`` and ``ou=groups`` under ``base``.

    ``passwords`` maps uid to the plaintext password (random unless given). ``env()`` returns the LDAP_*
    variables that point the portal at this server (see ``portal.auth.ldap_settings``).
    """

    base: str = BASE_DN
    users: tuple[DirectoryUser, ...] = DEMO_USERS
    groups: tuple[DirectoryGroup, ...] = DEMO_GROUPS
    passwords: dict[str, str] = field(default_factory=dict)
    root_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    start_timeout: float = 10.0
    port: int = 0
    directory: Path | None = None
    process: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for user in self.users:
            self.passwords.setdefault(user.uid, f"{user.uid}-{secrets.token_urlsafe(9)}")

    # --- addresses ------------------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def people_base(self) -> str:
        return f"ou=people,{self.base}"

    @property
    def group_base(self) -> str:
        return f"ou=groups,{self.base}"

    def group_dn(self, cn: str) -> str:
        return f"cn={cn},{self.group_base}"

    def env(self) -> dict[str, str]:
        """The portal's LDAP settings for this server. django-auth-ldap's USER_FLAGS_BY_GROUP takes group
        DNs and, for posixGroup, checks ``memberUid`` of that DN (``PosixGroupType.is_member``)."""
        return {
            "LDAP_SERVER_URI": self.uri,
            "LDAP_USER_BASE": self.people_base,
            "LDAP_GROUP_BASE": self.group_base,
            "LDAP_GROUP_TYPE": "posix",
            "LDAP_STAFF_GROUP": self.group_dn(STAFF_GROUP),
            "LDAP_SUPERUSER_GROUP": self.group_dn(SUPERUSER_GROUP),
            "LDAP_TIMEOUT": "3",
        }

    @property
    def root_dn(self) -> str:
        return f"cn=admin,{self.base}"

    def modify(self, ldif: str) -> None:
        """Change the running directory as its administrator (``ldapmodify`` LDIF: ``changetype: modify`` or
        ``delete`` records), as an operator would: a user leaves a group, an account is removed."""
        result = subprocess.run(
            ["ldapmodify", "-x", "-H", self.uri, "-D", self.root_dn, "-w", self.root_password],
            input=ldif,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise LdapServerError(f"ldapmodify failed: {result.stderr.strip() or result.stdout.strip()}")

    # --- life cycle -----------------------------------------------------------------------------------------

    def start(self) -> LdapServer:
        for binary in ("slapd", "slapadd"):
            if not shutil.which(binary) and not Path("/usr/sbin", binary).exists():
                raise LdapServerError(f"{binary} not found: apt-get install slapd ldap-utils")
        self.directory = Path(tempfile.mkdtemp(prefix="virtcloud-slapd-"))
        try:
            self._prepare()
            # A port picked free can be taken before slapd binds it; try a few.
            for attempt in range(3):
                self.port = free_port()
                if self._launch():
                    return self
                if attempt == 2:
                    raise LdapServerError(f"slapd did not start: {self._output()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate slapd (by PID) and remove its directory. Safe to call twice."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=5)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LdapServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------------------------

    def _sbin(self, name: str) -> str:
        return shutil.which(name) or f"/usr/sbin/{name}"

    def _prepare(self) -> None:
        assert self.directory is not None
        (self.directory / "db").mkdir()
        conf = self.directory / "slapd.conf"
        includes = "\n".join(f"include {SCHEMA_DIR / name}.schema" for name in SCHEMAS)
        conf.write_text(
            f"""{includes}
pidfile {self.directory / "slapd.pid"}
argsfile {self.directory / "slapd.args"}
modulepath {_module_dir()}
moduleload back_mdb
database mdb
maxsize 16777216
suffix "{self.base}"
rootdn "{self.root_dn}"
rootpw {ssha(self.root_password)}
directory {self.directory / "db"}
dbnosync
access to attrs=userPassword by anonymous auth by self read by * none
access to * by * read
"""
        )
        ldif = self.directory / "data.ldif"
        ldif.write_text(self._ldif())
        result = subprocess.run(
            [self._sbin("slapadd"), "-q", "-f", str(conf), "-l", str(ldif)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise LdapServerError(f"slapadd failed: {result.stderr.strip() or result.stdout.strip()}")

    def _ldif(self) -> str:
        dc = self.base.split(",")[0].split("=", 1)[1]
        entries = [
            f"dn: {self.base}\nobjectClass: dcObject\nobjectClass: organization\ndc: {dc}\no: VirtCloud test\n",
            f"dn: {self.people_base}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: {self.group_base}\nobjectClass: organizationalUnit\nou: groups\n",
        ]
        for user in self.users:
            entries.append(
                f"dn: uid={user.uid},{self.people_base}\n"
                "objectClass: inetOrgPerson\nobjectClass: posixAccount\n"
                f"uid: {user.uid}\ncn: {user.given_name} {user.surname}\n"
                f"givenName: {user.given_name}\nsn: {user.surname}\nmail: {user.uid}@virtcloud.test\n"
                f"uidNumber: {user.uid_number}\ngidNumber: {USERS_GID}\n"
                f"homeDirectory: /home/{user.uid}\nloginShell: /bin/bash\n"
                f"userPassword: {ssha(self.passwords[user.uid])}\n"
            )
        for group in self.groups:
            members = "".join(f"memberUid: {uid}\n" for uid in group.members)
            entries.append(
                f"dn: {self.group_dn(group.cn)}\nobjectClass: posixGroup\n"
                f"cn: {group.cn}\ngidNumber: {group.gid_number}\n{members}"
            )
        return "\n".join(entries)

    def _launch(self) -> bool:
        assert self.directory is not None
        if self._log is not None:
            self._log.close()
        self._log = open(self.directory / "slapd.log", "ab")  # noqa: SIM115 (closed by stop())
        self.process = subprocess.Popen(
            [self._sbin("slapd"), "-d", "0", "-f", str(self.directory / "slapd.conf"), "-h", self.uri],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if self._answers():
                return True
            time.sleep(0.02)
        self._kill()
        raise LdapServerError(f"slapd did not answer on {self.uri} within {self.start_timeout:.0f}s: {self._output()}")

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        import ldap  # a test/demo utility: see the module docstring

        conn = ldap.initialize(self.uri)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 1.0)
        try:
            conn.simple_bind_s("", "")
            conn.whoami_s()
            return True
        except ldap.LDAPError:
            return False
        finally:
            with contextlib.suppress(ldap.LDAPError):
                conn.unbind_s()

    def _output(self) -> str:
        if self.directory is None or not (self.directory / "slapd.log").exists():
            return ""
        return (self.directory / "slapd.log").read_text(errors="replace").strip()[-2000:]


def main() -> None:  # pragma: no cover - manual use: python -m portal.ldapserver
    with LdapServer() as server:
        print(f"slapd on {server.uri} (pid {server.process.pid})")
        for key, value in server.env().items():
            print(f"export {key}={value!r}")
        for uid, password in server.passwords.items():
            print(f"  {uid}: {password}")
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()


if __name__ == "__main__":  # pragma: no cover
    main()

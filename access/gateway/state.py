"""The gateway's state directory: what the portal publishes and the gateway pulls, and where it lives.

Layout (one directory, owned by root; ``ssh/`` 0755 because sshd reads it as the login user; ``vpn/`` see below)::

    <state>/
      vpn/ca.pem           client CA certificate (OpenVPN ``ca``)
      vpn/crl.pem          CRL of that CA (OpenVPN ``crl-verify``; reloaded by OpenVPN when it changes)
      vpn/aa.pem           the pinned Attribute Authority certificate (AC signature check)
      vpn/vlans.json       {"format": 1, "generated_at": "...", "clusters": {"c42": 142, ...}}
      vpn/revoked.json     serials the portal revoked lately (client-connect refuses them: the CRL is
                           checked at the handshake, which may have come just before the pull)
      vpn/server.pem       gateway TLS certificate   (written once at enrolment)
      vpn/server.key       gateway TLS key           (generated on the gateway or enrolled; 0600)
      vpn/tls-crypt.key    shared tls-crypt key      (0600)
      vpn/run/             runtime: ac-cache/ (tls-verify -> client-connect), peer-certs/
                           (tls-export-cert), sessions/<serial>.json (client-connect: the peers of
                           that certificate's sessions; dropped once they are cut), management.sock,
                           status.log
      ssh/user_ca.pub      TrustedUserCAKeys
      ssh/revoked.krl      RevokedKeys (binary KRL)
      ssh/principals/<account>   AuthorizedPrincipalsFile per bastion account
      ssh/host_key, ssh/host_key-cert.pub   the bastion's host key and certificate
      ssh/principals-command                sshd's AuthorizedPrincipalsCommand: the principals file, only
                           while the state is fresh; it records each login's sshd process in
                           ssh/run/sessions/<serial> (written by the bastion account), so that a revocation
                           cuts exactly that certificate's sessions
      ssh/revoked.json     SSH certificate serials the portal revoked lately (their sessions are cut)
      openvpn.conf, sshd_config, systemd/   the gateway's own configuration, rendered from the pulled ``config``
                           and local.json (:mod:`access.gateway.config`), rewritten by a pull that changes them
      local.json           the operator's choices for them (``gateway config --dir`` writes it)
      .config-changed      the configuration files pulls rewrote that no ``--on-change`` hook has acted on yet
      fresh-until          until when (this host's clock, seconds since the epoch) the state may be trusted:
                           the start of the pull that got it + its ``max_age``; past it every hook refuses
      .installed.json      etag, generated_at and max_age of the installed state (the next pull reports
                           generated_at to the portal, and a 304 refreshes fresh-until from max_age)

OpenVPN drops its privileges after start (``user``/``group`` in ``openvpn.conf``: ``local.json``'s ``vpn_user`` and
``vpn_group``, :class:`RunAs`), and its hooks run as that account too. So ``vpn/`` and ``vpn/run/`` are 0750
root:<group> and every file OpenVPN or a hook reads afterwards (CA, CRL, AA, VLAN map, revoked serials, server
certificate) 0640 root:<group>: readable, never writable by it. The keys stay 0600 root (OpenVPN reads them before
it drops, and ``persist-key`` keeps them across its soft restarts). What they write — ``run/ac-cache``,
``run/peer-certs``, ``run/sessions`` — belongs to that user (0700). ``management.sock`` and ``status.log`` are made by
OpenVPN before it drops, so only root (the pull that cuts sessions) may use the socket. Without ``vpn_user``
everything is root's: ``vpn/`` 0700. :meth:`VpnState.ensure_dirs` sets all of it (also on a directory copied from
elsewhere or set up before), :meth:`VpnState.readable` is the mode and group of a file the hooks read.

Fail closed: a gateway that has not pulled for ``max_age`` (``GATEWAY_STATE_MAX_AGE`` on the portal) stops
admitting anyone — it may map a cluster that has ended to a VLAN another cluster has since been given. Every
hook calls :func:`check_fresh`. A service the pulled document no longer carries fails closed by itself: its VLAN
map (or principals and cluster map) is emptied (:func:`access.gateway.pull.install_state`).

The root pull reads the hooks' records only through :func:`read_record` and gives them their owner only through
:func:`_own`: the account that writes them may plant links, FIFOs or hard links there, never followed.

Files are replaced atomically (write a temporary file with a random name, created exclusively, in the
same directory, fsync, rename) so a hook never reads half a CRL or half a map; a pull writes all of its
new files before it renames any (``write_all_atomic``).
"""

from __future__ import annotations

import collections
import errno
import grp
import hashlib
import ipaddress
import json
import os
import pwd
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# \Z, not $: "$" also matches before a final newline
CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


class StateError(Exception):
    """The pulled state is missing or malformed (the gateway refuses rather than guesses)."""


@dataclass(frozen=True)
class RunAs:
    """The account OpenVPN and its hooks run as once OpenVPN has started (``user``/``group`` in ``openvpn.conf``;
    ``local.json``'s ``vpn_user``/``vpn_group``), with its ids on this host."""

    user: str
    group: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, user: str, group: str) -> RunAs:
        """The account by its names; :class:`LookupError` when this host has no such user or group."""
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise LookupError(f"no user {user!r} on this host") from None
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"no group {group!r} on this host") from None
        return cls(user, group, uid, gid)

    def __str__(self) -> str:
        return f"{self.user}:{self.group}"

    def may(self, st: os.stat_result, bits: int) -> bool:
        """Whether this account has all of ``bits`` (4 read, 2 write, 1 search/execute) on a file with ``st``."""
        if st.st_uid == self.uid:
            have = st.st_mode >> 6
        elif st.st_gid == self.gid or st.st_gid in os.getgrouplist(self.user, self.gid):
            have = st.st_mode >> 3
        else:
            have = st.st_mode
        return have & bits == bits

    def cannot_reach(self, path: str | os.PathLike[str], bits: int = 4) -> str | None:
        """Why this account cannot open ``path`` (``bits`` on the file, search on every directory above it, on
        the way as written and as its symbolic links resolve), or None when it can."""
        path = Path(os.path.abspath(path))
        for way in dict.fromkeys((path, path.resolve())):
            for d in reversed(way.parents):
                try:
                    st = os.stat(d)
                except OSError as exc:
                    return f"{d}: {exc.strerror}"
                if not self.may(st, 1):
                    return f"{d} is {_describe(st)}"
        try:
            st = os.stat(path)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        return None if self.may(st, bits) else f"{path} is {_describe(st)}"


def _describe(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.S_IMODE(st.st_mode):04o} {owner}:{group}"


def _own(path: Path, mode: int | None, *, uid: int = -1, gid: int = -1) -> str | None:
    """Give ``path`` that owner/group (-1: as it is) and ``mode`` (None: as it is); only what differs is changed.
    Never through a link: a symbolic link gets the owner itself (``lchown``, never a mode), a regular file or a
    directory is changed through a descriptor opened without following one (``fchown``/``fchmod``: a swap after the
    check changes nothing else), and a file with another name elsewhere (a hard link, maybe to a file of root's),
    a FIFO, a socket or a device is left alone: what was left alone, or None. ``PermissionError`` when this process
    may not (not root)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
            os.chown(path, uid, gid, follow_symlinks=False)
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return f"{path} is not a regular file: left as it is"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since
            return f"{path} became a symbolic link: left as it is"
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1):
            return f"{path} has {st.st_nlink} names (a hard link?) or is not a regular file: left as it is"
        if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
            os.fchown(fd, uid, gid)
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return None


#: The most a record another account writes (``vpn/run/sessions/<serial>.json``, ``vpn/run/ac-cache/*``) may hold
#: when root reads it: a real one is a few hundred bytes.
RECORD_LIMIT = 64 * 1024


def read_record(path: Path, limit: int = RECORD_LIMIT) -> bytes:
    """The content of a record in a directory an unprivileged account writes (OpenVPN's hooks, the bastion's
    principals command), read so that a compromised one cannot make root follow anything or hang: opened without
    following a link, without waiting (a FIFO), and read from the descriptor only when it is a regular file with
    one name and at most ``limit`` bytes. Anything else is removed — the entry, never what it points to — said on
    stderr, and taken as no record: ``FileNotFoundError``, like a missing one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise  # (FileNotFoundError: no record)
        return _drop_record(path, "a symbolic link or a socket")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_nlink != 1:
            problem = f"a file with {st.st_nlink} names (a hard link)"
        elif st.st_size > limit:
            problem = f"{st.st_size} bytes, more than {limit}"
        else:
            chunks, size = [], 0
            while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
            if size <= limit:
                return b"".join(chunks)
            problem = f"more than {limit} bytes"  # (it grew since)
    finally:
        os.close(fd)
    return _drop_record(path, problem)


def _drop_record(path: Path, problem: str) -> bytes:
    print(f"virtcloud-gateway: removed {path}, not a record: {problem}", file=sys.stderr, flush=True)
    try:
        os.unlink(path)  # (the entry itself: unlink follows nothing)
    except OSError:
        pass
    raise FileNotFoundError(errno.ENOENT, f"not a record: {problem}", str(path))


@dataclass(frozen=True)
class VpnState:
    """Paths of the OpenVPN side of a gateway state directory, and (``run_as``) who OpenVPN runs as after it has
    started: None for root throughout."""

    root: Path
    run_as: RunAs | None = None

    @classmethod
    def at(cls, state_dir: str | os.PathLike[str], run_as: RunAs | None = None) -> VpnState:
        return cls(Path(state_dir) / "vpn", run_as)

    ca = property(lambda self: self.root / "ca.pem")
    crl = property(lambda self: self.root / "crl.pem")
    aa = property(lambda self: self.root / "aa.pem")
    vlans = property(lambda self: self.root / "vlans.json")
    revoked = property(lambda self: self.root / "revoked.json")  # serials revoked lately (client-connect refuses)
    server_cert = property(lambda self: self.root / "server.pem")
    server_key = property(lambda self: self.root / "server.key")
    tls_crypt = property(lambda self: self.root / "tls-crypt.key")
    run = property(lambda self: self.root / "run")
    ac_cache = property(lambda self: self.root / "run" / "ac-cache")
    peer_certs = property(lambda self: self.root / "run" / "peer-certs")
    sessions = property(lambda self: self.root / "run" / "sessions")
    management = property(lambda self: self.root / "run" / "management.sock")
    status = property(lambda self: self.root / "run" / "status.log")

    @property
    def readable(self) -> tuple[int, int | None]:
        """(mode, group) of a file OpenVPN or its hooks read after OpenVPN has dropped its privileges: 0640 and
        ``run_as``'s group (readable, not writable by it); 0644 and as it is without (``vpn/`` is root's then)."""
        return (0o640, self.run_as.gid) if self.run_as else (0o644, None)

    @property
    def shared(self) -> tuple[Path, ...]:
        """The files the hooks and OpenVPN read after it has dropped its privileges (mode :attr:`readable`)."""
        return (self.ca, self.crl, self.aa, self.vlans, self.revoked, self.server_cert)

    def ensure_dirs(self) -> list[str]:
        """Make the directories, and give them and the files already in them the owners and modes ``run_as``
        needs (see the module's docstring): also those of a directory set up for the other way, or copied from
        elsewhere. What it left alone, for the operator (an entry among the hooks' records that is not theirs to
        have: a hard link, a FIFO — never followed, see :func:`_own`). ``PermissionError`` when they cannot be
        given (not root)."""
        skipped = []
        gid = self.run_as.gid if self.run_as else os.getegid()  # (root's again when the drop is turned off)
        for d in (self.root, self.run):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            skipped.append(_own(d, 0o750 if self.run_as else 0o700, gid=gid))
        for path in self.shared:
            if path.exists():
                skipped.append(_own(path, self.readable[0], gid=gid))
        for path in (self.server_key, self.tls_crypt):
            if path.exists():
                skipped.append(_own(path, 0o600))
        # what the hooks (and OpenVPN's tls-export-cert) write, with what is in it: theirs, or root's again
        uid, gid = (self.run_as.uid, self.run_as.gid) if self.run_as else (os.geteuid(), os.getegid())
        for d in (self.ac_cache, self.peer_certs, self.sessions):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            skipped.append(_own(d, 0o700, uid=uid, gid=gid))
            with os.scandir(d) as entries:  # (a link the account planted there is not followed)
                for entry in entries:
                    skipped.append(_own(Path(entry.path), None, uid=uid, gid=gid))
        return [problem for problem in skipped if problem]

    def current_run_as(self) -> RunAs | None:
        """Who the directory is set up for now, by its owners on disk (what :meth:`ensure_dirs` gave it last): the
        group of ``vpn/`` and the owner of the hooks' records; None when they are root's (or there is none yet)."""
        try:
            gid, uid = os.lstat(self.root).st_gid, os.lstat(self.sessions).st_uid
        except FileNotFoundError:
            return None
        if gid == os.getegid() and uid == os.geteuid():
            return None
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return RunAs(user, group, uid, gid)


SSHD_CONFIG = "sshd_config"  # in the state directory: the bastion's sshd configuration (gateway config writes it)
OPENVPN_CONFIG = "openvpn.conf"  # … and OpenVPN's


@dataclass(frozen=True)
class SshState:
    """Paths of the SSH bastion side of a gateway state directory."""

    root: Path

    @classmethod
    def at(cls, state_dir: str | os.PathLike[str]) -> SshState:
        return cls(Path(state_dir) / "ssh")

    user_ca = property(lambda self: self.root / "user_ca.pub")
    krl = property(lambda self: self.root / "revoked.krl")
    principals_dir = property(lambda self: self.root / "principals")
    host_key = property(lambda self: self.root / "host_key")
    host_cert = property(lambda self: self.root / "host_key-cert.pub")
    principals_command = property(lambda self: self.root / "principals-command")
    revoked = property(lambda self: self.root / "revoked.json")  # serials revoked lately (their sessions are cut)
    clusters = property(lambda self: self.root / "clusters.json")  # per cluster: VLAN and nodes (for the legs)
    sessions = property(lambda self: self.root / "run" / "sessions")  # <serial>: "pid starttime" per login

    def principals(self, account: str) -> Path:
        return self.principals_dir / account

    def ensure_dirs(self) -> None:
        # 0755: sshd reads the principals file as the *target* account (a no-login user), and StrictModes
        # wants root-owned, non-writable directories. Only the host key inside is secret (0600).
        self.root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # ``run``: the bastion account's principals command reaches ``run/sessions`` through it to record each
        # login; made under a strict umask (0700 root's) it recorded none — and cut none — without a word
        for d in (self.root, self.principals_dir, self.sessions.parent):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(d, 0o755)  # noqa: S103 - public files only, see above


def _write_temp(path: Path, data: bytes | str, mode: int, group: int | None = None) -> Path:
    """``data`` in a new file beside ``path`` (a random name, created exclusively: a link planted there by
    someone who may write the directory is never followed), of ``group`` when given, flushed to disk; its path."""
    if isinstance(data, str):
        data = data.encode()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if group is not None:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600, group: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (readers see the old or the new file, never a mix); the new file has
    ``mode`` and, when given, ``group`` (before it replaces the old one: no reader ever finds it unreadable)."""
    tmp = _write_temp(path, data, mode, group)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_all_atomic(files: dict[Path, tuple[bytes | str, int] | tuple[bytes | str, int, int | None]]) -> None:
    """Replace several files together: every new file is written (and flushed) first, and only when all of
    them are does any replace its old one — a full disk or a failing write leaves the old set whole. The files
    replace theirs in the order given (a rename that fails stops there: put last what says the set is in). No
    temporary file is left behind. Each file is (data, mode) or (data, mode, group), as for :func:`write_atomic`."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, (data, mode, *group) in files.items():
            written.append((_write_temp(path, data, mode, *group), path))
        for done, (tmp, path) in enumerate(written):
            os.replace(tmp, path)
            written[done] = (path, path)  # (in place: nothing to clean)
    except BaseException:
        for tmp, path in written:
            if tmp != path:
                tmp.unlink(missing_ok=True)
        raise


def vlan_map_json(clusters: dict[str, int], *, generated_at: str) -> str:
    """Serialize a cluster -> VLAN id map in the format :func:`load_vlan_map` reads."""
    for name, vid in clusters.items():
        check_vlan_entry(name, vid)
    return json.dumps({"format": 1, "generated_at": generated_at, "clusters": dict(sorted(clusters.items()))}, indent=1)


def check_vlan_entry(name: object, vid: object, where: str = "the VLAN map") -> None:
    """A cluster name and its VLAN id as a gateway may use them (StateError otherwise)."""
    if not isinstance(name, str) or not CLUSTER_RE.match(name):
        raise StateError(f"invalid cluster name {name!r} in {where}")
    if not isinstance(vid, int) or isinstance(vid, bool) or not 1 <= vid <= 4094:
        raise StateError(f"invalid VLAN id {vid!r} for cluster {name} in {where}")


def load_vlan_map(path: Path) -> dict[str, int]:
    """The cluster -> VLAN id map pulled from the portal, without an id listed for two clusters (neither is
    entered); :class:`StateError` if missing or malformed."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"no VLAN map at {path} (has the gateway pulled its state?)") from None
    except ValueError as exc:
        raise StateError(f"VLAN map {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("clusters"), dict):
        raise StateError(f"VLAN map {path} has an unknown format")
    for name, vid in doc["clusters"].items():
        check_vlan_entry(name, vid)
    # Two clusters on one id cannot be told apart on one trunk: neither is entered (the portal never sends that)
    listed = collections.Counter(doc["clusters"].values())
    return {name: vid for name, vid in doc["clusters"].items() if listed[vid] == 1}


def legs_from_doc(doc: object) -> dict[str, tuple[int, str]]:
    """{cluster: (VLAN id, the bastion's address there)} of ``ssh/clusters.json`` (format 1), for the clusters
    that have both: the legs the bastion needs. :class:`StateError` if it is malformed."""
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("clusters"), dict):
        raise StateError("ssh/clusters.json: not a format-1 cluster map")
    out: dict[str, tuple[int, str]] = {}
    for name, entry in doc["clusters"].items():
        vid, address = (entry.get("vlan"), entry.get("bastion_address")) if isinstance(entry, dict) else (None, None)
        if vid is None or not address:
            continue
        check_vlan_entry(name, vid)
        if any(v == vid for v, _ in out.values()):
            raise StateError(f"ssh/clusters.json: VLAN {vid} is listed twice")
        out[name] = (vid, check_bastion_address(name, address))
    return out


# The prefix lengths a cluster network may have, IPv4 and IPv6: shorter would route a large part of the address
# space into the cluster's leg; longer leaves no host address beside the bastion's.
BASTION_PREFIX = {4: (8, 30), 6: (32, 126)}
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # (RFC 1122: "this host on this network", never a peer)


def bastion_address_problem(address: str) -> str | None:
    """Why ``address`` (``address/prefix``) cannot be the bastion's address in a cluster network, or None.
    A unicast host address of that network: not loopback, link-local (the legs hook manages global addresses
    only, and a link-local one is in every leg's network), multicast, unspecified or reserved, with a prefix
    length in ``BASTION_PREFIX``."""
    if "/" not in address or "%" in address:
        return "an address with its prefix length, e.g. 10.0.0.254/24"
    try:
        iface = ipaddress.ip_interface(address.strip())
    except ValueError:
        return "an address with its prefix length, e.g. 10.0.0.254/24"
    ip, net = iface.ip, iface.network
    this_network = ip.version == 4 and ip in _THIS_NETWORK
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved or this_network:
        return f"{ip} is not a unicast address a cluster network can give the bastion"
    shortest, longest = BASTION_PREFIX[ip.version]
    if not shortest <= net.prefixlen <= longest:
        return f"give the cluster network's prefix length (/{shortest} to /{longest})"
    if ip == net.network_address or (ip.version == 4 and ip == net.broadcast_address):
        return f"{ip} is not a host address of {net}"
    return None


def certificate_digest(line: str) -> str:
    """SHA-256 (hex) of a certificate line's type and base64 body (not its comment; of nothing for ""): how a node
    says which host certificate it has (``clusters/client.py host-access``; the portal compares)."""
    return hashlib.sha256(" ".join(line.split()[:2]).encode()).hexdigest()


def leg_unusable(bastion_address: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of the network of ``bastion_address`` (``address/prefix``) the bastion never forwards to: its
    own (a forwarding to it reaches the gateway's own services over loopback), and an IPv4 network's network and
    broadcast address. The gateway refuses a state that names one (``pull._check_targets``); the portal refuses
    a node at one and withholds one it has (``access.selectors.bastion_unreachable``)."""
    iface = ipaddress.ip_interface(bastion_address)
    unusable = {iface.ip}
    if iface.network.version == 4 and iface.network.prefixlen < 31:
        unusable |= {iface.network.network_address, iface.network.broadcast_address}
    return unusable


def check_bastion_address(name: object, address: object) -> str:
    """A cluster's bastion address (``address/prefix``) as a gateway may use it, normalized ("" for none);
    :class:`StateError` otherwise (the rule of :func:`bastion_address_problem`)."""
    if address == "":
        return ""
    problem = bastion_address_problem(address) if isinstance(address, str) else "not a string"
    if problem:
        raise StateError(f"cluster {name}: the bastion address {address!r} cannot be used: {problem}")
    return str(ipaddress.ip_interface(address.strip()))


def load_legs(path: Path) -> dict[str, tuple[int, str]]:
    """``legs_from_doc`` of the file at ``path``; :class:`StateError` if missing or malformed."""
    try:
        return legs_from_doc(json.loads(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path}: {exc}") from None


def fresh_until_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "fresh-until"


def installed_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / ".installed.json"


def fresh_until_text(until: float) -> str:
    """``fresh-until``'s content: whole seconds (rounded down), one line — the shell reads it too."""
    return f"{int(until)}\n"


def check_fresh(state_dir: str | os.PathLike[str], now: float | None = None) -> float:
    """Seconds the pulled state may still be trusted; :class:`StateError` (refuse everyone) when it has expired,
    is missing or unreadable."""
    path = fresh_until_path(state_dir)
    try:
        until = int(path.read_text().strip())
    except FileNotFoundError:
        raise StateError(f"no {path}: the gateway has not pulled its state (refusing everyone)") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"unreadable {path} ({exc}): refusing everyone") from None
    left = until - (time.time() if now is None else now)
    if left < 0:
        raise StateError(
            f"the pulled state expired {int(-left)} s ago: the gateway has not reached the portal since; "
            "refusing everyone until a pull succeeds"
        )
    return left


def revoked_serials(path: Path) -> set[int]:
    """The serials a pull listed in ``path`` (``vpn/revoked.json``, ``ssh/revoked.json``) as revoked lately;
    none when the file is missing (this gateway does not serve that side). ``ValueError`` when unreadable."""
    try:
        return {int(v) for v in json.loads(path.read_bytes())}
    except FileNotFoundError:
        return set()
    except TypeError as exc:
        raise ValueError(f"{path} is not a list of serials") from exc

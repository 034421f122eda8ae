"""Writes of the access service: the authorities, profiles and certificates for users, revocation, and
the state gateways pull.

Rules kept here:

- Authorization is :func:`access.selectors.clusters_user_may_enter`, asked at issue time and asked again
  when the credential is recorded, under the holder's and the clusters' row locks; afterwards, every event
  that takes the right away revokes (cluster ended or no longer closed/ready, user left the group, the
  group was deleted, the user was deactivated, the cluster lost its group/owner, admin action, "I lost my
  laptop"), taking the same locks first: an event either commits before the re-check (which refuses) or
  waits for the credential's commit and then revokes it.
- No credential outlives what it admits to: its validity ends by the clusters' expiry and by the expiry of
  the certificates that vouch for it (the VPN CA, the Attribute Authority).
- A user's private key is generated in memory for the one response that carries it; it is never saved,
  logged or put in an exception. Only :mod:`access.pki`, :mod:`access.attrcerts` and :mod:`access.ssh`
  touch cryptography.
- Serials come from :class:`access.models.SerialNumber` (unique, never reused). The AC inside a client
  certificate has the certificate's serial (the AA and the CA are different issuers).
- A revocation rewrites the CRL/KRL in the same transaction, so the next gateway pull has it; sessions
  that are up are cut by the gateway (pull: ``revoked_sessions``) or at once when its management socket
  is local.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from access import attrcerts, openvpn, pki, selectors
from access.errors import (
    AccessError,
    AuthorityExpired,
    BadLabel,
    BadPublicKey,
    CannotIssue,
    ClusterNotReady,
    GatewayMisconfigured,
    NameTooLong,
    NoCommonGateway,
    NoGateway,
    NotAllowed,
    NotFound,
)
from access.gateway.state import certificate_digest
from access.models import (
    LABEL_MAX,
    USER_KINDS,
    Authority,
    AuthorityKind,
    Credential,
    CredentialCluster,
    CredentialKind,
    Gateway,
    GatewaySession,
    RetiredHostKey,
    RevocationReason,
    SerialNumber,
)
from portal.models import ApiToken, TokenScope
from portal.tokens import token_create, token_revoke

logger = logging.getLogger(__name__)

# --- settings (the lead adds them to portal/settings.py; these defaults apply until then) -------------------


def _setting_seconds(name: str, default: int) -> dt.timedelta:
    return dt.timedelta(seconds=int(getattr(settings, name, default)))


def vpn_cert_lifetime() -> dt.timedelta:
    return _setting_seconds("ACCESS_VPN_CERT_LIFETIME", 3 * 24 * 3600)


def publish_cert_lifetime() -> dt.timedelta:
    return _setting_seconds("ACCESS_PUBLISH_CERT_LIFETIME", 90 * 24 * 3600)


def ssh_cert_lifetime() -> dt.timedelta:
    return _setting_seconds("ACCESS_SSH_CERT_LIFETIME", 12 * 3600)


def ssh_host_cert_lifetime() -> dt.timedelta:
    """The longest a node's host certificate lives (its cluster's expiry comes first, as a rule)."""
    return _setting_seconds("ACCESS_SSH_HOST_CERT_LIFETIME", 365 * 24 * 3600)


def crl_validity() -> dt.timedelta:
    return _setting_seconds("ACCESS_CRL_VALIDITY", 7 * 24 * 3600)


#: Revoked credentials listed for the gateways to cut live sessions, at least (``session_cut_window``).
SESSION_CUT_WINDOW = dt.timedelta(days=1)


def session_cut_window() -> dt.timedelta:
    """How long a revoked credential stays in the gateways' ``revoked_sessions``: a day, or the time a gateway may
    keep serving from its last pull (``GATEWAY_STATE_MAX_AGE``, then it cuts everyone) and an hour more — a
    gateway cut off from the portal for less than that learns of every revocation made meanwhile. Listed after
    the certificate expires too: a session outlives it (sshd checks it at login only, OpenVPN at renegotiation)."""
    return max(SESSION_CUT_WINDOW, dt.timedelta(seconds=settings.GATEWAY_STATE_MAX_AGE) + dt.timedelta(hours=1))


def ca_passphrase() -> bytes:
    """The passphrase of the authorities' PKCS#8 keys: ``ACCESS_CA_PASSPHRASE``, or (until the lead adds
    the setting) one derived from ``SECRETS_KEY`` with a purpose label, so it differs from the Fernet key."""
    value = getattr(settings, "ACCESS_CA_PASSPHRASE", "")
    if value:
        return value.encode()
    return hashlib.sha256(b"virtcloud-access-ca:" + settings.SECRETS_KEY.encode()).hexdigest().encode()


# --- serials and authorities -----------------------------------------------------------------------------------


def serial_allocate(purpose: str, *, pooled: bool = False) -> int:
    """A fresh serial, never handed out before.

    ``pooled``: from a block of :data:`SERIAL_BLOCK` serials this process reserved in one INSERT (the
    profile hot path saves a round trip). Only outside a transaction, where the reserved rows are committed
    at once: rows of a rolled-back transaction could be handed out again by SQLite. A block belongs to the
    process that reserved it (a fork starts its own), so two processes never share a serial; serials a
    process did not use before it ended are simply never used."""
    if not pooled or connection.in_atomic_block:
        return SerialNumber.objects.create(purpose=purpose[:40]).pk
    with _SERIAL_LOCK:
        pid, pool = _SERIAL_POOL.get(purpose, (None, []))
        if pid != os.getpid() or not pool:
            rows = SerialNumber.objects.bulk_create([SerialNumber(purpose=purpose[:40]) for _ in range(SERIAL_BLOCK)])
            pool = sorted((r.pk for r in rows if r.pk is not None), reverse=True)
            if len(pool) != SERIAL_BLOCK:  # a database that does not return the ids of a bulk insert
                return SerialNumber.objects.create(purpose=purpose[:40]).pk
            _SERIAL_POOL[purpose] = (os.getpid(), pool)
        return pool.pop()


#: Serials a process reserves at once for pooled allocation, and its blocks: purpose -> (pid, serials left).
SERIAL_BLOCK = 32
_SERIAL_POOL: dict[str, tuple[int, list[int]]] = {}
_SERIAL_LOCK = threading.Lock()


def _now() -> dt.datetime:
    return timezone.now().astimezone(dt.UTC).replace(microsecond=0)


def _create_authority(kind: str, loaded: dict[str, object]) -> Authority:
    passphrase = ca_passphrase()
    if kind == AuthorityKind.VPN:
        ca = pki.create_ca("VirtCloud VPN CA")
        return Authority(
            kind=kind,
            certificate=ca.cert_pem().decode(),
            public_key=pki.public_key_pem(ca.key.public_key()).decode(),
            private_key=ca.key_pem(passphrase).decode(),
        )
    if kind == AuthorityKind.AA:
        vpn_ca = loaded[AuthorityKind.VPN]
        key = pki.generate_private_key()
        # as long as the CA (it cannot outlive it): an AA ending first would refuse every login from then on
        lifetime = vpn_ca.cert.not_valid_after_utc - _now() - dt.timedelta(minutes=1)
        cert = pki.issue_aa_cert(vpn_ca, public_key=key.public_key(), serial=serial_allocate("aa"), lifetime=lifetime)
        return Authority(
            kind=kind,
            certificate=pki.cert_to_pem(cert).decode(),
            public_key=pki.public_key_pem(key.public_key()).decode(),
            private_key=pki.private_key_to_encrypted_pem(key, passphrase).decode(),
        )
    from access import ssh

    key = ssh.generate_ca_key()
    return Authority(
        kind=kind,
        public_key=ssh.public_key_line(key, comment=f"virtcloud-{kind.replace('_', '-')}-ca"),
        private_key=ssh.ca_key_to_encrypted_pem(key, passphrase).decode(),
    )


#: Decrypted signers by (kind, row id, public key, passphrase digest): the key is decrypted once per
#: process, not on every profile; a replaced key or passphrase misses the cache.
_SIGNERS: dict[tuple, object] = {}


def _load(row: Authority):
    """The in-memory signer of an authority row (a pki.CertificateAuthority, or an SSH CA key)."""
    passphrase = ca_passphrase()
    cache_key = (row.kind, row.pk, row.public_key, hashlib.sha256(passphrase).digest())
    signer = _SIGNERS.get(cache_key)
    if signer is None:
        if row.get_deferred_fields():  # a light row (see _signers): the key material is read on a miss only
            row = Authority.objects.get(pk=row.pk)
        signer = _SIGNERS[cache_key] = _decrypt(row, passphrase)
    return signer


def _signers(*kinds: str) -> list:
    """The in-memory signers of ``kinds``, with one light query (no key material read or decrypted unless
    this process has not loaded that key yet: the cache key is the row's public key)."""
    rows = {a.kind: a for a in Authority.objects.filter(kind__in=kinds).only("id", "kind", "public_key")}
    if len(rows) < len(kinds):
        rows = ca_ensure()
    return [_load(rows[kind]) for kind in kinds]


def _decrypt(row: Authority, passphrase: bytes):
    if row.kind in (AuthorityKind.VPN, AuthorityKind.AA):
        return pki.load_ca(row.certificate.encode(), str(row.private_key).encode(), passphrase)
    from access import ssh

    return ssh.load_ca_key(str(row.private_key).encode(), passphrase)


# Creation order matters: the AA certificate is signed by the VPN CA.
_ORDER = (AuthorityKind.VPN, AuthorityKind.AA, AuthorityKind.SSH_USER, AuthorityKind.SSH_HOST)


def ca_ensure() -> dict[str, Authority]:
    """Every authority exists afterwards (created on first use). Idempotent and race-safe: concurrent
    callers insert behind the unique ``kind``; the loser's savepoint rolls back and it reads the winner's."""
    rows = {a.kind: a for a in Authority.objects.all()}
    loaded: dict[str, object] = {}
    for kind in _ORDER:
        if kind not in rows:
            candidate = _create_authority(kind, loaded)
            try:
                with transaction.atomic():
                    candidate.save()
                rows[kind] = candidate
                logger.info("access: created the %s", candidate.get_kind_display())
            except IntegrityError:
                rows[kind] = Authority.objects.get(kind=kind)
        if kind == AuthorityKind.VPN:
            loaded[kind] = _load(rows[kind])
    return rows


def _authority(kind: str) -> Authority:
    row = Authority.objects.filter(kind=kind).first()
    return row if row is not None else ca_ensure()[kind]


# --- authorization -----------------------------------------------------------------------------------------------


def _cluster_id(value) -> int:
    pk = getattr(value, "pk", value)
    try:
        return int(pk)
    except (TypeError, ValueError):
        raise AccessError(f"{value!r} is not a cluster id", field="clusters") from None


def clusters_authorize(*, user, clusters: Iterable, lock: bool = False) -> list:
    """The requested clusters (ids or objects) if ``user`` may enter every one, in request order
    (``lock``: their rows locked until the caller's transaction ends).

    403 (:class:`NotAllowed`) for a cluster that is not the user's (or does not exist: the answer does
    not tell which); 409 (:class:`ClusterNotReady`) for the user's cluster whose network is not up, whose
    lifetime is over (its teardown has not started yet) or which is public (reached without a gateway)."""
    from clusters.models import Connectivity, VirtualCluster

    ids = list(dict.fromkeys(_cluster_id(c) for c in clusters))
    if not ids:
        raise AccessError("choose at least one cluster", field="clusters")
    # Only what issuing needs (label, state, expiry): no owner/group join, a handful of columns.
    rows = (
        selectors.clusters_user_may_enter(user)
        .filter(pk__in=ids)
        .select_related(None)
        .only("id", "name", "state", "connectivity", "owner_id", "group_id", "expires_at")
    )
    if lock:
        rows = rows.select_for_update(of=("self",), no_key=True).order_by("pk")
    enterable = {c.pk: c for c in rows}
    missing = [pk for pk in ids if pk not in enterable]
    if missing:
        own = {
            c.pk: c
            for c in VirtualCluster.objects.filter(pk__in=missing).filter(
                pk__in=selectors.clusters_user_belongs_to(user).values("pk")
            )
        }
        for pk in missing:
            cluster = own.get(pk)
            if cluster is None:
                raise NotAllowed(f"you may not enter cluster {pk}: it is not yours and not your group's")
            if cluster.connectivity != Connectivity.CLOSED:
                raise ClusterNotReady(
                    f"cluster {cluster.name} is public: reach it at its public addresses, no gateway needed"
                )
            raise ClusterNotReady(
                f"cluster {cluster.name} is {cluster.get_state_display()}: its network is not up, try again "
                "when it is ready"
            )
    now = timezone.now()
    for pk in ids:
        if enterable[pk].expires_at <= now:
            raise ClusterNotReady(
                f"the lifetime of cluster {enterable[pk].name} ended at {enterable[pk].expires_at.isoformat()}: "
                "it is being torn down"
            )
    return [enterable[pk] for pk in ids]


def _gateway(kind: str, clusters: Sequence) -> Gateway:
    """The gateway a user of ``clusters`` connects to (the first of ``_gateways``)."""
    return _gateways(kind, clusters)[0]


def _ssh_gateway(cluster) -> Gateway:
    """The gateway a user of ``cluster`` connects to over SSH: the first of ``_gateways`` whose bastion relays to
    the cluster's nodes (``selectors.gateway_relays_ssh``, as the access API lists it). A bastion per cluster
    listens only for clusters with a leg (access/gateway/bastion.py): when no gateway relays to the cluster,
    ``ClusterNotReady``."""
    for gateway in _gateways("ssh", [cluster]):
        if selectors.gateway_relays_ssh(gateway, cluster):
            return gateway
    raise ClusterNotReady(
        f"cluster {selectors.cluster_label(cluster)} has no address for the SSH bastion (its scheduler gave none): "
        "use its VPN profile",
        field="cluster",
    )


def _vpn_gateways(clusters: Sequence) -> list[Gateway]:
    """The gateways a VPN profile for ``clusters`` names: the one it connects to first (``_gateway``), then, for
    failover, up to ``ACCESS_VPN_PROFILE_GATEWAYS`` in all of the others that carry the clusters, in
    ``_gateways``' order, as long as all their certificates' names share a start the profile can pin
    (``openvpn.failover_prefix``: the default names do)."""
    chosen: list[Gateway] = []
    for gateway in _gateways("vpn", clusters):
        if len(chosen) >= max(1, settings.ACCESS_VPN_PROFILE_GATEWAYS):
            break
        if chosen and not openvpn.failover_prefix([gateway_server_name(g) for g in (*chosen, gateway)]):
            continue
        if chosen and not _readable_certificate(gateway):
            continue  # a failover gateway whose certificate cannot be pinned is left out (the first: an error)
        chosen.append(gateway)
    return chosen


def _readable_certificate(gateway: Gateway) -> bool:
    """Whether a failover gateway's certificate can be pinned, and has more than a minute left."""
    try:
        gateway_fingerprint(gateway)
        ends = gateway_certificate_end(gateway)
    except openvpn.ProfileError as exc:
        logger.error("access: gateway %s left out of VPN profiles: %s", gateway.name, exc)
        return False
    if ends <= _now() + dt.timedelta(minutes=1):
        logger.error("access: gateway %s left out of VPN profiles: its certificate ended %s", gateway.name, ends)
        return False
    return True


def _gateways(kind: str, clusters: Sequence) -> list[Gateway]:
    """The gateways a user of ``clusters`` may connect to, best first: those whose trunk carries their VLANs
    (see ``selectors.gateway_carries``), current before stale, at a site where the clusters have nodes
    before others (``selectors.gateways_for``). Never empty (``NoGateway``)."""
    from clusters.models import Node, NodeState

    what = "OpenVPN" if kind == "vpn" else "SSH"
    gateways = selectors.gateways_for(kind=kind)
    if not gateways:
        raise NoGateway(
            f"no {what} access gateway is ready (enabled, set up and pulling its state): ask your administrator"
        )
    carries = selectors.gateway_carries(clusters)
    if not [g for g in gateways if carries(g)]:
        if len(clusters) > 1 and all(any(map(selectors.gateway_carries([c]), gateways)) for c in clusters):
            raise NoCommonGateway(
                f"no {what} access gateway reaches all of these clusters' networks (each is reached alone): "
                "ask for one per cluster",
                field="clusters",  # (what to change: the page keeps what was ticked and entered)
            )
        raise NoGateway(f"no {what} access gateway is at a site your cluster's network reaches: ask your administrator")
    if len(gateways) > 1:
        site_ids = set(
            Node.objects.filter(cluster__in=clusters)
            .exclude(state=NodeState.REMOVED)
            .values_list("host__site_id", flat=True)
            .distinct()
        )
        gateways = selectors.gateways_for(kind=kind, site_ids=site_ids)
    return [g for g in gateways if carries(g)]


def _ensure_tls_crypt(gateway: Gateway) -> str:
    if gateway.tls_crypt_key:
        return str(gateway.tls_crypt_key)
    with transaction.atomic():
        locked = Gateway.objects.select_for_update().get(pk=gateway.pk)
        if not locked.tls_crypt_key:
            locked.tls_crypt_key = pki.generate_tls_crypt_key()
            locked.save(update_fields=["tls_crypt_key"])
    gateway.refresh_from_db(fields=["tls_crypt_key"])
    return str(gateway.tls_crypt_key)


def _misconfigured(gateway: Gateway, what: str, exc: Exception) -> GatewayMisconfigured:
    """A value that would break (or add lines to) a download. The user is told whom to ask; what is at fault, with
    the value, goes to the log for the administrator — not to the user's page."""
    logger.error("access: gateway %s: refused to write %s: %s", gateway.name, what, exc)
    return GatewayMisconfigured(
        f"a setting of access gateway {gateway.name} cannot be written into {what} (the portal's log says which). "
        "Tell your administrator."
    )


def gateway_server_name(gateway: Gateway) -> str:
    return gateway.server_name or f"virtcloud-gateway-{gateway.name}"


def _pinned_certificate(gateway: Gateway):
    """The gateway's current TLS server certificate (``gateway_enrol``), which VPN profiles pin: a ``ProfileError``
    when the recorded one cannot be read (the download says to ask the administrator)."""
    try:
        return pki.load_cert_pem(gateway.server_certificate.encode())
    except ValueError as exc:
        raise openvpn.ProfileError(f"the server certificate of gateway {gateway.name} cannot be read ({exc})") from None


def gateway_fingerprint(gateway: Gateway) -> str:
    """SHA-256 of the certificate VPN profiles pin (``_pinned_certificate``)."""
    return pki.cert_fingerprint(_pinned_certificate(gateway))


def gateway_certificate_end(gateway: Gateway) -> dt.datetime:
    """When the certificate VPN profiles pin ends (``_pinned_certificate``): a profile works no longer then."""
    return _pinned_certificate(gateway).not_valid_after_utc


def lock_holders(user_ids: Iterable[int]) -> None:
    """Lock the rows of these users until the transaction ends (issuance and revocation take them first)."""
    from django.contrib.auth import get_user_model

    list(
        get_user_model()
        .objects.select_for_update(no_key=True)
        .filter(pk__in=list(user_ids))
        .order_by("pk")
        .values("pk")
    )


@transaction.atomic  # the credential and its clusters (what revocation finds it by) together
def _record_credential(
    *, kind: str, serial: int, user, key_id: str, fingerprint: str, clusters: Sequence, start, end, **extra
) -> Credential:
    """Record an issued credential, after asking the membership rule again under the holder's and the
    clusters' row locks (signing took a while: the user may have left the group, been deactivated, the
    cluster may be ending). An event that takes the right away either committed before this check, which
    then refuses (the signed certificate is dropped, never handed out), or waits for this commit and then
    finds and revokes the new row."""
    from django.contrib.auth import get_user_model

    holder = get_user_model().objects.select_for_update(no_key=True).get(pk=user.pk)
    clusters_authorize(user=holder, clusters=[c.pk for c in clusters], lock=True)
    credential = Credential.objects.create(
        kind=kind,
        serial=serial,
        user=user,
        key_id=key_id[:200],
        fingerprint=fingerprint,
        not_before=start,
        not_after=end,
        **extra,
    )
    CredentialCluster.objects.bulk_create(
        [CredentialCluster(credential=credential, cluster_id=c.pk, label=selectors.cluster_label(c)) for c in clusters]
    )
    return credential


# --- VPN profiles --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VpnProfile:
    """An issued profile: its text holds the user's private key (hand it over, never store or log it)."""

    text: str
    filename: str
    credential: Credential

    def __repr__(self) -> str:
        return f"VpnProfile(filename={self.filename!r}, credential={self.credential.pk}, text=<redacted>)"

    def __iter__(self):  # (text, filename), as the brief's signature promises
        return iter((self.text, self.filename))


def _credential_end(wanted: dt.datetime, clusters: Sequence, authorities: dict[str, dt.datetime]) -> dt.datetime:
    """When a credential issued now ends: ``wanted``, or earlier when a cluster it admits to expires first
    or a certificate that vouches for it (``authorities``: name → end) does. An authority that has expired
    (or would leave less than a minute) is :class:`AuthorityExpired`: nothing can be issued until an
    administrator renews it."""
    now = _now()
    for name, until in authorities.items():
        if until <= now + dt.timedelta(minutes=1):
            raise AuthorityExpired(
                f"the certificate of {name} is valid until {until.isoformat()}: an administrator must renew it"
            )
    ends = [wanted, *authorities.values(), *(c.expires_at for c in clusters)]
    return min(ends).astimezone(dt.UTC).replace(microsecond=0)


def credential_label(text: str | None) -> str:
    """A credential's label as given ("work laptop"): trimmed, at most ``LABEL_MAX`` characters, one line."""
    label = (text or "").strip()
    if len(label) > LABEL_MAX:
        raise BadLabel(f"a label has at most {LABEL_MAX} characters, this one {len(label)}")
    # control and format characters (a bidi override would make it read as another), line and paragraph breaks
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in label):
        raise BadLabel("a label is one line of text, without control characters")
    return label


def vpn_profile_issue(*, user, clusters: Iterable, publish: bool = False, label: str = "") -> VpnProfile:
    """An ``.ovpn`` for ``user`` whose attribute certificate admits to ``clusters`` (ids or objects).

    The client key is generated here and only returned inside the profile. The certificate and its AC
    share one validity (a few days; months for a ``publish`` profile, which a router keeps up; never past
    the clusters' expiry, the CA's or the AA's). The
    profile enters the first cluster; the user switches with ``setenv UV_VCLUSTER`` to another one the
    AC covers (listed at the top of the file)."""
    label = credential_label(label)
    username = user.get_username()
    if pki.common_name_too_long(username):
        raise NameTooLong(
            f"the user name {username[:20]}… has {len(username.encode('utf-8', 'surrogatepass'))} bytes (UTF-8): a "
            f"certificate's name holds at most {pki.MAX_COMMON_NAME}; use the SSH access, or ask an administrator"
        )
    chosen = clusters_authorize(user=user, clusters=clusters)
    gateway, *fallbacks = _vpn_gateways(chosen)
    tls_crypt = _ensure_tls_crypt(gateway)
    vpn_ca, aa = _signers(AuthorityKind.VPN, AuthorityKind.AA)

    labels = [selectors.cluster_label(c) for c in chosen]
    try:
        pinned_until = gateway_certificate_end(gateway)
    except openvpn.ProfileError as exc:
        raise _misconfigured(gateway, "a VPN profile", exc) from None
    serial = serial_allocate("vpn-client", pooled=True)
    now = _now()
    start = now - pki.CLOCK_SKEW
    end = _credential_end(
        now + (publish_cert_lifetime() if publish else vpn_cert_lifetime()),
        chosen,
        {
            "the VPN CA": vpn_ca.cert.not_valid_after_utc,
            "the Attribute Authority": aa.cert.not_valid_after_utc,
            # the profile pins it: past its end the profile cannot connect, whatever its own dates say
            f"gateway {gateway.name} (its TLS server certificate; re-enrol it)": pinned_until,
        },
    )
    try:
        text, cert = _vpn_profile_render(
            user=user,
            gateway=gateway,
            labels=labels,
            serial=serial,
            start=start,
            end=end,
            publish=publish,
            signers=(vpn_ca, aa),
            tls_crypt=tls_crypt,
            fallbacks=fallbacks,
        )
    except (attrcerts.ACError, pki.PKIError) as exc:
        raise CannotIssue(f"cannot issue a VPN certificate for {username}: {exc}") from None
    except openvpn.ProfileError as exc:
        raise _misconfigured(gateway, "a VPN profile", exc) from None
    # Recorded last, in one short transaction: a profile that could not be rendered leaves no row.
    credential = _record_credential(
        kind=CredentialKind.VPN,
        serial=serial,
        user=user,
        key_id=f"vpn:{username}:{','.join(labels)}:{now:%Y%m%dT%H%M%SZ}" + (":publish" if publish else ""),
        fingerprint=pki.cert_fingerprint(cert),
        clusters=chosen,
        start=start,
        end=end,
        published=publish,
        generated_key=True,
        pinned_gateways=[gateway_fingerprint(g) for g in (gateway, *fallbacks)],
        label=label,
    )
    if len(labels) > 1:
        text = (
            f"# This certificate admits to: {', '.join(labels)}.\n"
            "# To enter another of them, change the 'setenv UV_VCLUSTER' line below.\n" + text
        )
    logger.info(
        "access: issued VPN %sprofile serial=%s user=%s clusters=%s until=%s",
        "publish " if publish else "",
        serial,
        username,
        ",".join(labels),
        end.isoformat(),
    )
    suffix = "-publish" if publish else ""
    filename = f"virtcloud-{labels[0]}{suffix}.ovpn" if len(labels) == 1 else f"virtcloud-{username}{suffix}.ovpn"
    return VpnProfile(text=text, filename=filename, credential=credential)


def _vpn_profile_render(
    *, user, gateway: Gateway, labels, serial, start, end, publish, signers, tls_crypt, fallbacks: Sequence = ()
):
    """(profile text, client certificate): the AC, the certificate carrying it, a fresh key, the ``.ovpn`` (with
    ``fallbacks``: the gateways it tries when ``gateway`` does not answer)."""
    vpn_ca, aa = signers
    username = user.get_username()
    holder = attrcerts.Holder(issuer=vpn_ca.cert.subject, serial=serial, not_before=start, not_after=end)
    ac_der = attrcerts.issue_ac(
        aa_key=aa.key,
        aa_cert=aa.cert,
        holder=holder,
        serial=serial,
        fqans=[attrcerts.fqan(label) for label in labels],
    )
    client_key = pki.generate_client_key()
    cert = pki.issue_client_cert(
        vpn_ca,
        public_key=client_key.public_key,
        user=username,
        serial=serial,
        not_before=start,
        not_after=end,
        email=user.email or None,
        ac_der=ac_der,
    )
    cert_pem = pki.cert_to_pem(cert)
    text = openvpn.render_client_profile(
        cluster=labels[0],
        remote=(gateway.address, gateway.vpn_port),
        server_name=gateway_server_name(gateway),
        server_fingerprint=gateway_fingerprint(gateway),
        ca_pem=vpn_ca.cert_pem(),
        cert_pem=cert_pem,
        key_pem=client_key.private_pem,
        tls_crypt_key=tls_crypt,
        proto=gateway.vpn_proto,
        publish=publish,
        user=username,
        expires=end.isoformat(),
        fallbacks=[
            openvpn.Remote(
                host=g.address,
                port=g.vpn_port,
                proto=g.vpn_proto,
                server_name=gateway_server_name(g),
                tls_crypt_key=_ensure_tls_crypt(g),
                fingerprint=gateway_fingerprint(g),
            )
            for g in fallbacks
        ],
    )
    return text, cert


# --- SSH certificates ----------------------------------------------------------------------------------------------

#: File names inside the SSH download (relative: ``cd`` into the folder, ``ssh -F virtcloud.conf ...``).
SSH_CONFIG_FILE = "virtcloud.conf"
SSH_KNOWN_HOSTS_FILE = "known_hosts"
SSH_KEY_FILE = "id_virtcloud"
SSH_CERT_FILE = "id_virtcloud-cert.pub"
_DEFAULT_IDENTITY = {"ssh-ed25519": "~/.ssh/id_ed25519", "ssh-rsa": "~/.ssh/id_rsa"}


def _node_address(label: str, node) -> str:
    # Node.address when the scheduler gave one (the ssh_config's HostName and the bastion's permitopen
    # target); else the node's alias, which the bastion must resolve inside the cluster's network.
    from access import ssh

    return node.address or ssh.node_alias(label, node.name)


def _node_hosts(cluster) -> list[tuple[str, str]]:
    """(node name, address the bastion reaches it at) for the live nodes of ``cluster``."""
    from clusters.models import NodeState

    label = selectors.cluster_label(cluster)
    return [(n.name, _node_address(label, n)) for n in cluster.nodes.exclude(state=NodeState.REMOVED).order_by("name")]


def ssh_config_render(
    *, cluster, gateway: Gateway | None = None, identity_file: str = SSH_KEY_FILE, withheld: Sequence = ()
) -> tuple[str, str]:
    """The ``ssh_config`` snippet and ``known_hosts`` (``@cert-authority``) for ``cluster``, through the
    cluster's SSH gateway: ``ssh -F virtcloud.conf <node>.<cluster>``. The ``withheld`` nodes ((name, address, why),
    see ``selectors.bastion_withheld_nodes``) get a comment saying why, not a ``Host`` entry."""
    from access import ssh

    gateway = gateway or _ssh_gateway(cluster)
    host_ca = _authority(AuthorityKind.SSH_HOST).public_key
    left_out = {name for name, _address, _why in withheld}
    label = selectors.cluster_label(cluster)
    nodes = [(name, address) for name, address in _node_hosts(cluster) if name not in left_out]
    port = gateway.ssh_port_for(cluster.vlan_id)
    try:
        config = ssh.render_ssh_config(
            cluster=label,
            nodes=nodes,
            withheld=withheld,
            gateway_host=gateway.address,
            gateway_port=port,
            gateway_user=gateway.ssh_user,
            identity_file=identity_file,
            certificate_file=SSH_CERT_FILE,
            known_hosts_file=SSH_KNOWN_HOSTS_FILE,
            node_user=node_user(cluster),
        )
        patterns = ssh.known_hosts_patterns(cluster=label, nodes=nodes, gateway_host=gateway.address, gateway_port=port)
    except ssh.SSHCertError as exc:
        raise _misconfigured(gateway, "an ssh_config", exc) from None
    revoked = "".join(
        ssh.known_hosts_revoked_line(key, [p for p in patterns if p in names])
        for key, names in _revoked_host_keys()
        if set(names) & set(patterns)  # the hosts this bundle reaches: no other cluster's node names
    )
    return config, ssh.known_hosts_line(host_ca, patterns) + revoked + retired_host_key_lines(gateway, patterns[:1])


@dataclass(frozen=True)
class SshAccess:
    """An issued SSH certificate with what the user downloads. ``private_key`` is set only when the portal
    generated the pair: hand it over once, never store or log it."""

    credential: Credential
    cluster_label: str
    principal: str
    certificate: str
    public_key: str
    private_key: str | None
    ssh_config: str
    known_hosts: str
    #: (name, address, why) of the cluster's nodes the bastion does not relay to (``selectors.bastion_withheld_nodes``)
    withheld: tuple[tuple[str, str, str], ...] = ()

    def __repr__(self) -> str:
        return f"SshAccess(credential={self.credential.pk}, principal={self.principal!r}, private_key=<redacted>)"

    def as_dict(self) -> dict:
        return {
            **_credential_fields(self.credential),
            "principal": self.principal,
            "certificate": self.certificate,
            "public_key": self.public_key,
            "private_key": self.private_key,
            "ssh_config": self.ssh_config,
            "known_hosts": self.known_hosts,
            "withheld_nodes": [
                {"name": name, "address": address, "reason": why} for name, address, why in self.withheld
            ],
        }

    @property
    def zip_name(self) -> str:
        return f"virtcloud-{self.cluster_label}-ssh.zip"

    def zip_bytes(self) -> bytes:
        """One folder with the config, known_hosts, certificate (and the generated key pair), modes set
        so that ``ssh`` accepts the private key after ``unzip``."""
        import io
        import zipfile

        folder = f"virtcloud-{self.cluster_label}/"
        files = [
            (SSH_CONFIG_FILE, self.ssh_config, 0o644),
            (SSH_KNOWN_HOSTS_FILE, self.known_hosts, 0o644),
            (SSH_CERT_FILE, self.certificate + "\n", 0o644),
        ]
        if self.private_key is not None:
            files += [(SSH_KEY_FILE, self.private_key, 0o600), (SSH_KEY_FILE + ".pub", self.public_key + "\n", 0o644)]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, text, mode in files:
                info = zipfile.ZipInfo(folder + name, date_time=timezone.now().timetuple()[:6])
                info.external_attr = (0o100000 | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, text)
        return buffer.getvalue()


@transaction.atomic
def ssh_certificate_issue(*, user, cluster, public_key: str | None = None, label: str = "") -> SshAccess:
    """An OpenSSH user certificate admitting ``user`` to ``cluster`` through the bastion, for the user's
    own public key (we never see their private key) or, without one, for a fresh Ed25519 pair generated
    here and only returned. Principal ``<cluster label>.<user>``, validity ACCESS_SSH_CERT_LIFETIME (or
    up to the cluster's expiry, when that comes first)."""
    from access import ssh

    label_given = credential_label(label)
    (chosen,) = clusters_authorize(user=user, clusters=[cluster])
    gateway = _ssh_gateway(chosen)
    label = selectors.cluster_label(chosen)
    username = user.get_username()
    try:
        ssh.principal(label, username)
    except ssh.SSHCertError as exc:  # a name a certificate cannot hold: asking again cannot help (as for VPN)
        raise CannotIssue(f"cannot certify {username} for cluster {label}: {exc}") from None
    pair = None
    if public_key:
        try:
            parsed = ssh.parse_public_key(public_key)
        except ssh.SSHKeyRejected as exc:
            raise BadPublicKey(str(exc)) from None
        identity_file = _DEFAULT_IDENTITY.get(parsed.key_type, "~/.ssh/id_ecdsa")
    else:
        pair = ssh.generate_user_key(comment=f"virtcloud-{label}-{username}")
        parsed = ssh.parse_public_key(pair.public_line)
        identity_file = SSH_KEY_FILE
    ca_key = _load(_authority(AuthorityKind.SSH_USER))
    serial = serial_allocate("ssh-user")
    now = _now()
    lifetime = _credential_end(now + ssh_cert_lifetime(), [chosen], {}) - now  # never past the cluster's expiry
    hours = lifetime.total_seconds() / 3600
    try:
        certificate = ssh.issue_user_cert(
            ca_key,
            public_key=parsed,
            user=username,
            cluster=label,
            serial=serial,
            hours=hours,
            min_hours=min(0.25, hours),
            max_hours=max(24.0, hours),
            now=now,
        )
    except ssh.SSHCertError as exc:
        raise AccessError(f"cannot certify {username} for cluster {label}: {exc}") from None
    principal = ssh.principal(label, username)
    credential = _record_credential(
        kind=CredentialKind.SSH,
        serial=serial,
        user=user,
        key_id=ssh.key_id(user=username, cluster=label, serial=serial, issued=now),
        fingerprint=parsed.fingerprint,
        clusters=[chosen],
        start=now - ssh.CLOCK_SKEW,
        end=now + lifetime,
        principals=[principal],
        label=label_given,
        generated_key=pair is not None,
    )
    withheld = tuple(selectors.bastion_withheld_nodes([chosen], gateway=gateway).get(chosen.pk, ()))
    config, known_hosts = ssh_config_render(
        cluster=chosen, gateway=gateway, identity_file=identity_file, withheld=withheld
    )
    logger.info(
        "access: issued SSH certificate serial=%s user=%s cluster=%s key=%s until=%s",
        serial,
        username,
        label,
        parsed.fingerprint,
        credential.not_after.isoformat(),
    )
    return SshAccess(
        credential=credential,
        cluster_label=label,
        principal=principal,
        certificate=certificate,
        public_key=pair.public_line if pair else parsed.line,
        private_key=pair.private_openssh.decode() if pair else None,
        ssh_config=config,
        known_hosts=known_hosts,
        withheld=withheld,
    )


def ssh_host_certificate_issue(*, public_key: str, principals: Sequence[str], days: float = 365) -> str:
    """A host certificate from the SSH host CA for the gateway's bastion (``gateway_enrol``), so users never
    see a host-key prompt. A cluster's nodes get theirs from :func:`node_host_certificate_issue`."""
    from access import ssh

    ca_key = _load(_authority(AuthorityKind.SSH_HOST))
    return ssh.issue_host_cert(
        ca_key, public_key=public_key, principals=list(principals), serial=serial_allocate("ssh-host"), days=days
    )


def _credential_fields(credential: Credential) -> dict:
    """What every issued certificate's answer says of its record (for revocation and the user's own records)."""
    return {
        "credential": credential.pk,
        "serial": credential.serial,
        "key_id": credential.key_id,
        "valid_after": credential.not_before,
        "valid_before": credential.not_after,
    }


@dataclass(frozen=True)
class NodeHostCertificate:
    """A node's host certificate, and what the node's sshd needs to let the cluster's people in: the user CA
    key (``TrustedUserCAKeys``) and the principals file of :func:`node_user`."""

    credential: Credential
    cluster_label: str
    node: str
    certificate: str
    principals: tuple[str, ...]
    user_ca: str
    authorized_principals: str
    node_user: str  # the account the principals file is for (``node_user``)

    def as_dict(self) -> dict:
        return {
            **_credential_fields(self.credential),
            "cluster": self.cluster_label,
            "node": self.node,
            "principals": list(self.principals),
            "certificate": self.certificate,
            "user_ca": self.user_ca,
            "node_user": self.node_user,
            "authorized_principals": self.authorized_principals,
        }


#: live node tokens a cluster may have at once (a boot script that mints one per node, or again on each retry,
#: stays far below; one minting in a loop is told to stop)
NODE_TOKENS_PER_CLUSTER = 50


@transaction.atomic
def node_token_issue(*, cluster) -> tuple[ApiToken, str]:
    """A token for ``cluster``'s nodes (the caller may act on the cluster: the API view asks): scope
    ``cluster:node``, bound to the cluster, acting as its owner — it certifies the cluster's nodes' host keys and
    fetches who may log in to them (``HostCertificateView``, ``NodeAccessView``), and nothing else. What a node's
    boot script and timer hold instead of the owner's or the middleware's token: the cluster's people are root on
    its nodes, and read whatever a node holds. Revoked when the cluster ends or changes owner. (record, secret)."""
    from clusters.models import ACTIVE_STATES, VirtualCluster

    locked = VirtualCluster.objects.select_for_update(no_key=True).select_related("owner").get(pk=cluster.pk)
    label = selectors.cluster_label(locked)
    if locked.state not in ACTIVE_STATES:
        raise ClusterNotReady(f"cluster {label} is {locked.get_state_display()}: its nodes need no token")
    if ApiToken.objects.filter(cluster=locked, revoked_at=None).count() >= NODE_TOKENS_PER_CLUSTER:
        raise ClusterNotReady(
            f"cluster {label} has {NODE_TOKENS_PER_CLUSTER} live node tokens already: use one of them (they end with "
            "the cluster)"
        )
    return token_create(user=locked.owner, name=f"nodes of {label}", scopes=[TokenScope.CLUSTER_NODE], cluster=locked)


def node_tokens_revoke(*, cluster_id: int, keep_user_id: int | None = None) -> int:
    """Revoke the live node tokens of a cluster (it ended; with ``keep_user_id``, those made for anyone but that
    user: it changed owner); how many."""
    live = list(ApiToken.objects.filter(cluster_id=cluster_id, revoked_at=None).exclude(user_id=keep_user_id))
    for token in live:
        token_revoke(token=token)
    return len(live)


@transaction.atomic
def node_host_certificate_issue(
    *, user, cluster, node, public_key: str, as_admin: bool = False, sees_all: bool = False
) -> NodeHostCertificate:
    """A host certificate from the SSH host CA for ``node`` (its id or name) of ``cluster`` (an id or object),
    for the node's own public key (its private key never leaves the node). Its one principal is the node's alias
    (:func:`access.ssh.node_host_names`: ``<node>.<cluster>``, never its address, which the owner picks), which
    the downloaded ssh_config checks it as (``HostKeyAlias``), so ``ssh <node>.<cluster>`` checks it against the
    host CA without a prompt; it lives
    ACCESS_SSH_HOST_CERT_LIFETIME, never past the cluster's expiry.

    For the cluster's owner, or (``as_admin``) an admin who may change clusters or the middleware: the
    certificate vouches for the node to everyone who enters the cluster, so a group member, who may only enter
    it, is refused (403), and so is an admin who may only view clusters (``sees_all``). A cluster the caller
    cannot see, or a node it does not have (live), is a 404; a cluster whose nodes are
    going or gone (tearing down, torn down, failed) or whose lifetime is over, a 409. A public cluster's nodes
    may have one too (users reach them at their addresses). Recorded as a credential of the cluster, with the
    key: it is revoked when the cluster ends, and a revoked host key goes into every SSH profile's
    ``known_hosts`` as ``@revoked`` (ssh refuses it and its certificates). The cluster's row is locked until
    the record commits, so a teardown either ended it first (409) or finds the record and revokes it."""
    from access import ssh

    found, label, chosen = _owned_live_node(
        user=user,
        cluster=cluster,
        node=node,
        as_admin=as_admin,
        sees_all=sees_all,
        lock=True,
        refusal="certifies its nodes' host keys (a host certificate vouches for a node to everyone who enters the "
        "cluster)",
    )
    try:
        parsed = ssh.parse_public_key(public_key)
    except ssh.SSHKeyRejected as exc:
        raise BadPublicKey(str(exc)) from None
    if Credential.objects.filter(
        kind=CredentialKind.SSH_HOST, fingerprint=parsed.fingerprint, revoked_at__isnull=False
    ).exists():
        raise BadPublicKey(f"host key {parsed.fingerprint} was revoked: generate a new host key for the node")
    principals = ssh.node_host_names(label, chosen.name)
    holder = _host_key_in_use(parsed.fingerprint, cluster_id=found.pk, node=principals[0])
    if holder is not None:
        raise BadPublicKey(f"host key {parsed.fingerprint} is {holder}'s: generate a host key of the node's own")
    now = _now()
    credential, certificate = _host_certificate_record(
        user=user,
        cluster=found,
        label=label,
        parsed=parsed,
        principals=principals,
        now=now,
        end=_credential_end(now + ssh_host_cert_lifetime(), [found], {}),
    )
    return NodeHostCertificate(
        credential=credential,
        cluster_label=label,
        node=chosen.name,
        certificate=certificate,
        principals=tuple(principals),
        user_ca=_authority(AuthorityKind.SSH_USER).public_key,
        authorized_principals=_node_authorized_principals(found, label),
        node_user=node_user(found),
    )


def _host_certificate_record(
    *, user, cluster, label: str, parsed, principals: Sequence[str], now: dt.datetime, end: dt.datetime, why: str = ""
) -> tuple[Credential, str]:
    """Sign a host certificate of the host CA for ``parsed`` (a node's key) with ``principals`` until ``end``, and
    record it as a credential of ``cluster`` asked for by ``user`` (the caller holds the cluster's row lock)."""
    from access import ssh

    serial = serial_allocate("ssh-host")
    try:
        certificate = ssh.issue_host_cert(
            _load(_authority(AuthorityKind.SSH_HOST)),
            public_key=parsed,
            principals=list(principals),
            serial=serial,
            until=end,
            now=now,
        )
    except ssh.SSHCertError as exc:
        raise CannotIssue(f"cannot certify the host key of {principals[0]}: {exc}") from None
    credential = Credential.objects.create(
        kind=CredentialKind.SSH_HOST,
        serial=serial,
        user=user,
        key_id=ssh.host_key_id(principals[0], serial),
        fingerprint=parsed.fingerprint,
        public_key=parsed.line,
        certificate=certificate,
        principals=list(principals),
        not_before=now - ssh.CLOCK_SKEW,
        not_after=end,
    )
    CredentialCluster.objects.create(credential=credential, cluster_id=cluster.pk, label=label)
    logger.info(
        "access: issued SSH host certificate serial=%s node=%s key=%s until=%s for %s%s",
        serial,
        principals[0],
        parsed.fingerprint,
        end.isoformat(),
        user.get_username(),
        why,
    )
    return credential, certificate


def _owned_live_node(*, user, cluster, node, as_admin: bool, lock: bool, refusal: str, sees_all: bool = False):
    """(cluster, its label, node) for what a node's sshd gets from the portal (:func:`node_host_certificate_issue`,
    :func:`node_access_current`): ``node`` (an id or name) of ``cluster`` (an id or object) if the caller is its
    owner or (``as_admin``) an admin who may change clusters or the middleware — a group member, or an admin who
    only sees every cluster (``sees_all``), is refused (403, "only the owner ... ``refusal``"). 404 for a cluster
    the caller cannot see or a node it does not have (live); 409 for a cluster
    whose nodes are going or gone or whose lifetime is over. ``lock``: the cluster's row stays locked until the
    caller's transaction ends."""
    from clusters.models import ACTIVE_STATES, Node, NodeState, VirtualCluster

    pk = _cluster_id(cluster)
    if as_admin or sees_all:
        visible = VirtualCluster.objects.all()
    elif not user.is_active:  # only a node token of the cluster admits one (portal.tokens): the cluster runs on
        visible = VirtualCluster.objects.filter(owner=user)
    else:
        visible = selectors.clusters_user_belongs_to(user)
    visible = visible.select_related(None).select_related("owner")
    if lock:
        visible = visible.select_for_update(of=("self",), no_key=True)
    found = visible.filter(pk=pk).first()
    if found is None:
        raise NotFound(f"no cluster {pk} among yours", field="cluster")
    label = selectors.cluster_label(found)
    if not as_admin and found.owner_id != user.pk:
        raise NotAllowed(f"only the owner of cluster {label}, an admin or the middleware {refusal}")
    if found.state not in ACTIVE_STATES:  # tearing down, torn down, failed
        raise ClusterNotReady(f"cluster {label} is {found.get_state_display()}: its nodes are gone")
    if found.expires_at <= timezone.now():
        raise ClusterNotReady(
            f"the lifetime of cluster {label} ended at {found.expires_at.isoformat()}: it is being torn down"
        )
    wanted = str(node).strip()
    live = Node.objects.filter(cluster=found).exclude(state=NodeState.REMOVED)
    if wanted.isascii() and wanted.isdigit():  # an id (names start with a letter)
        chosen = live.filter(pk=int(wanted)).first() if int(wanted) < 1 << 63 else None
    else:
        chosen = live.filter(name=wanted).first()
    if chosen is None:
        raise NotFound(f"cluster {label} has no node {wanted!r}", field="node")
    return found, label, chosen


def node_user(cluster) -> str:
    """The account the cluster's people log in as on its nodes: ``root`` (:data:`access.ssh.NODE_USER`) when the
    cluster's users have admin rights, or when it is closed and its nodes boot an image a user registered (its
    owner made it: root there is theirs whatever the portal says, and the provider's accounts need not exist in
    it); else ``ACCESS_SSH_NODE_USER``, an account of the provider's images (and of a user's image the provider
    approved: approving it vouches for that account) — a public cluster's people without admin rights are never
    root (paper §2.1).
    The nodes' principals file is that account's, and the ssh_config's ``User``."""
    from access import ssh
    from clusters.models import Connectivity, Image

    if cluster.admin_rights:
        return ssh.NODE_USER
    if (
        cluster.connectivity == Connectivity.CLOSED
        and Image.objects.filter(pk=cluster.image_id, owner__isnull=False).exists()
    ):
        return ssh.NODE_USER
    return settings.ACCESS_SSH_NODE_USER


def _node_authorized_principals(cluster, label: str) -> str:
    """The principals file of :func:`node_user` on the cluster's nodes, as the people are now."""
    from access import ssh

    return ssh.render_authorized_principals(label, cluster_principals([cluster])[cluster.pk])


@dataclass(frozen=True)
class NodeAccess:
    """Who may log in to a node now: what its sshd reads beside its host certificate, fetched again from a
    timer on the node so that someone who left the group, or a revoked user certificate, is refused there."""

    cluster_label: str
    node: str
    user_ca: str
    authorized_principals: str
    krl: bytes
    node_user: str  # the account the principals file is for (``node_user``)
    #: (its record, the certificate): the node's host certificate issued again, to the cluster's new end
    host_certificate: tuple[Credential, str] | None = None

    def as_dict(self) -> dict:
        renewed = None
        if self.host_certificate is not None:
            credential, certificate = self.host_certificate
            renewed = {
                **_credential_fields(credential),
                "principals": credential.principals,
                "certificate": certificate,
            }
        return {
            "cluster": self.cluster_label,
            "node": self.node,
            "node_user": self.node_user,
            "authorized_principals": self.authorized_principals,
            "krl": base64.b64encode(self.krl).decode(),
            "user_ca": self.user_ca,
            "host_certificate": renewed,
        }


def node_access_current(
    *,
    user,
    cluster,
    node,
    as_admin: bool = False,
    sees_all: bool = False,
    host_key: str = "",
    has_certificate: str = "",
) -> NodeAccess:
    """What ``node`` of ``cluster``'s sshd needs to admit exactly the cluster's people as they are now: the
    principals file of :func:`node_user` (the owner and the group's members now), the user CA key
    (``TrustedUserCAKeys``) and the user CA's current KRL (``RevokedKeys``). Asked as a host certificate is
    (:func:`node_host_certificate_issue`): the owner, an admin or the middleware; 404, 403 and 409 alike.

    ``host_key``: the node's host public key. When the certificate recorded for it ends before the cluster now
    ends (its lifetime was extended since), a new one is issued and answered (:func:`_host_certificate_renew`);
    ``has_certificate``: the ``certificate_digest`` of the certificate the node has, and when that is not the
    newest recorded for the key there, the newest is answered again (an answer that carried it was lost)."""
    found, label, chosen = _owned_live_node(
        user=user,
        cluster=cluster,
        node=node,
        as_admin=as_admin,
        sees_all=sees_all,
        lock=False,
        refusal="reads who may log in to its nodes (as it certifies their host keys)",
    )
    renewed = _host_certificate_renew(
        user=user, cluster=found, label=label, node=chosen, host_key=host_key, has=has_certificate
    )
    return NodeAccess(
        cluster_label=label,
        node=chosen.name,
        user_ca=_authority(AuthorityKind.SSH_USER).public_key,
        authorized_principals=_node_authorized_principals(found, label),
        node_user=node_user(found),
        krl=krl_current(),
        host_certificate=renewed,
    )


def _host_certificate_renew(
    *, user, cluster, label: str, node, host_key: str, has: str = ""
) -> tuple[Credential, str] | None:
    """The host certificate of ``node``'s key ``host_key`` issued again — the same key and principals, valid until
    the cluster now ends — when the newest one recorded for that key and node ends before a new one would
    (:func:`_host_certificate_due`); else that newest one when the node has another (``has``: the digest of the
    certificate it has; the answer that carried the newest was lost, or the POST's); None when neither, or none is
    recorded (a key never certified there), or the key was revoked (a certificate of it was). Recorded like any
    issuance; the old certificate is left to expire. Under the cluster's row lock, as issuance: a teardown either
    ended the cluster first (nothing issued) or revokes this one too."""
    from access import ssh
    from clusters.models import ACTIVE_STATES, VirtualCluster

    if not host_key:
        return None
    try:
        parsed = ssh.parse_public_key(host_key)
    except ssh.SSHKeyRejected as exc:
        raise BadPublicKey(str(exc)) from None
    alias = ssh.node_alias(label, node.name)

    def recorded() -> Credential | None:
        rows = Credential.objects.filter(kind=CredentialKind.SSH_HOST, fingerprint=parsed.fingerprint)
        if rows.filter(revoked_at__isnull=False).exists():
            return None  # a revoked key is never certified again (its older certificates are not revoked too)
        rows = rows.for_cluster(cluster.pk).order_by("-not_after", "-pk")
        return next((c for c in rows if (c.principals or [""])[0] == alias), None)

    def unless_had(newest: Credential) -> tuple[Credential, str] | None:
        if not has or not newest.certificate or certificate_digest(newest.certificate) == has:
            return None  # (one recorded before certificates were kept was answered when issued)
        return newest, newest.certificate

    stored = recorded()
    if stored is None:
        return None
    if _host_certificate_due(stored, cluster) is None:
        return unless_had(stored)  # (the usual answer, without a lock)
    with transaction.atomic():
        locked = VirtualCluster.objects.select_for_update(no_key=True).get(pk=cluster.pk)
        stored = recorded()
        if locked.state not in ACTIVE_STATES or stored is None:
            return None  # ended meanwhile: its certificates are being revoked
        now = _now()
        end = _host_certificate_due(stored, locked, now=now)
        if end is None:  # another request renewed it meanwhile
            return unless_had(stored)
        return _host_certificate_record(
            user=user,
            cluster=locked,
            label=label,
            parsed=parsed,
            principals=stored.principals,
            now=now,
            end=end,
            why=f" (renewed: serial {stored.serial} ended at {stored.not_after.isoformat()})",
        )


def _host_certificate_due(stored: Credential, cluster, *, now: dt.datetime | None = None) -> dt.datetime | None:
    """When a host certificate issued now would end, if ``stored`` (a node's) should be issued again: it ends
    before that, and either the new one reaches the cluster's end (the cluster's lifetime was extended since) or
    ``stored`` has less than half of ``ACCESS_SSH_HOST_CERT_LIFETIME`` left (a cluster that outlives that
    lifetime: renewed once, not at every request). None when it need not be."""
    now = now or _now()
    lifetime = ssh_host_cert_lifetime()
    if cluster.expires_at <= now:
        return None
    end = _credential_end(now + lifetime, [cluster], {})
    reaches_the_end = end >= cluster.expires_at.replace(microsecond=0)
    if stored.not_after < end and (reaches_the_end or stored.not_after < now + lifetime / 2):
        return end
    return None


def _revoked_host_keys() -> list[tuple[str, list[str]]]:
    """(key, the host names it was certified for) of nodes whose host certificate was revoked and has not
    expired (give or take the clock skew): ssh must refuse them for those names (``@revoked`` in the
    profiles' known_hosts)."""
    from access import ssh

    rows = Credential.objects.filter(
        kind=CredentialKind.SSH_HOST, revoked_at__isnull=False, not_after__gt=_now() - ssh.CLOCK_SKEW
    ).exclude(public_key="")
    return [(key, list(names)) for key, names in rows.order_by("serial").values_list("public_key", "principals")]


def _host_key_in_use(fingerprint: str, *, cluster_id: int, node: str) -> str | None:
    """Who else has host key ``fingerprint``: a gateway's bastion, or another node with a live host certificate
    (the same node asking again — a longer lifetime — is fine). Whoever asks chooses the key; certifying, then
    revoking, someone else's would have it refused for that host's names."""
    from access import ssh

    for gateway in Gateway.objects.exclude(ssh_host_certificate=""):
        if ssh.certificate_key_fingerprint(gateway.ssh_host_certificate) == fingerprint:
            return f"gateway {gateway.name}'s bastion"
    others = (
        Credential.objects.live(timezone.now())
        .filter(kind=CredentialKind.SSH_HOST, fingerprint=fingerprint)
        .prefetch_related("clusters")
    )
    for other in others:
        links = list(other.clusters.all())
        if any(link.cluster_id != cluster_id for link in links) or (other.principals or [""])[0] != node:
            return "another node"
    return None


# --- revocation ----------------------------------------------------------------------------------------------------


def _crl_entries(now: dt.datetime) -> list[pki.RevokedEntry]:
    # An expired certificate is refused anyway: listing it would only grow the CRL.
    rows = Credential.objects.filter(
        kind=CredentialKind.VPN, revoked_at__isnull=False, not_after__gt=now - pki.CLOCK_SKEW
    ).values_list("serial", "revoked_at", "revocation_reason")
    return [pki.RevokedEntry(serial, revoked_at, reason or "unspecified") for serial, revoked_at, reason in rows]


def _crl_regenerate(row: Authority) -> Authority:
    """Sign a new CRL onto ``row`` (locked by the caller)."""
    now = _now()
    ca = _load(row)
    number = row.revocation_number + 1
    crl = pki.build_crl(ca, _crl_entries(now), crl_number=number, this_update=now, next_update=now + crl_validity())
    row.revocation_number = number
    row.revocation_list = pki.crl_to_pem(crl).decode()
    row.revocation_updated_at = now
    row.revocation_next_update = now + crl_validity()
    row.save(update_fields=["revocation_number", "revocation_list", "revocation_updated_at", "revocation_next_update"])
    return row


def _krl_regenerate(row: Authority) -> Authority:
    """Write a new KRL of the revoked, unexpired SSH certificates onto ``row`` (locked by the caller)."""
    from access import ssh

    now = _now()
    # Kept while a gateway whose clock is behind by up to the tolerated skew still takes it as unexpired.
    serials = list(
        Credential.objects.filter(
            kind=CredentialKind.SSH, revoked_at__isnull=False, not_after__gt=now - ssh.CLOCK_SKEW
        ).values_list("serial", flat=True)
    )
    number = row.revocation_number + 1
    krl = ssh.build_krl(ca_public_key=row.public_key, serials=serials, version=number, comment="virtcloud")
    row.revocation_number = number
    row.revocation_list = base64.b64encode(krl).decode()
    row.revocation_updated_at = now
    row.revocation_next_update = None
    row.save(update_fields=["revocation_number", "revocation_list", "revocation_updated_at", "revocation_next_update"])
    return row


def _locked_authority(kind: str) -> Authority:
    _authority(kind)  # create on first use, outside the lock
    return Authority.objects.select_for_update().get(kind=kind)


def _refresh_margin() -> dt.timedelta:
    # Re-sign when less than half the validity is left: gateways pulling every few minutes never hold an
    # expiring CRL, and OpenVPN refuses every client once next_update has passed.
    return crl_validity() / 2


def _crl_fresh(row: Authority) -> bool:
    return bool(
        row.revocation_list
        and row.revocation_next_update
        and row.revocation_next_update - timezone.now() > _refresh_margin()
    )


def crl_current() -> str:
    """The VPN CA's CRL (PEM), re-signed when a revocation happened or it is getting old."""
    row = _authority(AuthorityKind.VPN)
    if _crl_fresh(row):
        return row.revocation_list
    with transaction.atomic():
        row = _locked_authority(AuthorityKind.VPN)
        if not _crl_fresh(row):  # another request may have re-signed it while this one waited for the lock
            _crl_regenerate(row)
    return row.revocation_list


def krl_current() -> bytes:
    """The SSH user CA's KRL (``ssh-keygen -k`` binary format)."""
    row = _authority(AuthorityKind.SSH_USER)
    if not row.revocation_list:
        with transaction.atomic():
            row = _locked_authority(AuthorityKind.SSH_USER)
            if not row.revocation_list:
                _krl_regenerate(row)
    return base64.b64decode(row.revocation_list)


def _local_gateways():
    return Gateway.objects.filter(enabled=True).exclude(local_state_dir="")


def _install_local_gateways(gateways: Iterable[Gateway] | None = None) -> None:
    """Gateways on this host (of ``gateways``, default all) get the new state at once: CRL/KRL installed, then
    exactly the revoked sessions cut (``access.gateway.pull``). Remote gateways do the same at their next pull."""
    from access.gateway import pull
    from access.gateway.state import StateError

    for gateway in _local_gateways() if gateways is None else gateways:
        doc = gateway_state(gateway=gateway)
        try:
            report = pull.install_state(gateway.local_state_dir, doc)
        except (StateError, OSError) as exc:
            logger.warning("access: gateway %s: could not install the new state: %s", gateway.name, exc)
            continue
        gateway_pulled(gateway=gateway, installed=doc["generated_at"])
        for error in report.cut_errors:
            logger.warning("access: gateway %s: could not cut a session: %s", gateway.name, error)
        if report.cut or report.ssh_cut:
            logger.info(
                "access: gateway %s: cut the sessions of VPN serials %s, SSH serials %s",
                gateway.name,
                report.cut,
                report.ssh_cut,
            )


def gateways_install_ready_cluster(*, cluster_id: int) -> int:
    """A closed cluster became ready: the gateways on this host that carry it get a state with it at once, as a
    revocation's (the others at their next pull; ``selectors.clusters_access_ready`` tells when all have it) —
    and those without a site, when another core's cluster holds its VLAN id too (they drop both). Call it after
    the commit that made the cluster ready. Returns how many gateways it went to."""
    from clusters.models import Connectivity, VirtualCluster

    gateways = list(_local_gateways())
    if not gateways:
        return 0
    cluster = VirtualCluster.objects.filter(
        pk=cluster_id, connectivity=Connectivity.CLOSED, state__in=selectors.enterable_states()
    ).first()
    if cluster is None:  # public, or ended again already: no gateway map changes
        return 0
    carries = selectors.gateway_carries([cluster])
    # a gateway without a site whose map holds another core's cluster on this id must drop it now, not at its
    # next pull: until then it would put that cluster's users on this VLAN too (``selectors.ambiguous_vlans``)
    shared = selectors.ambiguous_vlans().filter(vlan_id=cluster.vlan_id).exists()
    gateways = [g for g in gateways if carries(g) or (shared and g.site_id is None)]
    _install_local_gateways(gateways)
    logger.info("access: cluster %s is ready: its state went to gateways %s", cluster_id, [g.name for g in gateways])
    return len(gateways)


def _revoke_rows(credentials: Sequence[Credential], *, reason: str, by=None, note: str = "") -> int:
    """Revoke the given rows (locked by the caller), rewrite the CRL/KRL once, cut sessions after commit."""
    return _revoke_each([(credential, reason, note) for credential in credentials], by=by)


def _revoke_each(items: Sequence[tuple[Credential, str, str]], *, by=None) -> int:
    """Revoke each ``(row, reason, note)`` (rows locked by the caller). However many there are, the CRL and the
    KRL are rewritten (and signed) once each and the gateways on this host get the new state once, after commit:
    one event that revokes hundreds (a group deleted) is not hundreds of signatures over a growing list, with
    the authority's row locked all along."""
    for _credential, reason, _note in items:
        if reason not in RevocationReason.values:
            raise AccessError(f"unknown revocation reason {reason!r}", field="reason")
    now = timezone.now()
    kinds: set[str] = set()
    done = 0
    for credential, reason, note in items:
        if credential.revoked_at is not None:
            continue
        credential.revoked_at = now
        credential.revocation_reason = reason
        credential.revoked_by = by if getattr(by, "pk", None) else None
        credential.revocation_note = (note or (f"by {by.get_username()}" if by is not None else "system"))[:200]
        credential.save(update_fields=["revoked_at", "revocation_reason", "revoked_by", "revocation_note"])
        kinds.add(credential.kind)
        logger.info(
            "access: revoked %s serial=%s user=%s reason=%s (%r)",
            credential.kind,
            credential.serial,
            credential.user.get_username(),
            reason,
            credential.revocation_note,
        )
        done += 1
    if CredentialKind.VPN in kinds:
        _crl_regenerate(_locked_authority(AuthorityKind.VPN))
    if CredentialKind.SSH in kinds:
        _krl_regenerate(_locked_authority(AuthorityKind.SSH_USER))
    if done:
        _install_local_gateways_after_commit()
    return done


def _install_local_gateways_after_commit() -> None:
    """``_install_local_gateways`` once the transaction commits — once, however many revocations it made (a
    hook a rolled-back savepoint dropped is queued again by the next one)."""
    queued = transaction.get_connection().run_on_commit
    if not any(func is _install_local_gateways for _savepoints, func, _robust in queued):
        transaction.on_commit(_install_local_gateways)


@transaction.atomic
def credential_revoke(*, credential: Credential, reason: str, by=None, note: str = "") -> bool:
    """Revoke one credential (idempotent: False if it already was). The CRL/KRL is rewritten at once."""
    done = credentials_revoke(ids=[credential.pk], reason=reason, by=by, note=note) == 1
    credential.refresh_from_db()
    return done


@transaction.atomic
def credentials_revoke(*, ids: Iterable[int], reason: str, by=None, note: str = "") -> int:
    """Revoke the credentials ``ids`` together (all or none, the CRL/KRL re-signed once); returns how many
    were not revoked before."""
    rows = list(
        Credential.objects.filter(pk__in=list(ids))
        .select_for_update(of=("self",))
        .select_related("user")
        .order_by("pk")
    )
    return _revoke_rows(rows, reason=reason, by=by, note=note)


@transaction.atomic
def credentials_revoke_for(*, user=None, cluster=None, reason: str, by=None, note: str = "") -> int:
    """Revoke every live credential of ``user`` and/or covering ``cluster`` (an object or an id)."""
    if user is None and cluster is None:
        raise ValueError("credentials_revoke_for needs a user or a cluster")
    qs = Credential.objects.live(timezone.now())
    if user is not None:
        lock_holders([user.pk])  # an issuance in flight for this user records its row first, or sees this
        # what admits the user: the host certificates they asked for vouch for their clusters' nodes
        qs = qs.filter(user=user, kind__in=USER_KINDS)
    if cluster is not None:
        qs = qs.for_cluster(_cluster_id(cluster))
    rows = list(qs.select_for_update(of=("self",)).select_related("user").order_by("pk"))
    return _revoke_rows(rows, reason=reason, by=by, note=note)


_ENDED_OR_ENDING = ("gone", "tearing_down", "torn_down", "failed", "requested", "provisioning")


@transaction.atomic
def credentials_revoke_unauthorized(
    *, user=None, users: Iterable | None = None, cluster=None, clusters: Iterable[int] | None = None
) -> int:
    """Re-check live credentials of ``user`` (or of each of ``users``: one revocation for all) and/or covering
    ``cluster`` (or any of the ids ``clusters``) against the membership rule and revoke those admitting to a
    cluster their holder may no longer enter (left the group, the cluster's owner left it, the cluster changed
    group or owner, ended, became public)."""
    from clusters.models import Connectivity, VirtualCluster

    # (a node's host certificate is not its requester's to lose: it ends with the cluster)
    qs = Credential.objects.live(timezone.now()).filter(kind__in=USER_KINDS)
    holders = [user.pk] if user is not None else sorted({u.pk for u in users}) if users is not None else None
    if holders is not None:
        lock_holders(holders)  # an issuance in flight for these users records its row first, or sees this
        qs = qs.filter(user_id__in=holders)
    if cluster is not None:
        qs = qs.for_cluster(_cluster_id(cluster))
    if clusters is not None:  # (a subquery: no join to deduplicate under FOR UPDATE)
        qs = qs.filter(pk__in=CredentialCluster.objects.filter(cluster_id__in=list(clusters)).values("credential_id"))
    rows = list(qs.select_for_update(of=("self",)).select_related("user").prefetch_related("clusters").order_by("pk"))
    if not rows:
        return 0
    items: list[tuple[Credential, str, str]] = []
    by_user: dict[int, set[int]] = {}
    for credential in rows:
        if credential.user_id not in by_user:
            by_user[credential.user_id] = set(
                selectors.clusters_user_may_enter(credential.user).values_list("pk", flat=True)
            )
        lost = [c for c in credential.clusters.all() if c.cluster_id not in by_user[credential.user_id]]
        if not lost:
            continue
        states = {
            pk: (state, connectivity)
            for pk, state, connectivity in VirtualCluster.objects.filter(
                pk__in=[c.cluster_id for c in lost]
            ).values_list("pk", "state", "connectivity")
        }
        # Gone from the gateways (ended, ending, or no longer closed) rather than the holder leaving.
        ended = [
            c
            for c in lost
            if states.get(c.cluster_id, ("gone", ""))[0] not in selectors.enterable_states()
            or states[c.cluster_id][1] != Connectivity.CLOSED
        ]
        if ended:
            reason = RevocationReason.CESSATION_OF_OPERATION
            state, connectivity = states.get(ended[0].cluster_id, ("gone", ""))
            note = f"cluster {ended[0].label} is {state if state in _ENDED_OR_ENDING else connectivity}"
        else:
            reason = RevocationReason.AFFILIATION_CHANGED
            note = f"{credential.user.get_username()} may no longer enter cluster {lost[0].label}"
        items.append((credential, reason, note))
    return _revoke_each(items)


#: how long before a publish profile ends (one its clusters outlive) its holder gets an e-mail
PUBLISH_EXPIRY_NOTICE = dt.timedelta(days=7)


def credentials_mail_expiring(*, limit: int = 200) -> list[int]:
    """An e-mail to the holder of each publish profile (a router bridging a cluster into their network) that ends
    within ``PUBLISH_EXPIRY_NOTICE`` while every cluster it admits to lives on: the router loses access then,
    unless a new profile is installed. Once per profile: claimed before it is sent, given back when the relay
    cannot take it now (the next run tries again), not when it refuses it for good. A profile that ends with
    its cluster is the cluster's e-mail's business; a holder without an address is not mailed. Returns the
    credentials mailed."""
    from django.db.models import Exists, OuterRef

    from clusters.models import ACTIVE_STATES, VirtualCluster
    from portal import mail

    if not settings.EMAIL_ENABLED:
        return []
    now = timezone.now()
    # a cluster it admits to that does not outlive it (ended, ending first): the cluster's e-mail's business
    outliving = VirtualCluster.objects.filter(state__in=ACTIVE_STATES, expires_at__gt=OuterRef(OuterRef("not_after")))
    links = CredentialCluster.objects.filter(credential=OuterRef("pk"))
    due = (
        Credential.objects.filter(
            kind=CredentialKind.VPN,
            published=True,
            revoked_at=None,
            expiry_mailed=False,
            not_after__gt=now,
            not_after__lte=now + PUBLISH_EXPIRY_NOTICE,
        )
        .exclude(user__email="")
        .filter(Exists(links))
        .exclude(Exists(links.exclude(cluster_id__in=outliving.values("pk"))))
        .select_related("user")
        .prefetch_related("clusters")
        .order_by("not_after")[:limit]
    )
    mailed = []
    budget = mail.Budget()
    for credential in due:
        if not budget.left():
            break  # the rest: the next run
        claim = Credential.objects.filter(pk=credential.pk, expiry_mailed=False)
        if not claim.update(expiry_mailed=True):
            continue  # another run
        given = Credential.objects.filter(pk=credential.pk)
        if mail.send_claimed(
            give_back=lambda given=given: given.update(expiry_mailed=False),
            to=credential.user.email,
            subject=f"VirtCloud: your publish VPN profile {credential.serial} ends "
            f"{credential.not_after.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC",
            body=_publish_expiry_body(credential),
        ):
            mailed.append(credential.pk)
    return mailed


def _publish_expiry_body(credential: Credential) -> str:
    user = credential.user
    labels = ", ".join(link.label for link in credential.clusters.all())
    named = f" ({credential.label})" if credential.label else ""
    return (
        f"Hello {user.get_short_name() or user.get_username()},\n\n"
        f"your publish VPN profile {credential.serial}{named}, which bridges {labels} into your network, ends at "
        f"{credential.not_after.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC. The router that uses it loses access to "
        "the cluster then, although the cluster lives on.\n\n"
        f"Download a new publish profile on {settings.SITE_URL.rstrip('/')}/access/ and install it on the router "
        "before then.\n\n"
        "-- \nVirtCloud portal\n"
    )


def credentials_sweep() -> int:
    """Periodic safety net (``access.sweep_credentials``): revoke the live credentials that still admit to a
    cluster which ended, is ending, is no longer closed or is gone, and the host certificates of nodes of a
    cluster that is ending, ended or gone. Each of those events revokes at once (``cluster_ended`` after the
    commit that ends a cluster, the save signals in its transaction); this catches one that did not run (a
    worker that died between that commit and the signal, a signal that failed). One query when there is
    nothing to do; returns how many were revoked."""
    from django.db.models import Q

    from clusters.models import ACTIVE_STATES, Connectivity, VirtualCluster

    open_clusters = VirtualCluster.objects.filter(
        connectivity=Connectivity.CLOSED, state__in=selectors.enterable_states()
    ).values("pk")
    with_nodes = VirtualCluster.objects.filter(state__in=ACTIVE_STATES).values("pk")
    stale = (
        CredentialCluster.objects.filter(credential__in=Credential.objects.live(timezone.now()))
        .filter(
            Q(credential__kind__in=USER_KINDS) & ~Q(cluster_id__in=open_clusters)
            | Q(credential__kind=CredentialKind.SSH_HOST) & ~Q(cluster_id__in=with_nodes)
        )
        .values_list("cluster_id", "credential__kind")
        .distinct()
    )
    done = 0
    for cluster_id, kind in sorted(stale):
        if kind == CredentialKind.SSH_HOST:
            done += credentials_revoke_for(
                cluster=cluster_id,
                reason=RevocationReason.CESSATION_OF_OPERATION,
                note=f"cluster {cluster_id} ended (found by the sweep)",
            )
        else:
            done += credentials_revoke_unauthorized(cluster=cluster_id)
    if done:
        logger.warning("access: the sweep revoked %d credential(s) of ended clusters that had been missed", done)
    return done


# --- gateway state ---------------------------------------------------------------------------------------------


def _vlan_map(gateway: Gateway) -> tuple[dict[str, int], list]:
    """The closed clusters users may enter through ``gateway`` (label → VLAN), and those clusters: the ones whose
    VLAN its trunk carries — at a gateway's site, only clusters whose core reaches the site (the same id may be
    another core's cluster there); without a site, none whose id two clusters hold
    (``selectors.ambiguous_vlans``)."""
    from clusters.models import VirtualCluster

    closed = VirtualCluster.objects.filter(selectors.enterable_condition(), vlan_id__isnull=False)
    if gateway.site_id is not None:
        closed = closed.filter(segment__allocation__pool__core__sites=gateway.site_id)
    else:
        ambiguous = sorted(selectors.ambiguous_vlans())
        if ambiguous:
            logger.warning(
                "access: gateway %s has no site and VLANs %s are each held by clusters of more than one core: "
                "it carries none of them (give it a site)",
                gateway.name,
                ambiguous,
            )
            closed = closed.exclude(vlan_id__in=ambiguous)
    clusters = list(closed.select_related("owner", "group").order_by("pk"))
    return {selectors.cluster_label(c): c.vlan_id for c in clusters}, clusters


def ssh_principal(cluster, user) -> str:
    """The SSH principal admitting ``user`` to ``cluster`` (on the bastion: ``<cluster label>.<user>``)."""
    from access import ssh

    return ssh.principal(selectors.cluster_label(cluster), user.get_username())


def cluster_principals(clusters: Sequence) -> dict[int, list[str]]:
    """Per cluster (by id), the SSH principals of the people who may enter it — its active owner and its
    group's active members — sorted: what the bastion admits to its nodes (the gateway's state) and what
    each node's sshd admits (:func:`access.ssh.render_authorized_principals`). ``clusters`` need ``owner``
    loaded."""
    from django.contrib.auth import get_user_model

    from access import ssh

    group_ids = {c.group_id for c in clusters if c.group_id}
    members: dict[int, list] = {}
    owners_in: set[tuple[int, int]] = set()  # (owner, group): the share holds while its owner is in the group
    if group_ids:
        active = get_user_model().objects.filter(groups__in=group_ids, is_active=True)
        for u in active.prefetch_related("groups").distinct():
            for g in u.groups.all():
                members.setdefault(g.pk, []).append(u)
        owners_in = set(
            get_user_model()
            .groups.through.objects.filter(group_id__in=group_ids, user_id__in={c.owner_id for c in clusters})
            .values_list("user_id", "group_id")
        )
    out: dict[int, list[str]] = {}
    for cluster in clusters:
        people = {cluster.owner.pk: cluster.owner} if cluster.owner.is_active else {}
        shared = (cluster.owner_id, cluster.group_id) in owners_in  # (``clusters.selectors.shared_with``)
        for u in members.get(cluster.group_id, []) if shared else []:
            people[u.pk] = u
        principals = []
        for u in people.values():
            try:
                principals.append(ssh_principal(cluster, u))
            except ssh.SSHCertError:  # a user name that cannot be a principal gets no certificate either
                continue
        out[cluster.pk] = sorted(principals)
    return out


def _principals_map(clusters: Sequence, *, gateway: Gateway) -> dict[str, dict]:
    from access import ssh
    from clusters.models import Node, NodeState

    principals = cluster_principals(clusters)
    # the nodes ``gateway``'s bastion does not relay to are never targets (the same rule as the ssh_config's)
    withheld = {
        (cluster_id, name)
        for cluster_id, rows in selectors.bastion_withheld_nodes(clusters, gateway=gateway).items()
        for name, _address, _why in rows
    }
    nodes: dict[int, list] = {}
    for node in Node.objects.filter(cluster__in=clusters).exclude(state=NodeState.REMOVED).order_by("name"):
        if (node.cluster_id, node.name) not in withheld:
            nodes.setdefault(node.cluster_id, []).append(node)
    out: dict[str, dict] = {}
    for cluster in clusters:
        label = selectors.cluster_label(cluster)
        out[label] = {
            # the bastion's leg into the cluster (the operator's --on-change hook): the VLAN and its address there
            "vlan": cluster.vlan_id,
            "bastion_address": cluster.bastion_address,
            "principals": principals[cluster.pk],
            "nodes": [
                {"name": n.name, "alias": ssh.node_alias(label, n.name), "address": _node_address(label, n)}
                for n in nodes.get(cluster.pk, [])
            ],
            # Where the bastion lets these principals forward to (ProxyJump): the cluster's nodes only.
            "targets": [[_node_address(label, n), 22] for n in nodes.get(cluster.pk, [])],
        }
    return out


def _revoked_sessions(now: dt.datetime, kind: str) -> list[dict]:
    """Credentials of ``kind`` revoked within ``session_cut_window``: a gateway cuts their live sessions."""
    since = now - session_cut_window()
    rows = (
        Credential.objects.filter(kind=kind, revoked_at__gte=since, not_after__gt=since)
        .select_related("user")
        .order_by("revoked_at", "serial")
    )
    return [
        {"serial": c.serial, "common_name": c.user.get_username(), "revoked_at": c.revoked_at.isoformat()} for c in rows
    ]


def gateway_state(*, gateway: Gateway) -> dict:
    """Everything a gateway needs to decide offline, as one JSON document (``etag`` excludes the time).

    ``vpn``: CA and AA certificates, the CRL, the cluster->VLAN map of the closed READY clusters, and the
    recently revoked certificates whose live sessions the gateway cuts. ``ssh``: the user and host CA
    keys, the KRL (base64), and per cluster its VLAN, principals and the node aliases forwarding may reach.
    ``config``: the gateway's settings its own configuration files are rendered from (``selectors.gateway_settings``).
    """
    # Taken before anything is read (to the microsecond: a cluster that became ready in the same second is in the
    # state only if this is later), so the state holds every change committed before it.
    made = timezone.now().astimezone(dt.UTC)
    ca_ensure()
    now = _now()
    vlans, clusters = _vlan_map(gateway)
    # The sessions to cut are read before the CRL and the KRL (each read sees the commits before it): a
    # revocation rewrites them in its own transaction, so every certificate listed here is in the lists read
    # after — the other order could cut a session whose certificate the gateway's CRL still admits, and the
    # client was back at once.
    cut_vpn = _revoked_sessions(now, CredentialKind.VPN) if gateway.serves_vpn else []
    cut_ssh = _revoked_sessions(now, CredentialKind.SSH) if gateway.serves_ssh else []
    doc: dict = {"format": 1, "gateway": gateway.name, "gateway_id": gateway.pk}
    if gateway.serves_vpn:
        doc["vpn"] = {
            "ca": _authority(AuthorityKind.VPN).certificate,
            "aa": _authority(AuthorityKind.AA).certificate,
            "crl": crl_current(),
            "vlans": vlans,
            "server_name": gateway_server_name(gateway),
            "revoked_sessions": cut_vpn,
        }
    if gateway.serves_ssh:
        doc["ssh"] = {
            "account": gateway.ssh_user,
            "user_ca": _authority(AuthorityKind.SSH_USER).public_key,
            "host_ca": _authority(AuthorityKind.SSH_HOST).public_key,
            "krl": base64.b64encode(krl_current()).decode(),
            "revoked_sessions": cut_ssh,
            "clusters": _principals_map(clusters, gateway=gateway),
        }
    doc["config"] = selectors.gateway_settings(gateway)  # (in the ETag: a gateway follows a change at its next pull)
    doc["max_age"] = settings.GATEWAY_STATE_MAX_AGE
    doc["etag"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
    doc["generated_at"] = made.isoformat()
    return doc


def gateway_pulled(*, gateway: Gateway, installed: str | None) -> None:
    """Record a gateway's pull, and what it has installed: its state holds every change made before
    ``installed`` — the ``generated_at`` of the current state when the gateway sent its ETag (304), or of the
    state it says it installed (the ``VirtCloud-State-Generated-At`` header of a pull). A value that is malformed,
    naive, later than now or earlier than the gateway itself is ignored; ``state_as_of`` only moves forward. VLAN
    ids released before every gateway's ``state_as_of`` may be handed out again
    (``access.selectors.vlan_reuse_horizon``)."""
    now = timezone.now()
    try:
        made = dt.datetime.fromisoformat((installed or "").strip())
        # in UTC (a far-off offset on the first day of year 1 has no UTC date: it could be stored, never read)
        made = made.astimezone(dt.UTC) if made.tzinfo is not None else None
    except (ValueError, OverflowError):
        made = None
    updates: dict = {"last_pull_at": now}
    # No state of this gateway was made before it was enrolled (nor, with the clocks' skew, long before)
    if made is not None and gateway.created_at - pki.CLOCK_SKEW <= made <= now:
        updates["state_as_of"] = Greatest(Coalesce("state_as_of", Value(made)), Value(made))
    Gateway.objects.filter(pk=gateway.pk).update(**updates)


@transaction.atomic
def gateway_sessions_report(*, gateway: Gateway, vpn: Sequence[dict], ssh: Sequence[dict]) -> int:
    """Who is connected through ``gateway`` now, as it reports after a pull (``access.gateway.report``; validated by
    the API): its sessions replace those it reported before. A VPN entry is ``serial``, ``peer`` ([address, port]),
    ``since`` and ``cluster``; an SSH entry ``serial``, ``count`` and ``since``. Each row names its credential (the
    serial's, of its kind) when the portal issued it. Two reports of one gateway at once are taken one after the
    other (its row locked). How many rows."""
    Gateway.objects.select_for_update().filter(pk=gateway.pk).first()
    now = timezone.now()
    kinds = {GatewaySession.Kind.VPN: CredentialKind.VPN, GatewaySession.Kind.SSH: CredentialKind.SSH}
    serials = {e["serial"] for e in (*vpn, *ssh)}
    known = {
        (kind, serial): pk
        for pk, kind, serial in Credential.objects.filter(serial__in=serials, kind__in=kinds.values()).values_list(
            "pk", "kind", "serial"
        )
    }
    rows = []
    for kind, entries in ((GatewaySession.Kind.VPN, vpn), (GatewaySession.Kind.SSH, ssh)):
        for entry in entries:
            common = {
                "gateway": gateway,
                "kind": kind,
                "serial": entry["serial"],
                "credential_id": known.get((kinds[kind], entry["serial"])),
                "since": entry.get("since"),
                "reported_at": now,
            }
            if kind == GatewaySession.Kind.VPN:
                rows.append(GatewaySession(**common, peer=_peer(*entry["peer"]), cluster=entry.get("cluster", "")))
            else:
                rows.append(GatewaySession(**common, count=entry["count"]))
    GatewaySession.objects.filter(gateway=gateway).delete()
    GatewaySession.objects.bulk_create(rows)
    Gateway.objects.filter(pk=gateway.pk).update(sessions_reported_at=now)
    return len(rows)


def _peer(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --- gateway enrolment -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayEnrolment:
    """A gateway's own keys and certificates, made once when it is set up. The private keys are written
    into the gateway's state directory by ``manage.py gateway config`` and not kept by the portal."""

    server_name: str
    server_key_pem: bytes
    server_cert_pem: bytes
    tls_crypt_key: str
    ssh_host_key: bytes
    ssh_host_cert: str

    def __repr__(self) -> str:
        return f"GatewayEnrolment(server_name={self.server_name!r}, keys=<redacted>)"


def host_key_retire(*, gateway: Gateway) -> RetiredHostKey | None:
    """Take the bastion's current host key out of use (its gateway is re-enrolled or deleted): recorded while its
    certificate is valid, so that SSH bundles say ``@revoked`` for it (``retired_host_key_lines``). Rows past
    their grace are dropped here."""
    from access import ssh

    RetiredHostKey.objects.filter(until__lt=_now() - RETIRED_HOST_KEY_GRACE).delete()
    old = ssh.certified_key(gateway.ssh_host_certificate)  # None: no certificate, or nothing ssh would take
    if old is None or old[2] <= _now() - RETIRED_HOST_KEY_GRACE:
        return None
    key, names, until = old
    logger.info("access: gateway %s: host key %s retired (certificate until %s)", gateway.name, key.split()[0], until)
    return RetiredHostKey.objects.create(key=key, names=names, until=until, gateway=gateway.name)


#: how long after its certificate's end a retired host key is still listed: a client whose clock is behind would
#: still take the certificate
RETIRED_HOST_KEY_GRACE = dt.timedelta(days=1)


def retired_host_key_lines(gateway: Gateway, patterns: Sequence[str]) -> str:
    """``@revoked`` lines, for the gateway's ``patterns`` (as the bundle's ``known_hosts`` names it), of the retired
    host keys certified for the gateway's address whose certificates have not ended (a day's grace): ssh refuses
    whoever still holds one — the gateway's own earlier keys, and those of a gateway deleted at its address."""
    from access import ssh

    rows = RetiredHostKey.objects.filter(until__gt=_now() - RETIRED_HOST_KEY_GRACE).values_list("key", "names")
    return "".join(ssh.known_hosts_revoked_line(key, patterns) for key, names in rows if gateway.address in names)


@transaction.atomic
def gateway_enrol(*, gateway: Gateway) -> GatewayEnrolment:
    """New TLS server key + certificate (VPN CA) and SSH host key + certificate (host CA) for ``gateway``.

    Re-enrolling replaces both keys and certificates and the tls-crypt key, and retires the old ones: VPN profiles
    pin the new TLS certificate (``gateway_fingerprint``; those downloaded before refuse the gateway now), and SSH
    bundles say ``@revoked`` for the old host key until its certificate expires (``host_key_retire``)."""
    from access import ssh

    gateway = Gateway.objects.select_for_update().get(pk=gateway.pk)
    if gateway.enrolled_at is not None:
        # a new tls-crypt key too: the old one (in a stolen state directory) would still let a peer holding the
        # old server key pass for the gateway to a client that does not check the pinned fingerprint (OpenVPN 2.5
        # ignores ``peer-fingerprint``); profiles made before pin the old certificate and stop working either way
        gateway.tls_crypt_key = pki.generate_tls_crypt_key()
        gateway.save(update_fields=["tls_crypt_key"])
    tls_crypt = _ensure_tls_crypt(gateway)
    vpn_ca = _load(_authority(AuthorityKind.VPN))
    server_name = gateway_server_name(gateway)
    key = pki.generate_client_key()
    names = [server_name] + ([gateway.address] if not _is_ip(gateway.address) else [])
    cert = pki.issue_server_cert(
        vpn_ca,
        public_key=key.public_key,
        common_name=server_name,
        serial=serial_allocate("gateway-tls"),
        dns_names=names,
        ip_addresses=[gateway.address] if _is_ip(gateway.address) else [],
        lifetime=min(dt.timedelta(days=365), vpn_ca.cert.not_valid_after_utc - timezone.now()),
    )
    host = ssh.generate_user_key(comment=f"virtcloud-gateway-{gateway.name}")
    host_cert = ssh_host_certificate_issue(public_key=host.public_line, principals=[gateway.address, server_name])
    host_key_retire(gateway=gateway)
    gateway.enrolled_at = timezone.now()
    gateway.server_name = server_name
    gateway.server_certificate = pki.cert_to_pem(cert).decode()
    gateway.ssh_host_certificate = host_cert
    gateway.save(update_fields=["server_name", "server_certificate", "ssh_host_certificate", "enrolled_at"])
    logger.info("access: enrolled gateway %s (TLS serial %s)", gateway.name, cert.serial_number)
    return GatewayEnrolment(
        server_name=server_name,
        server_key_pem=key.private_pem,
        server_cert_pem=pki.cert_to_pem(cert),
        tls_crypt_key=tls_crypt,
        ssh_host_key=host.private_openssh,
        ssh_host_cert=host_cert,
    )


@dataclass(frozen=True)
class LostDevice:
    """What "lost my laptop" did: whether it revoked the credential now (and then signed the other browsers out),
    the account whose session hash the caller refreshes to stay signed in (None: nothing revoked, or an account
    with a password of its own, whose hash did not change), and the API tokens it revoked with it."""

    revoked: bool
    account: object | None
    tokens: list


def credential_revoke_lost_device(
    *, credential: Credential, user, token_ids=(), keep_session: str | None = None
) -> LostDevice:
    """ "Lost my laptop": revoke ``credential`` (``user``'s own) and, when that revoked it now, end the user's other
    browser sessions but ``keep_session`` (the device may still be signed in and could download a new profile). The
    API tokens among ``token_ids`` that are ``user``'s own and live are revoked too, whatever the credential's
    state (a token on the laptop issues new profiles as well as a browser session does); other ids are ignored.
    The tokens go first, in a transaction of their own: a CA that cannot sign the revocation list now does not
    keep them alive."""
    from portal.sessions import sign_out_elsewhere
    from portal.tokens import token_revoke, tokens_live

    with transaction.atomic():
        tokens = list(tokens_live(user).filter(pk__in=list(token_ids)).select_for_update().order_by("pk"))
        for token in tokens:
            token_revoke(token=token)
    with transaction.atomic():
        revoked = credential_revoke(
            credential=credential,
            reason=RevocationReason.KEY_COMPROMISE,
            by=user,
            note=f"{user.get_username()}: lost my laptop",
        )
        account = sign_out_elsewhere(user=user, keep=keep_session, why="a lost device") if revoked else None
        return LostDevice(revoked, account, tokens)


_TOKEN_NAME_LENGTH = ApiToken._meta.get_field("name").max_length
GATEWAY_ACCOUNT = "virtcloud-gateways"  # owns every gateway's pull token: a machine's credential, nobody's


def gateway_account():
    """The local account that owns the gateways' pull tokens (made on first use; no password, no rights). Not
    the admin who issued a token: deactivating that person (``ldap_sync``: gone from the directory) stopped
    every token they owned, and each of their gateways failed closed for everyone."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    return get_user_model().objects.get_or_create(
        username=GATEWAY_ACCOUNT, defaults={"is_active": True, "password": make_password(None)}
    )[0]


@transaction.atomic
def gateway_token_issue(*, gateway: Gateway, by) -> str:
    """A new pull token (scope ``gateway:pull``, owned by the gateways' account, issued by ``by``: in its name
    and the audit log) for ``gateway``; its previous token is revoked in the same transaction, so the gateway
    never holds two. Returns the secret, shown once."""
    locked = Gateway.objects.select_for_update(of=("self",)).select_related("token").get(pk=gateway.pk)
    old = locked.token
    token, secret = token_create(
        user=gateway_account(),
        name=f"gateway {gateway.name} (issued by {by.get_username()})"[:_TOKEN_NAME_LENGTH],
        scopes=[TokenScope.GATEWAY],
    )
    locked.token = gateway.token = token
    locked.save(update_fields=["token"])
    if old is not None:
        token_revoke(token=old)
    logger.info("access: new pull token %s for gateway %s", token.prefix, gateway.name)
    return secret


def _is_ip(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True

"""Access records: the signing authorities, every credential handed to a user, and the access gateways.

What is *never* here: a user's private key. A profile's key is generated while the response is built and
only travels in that response; a credential row keeps what the audit trail and revocation need (serial,
key id, validity, the clusters it covers, who revoked it and why).

Clusters are referenced by id and access label (``CredentialCluster``), not by foreign key: a credential
is a record that outlives its cluster, and the access app must not pin the clusters app's migrations.
"""

from __future__ import annotations

import ipaddress
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.secrets import EncryptedTextField


class AuthorityKind(models.TextChoices):
    VPN = "vpn", "VPN CA (client and gateway certificates, CRL)"
    AA = "aa", "Attribute Authority (attribute certificates)"
    SSH_USER = "ssh_user", "SSH user CA (user certificates, KRL)"
    SSH_HOST = "ssh_host", "SSH host CA (gateway and node host certificates)"


class Authority(models.Model):
    """One signing key of the access service: the VPN CA, the Attribute Authority (an end entity of the
    VPN CA, RFC 5755 §4.5), the SSH user CA or the SSH host CA.

    The private key is encrypted twice at rest: as PKCS#8 PEM under ``ACCESS_CA_PASSPHRASE`` and then,
    being an ``EncryptedTextField``, under the Fernet ``SECRETS_KEY``; a database dump alone opens
    neither. The current revocation list (X.509 CRL of the VPN CA, OpenSSH KRL of the user CA) is kept
    on the row so every gateway pull serves the same bytes until the next revocation or refresh."""

    kind = models.CharField(max_length=10, choices=AuthorityKind.choices, unique=True)
    certificate = models.TextField(blank=True, help_text="X.509 certificate (PEM) of the VPN CA and the AA")
    public_key = models.TextField(help_text="public key: PEM (X.509 authorities) or an OpenSSH line (SSH CAs)")
    private_key = EncryptedTextField(help_text="PKCS#8 PEM encrypted with ACCESS_CA_PASSPHRASE (never shown)")
    revocation_number = models.PositiveBigIntegerField(default=0, help_text="CRL number / KRL version")
    revocation_list = models.TextField(blank=True, help_text="current CRL (PEM) or KRL (base64)")
    revocation_updated_at = models.DateTimeField(null=True, blank=True)
    revocation_next_update = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["kind"]
        verbose_name_plural = "authorities"

    def __str__(self) -> str:
        return self.get_kind_display()


class SerialNumber(models.Model):
    """A serial number handed out once: the row's id. Certificates of every kind (X.509 client, gateway
    and AA certificates, ACs, SSH user and host certificates) take their serial from here, so a serial is
    unique across the service and never reused (PostgreSQL sequences never go back)."""

    purpose = models.CharField(max_length=40)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.pk} ({self.purpose})"


class CredentialKind(models.TextChoices):
    VPN = "vpn", "OpenVPN profile"
    SSH = "ssh", "SSH certificate"
    SSH_HOST = "ssh_host", "SSH host certificate of a node"


#: Credentials that admit a person (the membership rule applies to their holder); a node's host certificate
#: vouches for the node, whoever asked for it, and ends with its cluster.
USER_KINDS = (CredentialKind.VPN, CredentialKind.SSH)


class RevocationReason(models.TextChoices):
    # The keys of access.pki.REASONS: the CRL carries them as reason codes.
    UNSPECIFIED = "unspecified", "unspecified"
    KEY_COMPROMISE = "key_compromise", "key compromise (lost laptop)"
    AFFILIATION_CHANGED = "affiliation_changed", "left the cluster or its group"
    CESSATION_OF_OPERATION = "cessation_of_operation", "cluster ended"
    SUPERSEDED = "superseded", "superseded"
    PRIVILEGE_WITHDRAWN = "privilege_withdrawn", "withdrawn by an administrator"


class CredentialQuerySet(models.QuerySet):
    def unrevoked(self):
        return self.filter(revoked_at__isnull=True)

    def live(self, now):
        """Not revoked and not expired: what a gateway could still accept."""
        return self.filter(revoked_at__isnull=True, not_after__gt=now)

    def for_cluster(self, cluster_id: int):
        return self.filter(clusters__cluster_id=cluster_id)


LABEL_MAX = 60  # characters of a credential's label


class Credential(models.Model):
    """A certificate given to a user: an OpenVPN client certificate with its attribute certificate, or
    an OpenSSH user certificate; or an OpenSSH host certificate of a cluster's node (``user``: who asked for it,
    the cluster's owner or the middleware). Holds what revocation, the CRL/KRL and the audit trail need — never
    the private key. Revoked by setting ``revoked_at`` once (never un-revoked)."""

    kind = models.CharField(max_length=8, choices=CredentialKind.choices)
    serial = models.PositiveBigIntegerField(unique=True, help_text="certificate serial (also the AC serial)")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="access_credentials")
    key_id = models.CharField(max_length=200, help_text="who/what/when; the SSH certificate's key id")
    fingerprint = models.CharField(
        max_length=100, help_text="SHA-256 of the certificate (VPN) or the user's or node's key (SSH)"
    )
    principals = models.JSONField(default=list, blank=True, help_text="SSH principals")
    pinned_gateways = models.JSONField(
        default=list,
        blank=True,
        help_text="VPN profiles: the SHA-256 of each gateway certificate the profile accepts (re-enrolling one of "
        "these gateways makes the profile refuse it: download again)",
    )
    public_key = models.TextField(
        blank=True,
        help_text="SSH host certificates: the node's public key (revoked, it goes into the profiles' known_hosts as "
        "@revoked)",
    )
    certificate = models.TextField(
        blank=True,
        default="",
        db_default="",
        help_text="SSH host certificates: the certificate (public), sent again to a node that says it has another "
        "one (its answer was lost)",
    )
    label = models.CharField(
        max_length=LABEL_MAX,
        blank=True,
        default="",
        db_default="",
        help_text="the holder's name for it, e.g. 'work laptop'",
    )
    published = models.BooleanField(default=False, help_text="a long-lived 'publish' profile for a user's router")
    expiry_mailed = models.BooleanField(
        default=False, db_default=False, editable=False, help_text="its holder was sent an e-mail before it ends"
    )
    generated_key = models.BooleanField(default=False, help_text="the portal generated the key pair (not stored)")
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.CharField(max_length=30, choices=RevocationReason.choices, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revocation_note = models.CharField(max_length=200, blank=True, help_text="who or what revoked it, and why")

    objects = CredentialQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["user", "kind"]),
            models.Index(fields=["kind", "revoked_at", "not_after"]),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(not_after__gt=models.F("not_before")), name="credential_valid_window"),
            models.CheckConstraint(
                condition=Q(revoked_at__isnull=True, revocation_reason="") | Q(revoked_at__isnull=False),
                name="credential_reason_only_when_revoked",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.serial} of {self.user}" if self.user_id else f"#{self.serial}"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def status(self) -> str:
        """ "revoked", "expired" or "valid": what the page and the API show."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.not_after <= timezone.now() else "valid"

    def cluster_labels(self) -> list[str]:
        return [c.label for c in self.clusters.all()]


class CredentialCluster(models.Model):
    """A cluster a credential admits to (an AC attribute, an SSH principal): the cluster's id, for
    revocation, and its access label as written into the certificate."""

    credential = models.ForeignKey(Credential, on_delete=models.CASCADE, related_name="clusters")
    cluster_id = models.PositiveBigIntegerField(db_index=True)
    label = models.CharField(max_length=63)

    class Meta:
        ordering = ["label"]
        constraints = [
            models.UniqueConstraint(fields=["credential", "cluster_id"], name="credentialcluster_unique"),
        ]

    def __str__(self) -> str:
        return self.label


class GatewayKind(models.TextChoices):
    VPN = "vpn", "OpenVPN"
    SSH = "ssh", "SSH bastion"
    BOTH = "both", "OpenVPN and SSH"


# What a gateway's settings may hold: each one goes verbatim into users' downloads (OpenVPN profiles, ssh_config)
# or into the gateway's own configs, where a newline or a space would start a directive of the admin's choosing.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
PORT_VALIDATORS = [MinValueValidator(1), MaxValueValidator(65535)]
#: the bastion's local account (as ``access.gateway.sshd`` checks it): a POSIX-style user name
SSH_USER_VALIDATOR = RegexValidator(
    r"\A[a-z_][a-z0-9_-]{0,31}\Z",
    "A POSIX user name: lower-case letters, digits, '_' and '-', not starting with a digit or '-' (at most 32).",
)
#: the CN (and a DNS name) of the gateway's TLS certificate
SERVER_NAME_VALIDATOR = RegexValidator(
    r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z",
    "Letters, digits, '.', '_' and '-' only (no spaces), starting with a letter or digit.",
)


def validate_host(value: str) -> None:
    """A host name (RFC 1123 labels) or an IPv4/IPv6 address: what users' clients connect to."""
    try:
        # (no zone: "fe80::1%<anything>" parses, whatever follows the %)
        if "%" not in value and ipaddress.ip_address(value):
            return
    except ValueError:
        pass
    if len(value) > 253 or not _HOST_NAME_RE.fullmatch(value):
        raise ValidationError(
            "Enter a host name (letters, digits and '-' in dot-separated labels) or an IP address: %(value)r is "
            "neither.",
            code="invalid_host",
            params={"value": value},
        )


def validate_state_dir(value: str) -> None:
    """An absolute path without whitespace or control characters."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError("The path may not contain spaces, tabs, newlines or other control characters.")
    if not value.startswith("/"):
        raise ValidationError("Enter an absolute path (starting with '/').")


class VpnProto(models.TextChoices):
    # ``access.openvpn`` renders the server side (tcp-server) and the client side (tcp-client) from these.
    UDP = "udp", "UDP"
    TCP = "tcp", "TCP"
    UDP6 = "udp6", "UDP over IPv6"
    TCP6 = "tcp6", "TCP over IPv6"


class Gateway(models.Model):
    """An access gateway: an OpenVPN tap server and/or an SSH bastion with a trunk into the closed
    clusters' VLANs (one per site, or one for all). It pulls its state (VLAN map, CRL, KRL, principals)
    from the portal with its own API token (scope ``gateway:pull``) and keeps working from the last pull
    when the portal is down — for ``GATEWAY_STATE_MAX_AGE``, then it refuses everyone until a pull succeeds."""

    name = models.SlugField(max_length=50, unique=True)
    site = models.ForeignKey(
        "network.Site", null=True, blank=True, on_delete=models.PROTECT, related_name="access_gateways"
    )
    kind = models.CharField(max_length=4, choices=GatewayKind.choices, default=GatewayKind.BOTH)
    address = models.CharField(
        max_length=253, validators=[validate_host], help_text="public host name or IP users connect to"
    )
    vpn_port = models.PositiveIntegerField("VPN port", default=1194, validators=PORT_VALIDATORS)
    vpn_proto = models.CharField("VPN transport", max_length=12, choices=VpnProto.choices, default=VpnProto.UDP)
    ssh_port = models.PositiveIntegerField("SSH port", default=22, validators=PORT_VALIDATORS)
    ssh_port_base = models.PositiveIntegerField(
        "SSH port base",
        default=0,
        validators=[MaxValueValidator(65535 - 4094)],
        help_text="0: one bastion for every cluster (it forwards by address, so a node address two clusters use "
        "is withheld). N: a bastion per closed cluster, in the namespace of the cluster's leg, at port N + the "
        "cluster's VLAN id (access/gateway/bastion.py): clusters may share addresses",
    )
    ssh_user = models.CharField(
        "SSH account",
        max_length=32,
        default="virtcloud",
        validators=[SSH_USER_VALIDATOR],
        help_text="bastion account users log in as",
    )
    server_name = models.CharField(
        max_length=64,
        blank=True,
        validators=[SERVER_NAME_VALIDATOR],
        help_text="CN of the gateway's TLS certificate",
    )
    server_certificate = models.TextField(
        "TLS certificate", blank=True, help_text="the gateway's TLS certificate (PEM)"
    )
    ssh_host_certificate = models.TextField(
        "SSH host certificate", blank=True, help_text="the bastion's OpenSSH host certificate"
    )
    enrolled_at = models.DateTimeField(
        null=True, blank=True, help_text="when its current keys and certificates were made (gateway config)"
    )
    tls_crypt_key = EncryptedTextField("tls-crypt key", blank=True, help_text="shared tls-crypt key (in every profile)")
    local_state_dir = models.CharField(
        max_length=200,
        blank=True,
        validators=[validate_state_dir],
        help_text="the gateway's state directory when it runs on the portal's host: revocations are installed "
        "there at once (new CRL/KRL, live sessions cut) instead of at the next pull",
    )
    token = models.OneToOneField(
        "portal.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="access_gateway"
    )
    enabled = models.BooleanField(default=True)
    last_pull_at = models.DateTimeField(null=True, blank=True)
    state_as_of = models.DateTimeField(
        null=True,
        blank=True,
        help_text="the state this gateway has installed holds every change made before this time (it answered "
        "a pull with the current ETag, or said when the state it installed was made); VLAN ids released before "
        "it may be handed out again",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    sessions_reported_at = models.DateTimeField(
        null=True, blank=True, help_text="when it last reported who is connected (after each pull)"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def serves_vpn(self) -> bool:
        return self.kind in (GatewayKind.VPN, GatewayKind.BOTH)

    @property
    def serves_ssh(self) -> bool:
        return self.kind in (GatewayKind.SSH, GatewayKind.BOTH)

    @property
    def forwards_by_address(self) -> bool:
        """One bastion for every cluster (``ssh_port_base`` 0): it cannot tell apart clusters that use the same
        address or overlapping networks, so such nodes are withheld from it
        (``access.selectors.bastion_withheld_nodes``)."""
        return self.serves_ssh and not self.ssh_port_base

    def ssh_port_for(self, vlan_id: int | None) -> int:
        """The port users reach the bastion of the cluster on ``vlan_id`` at."""
        return self.ssh_port_base + vlan_id if self.ssh_port_base and vlan_id else self.ssh_port


class RetiredHostKey(models.Model):
    """A bastion host key taken out of use (its gateway re-enrolled or deleted) while its host certificate is still
    valid: ssh would take it for the names it was certified for, so every SSH bundle for a gateway at one of those
    names says ``@revoked`` for it, until a day after the certificate's end. Kept apart from the gateway's row, so
    that a gateway deleted and set up again at its address still refuses the old key."""

    key = models.TextField(help_text="the public key (OpenSSH line)")
    names = models.JSONField(default=list, help_text="the host names and addresses its certificate was for")
    until = models.DateTimeField(help_text="when its certificate ends")
    gateway = models.CharField(max_length=100, help_text="the gateway it was retired from, for the record")
    retired_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["until"]
        indexes = [models.Index(fields=["until"])]

    def __str__(self) -> str:
        return f"{self.gateway}: {self.key.split()[0]} until {self.until:%Y-%m-%d}"


class GatewaySession(models.Model):
    """Someone connected through an access gateway, as the gateway last reported (``access.gateway.report``, after
    each pull): a VPN session of a certificate from a peer address, or SSH logins on the bastion. The gateway's
    report replaces its rows whole; a report older than ``GATEWAY_STATE_MAX_AGE`` is not taken as "now"."""

    class Kind(models.TextChoices):
        VPN = "vpn", "VPN"
        SSH = "ssh", "SSH"

    gateway = models.ForeignKey(Gateway, on_delete=models.CASCADE, related_name="sessions")
    kind = models.CharField(max_length=3, choices=Kind.choices)
    serial = models.PositiveBigIntegerField(help_text="the certificate's serial")
    credential = models.ForeignKey(
        Credential, null=True, blank=True, on_delete=models.SET_NULL, related_name="sessions"
    )
    peer = models.CharField(max_length=100, blank=True, help_text="address and port it connects from (VPN)")
    cluster = models.CharField(max_length=100, blank=True, help_text="the cluster the VPN session landed on")
    count = models.PositiveIntegerField(default=1, help_text="logins of this certificate up (SSH)")
    since = models.DateTimeField(null=True, blank=True)
    reported_at = models.DateTimeField()

    class Meta:
        ordering = ["gateway_id", "kind", "serial", "peer"]

    def __str__(self) -> str:
        where = f" from {self.peer}" if self.peer else ""
        return f"{self.get_kind_display()} {self.serial}{where} on {self.gateway_id}"

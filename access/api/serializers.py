"""Request and response shapes of the access API."""

from __future__ import annotations

import unicodedata

from rest_framework import serializers

from access.models import LABEL_MAX, Credential, GatewayKind, RevocationReason, VpnProto
from clusters.models import ClusterState, Connectivity
from portal.api import IdField, StrictSerializer


class VpnProfileRequestSerializer(StrictSerializer):
    clusters = serializers.ListField(
        child=IdField(),
        min_length=1,
        max_length=50,
        help_text="ids of the clusters the attribute certificate covers; the profile enters the first",
    )
    publish = serializers.BooleanField(
        default=False, help_text="a long-lived profile for a router that bridges the cluster into your network"
    )
    label = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=LABEL_MAX,
        help_text="your name for the credential, e.g. 'work laptop' (listed with it, for revoking it when lost)",
    )


class SshCertificateRequestSerializer(StrictSerializer):
    cluster = IdField(help_text="id of the cluster")
    public_key = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=16384,
        help_text="your OpenSSH public key (one line); omit to get a fresh key pair (never stored)",
    )
    label = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=LABEL_MAX,
        help_text="your name for the credential, e.g. 'work laptop' (listed with it, for revoking it when lost)",
    )


class HostCertificateRequestSerializer(StrictSerializer):
    cluster = IdField(help_text="id of the cluster")
    node = serializers.CharField(max_length=63, help_text="the node's id or name")
    public_key = serializers.CharField(
        max_length=16384,
        help_text="the node's OpenSSH host public key, one line (/etc/ssh/ssh_host_ed25519_key.pub): ssh-ed25519, "
        "ecdsa-sha2-nistp256/384/521 or ssh-rsa of 3072 bits or more",
    )


class HostCertificateSerializer(serializers.Serializer):
    credential = serializers.IntegerField(help_text="id of the credential record (for revocation)")
    serial = serializers.IntegerField()
    key_id = serializers.CharField()
    cluster = serializers.CharField(help_text="the cluster's access label")
    node = serializers.CharField(help_text="the node's name")
    principals = serializers.ListField(
        child=serializers.CharField(),
        help_text="the names the users' ssh_config reaches the node by: <node>.<cluster> and its address",
    )
    valid_after = serializers.DateTimeField()
    valid_before = serializers.DateTimeField(help_text="the cluster's expiry at the latest: ask again if it grows")
    certificate = serializers.CharField(
        help_text="OpenSSH host certificate: save beside the key as <key>-cert.pub, sshd's HostCertificate"
    )
    user_ca = serializers.CharField(help_text="the user CA's public key line: sshd's TrustedUserCAKeys")
    node_user = serializers.CharField(help_text="the account users log in as (User in their ssh_config)")
    authorized_principals = serializers.CharField(
        help_text="node_user's AuthorizedPrincipalsFile (who may log in: the cluster's owner and group members "
        "now; fetch again when they change)"
    )


class NodeAccessQuerySerializer(serializers.Serializer):
    cluster = IdField(help_text="id of the cluster")
    node = serializers.CharField(max_length=63, help_text="the node's id or name")
    public_key = serializers.CharField(
        required=False,
        max_length=16384,
        help_text="the node's host public key (one line) whose certificate it has: when that certificate ends "
        "before the cluster now ends (its lifetime was extended), the answer has a new one (host_certificate)",
    )
    certificate_sha256 = serializers.RegexField(
        r"\A[0-9a-f]{64}\Z",
        required=False,
        help_text="with public_key: SHA-256 (hex) of '<type> <base64>' of the host certificate the node has (of "
        "nothing when it has none); when that is not the newest the portal issued for the key there (the answer "
        "that carried it was lost), the answer has the newest again (host_certificate)",
    )


class RenewedHostCertificateSerializer(serializers.Serializer):
    credential = serializers.IntegerField(help_text="id of the new credential record")
    serial = serializers.IntegerField()
    key_id = serializers.CharField()
    principals = serializers.ListField(child=serializers.CharField(), help_text="those of the certificate it replaces")
    valid_after = serializers.DateTimeField()
    valid_before = serializers.DateTimeField(help_text="the cluster's expiry as it is now, at the latest")
    certificate = serializers.CharField(help_text="replaces <key>-cert.pub (sshd's HostCertificate)")


class NodeAccessSerializer(serializers.Serializer):
    cluster = serializers.CharField(help_text="the cluster's access label")
    node = serializers.CharField(help_text="the node's name")
    node_user = serializers.CharField(help_text="the account users log in as (User in their ssh_config)")
    authorized_principals = serializers.CharField(
        help_text="node_user's AuthorizedPrincipalsFile: who may log in now (the cluster's owner and group members)"
    )
    krl = serializers.CharField(
        help_text="base64 of the SSH user CA's current KRL (ssh-keygen -k format): sshd's RevokedKeys"
    )
    user_ca = serializers.CharField(help_text="the user CA's public key line: sshd's TrustedUserCAKeys")
    host_certificate = RenewedHostCertificateSerializer(
        allow_null=True,
        help_text="a new host certificate for public_key (the same key and principals, until the cluster now ends) "
        "when the one issued for it ends earlier, or the newest issued when certificate_sha256 names another; null "
        "when neither, or without public_key. The old one is not revoked: it expires",
    )


class WithheldNodeSerializer(serializers.Serializer):
    name = serializers.CharField()
    address = serializers.CharField()
    reason = serializers.CharField()


class SshCertificateSerializer(serializers.Serializer):
    credential = serializers.IntegerField(help_text="id of the credential record (for revocation)")
    serial = serializers.IntegerField()
    key_id = serializers.CharField()
    principal = serializers.CharField()
    valid_after = serializers.DateTimeField()
    valid_before = serializers.DateTimeField()
    certificate = serializers.CharField(help_text="OpenSSH user certificate (save as <key>-cert.pub)")
    public_key = serializers.CharField()
    private_key = serializers.CharField(
        allow_null=True, help_text="only when the portal generated the key pair: save it now, it is not kept"
    )
    ssh_config = serializers.CharField(help_text="ssh_config snippet: ssh -F virtcloud.conf <node>.<cluster>")
    known_hosts = serializers.CharField(
        help_text="the @cert-authority line for the gateway and this cluster's nodes (and @revoked lines for "
        "revoked host keys): the ssh_config's UserKnownHostsFile"
    )
    withheld_nodes = WithheldNodeSerializer(
        many=True,
        help_text="nodes the SSH bastion does not relay to, and why (their address is used by another cluster: "
        "the bastion forwards by address); reach them through the VPN",
    )


class CredentialSerializer(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username", read_only=True)
    revoked_by = serializers.CharField(source="revoked_by.username", read_only=True, default=None)
    clusters = serializers.ListField(child=serializers.CharField(), source="cluster_labels", read_only=True)
    status = serializers.ChoiceField(choices=["valid", "expired", "revoked"], read_only=True)
    revocation_reason = serializers.CharField(read_only=True, help_text="see the revoke request's reasons")

    class Meta:
        model = Credential
        fields = [
            "id",
            "kind",
            "serial",
            "user",
            "key_id",
            "clusters",
            "principals",
            "pinned_gateways",
            "label",
            "published",
            "generated_key",
            "not_before",
            "not_after",
            "created_at",
            "status",
            "revoked_at",
            "revocation_reason",
            "revocation_note",
            "revoked_by",
        ]
        read_only_fields = fields


class RevokeRequestSerializer(StrictSerializer):
    reason = serializers.ChoiceField(
        choices=RevocationReason.choices,
        required=False,
        help_text="default: key_compromise for your own credential, privilege_withdrawn for an admin's action",
    )
    note = serializers.CharField(required=False, allow_blank=True, max_length=200)

    def validate_note(self, value: str) -> str:
        # kept with the revocation and written to the log: one line (no forged log lines, no hidden text)
        if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
            raise serializers.ValidationError("a note is one line of text, without control characters")
        return value


class GatewayStateSerializer(serializers.Serializer):
    """The document a gateway pulls (see ``access.services.gateway_state``)."""

    format = serializers.IntegerField()
    gateway = serializers.CharField()
    gateway_id = serializers.IntegerField(help_text="the gateway's id: a state directory takes its own gateway's only")
    etag = serializers.CharField()
    generated_at = serializers.DateTimeField()
    vpn = serializers.DictField(required=False, help_text="ca, aa, crl, vlans, server_name, revoked_sessions")
    ssh = serializers.DictField(required=False, help_text="account, user_ca, host_ca, krl (base64), clusters")


class VpnEndpointSerializer(serializers.Serializer):
    host = serializers.CharField(help_text="the gateway's public host name or address (the profile's `remote`)")
    port = serializers.IntegerField()
    proto = serializers.ChoiceField(choices=VpnProto.choices, help_text="the transport: UDP or TCP (`6`: over IPv6)")


class SshEndpointSerializer(serializers.Serializer):
    host = serializers.CharField(help_text="the SSH bastion's public host name or address (the jump host)")
    port = serializers.IntegerField(
        help_text="the port of this cluster's bastion: the gateway's SSH port, or its own port when the gateway "
        "runs a bastion per cluster"
    )
    user = serializers.CharField(help_text="the account users log in to the bastion as")


class GatewayRouteSerializer(serializers.Serializer):
    """A ready access gateway whose trunk carries the cluster, and where a user connects to it."""

    name = serializers.CharField(source="gateway.name")
    kind = serializers.ChoiceField(source="gateway.kind", choices=GatewayKind.choices)
    site = serializers.CharField(
        source="gateway.site.name", allow_null=True, help_text="its site; null: one trunk for every site"
    )
    vpn = VpnEndpointSerializer(allow_null=True, help_text="where OpenVPN profiles connect; null: no OpenVPN here")
    ssh = SshEndpointSerializer(
        allow_null=True,
        help_text="where SSH configs jump through; null: no SSH bastion here, or its bastion per cluster has none "
        "for this cluster (its scheduler gave no bastion address): use the VPN",
    )
    stale = serializers.BooleanField(
        help_text="it has not installed a current state for too long (or never pulled one): it refuses everyone "
        "until it reaches the portal again"
    )
    has_cluster = serializers.BooleanField(
        allow_null=True,
        help_text="its installed state is known to hold the cluster (made at or after the cluster became ready); "
        "null: the cluster has no ready time",
    )


class ClusterAccessSerializer(serializers.Serializer):
    """Whether and where a cluster can be entered: what the access page shows beside it."""

    id = serializers.IntegerField(source="cluster.pk")
    name = serializers.CharField(source="cluster.name")
    state = serializers.ChoiceField(source="cluster.state", choices=ClusterState.choices)
    connectivity = serializers.ChoiceField(source="cluster.connectivity", choices=Connectivity.choices)
    enterable = serializers.BooleanField(
        source="cluster.enterable",
        help_text="its owner and group members may enter it now: closed, and its network up (ready or updating). "
        "False for a public cluster: it is reached directly, not through the gateways",
    )
    access_ready = serializers.BooleanField(
        allow_null=True,
        help_text="every gateway listed has installed a state that holds the cluster (false: some may still refuse "
        "its users, for a minute or two after it became ready); null: no ready gateway carries it, or it has no "
        "ready time",
    )
    gateways = GatewayRouteSerializer(
        many=True,
        help_text="the ready access gateways whose trunk carries the cluster, by name (empty for a public cluster "
        "or one whose network is not up)",
    )


class _EpochField(serializers.FloatField):
    """Seconds since the epoch (what the gateway's records hold), as an aware time; out of range: a 400."""

    def to_internal_value(self, data):
        import datetime as dt

        value = super().to_internal_value(data)
        try:
            return dt.datetime.fromtimestamp(value, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise serializers.ValidationError("not a time (seconds since 1970)") from None


MAX_REPORTED = 5000  # per kind (access.gateway.report.MAX_SESSIONS)


class VpnSessionSerializer(serializers.Serializer):
    serial = serializers.IntegerField(min_value=0, max_value=2**63 - 1)
    peer = serializers.ListField(
        child=serializers.CharField(max_length=45), min_length=2, max_length=2, help_text="[address, port]"
    )
    since = _EpochField(required=False, allow_null=True, default=None)
    cluster = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")


class SshSessionSerializer(serializers.Serializer):
    serial = serializers.IntegerField(min_value=0, max_value=2**63 - 1)
    count = serializers.IntegerField(min_value=1, max_value=100000)
    since = _EpochField(required=False, allow_null=True, default=None)


class SessionsReportSerializer(serializers.Serializer):
    """The document: two lists of entries. An entry that is not valid is skipped (and counted), not the whole
    report: one record the gateway could not make sense of must not hide everyone else's sessions."""

    vpn = serializers.ListField(
        child=serializers.JSONField(), max_length=MAX_REPORTED, help_text="entries as VpnSession (one per peer)"
    )
    ssh = serializers.ListField(
        child=serializers.JSONField(), max_length=MAX_REPORTED, help_text="entries as SshSession"
    )

    def validate(self, data):
        kept, skipped = {}, 0
        data = {**data, "vpn": [one for entry in data["vpn"] for one in _per_peer(entry)]}
        if len(data["vpn"]) > MAX_REPORTED:  # (the release before's entries, one per peer now)
            raise serializers.ValidationError({"vpn": [f"at most {MAX_REPORTED} sessions"]})
        for kind, entry_serializer in (("vpn", VpnSessionSerializer), ("ssh", SshSessionSerializer)):
            kept[kind] = []
            for entry in data[kind]:
                checked = entry_serializer(data=entry)
                if checked.is_valid():
                    kept[kind].append(checked.validated_data)
                else:
                    skipped += 1
        if skipped and not kept["vpn"] and not kept["ssh"]:  # (a gateway that speaks another format: keep the last)
            raise serializers.ValidationError(f"none of the {skipped} entries is valid")
        return {**kept, "skipped": skipped}


def _per_peer(entry):
    """A VPN entry of an agent of the release before — ``peers``, a list of [address, port] — as one entry per
    peer (with its ``since`` and ``cluster``); any other entry as it is."""
    if isinstance(entry, dict) and "peer" not in entry and isinstance(entry.get("peers"), list):
        rest = {k: v for k, v in entry.items() if k != "peers"}
        return [{**rest, "peer": peer} for peer in entry["peers"]]
    return [entry]


class SessionsReportAnswerSerializer(serializers.Serializer):
    recorded = serializers.IntegerField(help_text="sessions recorded for the gateway")
    skipped = serializers.IntegerField(help_text="entries that were not valid, left out")

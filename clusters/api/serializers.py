"""API representations of clusters. Input serializers validate and resolve names; services do the rest."""

from __future__ import annotations

import dataclasses
import ipaddress
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from access.gateway.state import bastion_address_problem
from clusters import selectors
from clusters.models import (
    SETTLED_STATES,
    ClusterState,
    ClusterStep,
    Connectivity,
    Image,
    Node,
    NodeState,
    VirtualCluster,
    mac_validator,
    name_validator,
)
from clusters.services import NodeRequest
from network.drivers import host_attachment
from network.libvirt import interface_xml
from network.models import Host
from network.specs import host_spec
from portal.api import ID_MAX, IdField, NameRelatedField


class HostField(NameRelatedField):
    """A host by name; looked up in ``prefetched`` when the list of nodes filled it (one query for all
    the nodes of a request instead of one per node)."""

    prefetched: dict[str, Host] | None = None

    def to_internal_value(self, data):
        host = self.prefetched.get(data) if self.prefetched is not None and isinstance(data, str) else None
        # not among them: the name lookup answers (a name of no host, or one the database cannot compare — a
        # NUL, a lone surrogate — is a 400 there); a query per bad name only
        return host if host is not None else super().to_internal_value(data)


def _encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 encoding: a lone surrogate (a ``\\ud800`` escape in the JSON) has none, so
    the database cannot compare it (in the list of names the nodes' hosts are prefetched by)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class NodeListSerializer(serializers.ListSerializer):
    def to_internal_value(self, data):
        if isinstance(data, list):
            names = {item["host"] for item in data if isinstance(item, dict) and isinstance(item.get("host"), str)}
            names.discard("")
            field = self.child.fields["host"]
            field.prefetched = {
                h.name: h
                for h in field.get_queryset().filter(name__in=[n for n in names if "\x00" not in n and _encodable(n)])
            }
        return super().to_internal_value(data)


class NodeInputSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, validators=[name_validator])
    host = HostField(slug_field="name", queryset=Host.objects.select_related("site"))
    mac = serializers.CharField(max_length=17)
    address = serializers.IPAddressField(
        required=False,
        allow_null=True,
        default=None,
        help_text="the VM's address: a closed cluster's may be any (the SSH host entries use it); a public "
        "cluster's must be a host address of its subnet other than the router's, and is assigned when left out",
    )

    def validate_mac(self, value: str) -> str:
        value = value.strip().lower().replace("-", ":")
        mac_validator(value)
        if int(value.split(":")[0], 16) & 1:
            raise serializers.ValidationError("a multicast MAC cannot be a VM's address")
        if value == "00:00:00:00:00:00":  # (nor can Linux give it to a NIC: not a valid Ethernet address)
            raise serializers.ValidationError("the all-zero MAC cannot be a VM's address")
        return value

    def validate(self, attrs) -> NodeRequest:
        return NodeRequest(**attrs)

    class Meta:
        list_serializer_class = NodeListSerializer


class ClusterCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=40, validators=[name_validator])
    owner = NameRelatedField(
        slug_field="username",
        queryset=get_user_model().objects.filter(is_active=True),
        required=False,
        help_text="only for middleware tokens (clusters:manage) and admins; default: the caller",
    )
    group = NameRelatedField(slug_field="name", queryset=Group.objects.all(), required=False)
    image = NameRelatedField(slug_field="name", queryset=Image.objects.all())
    admin_rights = serializers.BooleanField(default=False)
    connectivity = serializers.ChoiceField(
        choices=Connectivity.choices,
        required=False,
        help_text="default: the policy decides (public for an approved image without administrator rights when a "
        "public prefix is configured, else closed). `closed` is always granted: reachable only through the "
        "access gateway, no public subnet (e.g. legacy software with known flaws on an approved image). `public` "
        "only where the policy decides public: else a 400 naming this field (a 422 when no public prefix is "
        "configured); only an administrator can override the policy",
    )
    nodes = NodeInputSerializer(many=True, allow_empty=False, max_length=1000)
    lifetime = serializers.IntegerField(
        required=False, min_value=1, help_text="seconds; default CLUSTER_DEFAULT_LIFETIME"
    )
    job_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    bastion_address = serializers.CharField(
        max_length=49,
        required=False,
        allow_blank=True,
        default="",
        help_text="closed clusters: the SSH bastion's address in the cluster's network with its prefix length "
        "(e.g. 10.0.0.254/24), kept free of nodes; without it the cluster is reached through the VPN only",
    )

    def validate_bastion_address(self, value: str) -> str:
        if not value:
            return ""
        problem = bastion_address_problem(value)  # the rule the gateways apply to it
        if problem:
            raise serializers.ValidationError(problem)
        return str(ipaddress.ip_interface(value.strip()))

    def validate(self, attrs):
        seconds = attrs.pop("lifetime", settings.CLUSTER_DEFAULT_LIFETIME)
        if not settings.CLUSTER_MIN_LIFETIME <= seconds <= settings.CLUSTER_MAX_LIFETIME:
            raise serializers.ValidationError(
                {
                    "lifetime": f"must be between {settings.CLUSTER_MIN_LIFETIME} and "
                    f"{settings.CLUSTER_MAX_LIFETIME} seconds"
                }
            )
        attrs["expires_at"] = timezone.now() + timedelta(seconds=seconds)
        return attrs


class ClusterExtendSerializer(serializers.Serializer):
    expires_at = serializers.DateTimeField()


class NodesAddSerializer(serializers.Serializer):
    nodes = NodeInputSerializer(many=True, allow_empty=False, max_length=1000)


class MigrateSerializer(serializers.Serializer):
    target_host = NameRelatedField(slug_field="name", queryset=Host.objects.all())


class ConnectivitySerializer(serializers.Serializer):
    connectivity = serializers.ChoiceField(choices=Connectivity.choices)
    reason = serializers.CharField(max_length=200)


class TeardownSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=200, required=False, default="requested")


class QuotaQuerySerializer(serializers.Serializer):
    """Query of ``GET /api/clusters/quota/``."""

    owner = NameRelatedField(
        slug_field="username",
        queryset=get_user_model().objects.filter(is_active=True),
        required=False,
        help_text="whose quota (middleware tokens and admins); default: the caller",
    )


class QuotaSerializer(serializers.Serializer):
    """One quota that applies to the owner's clusters and what is in use now."""

    scope = serializers.CharField(help_text="'user <name>' or 'group <name>'")
    max_clusters = serializers.IntegerField(allow_null=True, help_text="live clusters allowed; null: no limit")
    max_nodes = serializers.IntegerField(allow_null=True, help_text="live nodes allowed; null: no limit")
    clusters = serializers.IntegerField(help_text="live clusters now")
    nodes = serializers.IntegerField(help_text="nodes of live clusters now")


class EventQuerySerializer(serializers.Serializer):
    """Query of ``GET /api/clusters/events/``."""

    after = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=ID_MAX, help_text="the last event id already seen"
    )
    cluster = IdField(required=False, help_text="only this cluster's events (404: no such cluster you may see)")
    limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=1000)
    timeout = serializers.FloatField(
        required=False,
        default=0,
        min_value=0,
        max_value=settings.CLUSTER_WAIT_MAX,
        help_text=f"with no event yet, wait up to this many seconds for one (0 to {settings.CLUSTER_WAIT_MAX:g})",
    )


class EventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    cluster = serializers.IntegerField(source="cluster_id")
    cluster_name = serializers.CharField(source="cluster.name")
    state = serializers.ChoiceField(choices=ClusterState.choices)
    at = serializers.DateTimeField()


class EventPageSerializer(serializers.Serializer):
    events = EventSerializer(many=True)
    last = serializers.IntegerField(help_text="pass it as `after` next time (the last id here, or `after`)")


class WaitSerializer(serializers.Serializer):
    """Query of ``GET /api/clusters/{id}/wait/``."""

    until = serializers.CharField(
        required=False,
        default=",".join(SETTLED_STATES),
        help_text="comma-separated states to wait for (default: a settled state: ready, failed or torn_down)",
    )
    timeout = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=settings.CLUSTER_WAIT_MAX,
        default=settings.CLUSTER_WAIT_MAX,
        help_text=f"seconds to wait at most (0 to {settings.CLUSTER_WAIT_MAX:g}; default the maximum)",
    )

    def validate_until(self, value: str) -> list[str]:
        states = [part.strip() for part in value.split(",") if part.strip()]
        unknown = sorted(set(states) - set(ClusterState.values))
        if not states or unknown:
            given = ", ".join(unknown) or "(none given)"
            raise serializers.ValidationError(
                f"unknown state {given}; use one or more of {', '.join(ClusterState.values)}"
            )
        return states


class AttachmentSerializer(serializers.Serializer):
    """Where the VM manager plugs this node's NIC on a host (nothing is asked of the host to say it)."""

    bridge = serializers.CharField(
        allow_null=True, help_text="the bridge; null: the OVS bridge that holds `uplink` (ovs-vsctl port-to-br)"
    )
    vlan = serializers.IntegerField(allow_null=True, help_text="802.1Q tag of the VM's port; null: untagged")
    virtualport = serializers.CharField(allow_null=True, help_text="libvirt virtualport type (openvswitch)")
    uplink = serializers.CharField(help_text="the host's trunk toward its switch")
    libvirt = serializers.CharField(allow_null=True, help_text="the libvirt <interface> element, ready to use")


class NodeSerializer(serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    target_host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    attachment = serializers.SerializerMethodField()
    target_attachment = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = ["id", "name", "host", "target_host", "mac", "address", "state", "attachment", "target_attachment"]

    def _attachment(self, node: Node, host) -> dict | None:
        vid = node.cluster.vlan_id
        if host is None or vid is None or node.state == NodeState.REMOVED:
            return None
        found = host_attachment(host_spec(host), vid)
        return {**dataclasses.asdict(found), "libvirt": interface_xml(found, node.mac)}

    @extend_schema_field(AttachmentSerializer(allow_null=True))
    def get_attachment(self, node: Node) -> dict | None:
        """On ``host``, once the cluster has its VLAN."""
        return self._attachment(node, node.host)

    @extend_schema_field(AttachmentSerializer(allow_null=True))
    def get_target_attachment(self, node: Node) -> dict | None:
        """On ``target_host`` while the node migrates."""
        return self._attachment(node, node.target_host)


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = ClusterStep
        fields = ["name", "status", "started_at", "finished_at", "device", "detail", "error"]


class ClusterSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    group = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    image = serializers.SlugRelatedField(slug_field="name", read_only=True)
    nodes = NodeSerializer(many=True, read_only=True)
    steps = StepSerializer(many=True, read_only=True)
    progress = serializers.SerializerMethodField()
    public_gateway = serializers.CharField(read_only=True)

    class Meta:
        model = VirtualCluster
        fields = [
            "id",
            "name",
            "owner",
            "group",
            "image",
            "admin_rights",
            "connectivity",
            "connectivity_reason",
            "state",
            "state_reason",
            "vlan_id",
            "public_subnet",
            "public_gateway",
            "bastion_address",
            "job_id",
            "expires_at",
            "created_at",
            "ready_at",
            "ended_at",
            "progress",
            "nodes",
            "steps",
        ]

    def get_progress(self, cluster: VirtualCluster) -> dict:
        """Share of the provisioning steps done, and the step running now."""
        return selectors.cluster_progress(cluster)

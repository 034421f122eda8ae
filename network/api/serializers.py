"""Read-only representations of the inventory. Credentials never appear."""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from network.models import (
    CoreTransport,
    DeviceChange,
    Drift,
    Host,
    Site,
    Switch,
    SwitchPort,
    VlanAllocation,
    VlanPool,
)
from network.selectors import pool_usage
from portal.api import counted_list


class SiteSerializer(serializers.ModelSerializer):
    class Meta:
        model = Site
        fields = ["id", "name", "description", "worker_queue"]


class CoreTransportSerializer(serializers.ModelSerializer):
    sites = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = CoreTransport
        fields = ["id", "name", "kind", "sites", "vid_min", "vid_max", "service_tag", "mtu", "description"]


class SwitchPortSerializer(serializers.ModelSerializer):
    core = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = SwitchPort
        fields = ["id", "name", "role", "core", "static_vlans", "description"]


class SwitchSerializer(serializers.ModelSerializer):
    site = serializers.SlugRelatedField(slug_field="name", read_only=True)
    ports = SwitchPortSerializer(many=True, read_only=True)

    class Meta:
        model = Switch
        fields = ["id", "name", "site", "platform", "address", "worker_queue", "enabled", "description", "ports"]


class HostSerializer(serializers.ModelSerializer):
    site = serializers.SlugRelatedField(slug_field="name", read_only=True)
    switch = serializers.CharField(source="switch_port.switch.name", read_only=True)
    port = serializers.CharField(source="switch_port.name", read_only=True)

    class Meta:
        model = Host
        fields = ["id", "name", "site", "switch", "port", "trunk_interface", "driver", "agent_queue", "enabled"]


class VlanUsageSerializer(serializers.Serializer):
    size = serializers.IntegerField(help_text="VLAN ids clusters may get: the ranges minus the reserved ones")
    free = serializers.IntegerField(help_text="ids an allocation may take now")
    allocated = serializers.IntegerField(help_text="ids held by live networks")
    quarantined = serializers.IntegerField(
        help_text="ids released but held back: the pool's hold-down time, or an access gateway that may still map them"
    )


class VlanPoolSerializer(serializers.ModelSerializer):
    core = serializers.SlugRelatedField(slug_field="name", read_only=True)
    sites = serializers.SerializerMethodField(help_text="the sites the pool's core joins (a cluster's hosts' sites)")
    usage = serializers.SerializerMethodField()

    class Meta:
        model = VlanPool
        fields = ["id", "name", "core", "sites", "ranges", "reserved", "quarantine_seconds", "description", "usage"]
        list_serializer_class = counted_list(pool_usage)  # (one query for the page)

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_sites(self, pool) -> list[str]:
        return sorted(site.name for site in pool.core.sites.all())

    @extend_schema_field(VlanUsageSerializer)
    def get_usage(self, pool) -> dict[str, int]:
        usage = self.context.get("usage") or pool_usage([pool])  # (one pool: its own query)
        return usage[pool.pk]


class VlanAllocationSerializer(serializers.ModelSerializer):
    pool = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = VlanAllocation
        fields = [
            "id",
            "pool",
            "vid",
            "state",
            "owner",
            "allocated_at",
            "released_at",
            "quarantine_until",
            "gateway_mapped",
        ]


class DeviceChangeSerializer(serializers.ModelSerializer):
    segment = serializers.CharField(
        source="segment.owner_ref", read_only=True, default=None, allow_null=True, help_text="empty: reconcile"
    )

    class Meta:
        model = DeviceChange
        fields = [
            "id",
            "kind",
            "device",
            "segment",
            "cause",
            "status",
            "diff",
            "attempts",
            "created_at",
            "started_at",
            "finished_at",
            "error",
        ]


class DriftSerializer(serializers.ModelSerializer):
    class Meta:
        model = Drift
        fields = [
            "id",
            "device_kind",
            "device",
            "port",
            "kind",
            "vlans",
            "expected",
            "actual",
            "found_at",
            "last_seen_at",
            "repaired_at",
        ]

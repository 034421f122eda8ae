"""Read-only representations of the inventory. Credentials never appear."""

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


class VlanPoolSerializer(serializers.ModelSerializer):
    core = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = VlanPool
        fields = ["id", "name", "core", "ranges", "reserved", "quarantine_seconds", "description"]


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

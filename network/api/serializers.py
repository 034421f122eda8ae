"""Read-only representations of the inventory. Credentials never appear."""

from rest_framework import serializers

from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool


class SiteSerializer(serializers.ModelSerializer):
    class Meta:
        model = Site
        fields = ["id", "name", "description"]


class CoreTransportSerializer(serializers.ModelSerializer):
    sites = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = CoreTransport
        fields = ["id", "name", "kind", "sites", "vid_min", "vid_max", "service_tag", "description"]


class SwitchPortSerializer(serializers.ModelSerializer):
    core = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = SwitchPort
        fields = ["id", "name", "role", "core", "description"]


class SwitchSerializer(serializers.ModelSerializer):
    site = serializers.SlugRelatedField(slug_field="name", read_only=True)
    ports = SwitchPortSerializer(many=True, read_only=True)

    class Meta:
        model = Switch
        fields = ["id", "name", "site", "platform", "address", "enabled", "description", "ports"]


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

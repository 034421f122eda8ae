"""Read-only inventory endpoints (scope network:read for tokens)."""

from django.db.models import Prefetch
from rest_framework import viewsets

from network.api import serializers as s
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
from portal.models import TokenScope

READ = {"read": (TokenScope.NETWORK_READ,)}


class SiteViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Site.objects.all()
    serializer_class = s.SiteSerializer
    required_scopes = READ


class CoreTransportViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = CoreTransport.objects.prefetch_related("sites")
    serializer_class = s.CoreTransportSerializer
    required_scopes = READ


class SwitchViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Switch.objects.select_related("site").prefetch_related(
        Prefetch("ports", queryset=SwitchPort.objects.select_related("core"))
    )
    serializer_class = s.SwitchSerializer
    required_scopes = READ


class HostViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Host.objects.select_related("site", "switch_port", "switch_port__switch")
    serializer_class = s.HostSerializer
    required_scopes = READ


class VlanPoolViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = VlanPool.objects.select_related("core")
    serializer_class = s.VlanPoolSerializer
    required_scopes = READ


class VlanAllocationViewSet(viewsets.ReadOnlyModelViewSet):
    """VLAN ids handed out or in quarantine (free ids are not listed). Filters: ``pool``, ``state``, ``owner``."""

    serializer_class = s.VlanAllocationSerializer
    required_scopes = READ

    def get_queryset(self):
        qs = VlanAllocation.objects.select_related("pool").exclude(state=VlanAllocation.State.FREE)
        return _filtered(qs, self.request, pool="pool__name", state="state", owner="owner")


class DeviceChangeViewSet(viewsets.ReadOnlyModelViewSet):
    """Every device operation with its diff, status, attempts, timings and the device's own error.
    Filters: ``device``, ``status``, ``kind``, ``segment`` (owner reference, e.g. ``cluster:42``)."""

    serializer_class = s.DeviceChangeSerializer
    required_scopes = READ

    def get_queryset(self):
        qs = DeviceChange.objects.select_related("segment")
        return _filtered(qs, self.request, device="device", status="status", kind="kind", segment="segment__owner_ref")


class DriftViewSet(viewsets.ReadOnlyModelViewSet):
    """Differences the reconciler found between devices and the desired state. ``open=1``: not repaired."""

    serializer_class = s.DriftSerializer
    required_scopes = READ

    def get_queryset(self):
        qs = _filtered(Drift.objects.all(), self.request, device="device", kind="kind")
        if self.request.query_params.get("open") in ("1", "true"):
            qs = qs.filter(repaired_at__isnull=True)
        return qs


def _filtered(qs, request, **fields):
    for param, lookup in fields.items():
        value = request.query_params.get(param)
        if value:
            qs = qs.filter(**{lookup: value})
    return qs

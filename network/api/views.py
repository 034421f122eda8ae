"""Read-only inventory endpoints (scope network:read for tokens). Switch credentials never appear."""

from django.db.models import Prefetch
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import viewsets

from network.api import serializers as s
from network.models import (
    CoreTransport,
    DeviceChange,
    DeviceKind,
    Drift,
    Host,
    Site,
    Switch,
    SwitchPort,
    VlanAllocation,
    VlanPool,
)
from portal.api import Pagination, error_responses, query_param
from portal.models import TokenScope

READ = {"read": (TokenScope.NETWORK_READ,)}
DENIED = {"e403": "the token lacks the scope network:read"}


def _documented(serializer, *filters: OpenApiParameter):
    """List (with ``filters``) and retrieve, each with the errors it can answer."""
    return extend_schema_view(
        list=extend_schema(
            parameters=list(filters),
            responses={200: serializer(many=True), **error_responses(*((400,) if filters else ()), 401, 403, **DENIED)},
        ),
        retrieve=extend_schema(responses={200: serializer, **error_responses(401, 403, 404, **DENIED)}),
    )


def _param(name: str, description: str, enum=None) -> OpenApiParameter:
    return OpenApiParameter(name, OpenApiTypes.STR, enum=enum, description=description)


@_documented(s.SiteSerializer)
class SiteViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Site.objects.all()
    serializer_class = s.SiteSerializer
    required_scopes = READ
    pagination_class = Pagination


@_documented(s.CoreTransportSerializer)
class CoreTransportViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = CoreTransport.objects.prefetch_related("sites")
    serializer_class = s.CoreTransportSerializer
    required_scopes = READ
    pagination_class = Pagination


@_documented(s.SwitchSerializer)
class SwitchViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Switch.objects.select_related("site").prefetch_related(
        Prefetch("ports", queryset=SwitchPort.objects.select_related("core"))
    )
    serializer_class = s.SwitchSerializer
    required_scopes = READ
    pagination_class = Pagination


@_documented(s.HostSerializer)
class HostViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Host.objects.select_related("site", "switch_port", "switch_port__switch")
    serializer_class = s.HostSerializer
    required_scopes = READ
    pagination_class = Pagination


@_documented(s.VlanPoolSerializer)
class VlanPoolViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = VlanPool.objects.select_related("core")
    serializer_class = s.VlanPoolSerializer
    required_scopes = READ
    pagination_class = Pagination


@_documented(
    s.VlanAllocationSerializer,
    _param("pool", "pool name"),
    _param("state", "allocation state", enum=[v for v in VlanAllocation.State.values if v != "free"]),
    _param("owner", "the holder's reference, e.g. cluster:42"),
)
class VlanAllocationViewSet(viewsets.ReadOnlyModelViewSet):
    """VLAN ids handed out or in quarantine (free ids are not listed). Filters: ``pool``, ``state``, ``owner``."""

    queryset = VlanAllocation.objects.select_related("pool").exclude(state=VlanAllocation.State.FREE)
    serializer_class = s.VlanAllocationSerializer
    required_scopes = READ
    pagination_class = Pagination

    def get_queryset(self):
        return _filtered(super().get_queryset(), self.request, pool="pool__name", state="state", owner="owner")


@_documented(
    s.DeviceChangeSerializer,
    _param("device", "switch or host name"),
    _param("status", "change status", enum=DeviceChange.Status.values),
    _param("kind", "switch or host", enum=DeviceKind.values),
    _param("segment", "the segment's owner reference, e.g. cluster:42"),
)
class DeviceChangeViewSet(viewsets.ReadOnlyModelViewSet):
    """Every device operation with its diff, status, attempts, timings and the device's own error.
    Filters: ``device``, ``status``, ``kind``, ``segment`` (owner reference, e.g. ``cluster:42``)."""

    queryset = DeviceChange.objects.select_related("segment")
    serializer_class = s.DeviceChangeSerializer
    required_scopes = READ
    pagination_class = Pagination

    def get_queryset(self):
        return _filtered(
            super().get_queryset(),
            self.request,
            device="device",
            status="status",
            kind="kind",
            segment="segment__owner_ref",
        )


@_documented(
    s.DriftSerializer,
    _param("device", "switch or host name"),
    _param("kind", "kind of drift", enum=Drift.Kind.values),
    _param("open", "1 or true: only drift not repaired yet", enum=["1", "true", "0", "false"]),
)
class DriftViewSet(viewsets.ReadOnlyModelViewSet):
    """Differences the reconciler found between devices and the desired state. ``open=1``: not repaired."""

    queryset = Drift.objects.all()
    serializer_class = s.DriftSerializer
    required_scopes = READ
    pagination_class = Pagination

    def get_queryset(self):
        qs = _filtered(super().get_queryset(), self.request, device="device", kind="kind")
        if self.request.query_params.get("open") in ("1", "true"):
            qs = qs.filter(repaired_at__isnull=True)
        return qs


def _filtered(qs, request, **fields):
    for param, lookup in fields.items():
        value = query_param(request, param)
        if value:
            qs = qs.filter(**{lookup: value})
    return qs

"""Read-only inventory endpoints (scope network:read for tokens; in the browser, administrators who may view the
model in the admin). Switch credentials never appear."""

from django.db.models import Prefetch
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import permissions, viewsets
from rest_framework.exceptions import ValidationError

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
from portal.api import error_responses, query_param
from portal.models import TokenScope
from portal.tokens import HasScope, StaffSessionMayView

DENIED = {
    "e403": "the token lacks the scope network:read, or the browser session's account is not an administrator who "
    "may view these in the admin"
}
ALLOCATION_STATES = [v for v in VlanAllocation.State.values if v != "free"]
OPEN_VALUES = ["1", "true", "0", "false"]


def _documented(serializer, *filters: OpenApiParameter):
    """List (with ``filters``) and retrieve, each with the errors it can answer."""
    return extend_schema_view(
        list=extend_schema(
            parameters=list(filters),
            responses={200: serializer(many=True), **error_responses(400, 401, 403, **DENIED)},
        ),
        retrieve=extend_schema(responses={200: serializer, **error_responses(401, 403, 404, **DENIED)}),
    )


def _param(name: str, description: str, enum=None) -> OpenApiParameter:
    return OpenApiParameter(name, OpenApiTypes.STR, enum=enum, description=description)


# Readable with the scope network:read; ``filter_params`` maps a query parameter to the lookup it filters on
# (exact match, ignored when empty); ``filter_choices``: the values a parameter may take (any other is a 400,
# not an empty list that reads like "nothing there"). A comment, not a docstring: the schema would show it for
# every endpoint.
class _ReadOnly(viewsets.ReadOnlyModelViewSet):
    permission_classes = [permissions.IsAuthenticated, HasScope, StaffSessionMayView]
    required_scopes = {"read": (TokenScope.NETWORK_READ,)}
    filter_params: dict[str, str] = {}
    filter_choices: dict[str, list[str]] = {}

    def get_queryset(self):
        qs = super().get_queryset()
        for param, lookup in self.filter_params.items():
            value = query_param(self.request, param)
            if value:
                _check_choice(param, value, self.filter_choices.get(param))
                qs = qs.filter(**{lookup: value})
        return qs


def _check_choice(param: str, value: str, choices: list[str] | None) -> None:
    if choices is not None and value not in choices:
        raise ValidationError({param: [f"{value!r} is not one of: {', '.join(choices)}"]})


@_documented(s.SiteSerializer)
class SiteViewSet(_ReadOnly):
    queryset = Site.objects.all()
    serializer_class = s.SiteSerializer


@_documented(s.CoreTransportSerializer)
class CoreTransportViewSet(_ReadOnly):
    queryset = CoreTransport.objects.prefetch_related("sites")
    serializer_class = s.CoreTransportSerializer


@_documented(s.SwitchSerializer)
class SwitchViewSet(_ReadOnly):
    queryset = Switch.objects.select_related("site").prefetch_related(
        Prefetch("ports", queryset=SwitchPort.objects.select_related("core"))
    )
    serializer_class = s.SwitchSerializer


@_documented(s.HostSerializer)
class HostViewSet(_ReadOnly):
    queryset = Host.objects.select_related("site", "switch_port", "switch_port__switch")
    serializer_class = s.HostSerializer


@_documented(s.VlanPoolSerializer)
class VlanPoolViewSet(_ReadOnly):
    """VLAN pools with the sites their core joins and their ids' usage now (``usage.free``: what a new cluster's
    network may take; a scheduler checks it before it places a cluster)."""

    queryset = VlanPool.objects.select_related("core").prefetch_related("core__sites")

    serializer_class = s.VlanPoolSerializer


@_documented(
    s.VlanAllocationSerializer,
    _param("pool", "pool name"),
    _param("state", "allocation state", enum=ALLOCATION_STATES),
    _param("owner", "the holder's reference, e.g. cluster:42"),
)
class VlanAllocationViewSet(_ReadOnly):
    """VLAN ids handed out or in quarantine (free ids are not listed). Filters: ``pool``, ``state``, ``owner``."""

    queryset = VlanAllocation.objects.select_related("pool").exclude(state=VlanAllocation.State.FREE)
    serializer_class = s.VlanAllocationSerializer
    filter_params = {"pool": "pool__name", "state": "state", "owner": "owner"}
    filter_choices = {"state": ALLOCATION_STATES}


@_documented(
    s.DeviceChangeSerializer,
    _param("device", "switch or host name"),
    _param("status", "change status", enum=DeviceChange.Status.values),
    _param("kind", "switch or host", enum=DeviceKind.values),
    _param("segment", "the segment's owner reference, e.g. cluster:42"),
)
class DeviceChangeViewSet(_ReadOnly):
    """Every device operation with its diff, status, attempts, timings and the device's own error.
    Filters: ``device``, ``status``, ``kind``, ``segment`` (owner reference, e.g. ``cluster:42``)."""

    queryset = DeviceChange.objects.select_related("segment")
    serializer_class = s.DeviceChangeSerializer
    filter_params = {"device": "device", "status": "status", "kind": "kind", "segment": "segment__owner_ref"}
    filter_choices = {"status": DeviceChange.Status.values, "kind": DeviceKind.values}


@_documented(
    s.DriftSerializer,
    _param("device", "switch or host name"),
    _param("kind", "kind of drift", enum=Drift.Kind.values),
    _param("open", "1 or true: only drift not repaired yet; 0 or false: only repaired drift", enum=OPEN_VALUES),
)
class DriftViewSet(_ReadOnly):
    """Differences the reconciler found between devices and the desired state. ``open=1``: not repaired."""

    queryset = Drift.objects.all()
    serializer_class = s.DriftSerializer
    filter_params = {"device": "device", "kind": "kind"}
    filter_choices = {"kind": Drift.Kind.values}

    def get_queryset(self):
        qs = super().get_queryset()
        value = query_param(self.request, "open")
        if value:
            _check_choice("open", value, OPEN_VALUES)
            qs = qs.filter(repaired_at__isnull=value in ("1", "true"))
        return qs

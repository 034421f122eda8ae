"""Read-only inventory endpoints (scope network:read for tokens)."""

from django.db.models import Prefetch
from rest_framework import viewsets

from network.api import serializers as s
from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool
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

"""Access API routes; included by ``portal.urls`` at ``api/access/``."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from access.api import views

router = SimpleRouter(trailing_slash=True)
router.register("credentials", views.CredentialViewSet, basename="access-credential")
router.register("clusters", views.ClusterAccessViewSet, basename="access-cluster")

urlpatterns = [
    path("vpn-profiles/", views.VpnProfileView.as_view(), name="access-vpn-profiles"),
    path("ssh-certificates/", views.SshCertificateView.as_view(), name="access-ssh-certificates"),
    path("host-certificates/", views.HostCertificateView.as_view(), name="access-host-certificates"),
    path("host-certificates/access/", views.NodeAccessView.as_view(), name="access-host-access"),
    path("gateway/state/", views.GatewayStateView.as_view(), name="access-gateway-state"),
    path("gateway/sessions/", views.GatewaySessionsView.as_view(), name="access-gateway-sessions"),
    path("crl.pem", views.CrlView.as_view(), name="access-crl"),
    *router.urls,
]

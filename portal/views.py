"""Portal-wide endpoints: the health check and the Prometheus metrics for operators, logging out for users."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import redirect, render
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, renderers
from rest_framework.response import Response
from rest_framework.views import APIView

from portal import metrics
from portal.models import ApiToken, TokenScope


def healthz(request):
    """Liveness for load balancers: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


class PrometheusRenderer(renderers.BaseRenderer):
    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, dict):  # an error: its message as text
            return f"{data.get('detail', data)}\n".encode()
        return data.encode()


class MayScrape(permissions.BasePermission):
    """A token with ``metrics:read`` (what Prometheus is given), or the browser session of an admin who may view
    every cluster (``clusters.selectors.staff_may``: the counts say no more than the clusters they see)."""

    message = "Scraping needs an API token with the metrics:read scope (or an admin session)."

    def has_permission(self, request, view) -> bool:
        if not request.user.is_authenticated:
            return False
        if isinstance(request.auth, ApiToken):
            return request.auth.has_scope(TokenScope.METRICS)
        from clusters.models import VirtualCluster
        from clusters.selectors import staff_may

        return staff_may(request.user, "view", VirtualCluster)


@extend_schema(exclude=True)  # an operators' endpoint in Prometheus's format, not part of the REST API
class MetricsView(APIView):
    """``GET /metrics``: see ``portal.metrics``."""

    permission_classes = [MayScrape]
    renderer_classes = [PrometheusRenderer]

    def get(self, request):
        response = Response(metrics.render(metrics.collect()), content_type=metrics.CONTENT_TYPE)
        response["Cache-Control"] = "no-store"
        return response


class LogoutView(auth_views.LogoutView):
    """Log out by POST (the header's button), saying so on the login page. A GET — the address typed, an old
    bookmark — asks to confirm with a button instead of Django's blank 405 page; logged out already: the
    login page."""

    http_method_names = ["get", "post", "options"]
    template_name = "registration/logout_confirm.html"

    def get(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect(settings.LOGIN_URL)
        return render(request, self.template_name)

    def post(self, request, *args, **kwargs):
        was_in = request.user.is_authenticated
        response = super().post(request, *args, **kwargs)
        if was_in:
            messages.info(request, "You are logged out.")
        return response

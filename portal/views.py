"""Portal-wide endpoints: the health check and the Prometheus metrics for operators, logging out for users, and
the page where users make and revoke API tokens for their own scripts."""

import time

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from django.views.decorators.http import require_http_methods
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, renderers, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from portal import logins, metrics, sessions, tokens
from portal import secrets as portal_secrets
from portal.api import error_responses
from portal.forms import LoginForm
from portal.models import ApiToken, TokenScope


class BeatStatusSerializer(serializers.Serializer):
    ok = serializers.BooleanField(allow_null=True, help_text="null: clusters.expire has not run yet (or no beat)")
    last_success_age = serializers.FloatField(allow_null=True, help_text="seconds since clusters.expire last succeeded")
    interval = serializers.FloatField(allow_null=True, help_text="CLUSTER_EXPIRY_INTERVAL")


class StatusSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["ok", "degraded", "down"],
        help_text="down: nothing is provisioned now (no broker, or no central worker); degraded: the hosts_unusable "
        "cannot get a cluster's network, or beat is late",
    )
    checked_at = serializers.DateTimeField(help_text="the answer is kept 10 s")
    broker = serializers.BooleanField(help_text="the web server reaches the Celery broker")
    queues_without_worker = serializers.ListField(child=serializers.CharField())
    hosts_unusable = serializers.ListField(
        child=serializers.CharField(), help_text="enabled hosts whose agent or whose site's switch worker is missing"
    )
    beat = BeatStatusSerializer()


class StatusView(APIView):
    """``GET /api/status/``: whether a cluster asked for now would be provisioned (``portal.status``)."""

    required_scopes = {
        "read": (
            TokenScope.CLUSTERS_READ,
            TokenScope.CLUSTERS_WRITE,
            TokenScope.CLUSTERS_MANAGE,
            TokenScope.NETWORK_READ,
            TokenScope.METRICS,
        )
    }

    @extend_schema(responses={200: StatusSerializer, **error_responses(401, 403)})
    def get(self, request):
        """Whether provisioning works now: the broker, a worker on every queue the devices need, beat. A scheduler
        holds its jobs while it is ``down``, and places none on ``hosts_unusable``. Always 200: the body says."""
        from portal.status import provisioning_status

        response = Response(StatusSerializer(provisioning_status()).data)
        response["Cache-Control"] = "no-store"
        return response


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


class LoginView(auth_views.LoginView):
    """Django's login page (the portal's form); a user signed in already goes on to ``next``. A ``next`` that is
    the login page itself is no place to go on to (Django raised a 500 for the loop, or the browser went round
    it): the home page then."""

    authentication_form = LoginForm
    redirect_authenticated_user = True

    def get_redirect_url(self):
        from urllib.parse import urlsplit

        url = super().get_redirect_url()
        if url and urlsplit(url).path == self.request.path:
            return ""
        return url


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
        from django.contrib.auth import BACKEND_SESSION_KEY

        from portal import sso

        was_in = request.user.is_authenticated
        by_proxy = request.session.get(BACKEND_SESSION_KEY) == sso.BACKEND
        response = super().post(request, *args, **kwargs)
        if by_proxy and settings.SSO_LOGOUT_URL:  # signed in by the proxy: its logout too
            return redirect(settings.SSO_LOGOUT_URL)
        if was_in:
            messages.info(request, "You are logged out.")
        return response


# --- API tokens a user makes for their own scripts --------------------------------------------------------------

#: ended (revoked or expired) tokens the page lists, newest first; live ones are always all listed
ENDED_TOKENS_SHOWN = 20


_NEW_TOKEN = "portal.new_token"  # the session key holding a token just made, until the page shows it (once)
_NEW_TOKEN_SHOWN_FOR = 120  # seconds: the redirect's page shows it; later (never followed, a stale tab) never


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
@never_cache
@sensitive_variables("secret", "made")
@sensitive_post_parameters()
def my_tokens(request):
    """GET: the user's API tokens and the form to make one (and, once, the secret of the one just made). POST:
    make it, then back to the page (a reload of the page makes no second token)."""
    from portal.forms import TokenForm

    max_days = settings.USER_TOKEN_MAX_DAYS
    form = TokenForm(request.POST if request.method == "POST" else None, max_days=max_days) if max_days else None
    status = 200
    if request.method == "POST":
        if form is None:
            messages.error(request, "API tokens are made by the administrators here: ask them for one.")
            return redirect("tokens")
        if form.is_valid():
            try:
                made, secret = tokens.token_create_own(user=request.user, **form.cleaned_data)
            except tokens.TokenRefused as exc:
                if exc.field in form.fields:
                    form.add_error(exc.field, exc.message)
                else:
                    messages.error(request, exc.message)
                status = 400
            else:
                # ciphertext in the session store (a redirect never followed leaves it there until the next page)
                request.session[_NEW_TOKEN] = [made.pk, portal_secrets.encrypt(secret), time.time()]
                return redirect("tokens")
        else:
            status = 400
    made = secret = None
    # (a page that never came: gone with the next one; a HEAD — a link checker, a prefetch — shows nothing, takes
    # nothing)
    shown = request.session.pop(_NEW_TOKEN, None) if request.method == "GET" else None
    if shown and time.time() - shown[2] < _NEW_TOKEN_SHOWN_FOR:
        made = ApiToken.objects.filter(user=request.user, pk=shown[0]).first()
        secret = _shown_secret(shown[1]) if made else None
        made = made if secret else None
    live = tokens.tokens_live(request.user)
    ended = ApiToken.objects.filter(user=request.user, cluster=None).exclude(pk__in=live.values("pk"))
    context = {
        "form": form,
        "made": made,
        "secret": secret,
        "live": list(live.order_by("-created_at")),
        "ended": list(ended.order_by("-created_at")[:ENDED_TOKENS_SHOWN]),
        "ended_shown": ENDED_TOKENS_SHOWN,
        "signins": logins.sign_ins(request.user),
        "sessions": sessions.sessions_of(request.user),
        "this_session": request.session.session_key,
    }
    return render(request, "portal/tokens.html", context, status=status)


@require_http_methods(["POST"])
@login_required
def sign_out_others(request):
    """Sign every other browser of the account out (a lost or lent device, a sign-in that was not the holder's);
    this one stays."""
    from django.urls import reverse

    account = sessions.sign_out_elsewhere(
        user=request.user, keep=request.session.session_key, why="by its holder, from the account page"
    )
    if account is not None:
        sessions.stay_signed_in(request, account)
    messages.success(request, "Every other browser session of yours is signed out; this one stays.")
    return redirect(reverse("tokens") + "#sessions")


def _shown_secret(stored: str) -> str | None:
    """The secret a session holds for the page to show once; None for one it cannot read (another key)."""
    try:
        return portal_secrets.decrypt(stored)
    except ImproperlyConfigured:
        return None


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
@never_cache
def token_revoke(request, pk: int):
    """GET: what revoking this token does, and a button that does it. POST: revoke it."""
    token = get_object_or_404(ApiToken, user=request.user, pk=pk)
    if request.method != "POST":
        return render(request, "portal/token_revoke.html", {"token": token})
    if token.revoked_at is not None:
        messages.info(request, f"Token {token.name} was already revoked.")
    else:
        tokens.token_revoke(token=token)
        messages.success(request, f"Revoked token {token.name} ({token.prefix}…): it is refused from now on.")
    return redirect("tokens")

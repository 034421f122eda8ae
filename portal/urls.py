"""URL routes. Each app adds its own module here as it grows (``<app>.urls`` for pages, ``<app>.api.urls``)."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from clusters import views as cluster_views
from portal import sso, views
from portal.forms import LoginForm

admin.site.site_header = "VirtCloud portal administration"
admin.site.site_title = "VirtCloud admin"
admin.site.login_form = LoginForm

handler400 = "portal.api.bad_request"
handler404 = "portal.api.not_found"
handler500 = "portal.api.server_error"

urlpatterns = [
    path("", cluster_views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.MetricsView.as_view(), name="metrics"),
    path(
        "login/",
        views.LoginView.as_view(),
        name="login",
    ),
    path("logout/", views.LogoutView.as_view(), name="logout"),
    path("sso/login/", sso.sso_login, name="sso-login"),
    path("tokens/", views.my_tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
    path("sessions/sign-out-others/", views.sign_out_others, name="sign-out-others"),
    path("admin/", admin.site.urls),
    path("api/status/", views.StatusView.as_view(), name="status"),
    path("api/", include("clusters.api.urls")),
    path("api/network/", include("network.api.urls")),
    path("api/access/", include("access.api.urls")),
    path("access/", include("access.urls")),
    path("clusters/", include("clusters.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # (the split view serves its start-up script as a file of its own: no inline script, under the CSP)
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
]

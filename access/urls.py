"""Browser pages of the access service; included by ``portal.urls`` at ``access/``."""

from django.urls import path

from access import views

app_name = "access"
urlpatterns = [
    path("", views.my_clusters, name="my-clusters"),
    path("vpn-profile/", views.vpn_profile_download, name="vpn-profile"),
    path("ssh/", views.ssh_download, name="ssh"),
    path("credentials/<int:pk>/revoke/", views.credential_revoke, name="credential-revoke"),
]

from django.urls import path

from clusters.api.views import ClusterViewSet, ImageViewSet, PublicNetworksView, PublicPrefixViewSet, WebhookViewSet
from portal.api import Router

router = Router(trailing_slash=True)
router.register("clusters", ClusterViewSet, basename="cluster")
router.register("images", ImageViewSet, basename="image")
router.register("webhooks", WebhookViewSet, basename="webhook")
router.register("public-prefixes", PublicPrefixViewSet, basename="public-prefix")
urlpatterns = [
    path("public-networks/", PublicNetworksView.as_view(), name="public-networks"),
    *router.urls,
]

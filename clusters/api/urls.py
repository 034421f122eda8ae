from clusters.api.views import ClusterViewSet, ImageViewSet
from portal.api import Router

router = Router(trailing_slash=True)
router.register("clusters", ClusterViewSet, basename="cluster")
router.register("images", ImageViewSet, basename="image")
urlpatterns = router.urls

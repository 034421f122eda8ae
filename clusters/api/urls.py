from clusters.api.views import ClusterViewSet
from portal.api import Router

router = Router(trailing_slash=True)
router.register("clusters", ClusterViewSet, basename="cluster")
urlpatterns = router.urls

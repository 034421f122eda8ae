from network.api import views
from portal.api import Router

router = Router(trailing_slash=True)
router.register("sites", views.SiteViewSet)
router.register("cores", views.CoreTransportViewSet)
router.register("switches", views.SwitchViewSet)
router.register("hosts", views.HostViewSet)
router.register("pools", views.VlanPoolViewSet)
router.register("allocations", views.VlanAllocationViewSet, basename="vlanallocation")
router.register("changes", views.DeviceChangeViewSet, basename="devicechange")
router.register("drift", views.DriftViewSet, basename="drift")
urlpatterns = router.urls

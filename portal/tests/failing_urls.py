"""The portal's URLs plus two views that fail, for the server-error tests (``pytest.mark.urls``)."""

from django.urls import path

from portal.urls import handler400, handler404, handler500, urlpatterns  # noqa: F401


def boom(request):
    raise RuntimeError("a bug")


urlpatterns = [*urlpatterns, path("boom/", boom), path("api/boom/", boom)]

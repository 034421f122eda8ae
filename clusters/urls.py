"""Browser pages of one cluster — its page, extend, tear down — (the list is the home page, ``/``) and the images
page; included by ``portal.urls`` at ``clusters/``."""

from django.urls import path

from clusters import views

app_name = "clusters"
urlpatterns = [
    path("<int:pk>/", views.detail, name="detail"),
    path("<int:pk>/extend/", views.extend, name="extend"),
    path("<int:pk>/teardown/", views.teardown, name="teardown"),
    path("images/", views.images, name="images"),
    path("images/<slug:name>/delete/", views.image_delete, name="image-delete"),
]

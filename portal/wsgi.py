"""WSGI entry point (gunicorn portal.wsgi)."""

import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
application = get_wsgi_application()


def _warm_and_freeze() -> None:
    """Import every view now (the URLconf pulls in each app's views, serializers and the schema code), then
    move everything alive at that point out of the cyclic garbage collector's reach (``gc.freeze``): a full
    collection otherwise walks the whole of Django, DRF and the apps, tens of ms on whichever request's path
    it falls (a scheduler's POST waits for it). The Celery workers do the same (``portal.celery``)."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports every view
    gc.freeze()


_warm_and_freeze()

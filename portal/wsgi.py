"""WSGI entry point (gunicorn portal.wsgi)."""

import gc
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup(set_prefix=False)  # (what ``get_wsgi_application`` does, with the portal's handler)

from portal.requests import PortalWSGIHandler  # noqa: E402 (after setup)

# requests in a charset the portal does not decode are refused, not a 500 (``portal.requests``)
application = PortalWSGIHandler()


def _warm_and_freeze() -> None:
    """Import every view now (the URLconf pulls in each app's views, serializers and the schema code), then
    move everything alive at that point out of the cyclic garbage collector's reach (``gc.freeze``): a full
    collection otherwise walks the whole of Django, DRF and the apps, tens of ms on whichever request's path
    it falls (a scheduler's POST waits for it). The Celery workers do the same (``portal.celery``)."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports every view
    gc.freeze()


_warm_and_freeze()

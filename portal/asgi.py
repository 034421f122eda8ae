"""ASGI entry point (uvicorn, daphne): the portal's handler, as ``portal.wsgi``'s (``portal.requests``)."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup(set_prefix=False)  # (what ``get_asgi_application`` does, with the portal's handler)

from portal.requests import PortalASGIHandler  # noqa: E402 (after setup)

application = PortalASGIHandler()

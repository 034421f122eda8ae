"""The Celery app as the real-worker tests start it: the portal's app plus the fake device drivers of
``network.tests.fakes`` (platform/driver ``fake``), so a worker process can converge a fake fabric."""

from network.tests import fakes
from portal.celery import app

fakes.register()

__all__ = ["app"]

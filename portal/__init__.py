"""VirtCloud portal: network as a resource for virtual clusters."""

from .celery import app as celery_app

__all__ = ["celery_app"]

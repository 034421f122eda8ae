"""Signals other apps listen to (``access`` revokes credentials when a cluster ends)."""

from django.dispatch import Signal

# Sent after commit when a cluster is torn down or failed: kwargs ``cluster``.
cluster_ended = Signal()
# Sent after commit when a cluster's provisioning made it READY: kwargs ``cluster_id``.
cluster_ready = Signal()

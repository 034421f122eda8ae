"""Domain errors of the VLAN life-cycle service. Each names the object it is about and carries a
``status`` hint for the API (409 conflict, 422 bad topology, 502 a device failed)."""

from __future__ import annotations

from portal.errors import DomainError


class NetworkError(DomainError):
    """Base of the service's domain errors; ``str(exc)`` is the message a user sees."""


class PoolExhausted(NetworkError):
    """No free VLAN id left in the pool(s) that could serve the request."""

    status = 409


class NoCoreForSites(NetworkError):
    """No core transport joins every site the segment needs (or the segment's core does not reach a new
    site)."""

    status = 422


class HostUnavailable(NetworkError):
    """A host (or the switch it hangs on) is disabled: the portal would not touch it."""

    status = 422


class SegmentExists(NetworkError):
    """The owner already has a live segment."""

    status = 409


class SegmentClosed(NetworkError):
    """The segment is going away (or gone); it cannot be changed any more."""

    status = 409


class DeviceChangeFailed(NetworkError):
    """A device failed for good (after its retries): carries the device and the device's own message.

    The constructor arguments are kept in ``args`` so that Celery can rebuild the exception from a result
    backend (JSON serialiser) and the caller of a workflow sees the same device and message."""

    status = 502

    def __init__(self, device: str, message: str, change_id: int | None = None):
        Exception.__init__(self, device, message, change_id)
        self.device = device
        self.message = message
        self.change_id = change_id

    def __str__(self) -> str:
        return f"{self.device}: {self.message}"

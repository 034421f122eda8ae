"""Errors a user or the middleware can cause, each with the HTTP status the API answers with."""

from __future__ import annotations

from portal.errors import DomainError


class ClusterError(DomainError):
    """A refused request about a cluster. ``field`` names the offending input when there is one."""


class InvalidTopology(ClusterError):
    """The request is well-formed but cannot be built on this network (host at a site no core reaches, …)."""

    status = 422
    code = "invalid_topology"


class Conflict(ClusterError):
    """The request clashes with the current state (pool exhausted, wrong state for this transition, …)."""

    status = 409
    code = "conflict"


class Busy(Conflict):
    """The cluster is in the middle of a workflow (provisioning, a node change) that ends in READY: the same
    request succeeds once it is ready. The API answers ``Retry-After`` (seconds) with it; ``Conflict`` itself
    is a refusal that retrying does not change (the cluster has ended)."""

    code = "busy"
    retry_after = 2  # seconds; a node change on real switches takes a few


class PoolExhausted(Conflict):
    code = "pool_exhausted"


class QuotaExceeded(Conflict):
    """The owner (or the cluster's group) already has as many live clusters or nodes as its quota allows."""

    code = "quota_exceeded"


class NotAllowed(ClusterError):
    status = 403
    code = "forbidden"


class Gone(ClusterError):
    """What the request names was deleted while it was being handled."""

    status = 404
    code = "not_found"


class EventsPruned(ClusterError):
    """A feed reader's cursor is behind events pruning deleted (``CLUSTER_EVENT_RETENTION``): it may have missed
    some. It reads the clusters again and goes on after ``resume_after`` (as a Kubernetes watch whose
    resourceVersion is too old is answered 410 and lists again)."""

    status = 410
    code = "events_pruned"

    def __init__(self, message: str, *, resume_after: int):
        super().__init__(message)
        self.resume_after = resume_after

    def as_dict(self) -> dict:
        return {**super().as_dict(), "resume_after": self.resume_after}

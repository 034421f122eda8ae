"""Connectivity policy (paper §2.1): the policy decides whether a cluster is public or closed, not the user.

- An approved image without administrator rights: the provider can take responsibility for the VMs, so the
  cluster may be **public** (attached to the provider's routed network, addresses from its pool) — when
  the provider has a public prefix configured; otherwise it is closed.
- A user-provided image, or administrator rights in the VMs: the provider cannot vouch for the VMs; they
  must not be reachable through the provider's address space, so the cluster is **closed** (reachable only
  through the access gateway; any addresses, even ones other clusters use at the same time).

A request may ask for a closed cluster whatever the policy decides ("legacy insecure services and
components": an approved image running software with known flaws), never for a public one the policy makes
closed. Only an admin can override the decision, and the override is audited.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusters.errors import ClusterError, InvalidTopology
from clusters.models import Connectivity, Image


@dataclass(frozen=True)
class Decision:
    connectivity: str
    reason: str


def decide(*, image: Image, admin_rights: bool, public_available: bool, requested: str = "") -> Decision:
    """The connectivity of a new cluster and why. ``requested`` is what the request asks for ("": nothing):
    closed is granted always (the reason says it was asked for, and what the policy alone decides); public
    only where the policy decides public — otherwise a refusal naming the ``connectivity`` field: 422 when
    only the missing public prefix stands in the way (as for an admin's override), else 400."""
    own = _policy(image=image, admin_rights=admin_rights, public_available=public_available)
    if requested == Connectivity.CLOSED:
        if own.connectivity == Connectivity.PUBLIC:
            return Decision(Connectivity.CLOSED, f"closed on request (the policy allows public: {own.reason})")
        return Decision(Connectivity.CLOSED, f"closed on request (and by the policy: {own.reason})")
    if requested == Connectivity.PUBLIC and own.connectivity != Connectivity.PUBLIC:
        ask = "ask for closed or leave connectivity out"
        if _policy(image=image, admin_rights=admin_rights, public_available=True).connectivity == Connectivity.PUBLIC:
            raise InvalidTopology(
                f"public was asked for, but no public prefix is configured; {ask}", field="connectivity"
            )
        raise ClusterError(
            f"public was asked for, but the policy makes this cluster closed: {own.reason}; {ask} (only an "
            "administrator can override the policy)",
            field="connectivity",
        )
    return own


def _policy(*, image: Image, admin_rights: bool, public_available: bool) -> Decision:
    if not image.approved:
        return Decision(Connectivity.CLOSED, f"image {image.name} is user-provided (not approved by the provider)")
    if admin_rights:
        return Decision(Connectivity.CLOSED, "users have administrator rights in the VMs")
    if not public_available:
        return Decision(Connectivity.CLOSED, "approved image without admin rights, but no public prefix is configured")
    return Decision(Connectivity.PUBLIC, f"approved image {image.name} without administrator rights")

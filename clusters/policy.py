"""Connectivity policy (paper §2.1): the policy decides whether a cluster is public or closed, not the user.

- An approved image without administrator rights: the provider can take responsibility for the VMs, so the
  cluster may be **public** (attached to the provider's routed network, addresses from its pool) — when
  the provider has a public prefix configured; otherwise it is closed.
- A user-provided image, or administrator rights in the VMs: the provider cannot vouch for the VMs; they
  must not be reachable through the provider's address space, so the cluster is **closed** (reachable only
  through the access gateway; any addresses, even ones other clusters use at the same time).

Only an admin can override the decision, and the override is audited.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusters.models import Connectivity, Image


@dataclass(frozen=True)
class Decision:
    connectivity: str
    reason: str


def decide(*, image: Image, admin_rights: bool, public_available: bool) -> Decision:
    if not image.approved:
        return Decision(Connectivity.CLOSED, f"image {image.name} is user-provided (not approved by the provider)")
    if admin_rights:
        return Decision(Connectivity.CLOSED, "users have administrator rights in the VMs")
    if not public_available:
        return Decision(Connectivity.CLOSED, "approved image without admin rights, but no public prefix is configured")
    return Decision(Connectivity.PUBLIC, f"approved image {image.name} without administrator rights")

"""The connectivity policy (paper §2.1) and what a request may ask of it: closed always, public only where
the policy decides public."""

from __future__ import annotations

import pytest

from clusters import policy
from clusters.errors import ClusterError, InvalidTopology
from clusters.models import Image, VirtualCluster

APPROVED = Image(name="debian-12", approved=True)
CUSTOM = Image(name="my-own", approved=False)


def decide(image=APPROVED, admin_rights=False, public_available=True, requested=""):
    return policy.decide(image=image, admin_rights=admin_rights, public_available=public_available, requested=requested)


@pytest.mark.parametrize("requested", ["", "public"])
def test_an_approved_image_without_admin_rights_is_public_unless_closed_is_asked_for(requested):
    assert decide(requested=requested) == policy.Decision(
        "public", "approved image debian-12 without administrator rights"
    )


def test_closed_asked_for_where_the_policy_allows_public_is_granted_and_says_so():
    assert decide(requested="closed") == policy.Decision(
        "closed", "closed on request (the policy allows public: approved image debian-12 without administrator rights)"
    )


@pytest.mark.parametrize(
    "image, admin_rights, public_available, because",
    [
        (CUSTOM, False, True, "image my-own is user-provided (not approved by the provider)"),
        (APPROVED, True, True, "users have administrator rights in the VMs"),
        (APPROVED, False, False, "approved image without admin rights, but no public prefix is configured"),
    ],
)
def test_where_the_policy_says_closed_asking_for_closed_is_recorded_too(image, admin_rights, public_available, because):
    """Closed anyway; the reason says the owner wanted it so, which an admin deciding an override reads."""
    kwargs = {"image": image, "admin_rights": admin_rights, "public_available": public_available}
    assert decide(**kwargs) == policy.Decision("closed", because)
    assert decide(**kwargs, requested="closed") == policy.Decision(
        "closed", f"closed on request (and by the policy: {because})"
    )


@pytest.mark.parametrize(
    "image, admin_rights, because",
    [(CUSTOM, False, "image my-own is user-provided"), (APPROVED, True, "administrator rights in the VMs")],
)
def test_public_asked_for_where_the_policy_says_closed_is_a_400_naming_the_field(image, admin_rights, because):
    with pytest.raises(ClusterError) as refused:
        decide(image=image, admin_rights=admin_rights, requested="public")
    assert not isinstance(refused.value, InvalidTopology)
    assert refused.value.status == 400 and refused.value.field == "connectivity"
    assert because in refused.value.message and "ask for closed or leave connectivity out" in refused.value.message
    # however the prefix stands: the policy, not the network, refuses it
    with pytest.raises(ClusterError) as refused:
        decide(image=image, admin_rights=admin_rights, public_available=False, requested="public")
    assert refused.value.status == 400 and because in refused.value.message


def test_public_asked_for_with_no_public_prefix_is_a_422_as_for_an_override():
    with pytest.raises(InvalidTopology) as refused:
        decide(public_available=False, requested="public")
    assert refused.value.status == 422 and refused.value.field == "connectivity"
    assert refused.value.as_dict() == {
        "connectivity": [
            "public was asked for, but no public prefix is configured; ask for closed or leave connectivity out"
        ],
        "code": "invalid_topology",
    }


@pytest.mark.parametrize("approved", [True, False])
def test_every_reason_fits_the_record_with_the_longest_image_name(approved):
    image = Image(name="i" * Image._meta.get_field("name").max_length, approved=approved)
    room = VirtualCluster._meta.get_field("connectivity_reason").max_length
    for requested in ("", "closed"):
        assert len(decide(image=image, requested=requested).reason) <= room

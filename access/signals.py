"""Receivers that turn events elsewhere into revocations (connected in ``AccessConfig.ready``), and a closed
cluster becoming ready into a state for the gateways on this host.

Each one is cheap when there is nothing to revoke (one indexed query) because some fire on every save.
"""

from __future__ import annotations

import logging

from django.db import transaction

logger = logging.getLogger(__name__)


def cluster_ended(sender, cluster, **kwargs) -> None:
    """A cluster was torn down or failed (sent after commit): every credential for it is revoked, and its node
    tokens."""
    from access import services

    _revoke_for_cluster(cluster, f"ended: {cluster.get_state_display()}")
    services.node_tokens_revoke(cluster_id=cluster.pk)


def cluster_deleted(sender, instance, **kwargs) -> None:
    """A cluster's row was deleted (by a script: admin deletes only ended ones): its credentials are revoked
    as when it ends (same transaction)."""
    _revoke_for_cluster(instance, "deleted")


def _revoke_for_cluster(cluster, what: str) -> None:
    from access import services
    from access.models import RevocationReason

    count = services.credentials_revoke_for(
        cluster=cluster.pk,
        reason=RevocationReason.CESSATION_OF_OPERATION,
        note=f"cluster {cluster.name} ({cluster.pk}) {what}",
    )
    if count:
        logger.info("access: cluster %s %s, revoked %d credential(s)", cluster.pk, what, count)


def cluster_saved(sender, instance, created, raw=False, **kwargs) -> None:
    """A cluster changed owner, group, state or connectivity: holders who may no longer enter lose their
    credentials (at once, in the same transaction as the change), and node tokens made for its former owner, or
    for a cluster that is no longer active, are revoked."""
    if raw or created:
        return
    from django.utils import timezone

    from access import services
    from access.models import USER_KINDS, Credential
    from clusters.models import ACTIVE_STATES

    # node tokens act as the owner they were made for, while the cluster is active
    active = instance.state in ACTIVE_STATES
    services.node_tokens_revoke(cluster_id=instance.pk, keep_user_id=instance.owner_id if active else None)
    if not Credential.objects.live(timezone.now()).for_cluster(instance.pk).filter(kind__in=USER_KINDS).exists():
        return
    services.credentials_revoke_unauthorized(cluster=instance)


def cluster_ready(sender, cluster_id, **kwargs) -> None:
    """A provisioning made the cluster READY (sent after its commit): the gateways on this host get a state
    with it at once, instead of at their next pull, so a user who downloads a profile right away gets in (a
    gateway that cannot take it now pulls it later: the sender is robust)."""
    from access import services

    services.gateways_install_ready_cluster(cluster_id=cluster_id)


def user_groups_changed(sender, instance, action, reverse, pk_set, **kwargs) -> None:
    """A user left a group (``user.groups.remove``/``clear``, or ``group.user_set.remove``/``clear``)."""
    from django.contrib.auth import get_user_model

    from access import selectors, services

    if action == "pre_clear" and reverse:
        # group.user_set.clear(): post_clear has no pk_set, remember who was in the group.
        instance._access_cleared_users = list(instance.user_set.values_list("pk", flat=True))
        return
    if action not in ("post_remove", "post_clear"):
        return
    if reverse:
        ids = pk_set if action == "post_remove" else getattr(instance, "_access_cleared_users", [])
        users = list(get_user_model().objects.filter(pk__in=ids or ()))
    else:
        users = [instance]
    with transaction.atomic():  # all at once, in one order (no deadlock); one CRL/KRL for all
        services.credentials_revoke_unauthorized(users=users)
        # and a cluster one of them owns is no longer shared with a group they left: its people lose it — every
        # member's row locked first, as for a member who leaves (an issuance in flight for one of them records
        # its credential first, then is found here; or waits, and then sees the share gone)
        unshared = selectors.clusters_unshared_by_owner(users)
        if unshared:
            members = get_user_model().objects.filter(groups__clusters__pk__in=unshared).distinct()
            services.credentials_revoke_unauthorized(users=list(members), clusters=unshared)


def group_deleting(sender, instance, **kwargs) -> None:
    """A group is about to be deleted (its memberships go in bulk, without ``m2m_changed``): lock its members
    (before the clusters' rows, as issuance does) and remember them for ``group_deleted``."""
    from access import services

    instance._access_members = list(instance.user_set.values_list("pk", flat=True))
    services.lock_holders(instance._access_members)


def group_deleted(sender, instance, **kwargs) -> None:
    """A group was deleted (same transaction): its members who may no longer enter a cluster through it
    lose their credentials for it."""
    from django.contrib.auth import get_user_model

    from access import services

    members = list(get_user_model().objects.filter(pk__in=getattr(instance, "_access_members", ())))
    if members:
        services.credentials_revoke_unauthorized(users=members)  # one CRL/KRL for all


def user_saved(sender, instance, created, raw=False, **kwargs) -> None:
    """A deactivated account loses every credential at once (in the same transaction as the change). An
    active one costs nothing here: this fires on every login (``last_login``)."""
    if raw or created or instance.is_active:
        return
    from access import services
    from access.models import RevocationReason

    services.credentials_revoke_for(
        user=instance,
        reason=RevocationReason.PRIVILEGE_WITHDRAWN,
        note=f"account {instance.get_username()} deactivated",
    )
    # and its API tokens, for good: an account made active again (a name the directory gave to someone else, a
    # helpdesk's reactivation) does not bring back what its former self left live (not its clusters' node tokens:
    # the nodes', which end with their cluster)
    from portal.tokens import token_revoke, tokens_live

    for token in tokens_live(instance):
        token_revoke(token=token)


def gateway_deleted(sender, instance, **kwargs) -> None:
    """A gateway's row is being deleted: its bastion's host key is retired (same transaction), so that a gateway
    set up again at its address — a new row — still has SSH bundles refuse the old key."""
    from access import services

    services.host_key_retire(gateway=instance)

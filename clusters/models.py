"""Virtual clusters: sets of VMs on hypervisors at several sites sharing one layer-2 network (paper §2-3)."""

from __future__ import annotations

import contextlib
import ipaddress
import urllib.parse

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator, URLValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.secrets import EncryptedTextField

name_validator = RegexValidator(
    r"^[a-z][a-z0-9-]{0,39}$", "Lower-case letters, digits and '-', starting with a letter, at most 40 characters."
)
mac_validator = RegexValidator(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", "A MAC address like 52:54:00:12:34:56.")


class Image(models.Model):
    """An OS image a cluster's VMs boot. Approved images are maintained by the provider; user-provided
    ones are not, which makes the cluster closed (paper §2.1).

    The provider's catalogue (no ``owner``) is open to everyone. A user registers their own images through the
    API: only they (and, with ``group``, that group's members) may boot clusters from it, and it is never
    approved unless an admin approves it. An image that ended clusters still name is retired rather than
    deleted: it keeps their history, is listed no more, and boots nothing new; its name stays taken."""

    name = models.SlugField(max_length=100, unique=True)
    approved = models.BooleanField(default=False, help_text="maintained and vouched for by the provider")
    description = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="images",
        help_text="who registered it (user-provided); empty: the provider's catalogue, open to everyone",
    )
    group = models.ForeignKey(
        Group,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="images",
        help_text="a user-provided image shared with this group's members",
    )
    source = models.CharField(
        max_length=500, blank=True, help_text="where the image comes from (a URL, a path, a checksum): for the record"
    )
    created_at = models.DateTimeField(auto_now_add=True, null=True)
    retired_at = models.DateTimeField(null=True, blank=True, help_text="deleted while ended clusters still name it")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(group__isnull=True) | Q(owner__isnull=False),
                name="image_group_needs_owner",
                violation_error_message="Only a user-provided image (one with an owner) is shared with a group.",
            )
        ]

    def __str__(self) -> str:
        return self.name


class Connectivity(models.TextChoices):
    PUBLIC = "public", "public (provider's routed network)"
    CLOSED = "closed", "closed (access gateway only)"


class ClusterState(models.TextChoices):
    REQUESTED = "requested", "requested"
    PROVISIONING = "provisioning", "provisioning"
    READY = "ready", "ready"
    UPDATING = "updating", "updating network"
    TEARING_DOWN = "tearing_down", "tearing down"
    TORN_DOWN = "torn_down", "torn down"
    FAILED = "failed", "failed"


ACTIVE_STATES = (ClusterState.REQUESTED, ClusterState.PROVISIONING, ClusterState.READY, ClusterState.UPDATING)
LIVE_STATES = (*ACTIVE_STATES, ClusterState.TEARING_DOWN)
SETTLED_STATES = (ClusterState.READY, ClusterState.FAILED, ClusterState.TORN_DOWN)  # no workflow is running
# PostgreSQL: every change of a cluster's state is announced on this channel, its id as payload (a trigger,
# migration 0003), so waiters (``selectors.cluster_wait``) wake without polling
STATE_CHANNEL = "virtcloud_cluster_state"


class PublicPrefix(models.Model):
    """A block of the provider's routed address space from which public clusters get a subnet."""

    name = models.SlugField(max_length=50, unique=True)
    prefix = models.CharField(max_length=43, help_text="e.g. 198.19.0.0/16")
    subnet_length = models.PositiveSmallIntegerField(default=26, help_text="prefix length handed to one cluster")

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "public prefixes"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    def clean(self) -> None:
        try:
            net = ipaddress.ip_network(self.prefix, strict=True)
        except ValueError as exc:
            raise ValidationError({"prefix": f"prefix {self.name}: {exc}"}) from None
        if not net.prefixlen < self.subnet_length <= (30 if net.version == 4 else 64):
            raise ValidationError(
                {"subnet_length": f"prefix {self.name}: subnets of /{self.subnet_length} do not fit in {net}"}
            )
        others = PublicPrefix.objects.exclude(pk=self.pk).values_list("name", "prefix")
        other_family = [
            name for name, prefix in others if ipaddress.ip_network(prefix, strict=False).version != net.version
        ]
        if other_family:
            # a cluster gets one subnet: mixing families would give it IPv4 or IPv6 by which has room left
            raise ValidationError(
                {
                    "prefix": f"prefix {self.name}: {net} is IPv{net.version}, prefix {other_family[0]} is not; "
                    "a public cluster gets one subnet (no dual stack), so every public prefix is of one family"
                }
            )


class VirtualCluster(models.Model):
    """A user's virtual cluster: its VMs (nodes), the layer-2 segment (VLAN) they share across sites, and
    whether it is public or closed. Created by middleware (a batch scheduler) or a user through the API."""

    name = models.CharField(max_length=40, validators=[name_validator])
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="clusters")
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.SET_NULL, related_name="clusters")
    image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="clusters")
    admin_rights = models.BooleanField(default=False, help_text="users are root in their VMs")
    connectivity = models.CharField(max_length=10, choices=Connectivity.choices)
    connectivity_reason = models.CharField(max_length=200)
    connectivity_overridden_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # (its admin's account may be deleted since: the flag stays, the policy's sweeps leave the cluster as it is)
    connectivity_overridden = models.BooleanField(
        default=False, db_default=False, help_text="an administrator overrode the policy's connectivity"
    )
    state = models.CharField(max_length=20, choices=ClusterState.choices, default=ClusterState.REQUESTED)
    state_reason = models.TextField(blank=True, help_text="why it failed, or who tore it down")
    segment = models.OneToOneField(
        "network.Segment", null=True, blank=True, on_delete=models.SET_NULL, related_name="cluster"
    )
    vlan_id = models.PositiveSmallIntegerField(
        "VLAN", null=True, blank=True, help_text="kept for the record after release"
    )
    public_prefix = models.ForeignKey(PublicPrefix, null=True, blank=True, on_delete=models.PROTECT)
    public_subnet = models.CharField(max_length=43, blank=True)
    job_id = models.CharField(max_length=200, blank=True, help_text="the scheduler's own job id")
    bastion_address = models.CharField(
        max_length=49,
        blank=True,
        help_text="closed clusters: the SSH bastion's own address in the cluster's network, with its prefix "
        "length (e.g. 10.0.0.254/24), given by the scheduler; the gateway operator's hook puts it on the "
        "bastion's leg into the cluster's VLAN",
    )
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    closed_since = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="when it last became closed (created closed, or an admin's override): the access gateways have "
        "it once the state they installed is newer than this and than ready_at",
    )
    ended_at = models.DateTimeField(null=True, blank=True)
    expiry_warned_for = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="the expiry an 'expiring' event was written for"
    )
    expiry_mailed_for = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="the expiry its owner was sent an e-mail about"
    )
    workflow_generation = models.PositiveIntegerField(
        default=0, help_text="bumped by every network change; stale workflow callbacks are ignored"
    )
    provision_sent = models.PositiveIntegerField(
        null=True,
        blank=True,
        editable=False,
        help_text="the workflow generation whose provisioning, node change or teardown went to the broker (a "
        "crash in between: sent again)",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=Q(state__in=[s.value for s in LIVE_STATES]),
                name="cluster_unique_live_name_per_owner",
            ),
            models.UniqueConstraint(
                fields=["public_prefix", "public_subnet"],
                condition=~Q(public_subnet="") & Q(state__in=[s.value for s in LIVE_STATES]),
                name="cluster_unique_live_public_subnet",
            ),
        ]
        indexes = [models.Index(fields=["state", "expires_at"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.owner})" if self.owner_id else self.name

    @property
    def ref(self) -> str:
        """The opaque reference by which the network layer knows this cluster's segment."""
        return f"cluster:{self.pk}"

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= timezone.now()

    @property
    def public_gateway(self) -> str:
        """The provider router's address in a public cluster's subnet (its first host address)."""
        if not self.public_subnet:
            return ""
        return str(next(ipaddress.ip_network(self.public_subnet).hosts()))


def address_key(address) -> str:
    """An IP address as a fixed-width hex string (32 digits): keys of one version compare as the addresses do."""
    return f"{int(ipaddress.ip_address(address)):032x}"


class PublicSubnetLease(models.Model):
    """Who held a public subnet, and when: a cluster's subnet on the provider's routed network, from the moment
    it got it until it gave it back (its end, or an override to closed). The answer to an abuse report ("who
    had 198.51.100.7 on 1 December at 10:00?"): the VMs' users are root, so any address of the subnet was
    theirs to use. Kept ``HISTORY_RETENTION`` days after it ended, whatever becomes of the cluster's row."""

    cluster = models.ForeignKey(
        VirtualCluster, null=True, blank=True, on_delete=models.SET_NULL, related_name="public_leases"
    )
    cluster_name = models.CharField(max_length=63)
    owner = models.CharField(max_length=150, help_text="the owner's user name then")
    group = models.CharField(max_length=150, blank=True)
    job_id = models.CharField(max_length=200, blank=True)
    subnet = models.CharField(max_length=43)
    version = models.PositiveSmallIntegerField()
    first = models.CharField(max_length=32, help_text="the subnet's first address (address_key)")
    last = models.CharField(max_length=32, help_text="the subnet's last address (address_key)")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["version", "first", "last"], name="lease_range"),
            # the leases that ended within the hold-down (every public allocation, scrape and prefix page asks,
            # the allocations under their lock): not a scan of the whole history
            models.Index(fields=["ended_at"], name="lease_ended", condition=models.Q(ended_at__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.subnet}: {self.cluster_name} ({self.owner})"


class NodeState(models.TextChoices):
    PENDING = "pending", "pending network"
    READY = "ready", "ready"
    MIGRATING = "migrating", "migrating"
    REMOVED = "removed", "removed"


class Node(models.Model):
    """A VM of a virtual cluster, on one hypervisor host, plugged into the cluster's VLAN bridge there.
    During a migration ``target_host`` is set and the network is ready on both hosts."""

    cluster = models.ForeignKey(VirtualCluster, on_delete=models.CASCADE, related_name="nodes")
    name = models.CharField(max_length=63, validators=[name_validator])
    host = models.ForeignKey("network.Host", on_delete=models.PROTECT, related_name="nodes")
    target_host = models.ForeignKey(
        "network.Host", null=True, blank=True, on_delete=models.PROTECT, related_name="incoming_nodes"
    )
    mac = models.CharField("MAC address", max_length=17, validators=[mac_validator])
    address = models.GenericIPAddressField(
        null=True,
        blank=True,
        help_text="the VM's address in the cluster network, if the scheduler knows it (SSH targets)",
    )
    state = models.CharField(max_length=10, choices=NodeState.choices, default=NodeState.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True, help_text="when it left the cluster (usage reports)")

    class Meta:
        ordering = ["cluster_id", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "name"], condition=~Q(state="removed"), name="node_unique_name_in_cluster"
            ),
            models.UniqueConstraint(fields=["mac"], condition=~Q(state="removed"), name="node_unique_live_mac"),
        ]

    def __str__(self) -> str:
        return f"{self.cluster.name}/{self.name}" if self.cluster_id else self.name


class StepStatus(models.TextChoices):
    RUNNING = "running", "running"
    OK = "ok", "ok"
    FAILED = "failed", "failed"
    SKIPPED = "skipped", "skipped"


class EventKind(models.TextChoices):
    STATE = "state", "created, or its state changed"
    EXPIRING = "expiring", "expires soon"
    LIFETIME = "lifetime", "its expiry changed"


class ClusterEvent(models.Model):
    """A cluster was created or its state changed (``kind`` state). Written by the database itself (triggers,
    migration 0008), in the transaction of the change, so no change is ever missed or recorded without
    happening; on PostgreSQL at commit time under a short lock, so ids follow the order of commits: a reader
    that goes on from the last id it saw (``GET /api/clusters/events/?after=``) never skips an event. An
    ``expiring`` event (the cluster ends within ``CLUSTER_EXPIRY_WARNING``; ``state`` is its state then) is
    written by ``clusters.services.clusters_warn_expiring`` under the same lock. A ``lifetime`` event (its expiry
    changed: extended by its owner, an admin or the middleware) is written by a trigger as ``state`` events are
    (migration 0022)."""

    id = models.BigAutoField(primary_key=True)
    cluster = models.ForeignKey(VirtualCluster, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(
        max_length=10, choices=EventKind.choices, default=EventKind.STATE, db_default=EventKind.STATE
    )
    state = models.CharField(max_length=20, choices=ClusterState.choices)
    at = models.DateTimeField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["at"], name="clusterevent_at")]  # pruning old events

    def __str__(self) -> str:
        return f"{self.id}: cluster {self.cluster_id} {self.state}"


class EventHorizon(models.Model):
    """One row: how far pruning (``CLUSTER_EVENT_RETENTION``) has deleted the cluster event feed. A reader whose
    last event id is below ``pruned_through`` may have missed events that no longer exist: the API answers it 410
    (read the clusters again, go on after ``pruned_through``) and a webhook's next batch says so (``missed``)."""

    pruned_through = models.BigIntegerField(default=0, help_text="the highest event id pruning deleted")

    def __str__(self) -> str:
        return f"events pruned through {self.pruned_through}"

    @classmethod
    def through(cls) -> int:
        return cls.objects.filter(pk=1).values_list("pruned_through", flat=True).first() or 0


class Webhook(models.Model):
    """An HTTP endpoint that gets the cluster event feed pushed (POST, JSON, HMAC-SHA256 signed with
    ``secret``): in commit order, in batches, at least once — the cursor ``last_event_id`` moves only when the
    endpoint answered 2xx; a failure is retried with backoff. Starts with the events after its creation."""

    name = models.SlugField(max_length=50, help_text="unique among its owner's (and among the admin's) webhooks")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="webhooks",
        editable=False,
        help_text="who registered it through the API (the middleware's account); empty: made in the admin",
    )
    token = models.ForeignKey(
        "portal.ApiToken",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="webhooks",
        editable=False,
        help_text="the token it was registered with: revoked or expired, nothing more is sent",
    )
    url = models.URLField(
        "URL",
        max_length=500,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="http(s) endpoint that receives POSTed batches of events",
    )
    secret = EncryptedTextField(help_text="signs each body: X-VirtCloud-Signature: sha256=<hex HMAC>")
    states = models.JSONField(
        default=list, blank=True, help_text='only events of these states, e.g. ["ready", "failed"]; empty: all'
    )
    kinds = models.JSONField(
        default=list,
        blank=True,
        help_text='only events of these kinds, e.g. ["state"] (created or its state changed: not "lifetime" nor '
        '"expiring", which carry the state the cluster is in); empty: all',
    )
    enabled = models.BooleanField(default=True)
    all_clusters = models.BooleanField(
        default=True,
        help_text="every cluster's events (made in the admin, by middleware or an admin); off: only those of the "
        "clusters its owner sees — their own and their groups' (registered with a user's clusters:write token)",
    )
    last_event_id = models.BigIntegerField(default=0, help_text="the last event delivered (or skipped by states)")
    last_delivered_at = models.DateTimeField(null=True, blank=True)
    last_status = models.PositiveSmallIntegerField(null=True, blank=True, help_text="HTTP status of the last try")
    last_error = models.TextField(blank=True)
    failures = models.PositiveIntegerField(default=0, help_text="failed tries in a row")
    failing_since = models.DateTimeField(
        null=True, blank=True, help_text="the first of the tries in a row not answered 2xx; empty: keeping up"
    )
    failing_mailed_for = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="the failing_since its owner was mailed about (once per run of failures, WEBHOOK_ALERT_AFTER)",
    )
    next_attempt_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # a name per account: nobody learns another's webhook names, nor takes one before its setup script runs
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                name="webhook_name_per_owner",
                violation_error_message="its owner has a webhook of this name already",
            ),
            models.UniqueConstraint(
                fields=["name"],
                condition=Q(owner=None),
                name="webhook_name_of_the_admin",
                violation_error_message="a webhook made in the admin has this name already",
            ),
        ]

    #: the delivery state of a webhook that keeps up (no failure in a row, no alert pending)
    KEEPING_UP = {"failures": 0, "failing_since": None, "failing_mailed_for": None}

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        if self._state.adding and not self.last_event_id:  # a new endpoint gets what happens from now on
            self.last_event_id = ClusterEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
        super().save(*args, **kwargs)

    def clean(self) -> None:
        from clusters.webhooks import reach, refused_address

        parts = urllib.parse.urlsplit(self.url or "")
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError as exc:
            raise ValidationError({"url": f"{exc} in {self.url}"}) from None
        host = parts.hostname or ""
        with contextlib.suppress(ValueError):
            if refused_address("127.0.0.1" if host == "localhost" else host, **reach(self)):
                raise ValidationError({"url": f"{host} is this machine's or a special address: not delivered to"})
        choices = ", ".join(ClusterState.values)
        if not isinstance(self.states, list) or not all(isinstance(s, str) for s in self.states):
            raise ValidationError({"states": f'a list of state names, e.g. ["ready", "failed"]; use {choices}'})
        unknown = sorted(set(self.states) - set(ClusterState.values))
        if unknown:
            raise ValidationError({"states": f"unknown states {', '.join(unknown)}; use {choices}"})
        kinds = ", ".join(EventKind.values)
        if not isinstance(self.kinds, list) or not all(isinstance(k, str) for k in self.kinds):
            raise ValidationError({"kinds": f'a list of event kinds, e.g. ["state"]; use {kinds}'})
        unknown = sorted(set(self.kinds) - set(EventKind.values))
        if unknown:
            raise ValidationError({"kinds": f"unknown kinds {', '.join(unknown)}; use {kinds}"})

    def token_allows(self) -> bool:
        """Whether the token it was registered with (if any) still has the scopes for the feed it gets: every
        cluster's needs ``clusters:manage``, its owner's clusters ``clusters:write`` (or manage). A scope taken
        from the token in the admin stops the feed, as revoking it does (``deliverable``)."""
        from portal.models import TokenScope

        if self.token_id is None:
            return True
        if self.all_clusters:
            return self.token.has_scope(TokenScope.CLUSTERS_MANAGE)
        return any(self.token.has_scope(s) for s in (TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE))

    @classmethod
    def deliverable(cls):
        """The webhooks that get the feed: enabled, and made in the admin or by an account that still may — its
        user active, and the token it was registered with neither revoked nor expired (or, registered from an
        admin's session, the admin still staff)."""
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Permission

        now = timezone.now()
        live_token = Q(token__revoked_at=None) & (Q(token__expires_at=None) | Q(token__expires_at__gt=now))
        # the feed names every cluster: an admin's session webhook only while the admin may view them all
        # (``staff_may``: a superuser, or the clusters' view or change permission, given or through a group)
        viewing = Permission.objects.filter(
            content_type__app_label="clusters", codename__in=["view_virtualcluster", "change_virtualcluster"]
        )
        viewers = get_user_model().objects.filter(
            Q(is_superuser=True) | Q(user_permissions__in=viewing) | Q(groups__permissions__in=viewing)
        )
        by_staff = Q(token=None, owner__is_staff=True, owner__in=viewers.values("pk"))
        return cls.objects.filter(enabled=True).filter(
            Q(owner=None) | (Q(owner__is_active=True) & (Q(token__isnull=False) & live_token | by_staff))
        )


class ClusterStep(models.Model):
    """One step of a cluster's life (allocate, switches, hosts, gateway, teardown, migration, …) with its
    timings and error; the API derives progress from these and the network's device changes."""

    cluster = models.ForeignKey(VirtualCluster, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=50)
    generation = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=StepStatus.choices, default=StepStatus.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    device = models.CharField(max_length=100, blank=True)
    detail = models.TextField(blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["started_at", "id"]
        # the steps of one name finished lately (metrics: provisioning times of the last hour)
        indexes = [models.Index(fields=["name", "finished_at"], name="clusterstep_name_finished")]

    def __str__(self) -> str:
        return f"{self.cluster_id}:{self.name}:{self.status}"


class Quota(models.Model):
    """How many live clusters and nodes (VMs) one user — or all clusters of one group together — may have.
    VLAN ids are a scarce shared resource (at most 4094 per core), so one user or one runaway script must
    not take them all. A user without a quota of their own gets ``CLUSTER_QUOTA_CLUSTERS`` and
    ``CLUSTER_QUOTA_NODES``; a group is limited only when it has a quota. An empty limit means the default
    (users) or no limit (groups); 0 allows none. Staff users are not limited."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="cluster_quota"
    )
    group = models.OneToOneField(
        "auth.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="cluster_quota"
    )
    max_clusters = models.PositiveIntegerField(null=True, blank=True, help_text="live clusters at once")
    max_nodes = models.PositiveIntegerField(null=True, blank=True, help_text="nodes of live clusters at once")
    note = models.CharField(max_length=200, blank=True, help_text="why (e.g. the project's allocation)")

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=False, group__isnull=True) | Q(user__isnull=True, group__isnull=False),
                name="quota_user_or_group",
                violation_error_message="A quota is for a user or for a group: choose one of them, not both.",
            )
        ]

    def __str__(self) -> str:
        who = f"user {self.user}" if self.user_id else f"group {self.group}"
        return f"quota of {who}"


class IdempotencyKey(models.Model):
    """A client's ``Idempotency-Key`` for a request that changes a cluster (create, teardown, nodes,
    migration, …): a retried request answers like the first (``status_code``, the cluster as it is now) and
    changes nothing again."""

    actor = models.CharField(max_length=200)
    key = models.CharField(max_length=200)
    request_hash = models.CharField(max_length=64)
    # a create's body as sent (``services.request_fingerprint``): its retry is answered before validation, which
    # may refuse what was valid then (the image's share ended, the owner was deactivated since)
    raw_hash = models.CharField(max_length=64, blank=True, default="", db_default="")  # (old processes: no column)
    cluster = models.ForeignKey(VirtualCluster, on_delete=models.CASCADE, related_name="+")
    status_code = models.PositiveSmallIntegerField(default=201, help_text="what the first request answered")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["actor", "key"], name="idempotency_unique_key")]

    def __str__(self) -> str:
        return f"{self.actor}:{self.key}"

"""API representations of clusters. Input serializers validate and resolve names; services do the rest."""

from __future__ import annotations

import dataclasses
import ipaddress

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied

from access.gateway.state import bastion_address_problem
from clusters import selectors
from clusters.models import (
    SETTLED_STATES,
    ClusterState,
    ClusterStep,
    Connectivity,
    EventKind,
    Image,
    Node,
    NodeState,
    PublicPrefix,
    VirtualCluster,
    Webhook,
    mac_validator,
    name_validator,
)
from clusters.services import NodeRequest, image_unavailable
from network.drivers import host_attachment
from network.libvirt import interface_xml
from network.models import Host
from network.specs import host_spec
from portal.api import ID_MAX, IdField, NameRelatedField, StrictSerializer, counted_list
from portal.text import storable


class OwnerField(NameRelatedField):
    """The user (by name) a request acts for. A caller that acts only for itself (neither middleware nor an
    admin who may, ``may(request)``: by default ``selectors.acts_on_all``) naming anyone else is refused (403,
    ``refusal``) before the name is looked up, whether that user exists or not: it learns nothing about who has
    an account."""

    def __init__(self, *, refusal: str, may=selectors.acts_on_all, **kwargs):
        self.refusal = refusal
        self.may = may
        super().__init__(slug_field="username", queryset=get_user_model().objects.filter(is_active=True), **kwargs)

    def to_internal_value(self, data):
        request = self.context["request"]
        if data != request.user.get_username() and not self.may(request):
            raise PermissionDenied(self.refusal)
        return super().to_internal_value(data)


class GroupField(NameRelatedField):
    """A group by name, for the owner to share with: a name no group has is refused in the same words as a group
    the owner is not in (``services.not_a_group_of_the_owner``), so a caller learns no other project's group."""

    default_error_messages = {"does_not_exist": "{value}: not a group the owner is a member of"}

    def __init__(self, **kwargs):
        super().__init__(slug_field="name", queryset=Group.objects.all(), **kwargs)


class HostField(NameRelatedField):
    """A host by name; looked up in ``prefetched`` when the list of nodes filled it (one query for all
    the nodes of a request instead of one per node)."""

    prefetched: dict[str, Host] | None = None

    def to_internal_value(self, data):
        host = self.prefetched.get(data) if self.prefetched is not None and isinstance(data, str) else None
        # not among them: the name lookup answers (a name of no host, or one the database cannot compare — a
        # NUL, a lone surrogate — is a 400 there); a query per bad name only
        return host if host is not None else super().to_internal_value(data)


class NodeListSerializer(serializers.ListSerializer):
    def to_internal_value(self, data):
        # (a list over ``max_length`` is refused by the ListSerializer before any host is looked up: its names
        # could bind more variables than SQLite takes in one query)
        if isinstance(data, list) and (self.max_length is None or len(data) <= self.max_length):
            names = {item["host"] for item in data if isinstance(item, dict) and isinstance(item.get("host"), str)}
            names.discard("")
            field = self.child.fields["host"]
            field.prefetched = {
                h.name: h for h in field.get_queryset().filter(name__in=[n for n in names if storable(n)])
            }
        return super().to_internal_value(data)


class NodeInputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=40, validators=[name_validator])
    host = HostField(slug_field="name", queryset=Host.objects.select_related("site"))
    mac = serializers.CharField(max_length=17)
    address = serializers.IPAddressField(
        required=False,
        allow_null=True,
        default=None,
        help_text="the VM's address: a closed cluster's may be any (the SSH host entries use it); a public "
        "cluster's must be a host address of its subnet other than the router's, and is assigned when left out",
    )

    def validate_mac(self, value: str) -> str:
        value = value.strip().lower().replace("-", ":")
        mac_validator(value)
        if int(value.split(":")[0], 16) & 1:
            raise serializers.ValidationError("a multicast MAC cannot be a VM's address")
        if value == "00:00:00:00:00:00":  # (nor can Linux give it to a NIC: not a valid Ethernet address)
            raise serializers.ValidationError("the all-zero MAC cannot be a VM's address")
        return value

    def validate(self, attrs) -> NodeRequest:
        return NodeRequest(**attrs)

    class Meta:
        list_serializer_class = NodeListSerializer


_LIFETIME_BOUNDS = f"must be between {settings.CLUSTER_MIN_LIFETIME} and {settings.CLUSTER_MAX_LIFETIME} seconds"


class UsableImageField(NameRelatedField):
    """An image the cluster's owner may boot (``selectors.images_usable``), by name: the caller, or the ``owner``
    a middleware token or an admin names. One that does not exist, is retired or is someone else's gets the same
    answer, at this field, beside the other fields' (``services.image_unavailable``)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("error_messages", {"does_not_exist": image_unavailable("{value}")})
        super().__init__(slug_field="name", queryset=Image.objects.none(), **kwargs)

    def get_queryset(self):
        request = self.context.get("request")
        if request is None:  # (schema generation)
            return Image.objects.none()
        owner = request.user
        named = getattr(self.parent, "initial_data", {}).get("owner")
        if (
            named
            and selectors.acts_on_all(request)
            and isinstance(named, str)
            and storable(named)  # (``owner`` says why at its own field; the database cannot compare it)
        ):  # (as ``owner`` allows)
            owner = get_user_model().objects.filter(username=named, is_active=True).first()
        return selectors.images_usable(owner) if owner is not None else Image.objects.none()


class ClusterCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=40, validators=[name_validator])
    owner = OwnerField(
        refusal="Only middleware tokens (clusters:manage) and admins create clusters for others.",
        required=False,
        help_text="only for middleware tokens (clusters:manage) and admins (anyone else naming another user: "
        "403); default: the caller",
    )
    group = GroupField(required=False)
    image = UsableImageField(
        help_text="the provider's catalogue, the owner's own images, or an image shared with one of the owner's "
        "groups (`GET /api/images/`); a user-provided (not approved) image makes the cluster closed",
    )
    admin_rights = serializers.BooleanField(default=False)
    connectivity = serializers.ChoiceField(
        choices=Connectivity.choices,
        required=False,
        help_text="default: the policy decides (public for an approved image without administrator rights when a "
        "public prefix is configured, else closed). `closed` is always granted: reachable only through the "
        "access gateway, no public subnet (e.g. legacy software with known flaws on an approved image). `public` "
        "only where the policy decides public: else a 400 naming this field (a 422 when no public prefix is "
        "configured); only an administrator can override the policy",
    )
    nodes = NodeInputSerializer(many=True, allow_empty=False, max_length=1000)
    lifetime = serializers.IntegerField(
        default=settings.CLUSTER_DEFAULT_LIFETIME,
        min_value=settings.CLUSTER_MIN_LIFETIME,
        max_value=settings.CLUSTER_MAX_LIFETIME,
        error_messages={"min_value": _LIFETIME_BOUNDS, "max_value": _LIFETIME_BOUNDS},
        help_text="seconds from now; default CLUSTER_DEFAULT_LIFETIME",
    )
    job_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    bastion_address = serializers.CharField(
        max_length=49,
        required=False,
        allow_blank=True,
        default="",
        help_text="closed clusters: the SSH bastion's address in the cluster's network with its prefix length "
        "(e.g. 10.0.0.254/24), kept free of nodes; without it the cluster is reached through the VPN only. Given "
        "by the scheduler (a `clusters:manage` token) or an admin who may change clusters: its network is where "
        "the shared bastion forwards to, so a user may not choose it (403)",
    )

    def validate_bastion_address(self, value: str) -> str:
        if not value:
            return ""
        if not selectors.acts_on_all(self.context["request"]):
            # the network decides where the gateway's one bastion forwards to (its routes): a user choosing a
            # wide one (10.255.255.254/8) would reach the provider's hosts through it
            raise PermissionDenied(
                "bastion_address is given by the scheduler (a clusters:manage token) or an admin: the bastion "
                "forwards into its network"
            )
        problem = bastion_address_problem(value)  # the rule the gateways apply to it
        if problem:
            raise serializers.ValidationError(problem)
        return str(ipaddress.ip_interface(value.strip()))


class ImageSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True, help_text="null: the provider's catalogue"
    )
    group = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = Image
        fields = ("name", "approved", "description", "source", "owner", "group", "created_at")
        read_only_fields = fields


class ImageCreateSerializer(StrictSerializer):
    """A user-provided image to register: never approved (an admin approves images), so clusters booting it
    are closed."""

    name = serializers.SlugField(max_length=100, help_text="unique among all images")
    owner = OwnerField(
        refusal="Only middleware tokens (clusters:manage) and admins register images for others.",
        may=lambda request: selectors.acts_on_all(request, Image),
        required=False,
        help_text="only for middleware tokens (clusters:manage) and admins; default: the caller",
    )
    group = GroupField(
        required=False,
        allow_null=True,
        help_text="share it with this group's members (the owner must be one)",
    )
    description = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    source = serializers.CharField(
        max_length=500, required=False, allow_blank=True, default="", help_text="a URL, a path, a checksum"
    )


class ImageUpdateSerializer(StrictSerializer):
    """What the owner may change of a user-provided image (each field optional)."""

    group = GroupField(
        required=False,
        allow_null=True,
        help_text="share it with this group (the owner must be a member); null: not shared",
    )
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)
    source = serializers.CharField(max_length=500, required=False, allow_blank=True)


class ImageQuerySerializer(serializers.Serializer):
    """Filters of ``GET /api/images/``."""

    approved = serializers.BooleanField(required=False, allow_null=True, default=None)
    owner = serializers.CharField(
        required=False, max_length=150, help_text="the owner's user name; `-`: the provider's catalogue"
    )


class PublicHostSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="the node's name in its cluster")
    mac = serializers.CharField(help_text="its MAC address")
    address = serializers.IPAddressField(help_text="its address in the subnet (what the router's DHCP hands it)")


class PublicNetworkSerializer(serializers.Serializer):
    cluster = serializers.IntegerField()
    name = serializers.CharField()
    state = serializers.ChoiceField(choices=ClusterState.choices)
    vlan_id = serializers.IntegerField(min_value=1, max_value=4094)
    subnet = serializers.CharField(help_text="the cluster's public subnet (CIDR)")
    router_address = serializers.CharField(
        help_text="the router's address in it, with the prefix length (the subnet's first host: the nodes' gateway)"
    )
    hosts = PublicHostSerializer(many=True, help_text="the cluster's nodes, for the router's DHCP and DNS")


class PublicNetworksSerializer(serializers.Serializer):
    networks = PublicNetworkSerializer(many=True)


class PublicNetworksQuerySerializer(serializers.Serializer):
    site = serializers.CharField(
        required=False,
        max_length=100,
        help_text="only clusters whose core joins this site (the router trunk there carries their VLANs); a name "
        "no site has is a 400, never an empty list (a router with a misspelt site would remove every link)",
    )

    def validate_site(self, value: str) -> str:
        from network.models import Site

        if not Site.objects.filter(name=value).exists():
            raise serializers.ValidationError(f"no site named {value}")
        return value

    def validate(self, attrs):
        if self.initial_data.get("site") == "":  # (DRF drops an empty optional query value: "every site")
            raise serializers.ValidationError({"site": ["may not be blank: leave it out for every site"]})
        return attrs


class ClusterExtendSerializer(StrictSerializer):
    """The new expiry: required (this PATCH changes the lifetime and nothing else)."""

    expires_at = serializers.DateTimeField()

    # Never partial, although DRF and drf-spectacular make a PATCH's serializer so: the schema then says
    # ``expires_at`` is required (``ClusterExtend``, not an all-optional ``PatchedClusterExtend``), as it is.
    @property
    def partial(self) -> bool:
        return False

    @partial.setter
    def partial(self, value: bool) -> None:
        pass


class NodesAddSerializer(StrictSerializer):
    nodes = NodeInputSerializer(many=True, allow_empty=False, max_length=1000)


class MigrateSerializer(StrictSerializer):
    target_host = NameRelatedField(slug_field="name", queryset=Host.objects.all())


class ConnectivitySerializer(StrictSerializer):
    connectivity = serializers.ChoiceField(choices=Connectivity.choices)
    reason = serializers.CharField(max_length=200)


class NodeTokenSerializer(serializers.Serializer):
    """A node token, as made (``POST /api/clusters/{id}/node-token/``): its secret is shown this once."""

    token = serializers.CharField(help_text="the secret (``Authorization: Bearer …``): shown once, never again")
    prefix = serializers.CharField(help_text="what the token is known by in lists and the admin")
    name = serializers.CharField()
    cluster = serializers.IntegerField(help_text="the cluster whose node endpoints it admits to")
    scopes = serializers.ListField(child=serializers.CharField())


class TeardownSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=200, required=False, default="requested")


class QuotaQuerySerializer(serializers.Serializer):
    """Query of ``GET /api/clusters/quota/``."""

    owner = OwnerField(
        refusal="Only middleware tokens (clusters:manage) and admins see others' quotas.",
        may=selectors.sees_all,  # (whoever sees every cluster: the quota report counts them)
        required=False,
        help_text="whose quota (middleware tokens and admins; anyone else naming another user: 403); default: "
        "the caller",
    )


class QuotaSerializer(serializers.Serializer):
    """One quota that applies to the owner's clusters and what is in use now."""

    scope = serializers.CharField(help_text="'user <name>' or 'group <name>'")
    max_clusters = serializers.IntegerField(allow_null=True, help_text="live clusters allowed; null: no limit")
    max_nodes = serializers.IntegerField(allow_null=True, help_text="live nodes allowed; null: no limit")
    clusters = serializers.IntegerField(help_text="live clusters now")
    nodes = serializers.IntegerField(help_text="nodes of live clusters now")


class EventQuerySerializer(serializers.Serializer):
    """Query of ``GET /api/clusters/events/``."""

    after = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=ID_MAX, help_text="the last event id already seen"
    )
    cluster = IdField(required=False, help_text="only this cluster's events (404: no such cluster you may see)")
    limit = serializers.IntegerField(required=False, default=100, min_value=1, max_value=1000)
    timeout = serializers.FloatField(
        required=False,
        default=0,
        min_value=0,
        max_value=settings.CLUSTER_WAIT_MAX,
        help_text=f"with no event yet, wait up to this many seconds for one (0 to {settings.CLUSTER_WAIT_MAX:g})",
    )


class EventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    cluster = serializers.IntegerField(source="cluster_id")
    cluster_name = serializers.CharField(source="cluster.name")
    kind = serializers.ChoiceField(
        choices=EventKind.choices,
        help_text="state: the cluster was created or its state changed (to state); expiring: its expiry comes within "
        "CLUSTER_EXPIRY_WARNING and will tear it down unless its lifetime is extended (state: its state then); "
        "lifetime: its expiry changed — extended by its owner, an admin or the middleware (state: its state then)",
    )
    state = serializers.ChoiceField(choices=ClusterState.choices)
    at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(
        source="cluster.expires_at",
        help_text="the cluster's expiry as the event is read (a later change: a later event)",
    )


class EventPageSerializer(serializers.Serializer):
    events = EventSerializer(many=True)
    last = serializers.IntegerField(
        help_text="pass it as `after` next time (the last id here; with fewer events than `limit`, the newest id "
        "of the whole feed: every event up to it you may see is here)"
    )


class EventsPrunedSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField(help_text="`events_pruned`")
    resume_after = serializers.IntegerField(
        help_text="the highest event id deleted: go on with `after` = this, once the clusters are read again"
    )


class WaitSerializer(serializers.Serializer):
    """Query of ``GET /api/clusters/{id}/wait/``."""

    until = serializers.CharField(
        required=False,
        default=",".join(SETTLED_STATES),
        help_text="comma-separated states to wait for (default: a settled state: ready, failed or torn_down)",
    )
    timeout = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=settings.CLUSTER_WAIT_MAX,
        default=settings.CLUSTER_WAIT_MAX,
        help_text=f"seconds to wait at most (0 to {settings.CLUSTER_WAIT_MAX:g}; default the maximum)",
    )

    def validate_until(self, value: str) -> list[str]:
        states = [part.strip() for part in value.split(",") if part.strip()]
        unknown = sorted(set(states) - set(ClusterState.values))
        if not states or unknown:
            given = ", ".join(unknown) or "(none given)"
            raise serializers.ValidationError(
                f"unknown state {given}; use one or more of {', '.join(ClusterState.values)}"
            )
        return states


class AttachmentSerializer(serializers.Serializer):
    """Where the VM manager plugs this node's NIC on a host (nothing is asked of the host to say it)."""

    bridge = serializers.CharField(
        allow_null=True, help_text="the bridge; null: the OVS bridge that holds `uplink` (ovs-vsctl port-to-br)"
    )
    vlan = serializers.IntegerField(allow_null=True, help_text="802.1Q tag of the VM's port; null: untagged")
    virtualport = serializers.CharField(allow_null=True, help_text="libvirt virtualport type (openvswitch)")
    uplink = serializers.CharField(help_text="the host's trunk toward its switch")
    mtu = serializers.IntegerField(
        allow_null=True, help_text="the largest packet the VM may send (the core's MTU); null: the default (1500)"
    )
    libvirt = serializers.CharField(allow_null=True, help_text="the libvirt <interface> element, ready to use")


class NodeSerializer(serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    target_host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    attachment = serializers.SerializerMethodField()
    target_attachment = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = ["id", "name", "host", "target_host", "mac", "address", "state", "attachment", "target_attachment"]

    def _attachment(self, node: Node, host) -> dict | None:
        vid = node.cluster.vlan_id
        if host is None or vid is None or node.state == NodeState.REMOVED:
            return None
        # the core's MTU when the cluster was read with it (``selectors.clusters_visible``)
        found = dataclasses.replace(host_attachment(host_spec(host), vid), mtu=getattr(node.cluster, "core_mtu", None))
        return {**dataclasses.asdict(found), "libvirt": interface_xml(found, node.mac)}

    @extend_schema_field(AttachmentSerializer(allow_null=True))
    def get_attachment(self, node: Node) -> dict | None:
        """On ``host``, once the cluster has its VLAN."""
        return self._attachment(node, node.host)

    @extend_schema_field(AttachmentSerializer(allow_null=True))
    def get_target_attachment(self, node: Node) -> dict | None:
        """On ``target_host`` while the node migrates."""
        return self._attachment(node, node.target_host)


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = ClusterStep
        fields = ["name", "status", "started_at", "finished_at", "device", "detail", "error"]


class ProgressSerializer(serializers.Serializer):
    percent = serializers.IntegerField(min_value=0, max_value=100, help_text="share of the workflow's steps done")
    current = serializers.CharField(
        allow_null=True, help_text="the step running now (a name among `steps`); null: none is running"
    )


class ClusterListSerializer(serializers.ListSerializer):
    """A page of clusters: the devices' messages to take out looked up once for the page (one query)."""

    def to_representation(self, data):
        clusters = list(data.all() if hasattr(data, "all") else data)
        self.child._device_messages = selectors.device_messages(self.context.get("request"), clusters)
        try:
            return super().to_representation(clusters)
        finally:
            self.child._device_messages = None


class ClusterSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    group = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    image = serializers.SlugRelatedField(slug_field="name", read_only=True)
    nodes = NodeSerializer(many=True, read_only=True)
    steps = StepSerializer(many=True, read_only=True)
    progress = serializers.SerializerMethodField(
        help_text="how far the workflow the state names is: the provisioning while `requested` or "
        "`provisioning` (its steps allocate, network, gateway, ready: 25 % each); a node change while "
        "`updating` and the teardown while `tearing_down` (one step each: 0 % until it ends and the state "
        "changes); 100 % with no current step in a settled state (`ready`, `failed`, `torn_down`): nothing "
        "is running. `current` is null too before a worker has started the workflow's step"
    )
    public_gateway = serializers.CharField(read_only=True)

    class Meta:
        model = VirtualCluster
        list_serializer_class = ClusterListSerializer
        fields = [
            "id",
            "name",
            "owner",
            "group",
            "image",
            "admin_rights",
            "connectivity",
            "connectivity_reason",
            "state",
            "state_reason",
            "vlan_id",
            "public_subnet",
            "public_gateway",
            "bastion_address",
            "job_id",
            "expires_at",
            "created_at",
            "ready_at",
            "ended_at",
            "progress",
            "nodes",
            "steps",
        ]

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, cluster: VirtualCluster) -> dict:
        return selectors.cluster_progress(cluster)

    def to_representation(self, instance):
        """The cluster; its reason and steps without the devices' own messages for a caller who may not read
        them (``selectors.device_messages``: its owner and group; the middleware, the failure's caller, does)."""
        data = super().to_representation(instance)
        found = getattr(self, "_device_messages", None)
        if found is None:
            found = selectors.device_messages(self.context.get("request"), [instance])
        messages = found.get(instance.pk)
        if messages:
            data["state_reason"] = selectors.without_device_messages(data["state_reason"], messages)
            for step in data["steps"]:
                for key in ("error", "detail"):
                    step[key] = selectors.without_device_messages(step[key], messages)
        return data


class WebhookSerializer(serializers.ModelSerializer):
    class Meta:
        model = Webhook
        fields = [
            "id",
            "name",
            "url",
            "states",
            "kinds",
            "enabled",
            "all_clusters",
            "last_event_id",
            "last_delivered_at",
            "last_status",
            "last_error",
            "failures",
            "failing_since",
            "next_attempt_at",
        ]
        read_only_fields = fields


class WebhookCreatedSerializer(WebhookSerializer):
    secret = serializers.CharField(
        help_text="signs every delivery: X-VirtCloud-Signature-Timestamped: sha256=<HMAC of '<X-VirtCloud-Timestamp>.'"
        " + body> (check it and refuse an old timestamp: a recorded delivery cannot be replayed; "
        "X-VirtCloud-Signature: sha256=<HMAC of the body> for receivers written before); shown this once"
    )

    class Meta(WebhookSerializer.Meta):
        fields = [*WebhookSerializer.Meta.fields, "secret"]
        read_only_fields = fields


class WebhookCreateSerializer(StrictSerializer):
    name = serializers.SlugField(max_length=50)
    url = serializers.URLField(max_length=500, help_text="http(s) endpoint that receives POSTed batches of events")
    states = serializers.ListField(
        child=serializers.ChoiceField(choices=ClusterState.choices),
        required=False,
        default=list,
        max_length=20,
        help_text="only events of these states; empty: all",
    )
    kinds = serializers.ListField(
        child=serializers.ChoiceField(choices=EventKind.choices),
        required=False,
        default=list,
        max_length=10,
        help_text='only events of these kinds; empty: all. ["state"]: creations and state changes only (not the '
        '"lifetime" and "expiring" events, which carry the state the cluster is in)',
    )
    enabled = serializers.BooleanField(required=False, default=True)


class WebhookUpdateSerializer(StrictSerializer):
    url = serializers.URLField(max_length=500, required=False)
    states = serializers.ListField(
        child=serializers.ChoiceField(choices=ClusterState.choices), required=False, max_length=20
    )
    kinds = serializers.ListField(
        child=serializers.ChoiceField(choices=EventKind.choices), required=False, max_length=10
    )
    enabled = serializers.BooleanField(required=False)


class PublicSubnetUsageSerializer(serializers.Serializer):
    size = serializers.IntegerField(help_text="subnets of the prefix at its subnet length")
    free = serializers.IntegerField(help_text="subnets a new public cluster may get now")
    allocated = serializers.IntegerField(help_text="subnets overlapping a live cluster's")
    resting = serializers.IntegerField(
        help_text="subnets given back less than PUBLIC_SUBNET_HOLD_DOWN seconds ago (the router may still route them)"
    )


class PublicPrefixSerializer(serializers.ModelSerializer):
    usage = serializers.SerializerMethodField()

    class Meta:
        model = PublicPrefix
        fields = ["id", "name", "prefix", "subnet_length", "usage"]
        list_serializer_class = counted_list(selectors.public_prefix_usage)  # (two queries for the page)

    @extend_schema_field(PublicSubnetUsageSerializer)
    def get_usage(self, prefix) -> dict[str, int]:
        return (self.context.get("usage") or selectors.public_prefix_usage([prefix]))[prefix.pk]


class DriftBriefSerializer(serializers.Serializer):
    port = serializers.CharField(
        help_text="the switch port (empty for a host, and for whom the device messages are not)"
    )
    kind = serializers.CharField(help_text="missing, stale or foreign")
    found_at = serializers.DateTimeField()


class NetworkDeviceSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["switch", "host"])
    name = serializers.CharField()
    site = serializers.CharField()
    wanted = serializers.BooleanField(
        help_text="its desired state carries the cluster's VLAN now (false: being cleaned)"
    )
    enabled = serializers.BooleanField(
        help_text="false: an operator took it out of service; the portal leaves it alone"
    )
    status = serializers.CharField(
        help_text="its last change for the cluster: pending, running, ok, noop or failed; none: no change yet"
    )
    changed_at = serializers.DateTimeField(allow_null=True)
    error = serializers.CharField(
        help_text="the device's own message (middleware, network:read and admins who may view device changes)"
    )
    drift = DriftBriefSerializer(many=True, help_text="open drift on the cluster's VLAN (the reconciler repairs it)")


class ClusterNetworkSerializer(serializers.Serializer):
    vlan_id = serializers.IntegerField(allow_null=True)
    segment_state = serializers.CharField(
        allow_null=True, help_text="pending, active, deleting, compensating, failed, closed"
    )
    devices = NetworkDeviceSerializer(many=True)


class PlannedNodeSerializer(serializers.Serializer):
    name = serializers.CharField()
    host = serializers.CharField()
    address = serializers.CharField(allow_null=True, help_text="a public cluster's nodes get theirs from its subnet")


class ClusterPlanSerializer(serializers.Serializer):
    connectivity = serializers.ChoiceField(choices=Connectivity.choices)
    connectivity_reason = serializers.CharField()
    pool = serializers.CharField(help_text="the VLAN pool its network would come from (no id is reserved)")
    core = serializers.CharField(help_text="that pool's core transport")
    sites = serializers.ListField(child=serializers.CharField(), help_text="the sites its nodes are at")
    public_subnet = serializers.CharField(help_text="what a public cluster would get now (not reserved); '' if closed")
    public_gateway = serializers.CharField()
    expires_at = serializers.DateTimeField()
    nodes = PlannedNodeSerializer(many=True)

"""Cluster endpoints for middleware (a batch scheduler), scripts and the browser. Thin: validate, call one
service, serialize."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.generics import get_object_or_404
from rest_framework.response import Response
from rest_framework.views import APIView

from clusters import selectors, services
from clusters.api import serializers as s
from clusters.models import (
    ClusterState,
    Connectivity,
    Image,
    Node,
    NodeState,
    PublicPrefix,
    VirtualCluster,
    Webhook,
)
from portal import notify
from portal.api import Pagination, choice_param, error_responses, if_none_match, query_param
from portal.models import ApiToken, TokenScope
from portal.tokens import HasScope, StaffSessionMayView

CLUSTER_ERRORS = {
    "e403": "not your cluster (group members and admins who may only view clusters see it), or the token lacks "
    "the scope",
    "e404": "no such cluster or node (or not visible to you)",
    "e409": "VLAN pool or public prefix exhausted, a quota reached, or the cluster's state does not allow this",
    "e422": "cannot be built on this network (e.g. a host no core reaches, a disabled host)",
}
CHANGE_ERRORS = {  # a change that needs the cluster READY
    **CLUSTER_ERRORS,
    "e409": "code `busy`: the cluster is provisioning or updating; the same request (with the same "
    "Idempotency-Key) succeeds once it is ready: retry after the `Retry-After` header's seconds. Code `conflict`: "
    "it never will (the cluster is tearing down, torn down or failed, or its provisioning failed and is being "
    "rolled back; the node is not migrating; the Idempotency-Key was used for another request). Also "
    "`quota_exceeded`, `pool_exhausted`",
}
OWNER_403 = (
    "`owner` names another user than the caller, which only middleware tokens (clusters:manage) and admins may "
    "(whether that user exists or not), or the token lacks the scope"
)
CREATE_ERRORS = {
    **CLUSTER_ERRORS,
    "e403": OWNER_403,
    "e400": "invalid input, with field-level messages (e.g. `connectivity`: public asked for where the policy "
    "makes the cluster closed)",
    "e422": f"{CLUSTER_ERRORS['e422']}, or public `connectivity` asked for with no public prefix configured",
}
WRITE_ERRORS = (400, 401, 403, 404, 409, 415, 422, 429)
IDEMPOTENCY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="a retried request with the same key (at most 200 characters) answers like the first and "
    "changes nothing again (create: returns the first cluster); the same key with another request is a 409",
)
FILTERS = [
    OpenApiParameter("state", OpenApiTypes.STR, enum=ClusterState.values, description="filter by state"),
    OpenApiParameter("owner", OpenApiTypes.STR, description="filter by owner user name"),
    OpenApiParameter("connectivity", OpenApiTypes.STR, enum=Connectivity.values, description="public or closed"),
    OpenApiParameter("job_id", OpenApiTypes.STR, description="the scheduler's job id"),
    OpenApiParameter("name", OpenApiTypes.STR, description="cluster name"),
]


def _backing_off(response: Response) -> Response:
    """A long poll answered at once because this server's long-poll slots were all taken (``LONG_POLL_SLOTS``)
    says when to ask again (``Retry-After``), so that a caller does not ask again at once, in a loop."""
    if notify.answered_early():
        response["Retry-After"] = "1"
    return response


def _valid(serializer_class, request) -> dict:
    """The request body as ``serializer_class`` validates it (400 otherwise), defaults applied."""
    data = serializer_class(data=request.data, context={"request": request})
    data.is_valid(raise_exception=True)
    return data.validated_data


def _with_errors(*codes):
    return error_responses(*codes, **CLUSTER_ERRORS)


def _change_errors(*codes):
    return error_responses(*codes, **CHANGE_ERRORS)


def _asked(v: dict, owner) -> dict:
    """``cluster_create``'s arguments from a validated create (or plan) body."""
    return {
        "owner": owner,
        "name": v["name"],
        "image": v["image"],
        "admin_rights": v["admin_rights"],
        "nodes": v["nodes"],
        "expires_at": timezone.now() + timedelta(seconds=v["lifetime"]),
        "group": v.get("group"),
        "job_id": v["job_id"],
        "bastion_address": v["bastion_address"],
        "connectivity": v.get("connectivity", ""),
    }


@extend_schema_view(
    list=extend_schema(
        parameters=FILTERS, responses={200: s.ClusterSerializer(many=True), **_with_errors(400, 401, 403)}
    ),
    retrieve=extend_schema(responses={200: s.ClusterSerializer, **_with_errors(401, 403, 404)}),
)
class ClusterViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Virtual clusters and their network."""

    serializer_class = s.ClusterSerializer
    pagination_class = Pagination
    required_scopes = {
        "read": (TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE),
        "write": (TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE),
    }
    throttle_scope = "cluster-writes"  # (unsafe methods only: portal.throttle)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return VirtualCluster.objects.none()
        qs = selectors.clusters_visible(self.request)
        # a state or connectivity left empty (a template's empty variable) is no filter; a job id, name or owner
        # is matched as given, an empty one too (``?job_id=``: the clusters made without one — never all of them,
        # which an epilogue that tears down what it lists would take for its job's)
        chosen = {
            "state": choice_param(self.request, "state", ClusterState.values),
            "connectivity": choice_param(self.request, "connectivity", Connectivity.values),
        }
        qs = qs.filter(**{lookup: value for lookup, value in chosen.items() if value})
        for param, lookup in (("job_id", "job_id"), ("name", "name"), ("owner", "owner__username")):
            if param in self.request.query_params:
                qs = qs.filter(**{lookup: query_param(self.request, param)})
        return qs

    def _actionable(self, pk) -> object:
        cluster = get_object_or_404(self.get_queryset(), pk=pk)
        if not selectors.may_act_on(self.request, cluster):
            raise PermissionDenied(
                "Only the owner, an admin who may change clusters or the middleware can change this cluster."
            )
        return cluster

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        retry_after = getattr(exc, "retry_after", None)  # (clusters.errors.Busy: the same request succeeds later)
        if retry_after:
            response["Retry-After"] = str(retry_after)
        return response

    def _idempotency(self, request, body: dict) -> tuple[str, str, str] | None:
        """(actor, key, fingerprint) when the request has an ``Idempotency-Key``. The actor is the caller's user,
        whichever of its tokens (or its session) sends the request: a retry after the token was rotated is the
        same caller. The fingerprint is of the method, path and ``body`` as validated (defaults applied): a
        retry that spells out a default is the same request."""
        key = request.headers.get("Idempotency-Key", "").strip()
        if not key:
            return None
        if len(key) > 200:
            raise ValidationError({"Idempotency-Key": ["at most 200 characters"]})
        if "\x00" in key:  # (PostgreSQL text cannot hold it; gunicorn refuses it, runserver passes it on)
            raise ValidationError({"Idempotency-Key": ["must not contain NUL characters"]})
        fingerprint = services.request_fingerprint({"method": request.method, "path": request.path, "body": body})
        return f"user:{request.user.pk}", key, fingerprint

    def _once(self, request, cluster, code: int, act, body: dict | None = None) -> Response:
        """Run ``act`` and answer ``code`` with the cluster; with an ``Idempotency-Key``, at most once: a retry
        (the same validated ``body``) answers like the first request without acting again."""
        cluster, code = services.cluster_act_once(
            idempotency=self._idempotency(request, body or {}), cluster=cluster, status_code=code, act=act
        )
        return self._respond(cluster, code)

    def _respond(self, cluster, code=status.HTTP_200_OK) -> Response:
        cluster = selectors.clusters_visible(self.request).filter(pk=cluster.pk).first()
        if cluster is None:  # out of the caller's sight meanwhile (left the group during a long poll, deleted)
            raise NotFound("No cluster matches the given query.")
        return Response(s.ClusterSerializer(cluster, context={"request": self.request}).data, status=code)

    @extend_schema(
        request=s.ClusterCreateSerializer,
        parameters=[IDEMPOTENCY],
        responses={
            201: s.ClusterSerializer,
            200: OpenApiResponse(s.ClusterSerializer, description="replay of an earlier request (same key)"),
            **error_responses(400, 401, 403, 409, 415, 422, 429, **CREATE_ERRORS),
        },
    )
    def create(self, request):
        """Create a cluster; its network is provisioned in the background (wait for READY with ``…/wait/``). The
        policy decides whether it is public or closed (``connectivity_reason`` says why); the request may ask
        for closed, never for public against the policy."""
        raw = self._idempotency(request, {"sent": request.data})
        replayed = services.create_replay(*raw) if raw else None
        if replayed is not None:  # the same body with the same key: answered like the first, not validated again
            return self._respond(replayed, status.HTTP_200_OK)
        v = _valid(s.ClusterCreateSerializer, request)  # (another owner than the caller: 403 unless allowed)
        owner = v.get("owner") or request.user
        idempotency = self._idempotency(request, {**v, "owner": owner})
        cluster, created = services.cluster_create_idempotent(
            **_asked(v, owner), idempotency=idempotency, raw_fingerprint=raw[2] if raw else ""
        )
        return self._respond(cluster, status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(
        request=s.ClusterCreateSerializer,
        responses={200: s.ClusterPlanSerializer, **error_responses(400, 401, 403, 409, 415, 422, 429, **CREATE_ERRORS)},
    )
    @action(detail=False, methods=["post"])
    def plan(self, request):
        """A dry run of a create with the same body: the policy's decision, the VLAN pool and the public subnet it
        would get now, or the very error a create would answer (a quota, an exhausted pool, a host no core
        reaches…). Nothing is allocated, recorded or sent — a scheduler checks a placement before it commits."""
        v = _valid(s.ClusterCreateSerializer, request)
        found = services.cluster_plan(**_asked(v, v.get("owner") or request.user))
        return Response(s.ClusterPlanSerializer(found).data)

    @extend_schema(
        parameters=[s.EventQuerySerializer],
        responses={
            200: s.EventPageSerializer,
            **_with_errors(400, 401, 403, 404),
            410: OpenApiResponse(
                s.EventsPrunedSerializer,
                description="code `events_pruned`: events after `after` were deleted (older than "
                "CLUSTER_EVENT_RETENTION days), some may be missing: read the clusters again and go on with "
                "`after` = `resume_after`",
            ),
        },
    )
    @action(detail=False, methods=["get"], pagination_class=None)
    def events(self, request):
        """The feed of cluster state changes (creation included), oldest first, for the clusters you may see:
        go on with ``after`` = the ``last`` of the previous answer and nothing is ever skipped (the database
        writes the events in the transaction of each change, numbered in commit order; ``last`` moves on with
        the whole feed even when none of its events are yours). Events are kept ``CLUSTER_EVENT_RETENTION``
        days: a reader that comes back with an ``after`` older than that is answered 410 (``events_pruned``),
        with the ``resume_after`` to go on with once it has read the clusters again. With ``timeout``, an
        empty answer waits for the next event: one long poll follows every cluster of a scheduler. When every
        long-poll slot of the server is taken (``LONG_POLL_SLOTS``), the answer comes at once with ``Retry-After:
        1``: ask again a second later."""
        query = s.EventQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        v = query.validated_data
        if v.get("cluster") is not None and not selectors.clusters_visible(request).filter(pk=v["cluster"]).exists():
            raise NotFound("No such cluster (or it is not visible to you).")  # not a wait for what cannot come
        events, last = selectors.cluster_events(
            request, after=v["after"], cluster_id=v.get("cluster"), limit=v["limit"], timeout=v["timeout"]
        )
        return _backing_off(Response(s.EventPageSerializer({"events": events, "last": last}).data))

    @extend_schema(
        parameters=[s.QuotaQuerySerializer],
        responses={200: s.QuotaSerializer(many=True), **error_responses(400, 401, 403, e403=OWNER_403)},
    )
    @action(detail=False, methods=["get"], pagination_class=None)
    def quota(self, request):
        """The quotas that apply to the caller's clusters (or, for middleware and admins, ``owner``'s), with
        what is in use now: a scheduler can check before it asks for a cluster."""
        query = s.QuotaQuerySerializer(data=request.query_params, context={"request": request})
        query.is_valid(raise_exception=True)  # (another owner than the caller: 403 unless allowed)
        owner = query.validated_data.get("owner") or request.user
        return Response(s.QuotaSerializer(selectors.quota_report(owner), many=True).data)

    @extend_schema(
        parameters=[s.WaitSerializer],
        responses={
            200: OpenApiResponse(
                s.ClusterSerializer,
                description="the cluster once its state is one of `until`, or when `timeout` ran out (compare `state`)",
            ),
            **_with_errors(400, 401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"])
    def wait(self, request, pk=None):
        """Long poll: answer as soon as the cluster's state is one of ``until`` (default: settled — ready,
        failed or torn_down), or after ``timeout`` seconds with the state it has then. A scheduler waits for
        READY with one request instead of polling. When every long-poll slot of the server is taken
        (``LONG_POLL_SLOTS``), the answer comes at once with ``Retry-After: 1``: ask again a second later."""
        cluster = get_object_or_404(self.get_queryset(), pk=pk)
        query = s.WaitSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        until, timeout = query.validated_data["until"], query.validated_data["timeout"]
        if selectors.cluster_wait(cluster.pk, until, timeout, holder=f"user:{request.user.pk}") is None:
            raise NotFound("the cluster was deleted while waiting")
        return _backing_off(self._respond(cluster))

    @extend_schema(responses={200: s.ClusterNetworkSerializer, **_with_errors(401, 403, 404)})
    @action(detail=True, methods=["get"])
    def network(self, request, pk=None):
        """The switches and hosts that carry the cluster's VLAN (or carried it and are being cleaned), each with its
        last change for the cluster and the open drift on the VLAN: which device a pending node waits for."""
        cluster = get_object_or_404(self.get_queryset().select_related("segment"), pk=pk)
        return Response(s.ClusterNetworkSerializer(selectors.cluster_network(request, cluster)).data)

    @extend_schema(
        request=s.ClusterExtendSerializer,
        parameters=[IDEMPOTENCY],
        responses={200: s.ClusterSerializer, **_with_errors(*WRITE_ERRORS)},
    )
    def partial_update(self, request, pk=None):
        """Change the lifetime (``expires_at``)."""
        cluster = self._actionable(pk)
        v = _valid(s.ClusterExtendSerializer, request)

        def act():
            services.cluster_extend(cluster=cluster, expires_at=v["expires_at"])

        return self._once(request, cluster, status.HTTP_200_OK, act, v)

    @extend_schema(request=None, responses={201: s.NodeTokenSerializer, **_with_errors(401, 403, 404, 409, 429)})
    @action(detail=True, methods=["post"], url_path="node-token")
    def node_token(self, request, pk=None):
        """A token for the cluster's nodes (the owner's, an admin's who may change clusters, the middleware's):
        scope ``cluster:node``, bound to this cluster, acting as its owner — it certifies the nodes' host keys and
        fetches who may log in to them (``/api/access/host-certificates/``, ``…/access/``), nothing else; revoked
        when the cluster ends. What a node's boot script and timer hold (the cluster's people are root on its
        nodes), never the owner's or the middleware's own token. A new one each call; the secret is shown once."""
        from access import services as access_services

        cluster = self._actionable(pk)
        token, secret = access_services.node_token_issue(cluster=cluster)
        body = {
            "token": secret,
            "prefix": token.prefix,
            "name": token.name,
            "cluster": cluster.pk,
            "scopes": token.scopes,
        }
        response = Response(s.NodeTokenSerializer(body).data, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(
        request=s.TeardownSerializer,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_with_errors(*WRITE_ERRORS)},
    )
    @action(detail=True, methods=["post"])
    def teardown(self, request, pk=None):
        """Tear the cluster down: hosts, then switches; the VLAN goes to quarantine; access is revoked."""
        cluster = self._actionable(pk)
        v = _valid(s.TeardownSerializer, request)

        def act():
            services.cluster_teardown(cluster=cluster, reason=f"{v['reason']} (by {request.user.get_username()})")

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act, v)

    @extend_schema(
        request=s.NodesAddSerializer,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_change_errors(*WRITE_ERRORS)},
    )
    @action(detail=True, methods=["post"])
    def nodes(self, request, pk=None):
        """Add nodes to a ready cluster; the network converges onto their hosts."""
        cluster = self._actionable(pk)
        v = _valid(s.NodesAddSerializer, request)

        def act():
            services.cluster_nodes_add(cluster=cluster, nodes=v["nodes"])

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act, v)

    def _node(self, cluster, node_id) -> Node:
        # A removed node is gone (404) — but an ended cluster's nodes were removed by its end: a change of one
        # is refused by the service for the cluster's state (409), as adding a node is.
        nodes = Node.objects.exclude(state=NodeState.REMOVED) if cluster.is_live else Node.objects.all()
        return get_object_or_404(nodes, cluster=cluster, pk=node_id)

    @extend_schema(
        request=None,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_change_errors(400, 401, 403, 404, 409, 422, 429)},
    )
    @action(detail=True, methods=["delete"], url_path=r"nodes/(?P<node_id>\d+)")
    def node_remove(self, request, pk=None, node_id=None):
        """Remove a node; its host is cleaned when no node of the cluster is left there."""
        cluster = self._actionable(pk)

        def act():
            services.cluster_node_remove(cluster=cluster, node=self._node(cluster, node_id))

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act)

    @extend_schema(
        request=s.MigrateSerializer,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_change_errors(*WRITE_ERRORS)},
    )
    @action(detail=True, methods=["post"], url_path=r"nodes/(?P<node_id>\d+)/migrate")
    def migrate(self, request, pk=None, node_id=None):
        """Prepare a migration: the network is made ready on the target host before the VM moves."""
        cluster = self._actionable(pk)
        v = _valid(s.MigrateSerializer, request)

        def act():
            services.node_migrate_prepare(cluster=cluster, node=self._node(cluster, node_id), target=v["target_host"])

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act, v)

    @extend_schema(
        request=None,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_change_errors(400, 401, 403, 404, 409, 422, 429)},
    )
    @action(detail=True, methods=["post"], url_path=r"nodes/(?P<node_id>\d+)/migrated")
    def migrated(self, request, pk=None, node_id=None):
        """Complete a migration: the VM runs on the target; the source is cleaned if no node is left there."""
        cluster = self._actionable(pk)

        def act():
            services.node_migrate_complete(cluster=cluster, node=self._node(cluster, node_id))

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act)

    @extend_schema(
        request=None,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_change_errors(400, 401, 403, 404, 409, 422, 429)},
    )
    @action(detail=True, methods=["post"], url_path=r"nodes/(?P<node_id>\d+)/migrate/cancel")
    def migrate_cancel(self, request, pk=None, node_id=None):
        """Call a prepared migration off: the VM stays on its host; the network prepared on the target is
        taken away again (409 when the node is not migrating)."""
        cluster = self._actionable(pk)

        def act():
            services.node_migrate_cancel(cluster=cluster, node=self._node(cluster, node_id))

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act)

    @extend_schema(
        request=s.ConnectivitySerializer,
        parameters=[IDEMPOTENCY],
        responses={202: s.ClusterSerializer, **_change_errors(*WRITE_ERRORS)},
    )
    @action(detail=True, methods=["post"])
    def connectivity(self, request, pk=None):
        """Admin only: override the connectivity policy (audited)."""
        cluster = self._actionable(pk)
        # an admin's token needs clusters:manage; a middleware token's user must be staff too (the service's test,
        # asked before the body is: one answer whatever the body)
        if not (
            selectors.acts_on_all(request, VirtualCluster)
            and selectors.staff_may(request.user, "change", VirtualCluster)
        ):
            raise PermissionDenied("Only an administrator can override the connectivity policy.")
        v = _valid(s.ConnectivitySerializer, request)

        def act():
            services.connectivity_override(
                cluster=cluster, connectivity=v["connectivity"], admin=request.user, reason=v["reason"]
            )

        return self._once(request, cluster, status.HTTP_202_ACCEPTED, act, v)


IMAGE_ERRORS = {
    "e403": "the provider's catalogue (changed in the admin only), someone else's image, or the token lacks the scope",
    "e404": "no such image (or not available to you)",
    "e409": "`quota_exceeded`: IMAGE_QUOTA images already; `conflict`: live clusters boot the image (a new "
    "source: live public clusters boot the approved image)",
}


@extend_schema_view(
    list=extend_schema(
        parameters=[s.ImageQuerySerializer],
        responses={200: s.ImageSerializer(many=True), **error_responses(400, 401, 403, **IMAGE_ERRORS)},
    ),
    retrieve=extend_schema(responses={200: s.ImageSerializer, **error_responses(401, 403, 404, **IMAGE_ERRORS)}),
)
class ImageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """OS images: the provider's catalogue, and images users register themselves (paper §2.1: a cluster that
    boots a user-provided image is closed)."""

    serializer_class = s.ImageSerializer
    pagination_class = Pagination
    lookup_field = "name"
    lookup_value_regex = r"[-a-zA-Z0-9_]+"
    required_scopes = ClusterViewSet.required_scopes
    throttle_scope = "cluster-writes"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Image.objects.none()
        qs = selectors.images_visible(self.request)
        if self.action != "list":
            return qs
        query = s.ImageQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        v = query.validated_data
        if v["approved"] is not None:
            qs = qs.filter(approved=v["approved"])
        if "owner" in v:
            qs = qs.filter(owner__isnull=True) if v["owner"] == "-" else qs.filter(owner__username=v["owner"])
        return qs

    def _changeable(self, name) -> Image:
        image = get_object_or_404(self.get_queryset(), name=name)
        if not selectors.image_may_change(self.request, image):
            raise PermissionDenied(
                "Only its owner, an admin or the middleware change a user-provided image; the provider's catalogue "
                "is changed in the admin."
            )
        return image

    @extend_schema(
        request=s.ImageCreateSerializer,
        responses={
            201: s.ImageSerializer,
            200: OpenApiResponse(s.ImageSerializer, description="the same registration again (a retry): the image"),
            **error_responses(400, 401, 403, 409, 415, 429, **{**IMAGE_ERRORS, "e403": OWNER_403}),
        },
    )
    def create(self, request):
        """Register a user-provided image (never approved: an admin may approve it in the admin). Only its owner
        (and, with ``group``, that group's members) may boot clusters from it. The same registration again (a
        retry) answers 200 with the image; another image of that name is a 400."""
        v = _valid(s.ImageCreateSerializer, request)
        image, created = services.image_register(
            owner=v.get("owner") or request.user,
            name=v["name"],
            description=v["description"],
            source=v["source"],
            group=v.get("group"),
        )
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(s.ImageSerializer(image).data, status=code)

    @extend_schema(
        request=s.ImageUpdateSerializer,
        responses={200: s.ImageSerializer, **error_responses(400, 401, 403, 404, 409, 415, 429, **IMAGE_ERRORS)},
    )
    def partial_update(self, request, name=None):
        """Change a user-provided image's description, source or group."""
        image = self._changeable(name)
        v = _valid(s.ImageUpdateSerializer, request)
        return Response(s.ImageSerializer(services.image_update(image=image, changes=v)).data)

    @extend_schema(request=None, responses={204: None, **error_responses(401, 403, 404, 409, 429, **IMAGE_ERRORS)})
    def destroy(self, request, name=None):
        """Delete a user-provided image no live cluster boots. One that ended clusters still name is retired
        instead: kept for their history, listed no more, booting nothing; its name stays taken."""
        services.image_delete(image=self._changeable(name))
        return Response(status=status.HTTP_204_NO_CONTENT)


WEBHOOK_403 = (
    "webhooks: a token with clusters:manage (middleware: every cluster's events) or clusters:write (a user: the "
    "events of the clusters the user sees), or an administrator"
)


@extend_schema_view(
    list=extend_schema(
        responses={200: s.WebhookSerializer(many=True), **error_responses(400, 401, 403, e403=WEBHOOK_403)}
    ),
    retrieve=extend_schema(responses={200: s.WebhookSerializer, **error_responses(401, 403, 404, e403=WEBHOOK_403)}),
)
class WebhookViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Webhooks a caller registers for itself: each gets the cluster event feed pushed, signed with its secret, while
    the token it was registered with is live — every cluster's (as ``GET /api/clusters/events/`` gives it to the
    middleware) for a ``clusters:manage`` token or an administrator, the clusters its owner sees (own, groups')
    for a user's ``clusters:write`` token (``all_clusters``). A caller sees and changes only its account's
    webhooks, and of those only the ones whose feed it may have itself: a token without ``clusters:manage`` never
    one with every cluster's (the admin's pages show every one)."""

    serializer_class = s.WebhookSerializer
    pagination_class = Pagination
    required_scopes = {
        "read": (TokenScope.CLUSTERS_MANAGE, TokenScope.CLUSTERS_WRITE),
        "write": (TokenScope.CLUSTERS_MANAGE, TokenScope.CLUSTERS_WRITE),
    }
    throttle_scope = "cluster-writes"

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        token = request.auth
        if isinstance(token, ApiToken):  # (HasScope made sure of clusters:manage or clusters:write)
            return
        action = "view" if request.method in permissions.SAFE_METHODS else "change"
        if not selectors.staff_may(request.user, action, Webhook):  # as the admin's webhook pages ask
            raise PermissionDenied(WEBHOOK_403)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Webhook.objects.none()
        hooks = Webhook.objects.filter(owner=self.request.user)
        token = self.request.auth
        if isinstance(token, ApiToken) and not token.has_scope(TokenScope.CLUSTERS_MANAGE):
            # every cluster's feed is for a caller that may have it: a narrower token of the same account
            # neither sees such a webhook nor points it elsewhere
            hooks = hooks.filter(all_clusters=False)
        return hooks.order_by("name")

    @extend_schema(
        request=s.WebhookCreateSerializer,
        responses={201: s.WebhookCreatedSerializer, **error_responses(400, 401, 403, 409, 415, 429, e403=WEBHOOK_403)},
    )
    def create(self, request):
        """Register a webhook: it gets the events from now on. Its ``secret`` is in this answer only."""
        v = _valid(s.WebhookCreateSerializer, request)
        token = request.auth if isinstance(request.auth, ApiToken) else None
        hook, secret = services.webhook_create(owner=request.user, token=token, **v)
        data = {**s.WebhookSerializer(hook).data, "secret": secret}
        return _no_store(Response(data, status=status.HTTP_201_CREATED))

    @extend_schema(
        request=s.WebhookUpdateSerializer,
        responses={200: s.WebhookSerializer, **error_responses(400, 401, 403, 404, 415, 429, e403=WEBHOOK_403)},
    )
    def partial_update(self, request, pk=None):
        """Change a webhook's URL, states, or whether it is enabled."""
        hook = get_object_or_404(self.get_queryset(), pk=pk)
        v = _valid(s.WebhookUpdateSerializer, request)
        return Response(s.WebhookSerializer(services.webhook_update(hook=hook, changes=v)).data)

    @extend_schema(request=None, responses={204: None, **error_responses(401, 403, 404, 429, e403=WEBHOOK_403)})
    def destroy(self, request, pk=None):
        """Delete a webhook: nothing more is sent to it."""
        services.webhook_delete(hook=get_object_or_404(self.get_queryset(), pk=pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _no_store(response: Response) -> Response:
    response["Cache-Control"] = "no-store"  # it carries a secret
    return response


class IsRouterOrAdmin(permissions.BasePermission):
    """A token with ``router:pull`` (or ``clusters:manage``: ``HasScope`` checks which), or the session of an
    admin who may view every cluster (``selectors.staff_may``): the list names every public cluster, not only the
    caller's."""

    message = "Only the provider's router (a token with scope router:pull), middleware or an admin may read this."

    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, ApiToken) or selectors.staff_may(request.user, "view", VirtualCluster)


PREFIX_DENIED = "not a token with clusters:manage or network:read, nor an administrator who may view public prefixes"


@extend_schema_view(
    list=extend_schema(
        responses={200: s.PublicPrefixSerializer(many=True), **error_responses(400, 401, 403, e403=PREFIX_DENIED)}
    ),
    retrieve=extend_schema(
        responses={200: s.PublicPrefixSerializer, **error_responses(401, 403, 404, e403=PREFIX_DENIED)}
    ),
)
class PublicPrefixViewSet(viewsets.ReadOnlyModelViewSet):
    """The provider's public prefixes with their subnets' usage now (``usage.free``: how many more public
    clusters fit; a scheduler checks it before it asks for one, an operator alerts on it)."""

    queryset = PublicPrefix.objects.order_by("name")
    serializer_class = s.PublicPrefixSerializer
    pagination_class = Pagination
    permission_classes = [permissions.IsAuthenticated, HasScope, StaffSessionMayView]
    required_scopes = {"read": (TokenScope.CLUSTERS_MANAGE, TokenScope.NETWORK_READ)}


class PublicNetworksView(APIView):
    """What the provider's router configures for the public clusters (the reference hook:
    ``access/gateway/router.py``)."""

    permission_classes = [permissions.IsAuthenticated, HasScope, IsRouterOrAdmin]
    required_scopes = {"read": (TokenScope.ROUTER, TokenScope.CLUSTERS_MANAGE)}

    @extend_schema(
        parameters=[s.PublicNetworksQuerySerializer, OpenApiParameter("If-None-Match", OpenApiTypes.STR, "header")],
        responses={
            200: s.PublicNetworksSerializer,
            304: OpenApiResponse(description="unchanged since the ETag sent"),
            **error_responses(400, 401, 403, e403="not a token with router:pull or clusters:manage, nor an admin"),
        },
    )
    def get(self, request):
        """Every public cluster whose network is set up or being set up, by VLAN: its subnet and the router's
        address there. Polled with ``If-None-Match`` (the ETag of the answer): 304 while nothing changed."""
        query = s.PublicNetworksQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        networks = selectors.public_networks(site=query.validated_data.get("site"))
        etag = '"' + services.request_fingerprint({"networks": networks})[:32] + '"'
        tags = if_none_match(request)
        if etag.strip('"') in tags or "*" in tags:
            response = Response(status=status.HTTP_304_NOT_MODIFIED)
        else:
            response = Response(s.PublicNetworksSerializer({"networks": networks}).data)
        response["ETag"] = etag
        response["Cache-Control"] = "no-cache"
        return response

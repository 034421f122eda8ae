"""Access endpoints for users' scripts, the browser and gateways. Thin: validate, call one service,
answer. Profiles and generated keys are answered with ``Cache-Control: no-store`` and never logged."""

from __future__ import annotations

import logging

from django.http import HttpResponse
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import get_object_or_404
from rest_framework.response import Response
from rest_framework.views import APIView

from access import selectors, services
from access.api import serializers as s
from access.errors import NotFound
from access.models import USER_KINDS, Credential, CredentialKind, Gateway, RevocationReason
from clusters.models import ClusterState, VirtualCluster
from portal.api import Pagination, choice_param, error_responses, if_none_match, query_param
from portal.models import ApiToken, TokenScope

logger = logging.getLogger(__name__)

ERRORS = {
    400: OpenApiResponse(description="invalid input (field-level messages), e.g. an unreadable public key"),
    401: OpenApiResponse(description="not authenticated"),
    403: OpenApiResponse(description="a cluster you may not enter, or the token lacks the scope"),
    404: OpenApiResponse(description="no such credential (or not yours)"),
    409: OpenApiResponse(
        description="the cluster's network is not up (not READY), or the cluster is public; code "
        "`no_common_gateway`: no gateway reaches all the clusters asked for together (ask for one per cluster)"
    ),
    503: OpenApiResponse(description="no access gateway of this kind is configured"),
    429: OpenApiResponse(
        description="code `throttled`: more requests of this kind than API_THROTTLE_RATES allows a user; retry "
        "after the Retry-After header's seconds"
    ),
}
ISSUE_SCOPES = {"write": (TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE)}
READ_SCOPES = {
    "read": (TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE),
    "write": (TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE),
}


def _credentials_visible(request):
    """The caller's credentials; everyone's for an admin who may view credentials (``clusters.selectors.sees_all``)
    in the browser or through a token with ``clusters:manage``. An admin's token is only as strong as its scopes:
    with ``clusters:read`` or ``clusters:write`` it lists and revokes its owner's own."""
    from clusters.selectors import sees_all

    return selectors.credentials_visible(request.user, as_admin=sees_all(request, Credential))


def _errors(*codes):
    return {c: ERRORS[c] for c in codes}


def _no_store(response):
    # A profile or a generated key must not stay in a browser or proxy cache.
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    return response


class VpnProfileView(APIView):
    """Issue an OpenVPN profile (.ovpn) for clusters you may enter."""

    required_scopes = ISSUE_SCOPES
    throttle_scope = "credentials"

    @extend_schema(
        request=s.VpnProfileRequestSerializer,
        responses={
            (200, "application/x-openvpn-profile"): OpenApiResponse(
                OpenApiTypes.BINARY,
                description="the .ovpn as a download (Content-Disposition); contains your private key",
            ),
            **_errors(400, 401, 403, 409, 429, 503),
        },
    )
    def post(self, request):
        data = s.VpnProfileRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        profile = services.vpn_profile_issue(
            user=request.user,
            clusters=data.validated_data["clusters"],
            publish=data.validated_data["publish"],
            label=data.validated_data.get("label", ""),
        )
        response = HttpResponse(profile.text, content_type="application/x-openvpn-profile")
        response["Content-Disposition"] = content_disposition_header(True, profile.filename)
        response["X-Credential-Id"] = str(profile.credential.pk)
        return _no_store(response)


class SshCertificateView(APIView):
    """Sign an OpenSSH user certificate for one cluster (your key, or a fresh key pair)."""

    required_scopes = ISSUE_SCOPES
    throttle_scope = "credentials"

    @extend_schema(
        request=s.SshCertificateRequestSerializer,
        responses={201: s.SshCertificateSerializer, **_errors(400, 401, 403, 409, 429, 503)},
    )
    def post(self, request):
        data = s.SshCertificateRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = services.ssh_certificate_issue(
            user=request.user,
            cluster=data.validated_data["cluster"],
            public_key=data.validated_data.get("public_key") or None,
            label=data.validated_data.get("label", ""),
        )
        return _no_store(Response(s.SshCertificateSerializer(issued.as_dict()).data, status=status.HTTP_201_CREATED))


# what a node's host certificate and its sshd's access answer when they are refused (one lookup in services)
NODE_ERRORS = {
    403: OpenApiResponse(
        description="a group member's request, or an admin's who may only view clusters (only the owner, an admin "
        "who may change clusters or the middleware), or the token lacks the scope"
    ),
    404: OpenApiResponse(description="no such cluster among yours, or no such live node in it"),
    409: OpenApiResponse(description="the cluster is tearing down, torn down or failed, or its lifetime is over"),
}


#: who may call the node endpoints: the owner's or the middleware's token (write), and a node token of the cluster
NODE_SCOPES = (*ISSUE_SCOPES["write"], TokenScope.CLUSTER_NODE)


def _node_token_bound(request, cluster_id: int) -> None:
    """A node token (``cluster:node``) admits to its own cluster's nodes only: another cluster is "no cluster
    among yours" (404), as for anyone who may not see it."""
    token = request.auth
    if isinstance(token, ApiToken) and token.cluster_id is not None and token.cluster_id != cluster_id:
        raise NotFound(f"no cluster {cluster_id} among yours", field="cluster")


class HostCertificateView(APIView):
    """Certify a cluster node's SSH host key (the cluster's owner, or the middleware; a node token of the cluster,
    ``POST /api/clusters/{id}/node-token/``, is what a node's boot script should hold): users reach it without a
    host-key prompt. The answer also holds what the node's sshd needs to let the cluster's people in."""

    required_scopes = {"write": NODE_SCOPES}
    throttle_scope = "host-certificates"

    @extend_schema(
        request=s.HostCertificateRequestSerializer,
        responses={
            201: s.HostCertificateSerializer,
            400: ERRORS[400],
            401: ERRORS[401],
            429: ERRORS[429],
            **NODE_ERRORS,
        },
    )
    def post(self, request):
        from clusters.selectors import acts_on_all, sees_all

        data = s.HostCertificateRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        _node_token_bound(request, data.validated_data["cluster"])
        issued = services.node_host_certificate_issue(
            user=request.user,
            cluster=data.validated_data["cluster"],
            node=data.validated_data["node"],
            public_key=data.validated_data["public_key"],
            as_admin=acts_on_all(request, VirtualCluster),
            sees_all=sees_all(request, VirtualCluster),
        )
        return Response(s.HostCertificateSerializer(issued.as_dict()).data, status=status.HTTP_201_CREATED)


class NodeAccessView(APIView):
    """Who may log in to a cluster's node now (the cluster's owner, or the middleware): its sshd's principals
    file, the user CA and the CA's current KRL, for a timer on the node to fetch again; with the node's host key,
    its host certificate issued again when the cluster's lifetime was extended."""

    # the scopes that certify the node's host key, though this is a GET (a clusters:read token gets a 403)
    required_scopes = {"read": NODE_SCOPES}

    @extend_schema(
        parameters=[s.NodeAccessQuerySerializer],
        responses={
            200: s.NodeAccessSerializer,
            400: OpenApiResponse(description="cluster or node missing or malformed, or an unreadable public_key"),
            401: ERRORS[401],
            **NODE_ERRORS,
        },
    )
    def get(self, request):
        from clusters.selectors import acts_on_all, sees_all

        data = s.NodeAccessQuerySerializer(data=request.query_params)
        data.is_valid(raise_exception=True)
        _node_token_bound(request, data.validated_data["cluster"])
        current = services.node_access_current(
            user=request.user,
            cluster=data.validated_data["cluster"],
            node=data.validated_data["node"],
            as_admin=acts_on_all(request, VirtualCluster),
            sees_all=sees_all(request, VirtualCluster),
            host_key=data.validated_data.get("public_key", ""),
            has_certificate=data.validated_data.get("certificate_sha256", ""),
        )
        response = Response(s.NodeAccessSerializer(current.as_dict()).data)
        response["Cache-Control"] = "no-cache"
        return response


CREDENTIAL_STATES = ("valid", "revoked", "expired")


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("kind", OpenApiTypes.STR, enum=CredentialKind.values),
            OpenApiParameter("status", OpenApiTypes.STR, enum=CREDENTIAL_STATES),
            OpenApiParameter("user", OpenApiTypes.STR, description="user name (admins)"),
        ],
        responses={200: s.CredentialSerializer(many=True), **_errors(400, 401, 403)},
    ),
    retrieve=extend_schema(responses={200: s.CredentialSerializer, **_errors(401, 403, 404)}),
)
class CredentialViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your credentials (admins: everyone's; through a token only with clusters:manage); revoke one ("I lost my
    laptop")."""

    serializer_class = s.CredentialSerializer
    required_scopes = READ_SCOPES

    def get_queryset(self):
        from django.utils import timezone

        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Credential.objects.none()
        qs = _credentials_visible(self.request)
        if kind := choice_param(self.request, "kind", CredentialKind.values):
            qs = qs.filter(kind=kind)
        if user := query_param(self.request, "user"):
            qs = qs.filter(user__username=user)
        state = choice_param(self.request, "status", CREDENTIAL_STATES)
        if state == "revoked":
            qs = qs.filter(revoked_at__isnull=False)
        elif state == "valid":
            qs = qs.live(timezone.now())
        elif state == "expired":
            qs = qs.filter(revoked_at__isnull=True, not_after__lte=timezone.now())
        return qs

    @extend_schema(
        request=s.RevokeRequestSerializer,
        responses={
            200: s.CredentialSerializer,
            **_errors(400, 401, 404),
            403: OpenApiResponse(
                description="another's credential, which only an admin who may change credentials revokes, or the "
                "token lacks the scope"
            ),
        },
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        from clusters.selectors import acts_on_all

        credential = get_object_or_404(_credentials_visible(request), pk=pk)
        own = credential.user_id == request.user.pk and (
            credential.kind in USER_KINDS or _owns_its_clusters(credential, request.user)
        )
        if not own and not acts_on_all(request, Credential):  # (seen by an admin who may only view credentials)
            if credential.user_id == request.user.pk:
                raise PermissionDenied(
                    "A node's host certificate is revoked by its cluster's owner or an administrator (whoever asked "
                    "for it may no longer act on the cluster)."
                )
            raise PermissionDenied("Only an administrator who may change credentials revokes another's.")
        data = s.RevokeRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        default = RevocationReason.KEY_COMPROMISE if own else RevocationReason.PRIVILEGE_WITHDRAWN
        services.credential_revoke(
            credential=credential,
            reason=data.validated_data.get("reason", default),
            by=request.user,
            note=data.validated_data.get("note") or f"revoked through the API by {request.user.get_username()}",
        )
        credential = _credentials_visible(request).get(pk=credential.pk)
        return Response(self.get_serializer(credential).data)


def _owns_its_clusters(credential: Credential, user) -> bool:
    """Whether ``user`` owns every cluster a node's host certificate vouches for, now (not only asked for it: the
    middleware account, an admin since demoted): a node's host key revoked is certified never again, and every
    bundle of the cluster says ``@revoked`` for it."""
    from clusters.models import VirtualCluster

    ids = set(credential.clusters.values_list("cluster_id", flat=True))
    return bool(ids) and VirtualCluster.objects.filter(pk__in=ids, owner=user).count() == len(ids)


CLUSTER_ERRORS = {
    "e400": "invalid input, with field-level messages (an unknown `state`, a NUL character in `job_id`, a bad "
    "`limit` or `offset`)",
    "e403": "the token lacks the scope (clusters:read, clusters:write or clusters:manage)",
    "e404": "no such cluster (or not visible to you)",
}
CLUSTER_FILTERS = [
    OpenApiParameter("state", OpenApiTypes.STR, enum=ClusterState.values, description="filter by state"),
    OpenApiParameter("job_id", OpenApiTypes.STR, description="the scheduler's job id"),
]


@extend_schema_view(
    list=extend_schema(
        parameters=CLUSTER_FILTERS,
        responses={200: s.ClusterAccessSerializer(many=True), **error_responses(400, 401, 403, **CLUSTER_ERRORS)},
    ),
    retrieve=extend_schema(
        responses={200: s.ClusterAccessSerializer, **error_responses(401, 403, 404, **CLUSTER_ERRORS)}
    ),
)
class ClusterAccessViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Whether and where the clusters you may see can be entered: enterable, the access gateways that carry each
    (where to connect, whether they are stale) and whether they have installed it yet (``access_ready``; false
    for a minute or two after the cluster became ready). What the access page shows, for a scheduler."""

    serializer_class = s.ClusterAccessSerializer
    pagination_class = Pagination
    required_scopes = READ_SCOPES

    def get_queryset(self):
        from clusters.selectors import clusters_visible

        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return VirtualCluster.objects.none()
        # (not the nodes and steps clusters_visible prefetches for the clusters API: none is shown here)
        return selectors.clusters_with_enterable(clusters_visible(self.request).prefetch_related(None))

    def list(self, request):
        qs = self.get_queryset()
        state = choice_param(request, "state", ClusterState.values)
        if state:
            qs = qs.filter(state=state)
        if "job_id" in request.query_params:
            qs = qs.filter(job_id=query_param(request, "job_id"))
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(self.get_serializer(selectors.clusters_access(page), many=True).data)

    def retrieve(self, request, pk=None):
        (access,) = selectors.clusters_access([self.get_object()])
        return Response(self.get_serializer(access).data)


class IsGatewayToken(permissions.BasePermission):
    """An enabled gateway's own API token with the ``gateway:pull`` scope (sessions are not enough)."""

    message = "Only an enabled access gateway's token (scope gateway:pull) may pull gateway state."

    def has_permission(self, request, view) -> bool:
        token = request.auth
        if not isinstance(token, ApiToken) or not token.has_scope(TokenScope.GATEWAY):
            return False
        view.gateway = Gateway.objects.filter(token=token, enabled=True).first()
        return view.gateway is not None


class GatewaySessionsView(APIView):
    """Who is connected through the gateway now (``access.gateway.report``, after each pull)."""

    permission_classes = [permissions.IsAuthenticated, IsGatewayToken]

    @extend_schema(
        request=s.SessionsReportSerializer,
        responses={
            200: s.SessionsReportAnswerSerializer,
            **error_responses(400, 401, 403, e403="not an enabled gateway's own token (scope gateway:pull)"),
        },
    )
    def post(self, request):
        """The gateway's sessions up now, replacing those it reported before (an entry that is not valid is left
        out and counted in ``skipped``; a document that is not two lists is a 400)."""
        report = s.SessionsReportSerializer(data=request.data)
        report.is_valid(raise_exception=True)
        v = report.validated_data
        recorded = services.gateway_sessions_report(gateway=self.gateway, vpn=v["vpn"], ssh=v["ssh"])
        if v["skipped"]:
            logger.warning("gateway %s reported %d session entries that are not valid", self.gateway.name, v["skipped"])
        return Response({"recorded": recorded, "skipped": v["skipped"]})


class GatewayStateView(APIView):
    """What a gateway needs to authorize offline: CA/AA certificates, CRL, KRL, VLAN map, principals."""

    permission_classes = [permissions.IsAuthenticated, IsGatewayToken]

    @extend_schema(
        parameters=[
            OpenApiParameter("If-None-Match", OpenApiTypes.STR, OpenApiParameter.HEADER),
            OpenApiParameter(
                "VirtCloud-State-Generated-At",
                OpenApiTypes.DATETIME,
                OpenApiParameter.HEADER,
                description="the generated_at of the state the gateway has installed: VLAN ids released before it "
                "(and before every other gateway's) may be handed out again",
            ),
        ],
        responses={
            200: s.GatewayStateSerializer,
            304: OpenApiResponse(description="unchanged since the ETag the gateway sent"),
            401: ERRORS[401],
            403: OpenApiResponse(description="not an enabled gateway's token with scope gateway:pull"),
        },
    )
    def get(self, request):
        state = services.gateway_state(gateway=self.gateway)
        etag = f'"{state["etag"]}"'
        if state["etag"] in if_none_match(request):
            # it has the current state: every change made before this document is in what it installed
            services.gateway_pulled(gateway=self.gateway, installed=state["generated_at"])
            response = Response(status=status.HTTP_304_NOT_MODIFIED)
        else:
            services.gateway_pulled(gateway=self.gateway, installed=request.headers.get("VirtCloud-State-Generated-At"))
            response = Response(state)
        response["ETag"] = etag
        response["Cache-Control"] = "no-cache"
        return response


class CrlView(APIView):
    """The VPN CA's current CRL (public, like any CRL distribution point)."""

    authentication_classes: list = []
    permission_classes = [permissions.AllowAny]

    @extend_schema(responses={(200, "application/x-pem-file"): OpenApiTypes.STR})
    def get(self, request):
        response = HttpResponse(services.crl_current(), content_type="application/x-pem-file")
        response["Cache-Control"] = "public, max-age=60"
        return response

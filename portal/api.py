"""API plumbing shared by every app: errors a user can cause become clear JSON answers, never a 500, and the
schema documents them (``error_responses``) and the API token scheme (``TokenAuthenticationScheme``)."""

from __future__ import annotations

from collections.abc import Mapping

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpResponse, HttpResponseServerError, JsonResponse, QueryDict
from django.urls import is_valid_path
from django.utils.encoding import smart_str
from django.views.defaults import bad_request as django_bad_request
from django.views.defaults import page_not_found
from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.routers import DefaultRouter
from rest_framework.views import exception_handler as drf_exception_handler

from portal import audit
from portal.models import TokenScope
from portal.text import encodable


def _too_big() -> dict:
    return {
        "detail": f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes",
        "code": "too_large",
    }


def exception_handler(exc, context):
    """Every error answer of a view is JSON with ``code`` beside a ``detail``: domain errors as they say,
    DRF's own (401, 403, 404, 405, 415, …) with their code (e.g. ``not_authenticated``, ``not_found``), a
    body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` a 413; invalid input keeps its field-level messages."""
    status_code = getattr(exc, "status", None)
    as_dict = getattr(exc, "as_dict", None)
    if isinstance(status_code, int) and callable(as_dict):
        # Domain errors (portal.errors.DomainError, network.errors.NetworkError) carry their status.
        return Response(as_dict(), status=status_code)
    if isinstance(exc, DjangoValidationError):
        data = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        return Response(data, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, RequestDataTooBig):
        return Response(_too_big(), status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, Http404):
        exc = NotFound()  # Django's message names the model ("No VirtualCluster matches the given query.")
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, APIException) and isinstance(response.data, dict):
        if set(response.data) == {"detail"} and isinstance(exc.detail, str):
            response.data["code"] = getattr(exc.detail, "code", None) or exc.default_code
    return response


class Router(DefaultRouter):
    """The API's router: DRF's (trailing slashes, the API root), without the ``.json`` format-suffix routes —
    the API speaks JSON only, and those routes reached the views with a ``format`` argument they do not take
    (a 500 for ``POST /api/clusters/1/teardown.json``); such a path is a 404 now."""

    include_format_suffixes = False

    class APIRootView(DefaultRouter.APIRootView):
        """The links to the API's lists: readable by any token (each list asks for its own scope)."""

        required_scopes = {"read": tuple(TokenScope.values)}


def api_slash_middleware(get_response):
    """Under ``/api/``, a POST, PUT, PATCH or DELETE to a path without its trailing slash is answered 308, which
    a client repeats with the same method and body at the path with the slash. Django's APPEND_SLASH answers
    301, which clients follow as a GET: ``POST /api/clusters`` then listed the clusters, and looked like a
    success."""

    def middleware(request):
        path = request.path_info
        if request.method not in ("GET", "HEAD", "OPTIONS") and path.startswith("/api/") and not path.endswith("/"):
            urlconf = getattr(request, "urlconf", None)
            if not is_valid_path(path, urlconf) and is_valid_path(f"{path}/", urlconf):
                response = HttpResponse(status=308)
                response["Location"] = request.get_full_path(force_append_slash=True)
                return response
        return get_response(request)

    return middleware


def not_found(request, exception=None):
    """``handler404``: under ``/api/`` a path no route matches (e.g. an id with a dot) is answered in JSON
    like every other API error; elsewhere Django's page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found.", "code": "not_found"}, status=404)
    return page_not_found(request, exception)


def bad_request(request, exception=None):
    """``handler400``: a request Django refuses before any view (a Host header that is not a host name,
    too many fields) is answered in JSON under ``/api/`` too; elsewhere Django's page."""
    if request.path.startswith("/api/"):
        if isinstance(exception, RequestDataTooBig):
            return JsonResponse(_too_big(), status=413)
        return JsonResponse({"detail": "Bad request.", "code": "bad_request"}, status=400)
    return django_bad_request(request, exception)


def server_error(request):
    """``handler500``: the page (or, under ``/api/``, the JSON answer) names the request's id, which the
    logs carry on every line of that request: what a user quotes to the operators."""
    from django.template import loader

    request_id = getattr(request, "request_id", "") or audit.current().request_id or ""
    if request.path.startswith("/api/"):
        body = {"detail": "Server error.", "code": "server_error", "request_id": request_id}
        return JsonResponse(body, status=500)
    return HttpResponseServerError(loader.get_template("500.html").render({"request_id": request_id}))


class Pagination(LimitOffsetPagination):
    """``?limit=&offset=`` with a ceiling: an unbounded limit (``limit=10**20``) overflows PostgreSQL's
    LIMIT (a 500) and a large one reads a whole table into one answer. A limit or offset that is not a
    number (or a limit below 1, an offset below 0) is a 400, not silently the default page."""

    max_limit = 1000

    def get_limit(self, request):
        self._check(request, self.limit_query_param, minimum=1)
        return super().get_limit(request)

    def get_offset(self, request):
        self._check(request, self.offset_query_param, minimum=0)
        return super().get_offset(request)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            minimum = {self.limit_query_param: 1, self.offset_query_param: 0}.get(parameter["name"])
            if minimum is not None:
                parameter["schema"]["minimum"] = minimum
                if parameter["name"] == self.limit_query_param:
                    parameter["schema"]["maximum"] = self.max_limit
        return parameters

    @staticmethod
    def _check(request, name: str, *, minimum: int) -> None:
        raw = request.query_params.get(name)
        if raw in (None, ""):
            return
        try:
            ok = int(raw) >= minimum
        except ValueError:
            ok = False
        if not ok:
            raise ValidationError({name: [f"must be a whole number, at least {minimum}"]})


def query_param(request, name: str) -> str | None:
    """A query parameter used as a filter; 400 for text PostgreSQL cannot compare (a NUL character, a lone
    surrogate)."""
    value = request.query_params.get(name)
    if value and "\x00" in value:
        raise ValidationError({name: ["must not contain NUL characters"]})
    if value and not encodable(value):
        raise ValidationError({name: ["must not contain lone surrogates (not characters)"]})
    return value


def if_none_match(request) -> set[str]:
    """The entity tags of the request's ``If-None-Match`` header, without quotes or ``W/`` (``*``: any tag, the
    caller answers 304 when it has the resource at all)."""
    header = request.headers.get("If-None-Match", "")
    return {t.strip().removeprefix("W/").strip('"') for t in header.split(",") if t.strip()}


def choice_param(request, name: str, choices) -> str | None:
    """A query parameter that must be one of ``choices`` (a TextChoices' values): the value, None when absent or
    empty, a 400 naming the choices otherwise."""
    value = query_param(request, name)
    if value and value not in choices:
        raise ValidationError({name: [f"unknown {name}; one of {', '.join(choices)}"]})
    return value or None


ID_MAX = 2**63 - 1  # the largest row id (a bigint)


class IdField(serializers.IntegerField):
    """A row id in a request: a positive 64-bit integer, so that a huge number is a 400, not a database
    error (a 500: SQLite cannot bind it)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", ID_MAX)
        super().__init__(**kwargs)


class NameRelatedField(serializers.SlugRelatedField):
    """A lookup by name that answers "does not exist" (400), not a database error (500), for a name
    PostgreSQL cannot hold (a NUL character)."""

    def to_internal_value(self, data):
        if isinstance(data, str) and "\x00" in data:
            self.fail("does_not_exist", slug_name=self.slug_field, value=smart_str(data))
        return super().to_internal_value(data)


class ErrorSerializer(serializers.Serializer):
    """An error answer: ``detail`` with a machine-readable ``code``, or, for invalid input, each offending
    field (or header, e.g. ``Idempotency-Key``) with its list of messages."""

    detail = serializers.CharField(required=False)
    code = serializers.CharField(required=False)


ERROR_DESCRIPTIONS = {
    400: "invalid input, with field-level messages",
    401: "not authenticated (no session, or a missing, unknown, revoked or expired API token)",
    403: "not allowed: not your object, or the token lacks the scope",
    404: "no such object (or not visible to you)",
    409: "conflicts with the current state",
    413: "the request body is larger than the server accepts",
    415: "the request body is not JSON, form or multipart data",
    422: "well-formed but cannot be done on this network",
    429: "code `throttled`: more requests of this kind than API_THROTTLE_RATES allows a user; retry after the "
    "Retry-After header's seconds",
}


def error_responses(*codes: int, **descriptions: str) -> dict[int, OpenApiResponse]:
    """Schema responses for error ``codes`` (``descriptions``: ``e409="..."`` overrides the default text)."""
    return {
        code: OpenApiResponse(ErrorSerializer, description=descriptions.get(f"e{code}", ERROR_DESCRIPTIONS[code]))
        for code in codes
    }


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents ``portal.tokens.TokenAuthentication`` as an HTTP bearer scheme."""

    target_class = "portal.tokens.TokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "vc_<prefix>_<secret>",
            "description": "An API token made in the admin (scoped, revocable): `Authorization: Bearer vc_…`.",
        }


def counted_list(count):
    """A ``ListSerializer`` class that counts its page at once — ``count(items)`` (one query or two, whatever the
    page's size) — and gives each item's serializer the answer in ``context["usage"]``."""

    class CountedList(serializers.ListSerializer):
        def to_representation(self, data):
            items = list(data.all() if hasattr(data, "all") else data)
            self.child.context["usage"] = count(items)
            return super().to_representation(items)

    return CountedList


# A request body that refuses the fields it does not know: a 400 naming each ("unknown field"), beside the other
# fields' errors. Ignored, a misspelt or guessed field (``expires_at`` for ``lifetime``, a node's ``ip`` for
# ``address``) left the caller believing it got what it asked for. A form-encoded body (the browsable API's
# forms) names a list's or an object's items ``nodes[0]name``: known by their field, ``nodes``; its CSRF token
# is not a field. (A comment, not a docstring: the schema would give it as the description of every request
# body without one of its own.)
class StrictSerializer(serializers.Serializer):
    def to_internal_value(self, data):
        unknown = {}
        if isinstance(data, Mapping):
            known = {name for name, field in self.fields.items() if not field.read_only}
            form = isinstance(data, QueryDict)
            unknown = {
                name: ["unknown field"]
                for name in data
                if (name.split("[", 1)[0] if form else name) not in known
                and not (form and name == "csrfmiddlewaretoken")
            }
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if unknown and isinstance(exc.detail, dict):
                raise serializers.ValidationError({**exc.detail, **unknown}) from None
            raise
        if unknown:
            raise serializers.ValidationError(unknown)
        return value


class StrictSerializerSchema(OpenApiSerializerExtension):
    """The schema says it too: ``additionalProperties: false`` on every ``StrictSerializer``."""

    target_class = StrictSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        return {**schema, "additionalProperties": False}

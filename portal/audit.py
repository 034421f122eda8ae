"""The audit log: every create, update and delete of registered models, with actor, request id and
before/after values (secrets masked).

The actor comes from a context variable set by ``AuditActorMiddleware`` for web and API requests and by
``audit_actor(...)`` for management commands and Celery tasks, so services never pass it around.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from django.db import models
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save

from portal.secrets import MASK

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Context:
    actor: str = "system"
    user_id: int | None = None
    request_id: str = ""


_context: contextvars.ContextVar[_Context] = contextvars.ContextVar(
    "audit_context",
    default=_Context(),  # noqa: B039 (frozen, immutable)
)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # whole value (fullmatch): no trailing newline


def current() -> _Context:
    return _context.get()


@contextlib.contextmanager
def audit_actor(actor: str, *, user=None, request_id: str | None = None):
    """Attribute every audited change in the block to ``actor`` (a system process or a user)."""
    token = _context.set(
        _Context(
            actor=actor,
            user_id=getattr(user, "pk", None),
            request_id=request_id or current().request_id or uuid.uuid4().hex,
        )
    )
    try:
        yield
    finally:
        _context.reset(token)


class RequestIdMiddleware:
    """Gives every request an id, echoed in the response and in every log line and audit entry the request
    causes. The ``X-Request-ID`` header is taken only behind the TLS proxy (``BEHIND_TLS_PROXY``), which sets
    it, and only when it is a sane token (1-64 of ``A-Za-z0-9._-``): without a proxy any client could file
    its changes in the audit log under another request's id, or under one of its choosing."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = _incoming_request_id(request) or uuid.uuid4().hex
        token = _context.set(_Context(actor="anonymous", request_id=request.request_id))
        try:
            response = self.get_response(request)
        finally:
            _context.reset(token)
        response["X-Request-ID"] = request.request_id
        return response


def _incoming_request_id(request) -> str | None:
    from portal.logins import from_trusted_proxy

    if not from_trusted_proxy(request):  # (a client that reached the portal another way names what it likes)
        return None
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _REQUEST_ID_RE.fullmatch(incoming) else None


class AuditActorMiddleware:
    """After authentication: the logged-in user (or API token owner) becomes the actor."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        ctx = current()
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            ctx = _Context(actor=user.get_username(), user_id=user.pk, request_id=ctx.request_id)
        token = _context.set(ctx)
        try:
            return self.get_response(request)
        finally:
            _context.reset(token)


def set_request_actor(actor: str, user=None) -> None:
    """Used by token authentication, which runs inside the view rather than in middleware."""
    ctx = current()
    _context.set(_Context(actor=actor, user_id=getattr(user, "pk", None), request_id=ctx.request_id))


class RequestIdLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current().request_id or "-"
        return True


# --- registration and signal handlers -------------------------------------------------------------------------


@dataclass
class _Registration:
    secret_fields: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    m2m: bool = True
    fields: list[str] = field(default_factory=list)


_registry: dict[type[models.Model], _Registration] = {}


def register(model: type[models.Model], *, secret_fields=(), exclude=()) -> type[models.Model]:
    """Audit every change to ``model``. Secret fields are recorded only as "changed", never by value."""
    _registry[model] = _Registration(secret_fields=frozenset(secret_fields), exclude=frozenset(exclude))
    uid = f"audit-{model._meta.label}"
    pre_save.connect(_pre_save, sender=model, dispatch_uid=uid + "-pre")
    post_save.connect(_post_save, sender=model, dispatch_uid=uid + "-post")
    post_delete.connect(_post_delete, sender=model, dispatch_uid=uid + "-del")
    for m2m_field in model._meta.many_to_many:
        m2m_changed.connect(_m2m_changed, sender=m2m_field.remote_field.through, dispatch_uid=f"{uid}-{m2m_field.name}")
    return model


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def snapshot(instance: models.Model) -> dict:
    """The audited field values of ``instance``: foreign keys by id; a secret field only as "set" or ""
    plus a one-way digest, so that a change can be seen without the value ever being stored."""
    reg = _registry.get(type(instance), _Registration())
    data = {}
    for f in instance._meta.concrete_fields:
        if f.name in reg.exclude:
            continue
        value = getattr(instance, f.attname)
        if f.name in reg.secret_fields:
            data[f.name] = _SecretState(str(value or ""))
        else:
            data[f.name] = _jsonable(value)
    return data


class _SecretState:
    """Compares by value but renders only as the mask: what the audit log stores for a secret."""

    __slots__ = ("_digest", "is_set")

    def __init__(self, value: str):
        self.is_set = bool(value)
        self._digest = hashlib.sha256(value.encode()).digest()

    def __eq__(self, other) -> bool:
        return isinstance(other, _SecretState) and other._digest == self._digest

    def __hash__(self) -> int:
        return hash(self._digest)

    def render(self) -> str:
        return MASK if self.is_set else ""


def _render(value):
    return value.render() if isinstance(value, _SecretState) else value


def _diff(before: dict, after: dict) -> dict:
    return {
        key: [_render(before.get(key)), _render(after.get(key))]
        for key in sorted(after.keys() | before.keys())
        if before.get(key) != after.get(key)
    }


def _entry(model, action: str, changes: dict | None, message: str) -> dict:
    """The values of an audit entry about an object of ``model`` in the current context, by attribute name
    (the object's id and text are the caller's)."""
    from django.contrib.contenttypes.models import ContentType

    ctx = current()
    return {
        "user_id": ctx.user_id,
        "actor": ctx.actor[:200],
        "request_id": ctx.request_id,
        "action": action,
        "content_type_id": ContentType.objects.get_for_model(model).pk,
        "changes": changes or {},
        "message": message,
    }


def record(instance, action: str, changes: dict | None = None, message: str = "") -> None:
    """Write one audit entry for ``instance`` in the current context (also for non-model actions)."""
    from portal.models import AuditEntry

    AuditEntry.objects.create(
        **_entry(type(instance), action, changes, message),
        object_id=str(instance.pk),
        object_repr=str(instance)[:200],
    )


def create_rows(model, rows: list, *, related: Sequence[str] = ()) -> list:
    """``bulk_create`` ``rows`` of an audited model with the audit entry each would get from ``save()``, in three
    statements whatever their number (the rows' text, which often reads related rows, read in one query joining
    ``related``). Returns the rows created."""
    from django.db import connection

    from portal.models import AuditEntry

    if not connection.features.can_return_rows_from_bulk_insert:  # (SQLite before 3.35: no ids back)
        for row in rows:
            row.save()  # (one statement each, audited by the save signal)
        return rows
    created = model.objects.bulk_create(rows)
    if not created:
        return created
    read = model.objects.filter(pk__in=[row.pk for row in created]).select_related(*related).order_by("pk")
    AuditEntry.objects.bulk_create(
        AuditEntry(
            **_entry(
                model,
                "create",
                {k: [None, _render(v)] for k, v in snapshot(row).items() if _render(v) not in (None, "")},
                "",
            ),
            object_id=str(row.pk),
            object_repr=str(row)[:200],
        )
        for row in read
    )
    return created


def delete_rows(queryset, *, related: Sequence[str] = ()) -> int:
    """Delete the rows of ``queryset`` (an audited model that no other row references) with the audit entry
    each would get from ``delete()``, in three statements whatever their number: ``delete()`` reads, signals
    and audits row by row, and the text of an entry (``str(row)``) often reads related rows too (``related``
    joins them in the one read). Returns how many rows went."""
    from django.db import connection

    from portal.models import AuditEntry

    model = queryset.model
    if model._meta.related_objects:
        raise TypeError(f"{model.__name__} is referenced by other models: use delete(), which follows them")
    rows = list(queryset.select_related(*related).order_by("pk"))
    if not rows:
        return 0
    AuditEntry.objects.bulk_create(
        AuditEntry(
            **_entry(model, "delete", {k: [_render(v), None] for k, v in snapshot(row).items()}, ""),
            object_id=str(row.pk),
            object_repr=str(row)[:200],
        )
        for row in rows
    )
    q = connection.ops.quote_name
    ids = [row.pk for row in rows]
    with connection.cursor() as cursor:  # identifiers come from the model, values are parameters
        cursor.execute(
            f"DELETE FROM {q(model._meta.db_table)} WHERE {q(model._meta.pk.column)} IN "  # noqa: S608
            f"({', '.join(['%s'] * len(ids))})",
            ids,
        )
        return cursor.rowcount


def insert_for_rows(rows: str, model, *, action: str, changes: dict, message: str, repr_sql: str, repr_params=()):
    """SQL and parameters of an ``INSERT … SELECT`` writing one audit entry (in the current context) for
    each row of ``rows``, a CTE of ``model`` rows with an ``id`` column — so that a service changes rows
    and audits them in ONE statement (PostgreSQL)::

        WITH changed AS (UPDATE … RETURNING id, vid), logged AS (<this>) SELECT id, vid FROM changed

    ``repr_sql`` (with ``repr_params``) is the SQL expression over ``rows`` for ``object_repr`` (cut to the
    column's length, as ``record`` cuts it)."""
    from django.db import connection
    from django.utils import timezone

    from portal.models import AuditEntry

    meta = AuditEntry._meta
    values = {"timestamp": timezone.now(), **_entry(model, action, changes, message)}
    fields = [meta.get_field(name) for name in values]
    q = connection.ops.quote_name
    columns = [q(f.column) for f in (*fields, meta.get_field("object_id"), meta.get_field("object_repr"))]
    # identifiers come from the models and the caller's code, values are parameters
    repr_length = meta.get_field("object_repr").max_length
    select = f"{', '.join(['%s'] * len(fields))}, CAST({rows}.id AS varchar(64)), SUBSTR({repr_sql}, 1, {repr_length})"
    sql = f"INSERT INTO {q(meta.db_table)} ({', '.join(columns)}) SELECT {select} FROM {rows}"  # noqa: S608
    params = [f.get_db_prep_value(value, connection) for f, value in zip(fields, values.values(), strict=True)]
    return sql, [*params, *repr_params]


def _pre_save(sender, instance, raw=False, **kwargs):
    if raw or instance.pk is None:
        instance._audit_before = None
        return
    old = sender._default_manager.filter(pk=instance.pk).first()
    instance._audit_before = snapshot(old) if old is not None else None


def _post_save(sender, instance, created, raw=False, **kwargs):
    if raw:
        return
    after = snapshot(instance)
    before = getattr(instance, "_audit_before", None)
    if created or before is None:
        changes = {k: [None, _render(v)] for k, v in after.items() if _render(v) not in (None, "")}
        record(instance, "create", changes)
        return
    changes = _diff(before, after)
    if changes:
        record(instance, "update", changes)


def _post_delete(sender, instance, **kwargs):
    record(instance, "delete", {k: [_render(v), None] for k, v in snapshot(instance).items()})


def _m2m_field(model, through):
    return next((f for f in model._meta.many_to_many if f.remote_field.through is through), None)


def _m2m_changed(sender, instance, action, reverse, model, pk_set, **kwargs):
    """Many-to-many changes from either side (``core.sites.add(site)`` or ``site.core_transports.add(core)``)
    are recorded on the object that declares the field, with the names added or removed."""
    owner_model = model if reverse else type(instance)
    if owner_model not in _registry:
        return
    m2m = _m2m_field(owner_model, sender)
    if m2m is None:
        return
    if action == "pre_clear":
        # post_clear carries no primary keys: remember what is about to go.
        mine, other = (
            (m2m.m2m_reverse_field_name(), m2m.m2m_field_name())
            if reverse
            else (
                m2m.m2m_field_name(),
                m2m.m2m_reverse_field_name(),
            )
        )
        instance._audit_cleared = set(
            sender._default_manager.filter(**{mine: instance.pk}).values_list(f"{other}_id", flat=True)
        )
        return
    if action == "post_clear":
        pk_set = instance.__dict__.pop("_audit_cleared", set())
    elif action not in ("post_add", "post_remove"):
        return
    if not pk_set:
        return
    verb = "added" if action == "post_add" else "removed"
    if not reverse:
        names = sorted(str(o) for o in model._default_manager.filter(pk__in=pk_set))
        record(instance, "update", {m2m.name: [None, {verb: names}]})
        return
    for owner in model._default_manager.filter(pk__in=pk_set):
        record(owner, "update", {m2m.name: [None, {verb: [str(instance)]}]})

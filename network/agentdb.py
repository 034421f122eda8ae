"""The PostgreSQL privileges of a host agent (``PORTAL_ROLE=agent``, a worker on a hypervisor).

A hypervisor runs users' VMs, whose users are root in them: a VM that escapes onto it finds whatever the agent
holds. The agent holds none of the portal's keys (``portal.settings``), and with a database role of its own
made by ``manage.py network agent-grants ROLE --host NAME …`` it holds only what converging its own hosts
takes:

- it reads the network inventory and the desired state (sites, cores, switches without their credentials,
  switch ports, hosts, pools, VLAN ids, segments and their members, the device history and the drift) —
  nothing of the clusters, the users, the access credentials, the audit log or the sessions;
- it writes only rows of the hosts named, and only as converging them does (restrictive row-level security
  policies, which hold whatever other policy or group the role is given): the outcome of their device
  changes, the repairs the reconciler records for them (a pending change of the host, of no segment), their
  drift and when they were last reconciled. A device change of another host or of a switch, a segment's
  change, another host's row: out of its reach;
- with the ``django-db`` result backend, the task results (as every worker: the broker's trust, see below).

What a role cannot take away: it may take PostgreSQL's advisory locks (the device locks of every switch and
host, stalling their convergence while it holds them), and it shares the broker with every worker, so it can
send any task to any queue. The README says so.

Every other role works on these tables as its grants allow (a permissive policy for everyone). Run the
command again after every upgrade's ``migrate``: a new column an agent writes needs its grant.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from django.apps import apps
from django.db import connection
from django.db.models import Model

from network.models import (
    CoreTransport,
    DeviceChange,
    DeviceKind,
    Drift,
    Host,
    Segment,
    SegmentMember,
    Site,
    Switch,
    SwitchPort,
    VlanAllocation,
    VlanPool,
)

_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")  # short enough for the policy names (63 bytes)
EVERYONE = "virtcloud_everyone"  # the permissive policy of every role: as without row-level security

# The tables a host agent reads whole: what the desired state, the specs and the reconciler are computed from.
READS: tuple[type[Model], ...] = (
    Site,
    CoreTransport,
    CoreTransport.sites.through,
    SwitchPort,
    Host,
    VlanPool,
    VlanAllocation,
    Segment,
    SegmentMember,
    DeviceChange,
    Drift,
)
# … and the switches without these (an agent converges hosts only: a switch's login is not its business)
SWITCH_SECRETS = ("username", "password", "driver_args")


@dataclass(frozen=True)
class Write:
    """What an agent may write in one table: UPDATE of ``columns`` (model field names) on the rows ``mine``
    (an SQL condition), and with ``insert`` (a condition) INSERT of rows that meet ``mine`` and it. In the
    conditions, ``{hosts}`` stands for the hosts' ids, ``{names}`` for their names, ``{changes}`` for their
    device changes' ids."""

    model: type[Model]
    columns: tuple[str, ...]
    mine: str
    update_check: str = ""
    insert: str = ""


_HOST_CHANGE = f"kind = '{DeviceKind.HOST}' AND host_id IN {{hosts}}"
_HOST_NAME = f"device = (SELECT h.name FROM {Host._meta.db_table} h WHERE h.id = host_id)"  # noqa: S608
WRITES: tuple[Write, ...] = (
    # a device change's outcome (network.convergence._claim, _settle, change_fail), and a reconcile's repair
    # (change_create: a pending change of the host, of no segment)
    Write(
        DeviceChange,
        ("status", "batch", "started_at", "finished_at", "attempts", "orphaned", "error", "diff", "refused"),
        mine=_HOST_CHANGE,
        insert=f"switch_id IS NULL AND segment_id IS NULL AND status = 'pending' AND {_HOST_NAME}",
    ),
    # the drift the reconciler finds and repairs (network.convergence.reconcile_device, _record_drift)
    Write(
        Drift,
        ("vlans", "expected", "actual", "last_seen_at", "repaired_at", "repair"),
        mine=f"device_kind = '{DeviceKind.HOST}' AND host_id IN {{hosts}}",
        update_check="(repair_id IS NULL OR repair_id IN {changes})",
        insert=f"switch_id IS NULL AND repair_id IS NULL AND repaired_at IS NULL AND {_HOST_NAME}",
    ),
    # when the host was last reconciled, and why that failed (network.models.Reconciled)
    Write(Host, ("last_reconciled_at", "reconcile_error"), mine="name IN {names}"),
)


def _results() -> list[tuple[str, str]]:
    """(table, privileges) of the ``django-db`` result backend: a worker stores its tasks' results and counts a
    chord's parts down (``django_celery_results``)."""
    if not apps.is_installed("django_celery_results"):
        return []
    models = apps.get_app_config("django_celery_results")
    return [
        (models.get_model("TaskResult")._meta.db_table, "SELECT, INSERT, UPDATE"),
        (models.get_model("ChordCounter")._meta.db_table, "SELECT, UPDATE, DELETE"),
        (models.get_model("GroupResult")._meta.db_table, "SELECT"),
    ]


def statements(role: str, hosts: Sequence[str]) -> list[str]:
    """The SQL that gives ``role`` (which must exist) exactly a host agent's privileges for ``hosts`` (host
    names), taking away what it was granted before on the portal's tables. Idempotent: running it again
    replaces the role's privileges and policies with these."""
    if not hosts:
        raise ValueError("name at least one host the agent converges")
    if not _ROLE_NAME.fullmatch(role):
        raise ValueError(f"{role!r} is not a role name this command takes: letters, digits and _, at most 40")
    # DDL takes no parameters: the role name is checked above and quoted, host names are string literals
    q = connection.ops.quote_name
    role_q, schema = q(role), q(_schema())
    names = "(" + ", ".join(_literal(name) for name in sorted(set(hosts))) + ")"
    host_ids = f"(SELECT id FROM {q(Host._meta.db_table)} WHERE name IN {names})"  # noqa: S608
    changes = f"(SELECT id FROM {q(DeviceChange._meta.db_table)} WHERE {_HOST_CHANGE.format(hosts=host_ids)})"  # noqa: S608
    out = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role_q}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {role_q}",
        f"REVOKE CREATE ON SCHEMA {schema} FROM {role_q}",
    ]
    out += [f"GRANT SELECT ON {q(model._meta.db_table)} TO {role_q}" for model in READS]
    readable = ", ".join(q(f.column) for f in Switch._meta.concrete_fields if f.name not in SWITCH_SECRETS)
    out.append(f"GRANT SELECT ({readable}) ON {q(Switch._meta.db_table)} TO {role_q}")
    out += [f"GRANT {privileges} ON {q(table)} TO {role_q}" for table, privileges in _results()]
    for write in WRITES:
        table = q(write.model._meta.db_table)
        meta = write.model._meta
        out.append(
            f"GRANT UPDATE ({', '.join(q(meta.get_field(n).column) for n in write.columns)}) ON {table} TO {role_q}"
        )
        if write.insert:  # every column but the id (an id of its choosing would take the portal's next ones)
            columns = ", ".join(q(f.column) for f in meta.concrete_fields if not f.primary_key)
            out.append(f"GRANT INSERT ({columns}) ON {table} TO {role_q}")
        mine = write.mine.format(hosts=host_ids, names=names)
        checked = " AND ".join(c for c in (mine, write.update_check.format(changes=changes)) if c)
        out += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS {EVERYONE} ON {table}",
            f"CREATE POLICY {EVERYONE} ON {table} USING (true) WITH CHECK (true)",
        ]
        policies = [("update", f"FOR UPDATE TO {role_q} USING ({mine}) WITH CHECK ({checked})")]
        if write.insert:
            policies.append(("insert", f"FOR INSERT TO {role_q} WITH CHECK ({mine} AND {write.insert})"))
        for command, clause in policies:
            policy = q(f"virtcloud_agent_{command}_{role}")
            out += [
                f"DROP POLICY IF EXISTS {policy} ON {table}",
                f"CREATE POLICY {policy} ON {table} AS RESTRICTIVE {clause}",
            ]
    return out


def apply(role: str, hosts: Sequence[str]) -> list[str]:
    """Run ``statements`` in one transaction (as the owner of the portal's tables); returns them. Refuses a
    role that is not there, and one that would keep more than an agent's (a superuser, the tables' owner)."""
    from django.db import transaction

    sql = statements(role, hosts)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", [role])
        found = cursor.fetchone()
        if found is None:
            raise ValueError(f"no PostgreSQL role {role!r}: create it first (CREATE ROLE {role} LOGIN PASSWORD …)")
        cursor.execute(
            "SELECT pg_has_role(%s, relowner, 'MEMBER') FROM pg_class WHERE oid = %s::regclass",
            [role, connection.ops.quote_name(DeviceChange._meta.db_table)],
        )
        if any(found) or cursor.fetchone()[0]:
            raise ValueError(f"{role!r} is a superuser, bypasses row-level security or owns the portal's tables")
        for statement in sql:
            cursor.execute(statement)
    return sql


def unrestricted() -> str | None:
    """Why this process's database role is not a restricted agent role (``statements``), or None when it is.
    A host agent logs it when it starts (``portal.celery``)."""
    if connection.vendor != "postgresql":
        return "the database is not PostgreSQL (no roles)"
    changes = DeviceChange._meta.db_table
    allowed = {w.model._meta.db_table: ("SELECT", "UPDATE", "INSERT") for w in WRITES}
    allowed.update({table: tuple(p.strip() for p in privileges.split(",")) for table, privileges in _results()})
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper, rolbypassrls, rolcreaterole FROM pg_roles WHERE rolname = current_user")
        superuser, bypass, createrole = cursor.fetchone()
        cursor.execute(
            "SELECT pg_has_role(current_user, relowner, 'MEMBER') FROM pg_class WHERE oid = %s::regclass",
            [connection.ops.quote_name(changes)],
        )
        (owner,) = cursor.fetchone()
        # every privilege on every table of the schema, column grants too (has_any_column_privilege)
        cursor.execute(
            "SELECT c.relname, p.privilege FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
            "unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p(privilege) "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND CASE "
            "WHEN p.privilege IN ('SELECT', 'INSERT', 'UPDATE') THEN has_any_column_privilege(c.oid, p.privilege) "
            "ELSE has_table_privilege(c.oid, p.privilege) END ORDER BY 1, 2"
        )
        privileges = cursor.fetchall()
        switches = Switch._meta.db_table
        cursor.execute(
            "SELECT bool_or(has_column_privilege(%s, a.attname, 'SELECT')) FROM pg_attribute a "
            "WHERE a.attrelid = %s::regclass AND a.attname = ANY(%s)",
            [switches, connection.ops.quote_name(switches), [Switch._meta.get_field(n).column for n in SWITCH_SECRETS]],
        )
        (reads_logins,) = cursor.fetchone()
        cursor.execute(
            "SELECT tablename FROM pg_policies WHERE schemaname = current_schema() AND permissive = 'RESTRICTIVE' "
            "AND policyname LIKE 'virtcloud_agent_%%' AND current_user::name = ANY(roles)"
        )
        restricted = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')")
        (creates,) = cursor.fetchone()
    if superuser:
        return "it is a superuser"
    if bypass:
        return "it bypasses row-level security"
    if owner:
        return "it owns the portal's tables"
    if createrole:
        return "it may create and grant roles"
    if creates:
        return "it may create objects in the portal's schema (functions that could shadow the portal's)"
    readable = {m._meta.db_table for m in READS} | {switches} | set(allowed)
    reads = sorted({table for table, privilege in privileges if privilege == "SELECT" and table not in readable})
    if reads:
        return f"it may read {', '.join(reads[:5])}{' …' if len(reads) > 5 else ''}"
    if reads_logins:
        return "it may read the switches' logins"
    writes = [(table, privilege) for table, privilege in privileges if privilege != "SELECT"]
    beyond = sorted({table for table, privilege in writes if privilege not in allowed.get(table, ())})
    if beyond:
        return f"it may write {', '.join(beyond[:5])}{' …' if len(beyond) > 5 else ''}"
    missing = sorted({w.model._meta.db_table for w in WRITES} - restricted)
    if missing:
        return f"no row-level security policy limits its writes to its hosts' rows on {', '.join(missing)}"
    return None


def _schema() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        return cursor.fetchone()[0]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"

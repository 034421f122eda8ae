"""The PostgreSQL privileges of a host agent (``PORTAL_ROLE=agent``, a worker on a hypervisor).

A hypervisor runs users' VMs, whose users are root in them: a VM that escapes onto it finds whatever the agent
holds. The agent holds none of the portal's keys (``portal.settings``), and with a database role of its own
made by ``manage.py network agent-grants ROLE --host NAME …`` it holds only what converging its own bridges
takes:

- it reads the network inventory and the desired state (sites, cores, switches and their ports, hosts, pools,
  VLAN ids, segments and their members, the device history and the drift) — nothing of the clusters, the
  users, the access credentials, the audit log or the sessions;
- it writes only the rows of the hosts named (row-level security): the outcome of their device changes,
  the repairs the reconciler records for them, their drift and when they were last reconciled. A device
  change of another host or of a switch, or another host's row, is out of its reach: it cannot report a
  switch converged, nor hide another host's drift.

The role is put in the group role ``GROUP`` (``virtcloud_agents``); row-level security on the tables an
agent writes lets every role outside that group (the portal's own, a reporting role) do what its grants allow,
as before. Run the command again after every upgrade's ``migrate``: a new column an agent writes needs its
grant.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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

GROUP = "virtcloud_agents"
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")  # short enough for the policy names (63 bytes)


@dataclass(frozen=True)
class Write:
    """What an agent may write in one table: INSERT (``insert``) and UPDATE of ``columns`` (model field names),
        on the rows of its hosts only (``mine``: the SQL condition, ``{hosts}`` standing for the hosts' ids, ``{names}``
    for their names)."""

    model: type[Model]
    columns: tuple[str, ...]
    insert: bool
    mine: str


# The tables a host agent reads: what the desired state, the specs and the reconciler are computed from.
READS: tuple[type[Model], ...] = (
    Site,
    CoreTransport,
    CoreTransport.sites.through,
    Switch,
    SwitchPort,
    Host,
    VlanPool,
    VlanAllocation,
    Segment,
    SegmentMember,
    DeviceChange,
    Drift,
)

_HOST_CHANGE = f"kind = '{DeviceKind.HOST}' AND host_id IN {{hosts}}"
WRITES: tuple[Write, ...] = (
    # a device change's outcome (network.convergence._claim, _settle), a reconcile's repair (change_create)
    Write(
        DeviceChange,
        ("status", "batch", "started_at", "finished_at", "attempts", "error", "diff", "refused"),
        insert=True,
        mine=_HOST_CHANGE,
    ),
    # the drift the reconciler finds and repairs (network.convergence.reconcile_device)
    Write(
        Drift,
        ("vlans", "expected", "actual", "last_seen_at", "repaired_at", "repair"),
        insert=True,
        mine=f"device_kind = '{DeviceKind.HOST}' AND host_id IN {{hosts}}",
    ),
    # when the host was last reconciled, and why that failed (network.models.Reconciled)
    Write(Host, ("last_reconciled_at", "reconcile_error"), insert=False, mine="name IN {names}"),
)


def statements(role: str, hosts: Sequence[str], *, group: str = GROUP) -> list[str]:
    """The SQL that gives ``role`` (which must exist) exactly a host agent's privileges for ``hosts`` (host
    names), taking away any other it had on the portal's tables, and makes it a member of ``group`` (created
    when missing: the portal's database user needs CREATEROLE, or a DBA creates it first). Idempotent: running
    it again replaces the role's privileges and policies with these."""
    if not hosts:
        raise ValueError("name at least one host the agent converges")
    for name in (role, group):
        if not _ROLE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a role name this command takes: letters, digits and _, at most 40")
    # DDL takes no parameters: names are quoted (checked above), host names are string literals
    q = connection.ops.quote_name
    role_q = q(role)
    names = "(" + ", ".join(_literal(name) for name in sorted(set(hosts))) + ")"
    host_ids = f"(SELECT id FROM {q(Host._meta.db_table)} WHERE name IN {names})"  # noqa: S608
    agents = _literal(group)
    out = [
        f"DO $$ BEGIN CREATE ROLE {q(group)} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f"GRANT {q(group)} TO {role_q}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {q(_schema())} FROM {role_q}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {q(_schema())} FROM {role_q}",
    ]
    out += [f"GRANT SELECT ON {q(model._meta.db_table)} TO {role_q}" for model in READS]
    for write in WRITES:
        table = q(write.model._meta.db_table)
        columns = ", ".join(q(write.model._meta.get_field(name).column) for name in write.columns)
        out.append(f"GRANT UPDATE ({columns}) ON {table} TO {role_q}")
        if write.insert:
            out.append(f"GRANT INSERT ON {table} TO {role_q}")
        mine = write.mine.format(hosts=host_ids, names=names)
        # everyone outside the agents' group: as without row-level security (their grants decide)
        others = f"NOT pg_has_role(current_user, {agents}, 'MEMBER')"
        out += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS virtcloud_not_agents ON {table}",
            f"CREATE POLICY virtcloud_not_agents ON {table} USING ({others}) WITH CHECK ({others})",
            f"DROP POLICY IF EXISTS virtcloud_agents_read ON {table}",
            f"CREATE POLICY virtcloud_agents_read ON {table} FOR SELECT TO {q(group)} USING (true)",
        ]
        for command, clause in (("UPDATE", f"USING ({mine}) WITH CHECK ({mine})"), ("INSERT", f"WITH CHECK ({mine})")):
            if command == "INSERT" and not write.insert:
                continue
            policy = q(f"virtcloud_agent_{command.lower()}_{role}")
            out += [
                f"DROP POLICY IF EXISTS {policy} ON {table}",
                f"CREATE POLICY {policy} ON {table} FOR {command} TO {role_q} {clause}",
            ]
    return out


def apply(role: str, hosts: Sequence[str], *, group: str = GROUP) -> list[str]:
    """Run ``statements`` in one transaction (as the owner of the portal's tables); returns them."""
    from django.db import transaction

    sql = statements(role, hosts, group=group)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
        if cursor.fetchone() is None:
            raise ValueError(f"no PostgreSQL role {role!r}: create it first (CREATE ROLE {role} LOGIN PASSWORD …)")
        for statement in sql:
            cursor.execute(statement)
    return sql


def unrestricted() -> str | None:
    """Why this process's database role is not a restricted agent role (``statements``), or None when it is.
    A host agent logs it when it starts (``portal.celery``)."""
    from django.contrib.auth.models import User

    if connection.vendor != "postgresql":
        return "the database is not PostgreSQL (no roles)"
    changes = DeviceChange._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        superuser, bypass = cursor.fetchone()
        cursor.execute(
            "SELECT pg_has_role(current_user, relowner, 'USAGE'), relrowsecurity FROM pg_class "
            "WHERE oid = %s::regclass",
            [connection.ops.quote_name(changes)],
        )
        owner, row_security = cursor.fetchone()
        cursor.execute("SELECT has_table_privilege(current_user, %s, 'SELECT')", [User._meta.db_table])
        (reads_users,) = cursor.fetchone()
    if superuser:
        return "it is a superuser"
    if bypass:
        return "it bypasses row-level security"
    if owner:
        return "it owns the portal's tables"
    if reads_users:
        return "it reads the users' table"
    if not row_security:
        return f"row-level security is off on {changes}"
    return None


def _schema() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        return cursor.fetchone()[0]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"

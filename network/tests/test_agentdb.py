"""A host agent on a PostgreSQL role of its own (``manage.py network agent-grants``, ``network.agentdb``): a real
agent worker converges, rolls back and reconciles its host through that role, and the role reaches nothing
else — neither the portal's other tables nor another device's rows."""

from __future__ import annotations

import json
import uuid
from io import StringIO

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from network import services, workflows
from network.models import DeviceChange, Drift, Host, Segment, VlanAllocation
from network.tests import fakes
from network.tests.fakefabric import build_fabric

pytestmark = pytest.mark.worker


def _url(role: str) -> str:
    s = connection.settings_dict
    return f"postgres://{role}@{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"


@pytest.fixture
def roles(transactional_db):
    """An agent role and a reporting role (reads device changes only), unique to the test; dropped afterwards
    with every policy and privilege they were given."""
    if connection.vendor != "postgresql":
        pytest.skip("agent roles are PostgreSQL roles")
    tag = uuid.uuid4().hex[:8]
    names = {"agent": f"vc_agent_{tag}", "report": f"vc_report_{tag}"}
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{names["agent"]}" LOGIN')
        cursor.execute(f'CREATE ROLE "{names["report"]}" LOGIN')
        cursor.execute(f'GRANT SELECT ON network_devicechange TO "{names["report"]}"')
    yield names
    with connection.cursor() as cursor:
        for table in ("network_devicechange", "network_drift", "network_host"):
            cursor.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
            cursor.execute(
                "SELECT policyname FROM pg_policies WHERE tablename = %s AND policyname LIKE 'virtcloud%%'", [table]
            )
            for (policy,) in cursor.fetchall():
                cursor.execute(f'DROP POLICY "{policy}" ON {table}')
        for name in names.values():
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name])
            if cursor.fetchone():
                cursor.execute(f'DROP OWNED BY "{name}"')
                cursor.execute(f'DROP ROLE "{name}"')


def test_an_agent_on_its_own_role_converges_its_host_and_reaches_nothing_else(roles, celery_worker, tmp_path):
    from portal.testing_celery import WorkerProcess, wait_for

    fabric = build_fabric(tmp_path / "devices")
    agent_role = roles["agent"]
    Host.objects.filter(name="brno1").update(
        agent_queue="host.brno1", driver_args={**fabric.args, "reachable_from": "agent-brno1"}
    )
    out = StringIO()
    call_command("network", "agent-grants", agent_role, "--host", "brno1", "--apply", stdout=out)
    printed = out.getvalue().splitlines()
    assert printed[0] == "BEGIN;" and printed[-1] == "COMMIT;"
    assert f'GRANT SELECT ON "network_host" TO "{agent_role}";' in printed
    keys = {"SECRET_KEY": "", "SECRETS_KEY": "", "ACCESS_CA_PASSPHRASE": ""}
    env = {
        **celery_worker.env,
        "DATABASE_URL": _url(agent_role),
        "VIRTCLOUD_WORKER": "agent-brno1",
        "PORTAL_ROLE": "agent",
        **keys,
    }
    agent = WorkerProcess(env, tmp_path / "agent.log", queues=["host.brno1"], concurrency=2, name="agent-brno1")
    agent.start()
    try:
        assert "not restricted to an agent's privileges" not in (tmp_path / "agent.log").read_text()
        # the agent reconciles its host as it starts: done before the segment exists (once the segment was there,
        # that repair could put the VLAN on brno1 before the provisioning did, leaving its change nothing to do)
        wait_for(lambda: Host.objects.get(name="brno1").last_reconciled_at, what="the agent's reconcile at start")
        Host.objects.filter(name="brno1").update(last_reconciled_at=None)
        hosts = [fabric.hosts["brno1"], fabric.hosts["pilsen1"], fabric.hosts["prague2"]]
        seg = services.segment_create(owner="cluster:agent-role", hosts=hosts, gateway=False)
        assert workflows.provision(seg.pk).delay().get(timeout=60)["state"] == "active"
        assert fabric.host_vlans("brno1") == {seg.vid}
        by_agent = DeviceChange.objects.get(segment=seg, device="brno1")
        assert (by_agent.status, by_agent.diff) == ("ok", f"+ br-v{seg.vid}")

        # the reconciler, run by the agent: drift found on its host, recorded and repaired
        state = fakes.load(fabric.args, "host", "brno1")
        fakes.save(fabric.args, "host", "brno1", {**state, "vlans": [*state["vlans"], 777]})
        out = StringIO()
        call_command("network", "reconcile", "--host", "brno1", "--repair", stdout=out)
        assert out.getvalue() == "host brno1: drift brno1 foreign VLAN 777 (repaired)\n", out.getvalue()
        assert fabric.host_vlans("brno1") == {seg.vid}
        assert Drift.objects.get(device="brno1").repaired_at is not None
        assert Host.objects.get(name="brno1").last_reconciled_at is not None

        # a failing host elsewhere: the rollback reaches brno1 through its agent too
        services.segment_delete(segment=seg)
        workflows.teardown(seg.pk).delay().get(timeout=60)
        assert fabric.host_vlans("brno1") == frozenset()
        Host.objects.filter(name="pilsen1").update(driver_args={**fabric.args, "fail_commit": "permanent"})
        bad = services.segment_create(owner="cluster:agent-role-2", hosts=hosts, gateway=False)
        with pytest.raises(Exception, match="pilsen1"):
            workflows.provision(bad.pk).delay().get(timeout=60)
        wait_for(lambda: Segment.objects.get(pk=bad.pk).state == Segment.State.FAILED, what="the rollback")
    finally:
        agent.stop()
    # with the django-db result backend (the default), the agent stores its tasks' results through its role
    env["CELERY_RESULT_BACKEND"] = "django-db"
    results = WorkerProcess(env, tmp_path / "agent-db.log", queues=["agent-db"], concurrency=1, name="agent-db")
    results.start()
    try:
        from django_celery_results.models import TaskResult

        from network import tasks

        sent = tasks.plan_device.apply_async(("host", Host.objects.get(name="brno1").pk), queue="agent-db")
        done = wait_for(lambda: TaskResult.objects.filter(task_id=sent.id, status="SUCCESS").first(), what="the result")
        assert json.loads(done.result)["error"] == ""
    finally:
        results.stop()
    assert fabric.host_vlans("brno1") == frozenset()
    rollback = DeviceChange.objects.get(segment=bad, device="brno1", cause="compensate cluster:agent-role-2")
    assert rollback.status in ("ok", "noop"), (rollback.status, rollback.error)
    assert VlanAllocation.objects.get(pk=bad.allocation_id).state == VlanAllocation.State.QUARANTINED

    switch_change = DeviceChange.objects.filter(switch__isnull=False).first()
    own_change = DeviceChange.objects.filter(device="brno1").first()
    pilsen1 = Host.objects.get(name="pilsen1")
    forged = (
        "INSERT INTO network_devicechange (kind, switch_id, host_id, segment_id, device, cause, status, diff, "
        "attempts, created_at, error, refused) VALUES (%s, %s, %s, %s, %s, 'forged', %s, '', 0, now(), '', false)"
    )
    with psycopg.connect(_url(agent_role), autocommit=True) as db:
        for table in ("auth_user", "clusters_virtualcluster", "access_credential", "portal_auditentry"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute(f"SELECT 1 FROM {table} LIMIT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # a switch's login is not an agent's business
            db.execute("SELECT password, driver_args FROM network_switch")
        assert db.execute("SELECT count(*) FROM network_switch WHERE enabled").fetchone()[0] == 3
        for sql in (
            "UPDATE network_segment SET state = 'active'",
            "UPDATE network_host SET enabled = false",  # a column it does not write
            "UPDATE network_devicechange SET segment_id = NULL",
            "UPDATE clusters_virtualcluster SET state = 'ready'",
            "DELETE FROM network_devicechange",
            "CREATE TABLE planted (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute(sql)
        # another device's rows are out of its reach: nothing matches, an insert is refused
        assert db.execute("UPDATE network_devicechange SET status = 'ok' WHERE switch_id IS NOT NULL").rowcount == 0
        assert db.execute("UPDATE network_host SET reconcile_error = 'x' WHERE id = %s", [pilsen1.pk]).rowcount == 0
        brno1 = Host.objects.get(name="brno1").pk
        own = ("host", None, brno1, None, "brno1", "pending")  # what a reconcile's repair is
        for values in (
            ("switch", switch_change.switch_id, None, None, "x", "ok"),  # a switch's change
            ("host", None, pilsen1.pk, None, "pilsen1", "pending"),  # another host's
            ("host", None, brno1, bad.pk, "brno1", "pending"),  # its own, against a segment (a rollback "keeping" it)
            ("host", None, brno1, None, "brno1", "ok"),  # its own, settled from the start
            ("host", None, brno1, None, "sw-brno", "pending"),  # its own, under a switch's name
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                db.execute(forged, values)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):  # an id of its choosing
            db.execute(forged.replace("(kind,", "(id, kind,").replace("VALUES (", "VALUES (1000000, "), own)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):  # a repair not its own
            db.execute("UPDATE network_drift SET repair_id = %s WHERE host_id = %s", [switch_change.pk, brno1])
        # … its own host's are not (undone: the statements run in a transaction rolled back)
        with pytest.raises(_Undo), db.transaction():
            assert db.execute("UPDATE network_host SET reconcile_error = 'x' WHERE name = 'brno1'").rowcount == 1
            assert db.execute(
                "UPDATE network_drift SET repair_id = %s WHERE host_id = %s", [own_change.pk, brno1]
            ).rowcount
            db.execute(forged, own)
            raise _Undo
        # the restriction holds whatever other role it is given (the policies are restrictive)
        with connection.cursor() as cursor:
            cursor.execute(f'GRANT "{roles["report"]}" TO "{agent_role}"')
        assert db.execute("UPDATE network_devicechange SET status = 'ok' WHERE switch_id IS NOT NULL").rowcount == 0
    assert switch_change.status == DeviceChange.objects.get(pk=switch_change.pk).status
    # any other role reads and writes as its grants allow: every row
    with psycopg.connect(_url(roles["report"]), autocommit=True) as db:
        assert db.execute("SELECT count(*) FROM network_devicechange").fetchone()[0] == DeviceChange.objects.count()


class _Undo(Exception):
    pass


def test_agent_grants_are_refused_for_unknown_hosts_and_roles_and_can_be_applied_again(roles):
    from network.tests.factories import HostFactory

    HostFactory(name="h1")
    quiet = {"stdout": StringIO()}
    with pytest.raises(CommandError, match="^no host named nowhere$"):
        call_command("network", "agent-grants", roles["agent"], "--host", "h1", "--host", "nowhere", **quiet)
    with pytest.raises(CommandError, match=r"^no PostgreSQL role 'vc_nobody': create it first"):
        call_command("network", "agent-grants", "vc_nobody", "--host", "h1", "--apply", **quiet)
    owner = connection.settings_dict["USER"] or "postgres"
    with pytest.raises(CommandError, match="is a superuser, bypasses row-level security or owns the portal's tables"):
        call_command("network", "agent-grants", owner, "--host", "h1", "--apply", **quiet)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_policies WHERE policyname LIKE 'virtcloud%%'")
        assert cursor.fetchone()[0] == 0  # the refusals changed nothing
    with pytest.raises(CommandError, match="is not a role name this command takes"):
        call_command("network", "agent-grants", 'a"; DROP TABLE x; --', "--host", "h1", **quiet)
    for _ in range(2):  # again: the same privileges and policies, none twice
        call_command("network", "agent-grants", roles["agent"], "--host", "h1", "--apply", **quiet)
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename, policyname FROM pg_policies WHERE %s = ANY(roles)", [roles["agent"]])
        assert sorted(cursor.fetchall()) == [
            ("network_devicechange", f"virtcloud_agent_insert_{roles['agent']}"),
            ("network_devicechange", f"virtcloud_agent_update_{roles['agent']}"),
            ("network_drift", f"virtcloud_agent_insert_{roles['agent']}"),
            ("network_drift", f"virtcloud_agent_update_{roles['agent']}"),
            ("network_host", f"virtcloud_agent_update_{roles['agent']}"),
        ]
        cursor.execute("SELECT DISTINCT permissive FROM pg_policies WHERE %s = ANY(roles)", [roles["agent"]])
        assert cursor.fetchall() == [("RESTRICTIVE",)]


def test_an_agent_says_when_its_role_is_not_restricted(roles):
    """What a host agent logs when it starts (``agentdb.unrestricted``), asked as each role (SET ROLE)."""
    from network import agentdb
    from network.tests.factories import HostFactory

    HostFactory(name="h1")

    def as_role(role: str | None) -> str | None:
        with connection.cursor() as cursor:
            cursor.execute(f'SET ROLE "{role}"' if role else "RESET ROLE")
        try:
            return agentdb.unrestricted()
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET ROLE")

    assert as_role(None) == "it is a superuser"  # the test database's own user
    assert as_role(roles["report"]).startswith("no row-level security policy limits its writes to its hosts' rows")
    agentdb.apply(roles["agent"], ["h1"])
    assert as_role(roles["agent"]) is None
    # one privilege beyond an agent's at a time (column grants too), granted then taken back
    for privilege, table, said in (
        ("SELECT (username, is_superuser)", "auth_user", "it may read auth_user"),
        ("SELECT (password)", "network_switch", "it may read the switches' logins"),
        ("UPDATE (is_superuser)", "auth_user", "it may write auth_user"),
    ):
        with connection.cursor() as cursor:
            cursor.execute(f'GRANT {privilege} ON {table} TO "{roles["agent"]}"')
        assert as_role(roles["agent"]) == said, privilege
        with connection.cursor() as cursor:
            cursor.execute(f'REVOKE {privilege} ON {table} FROM "{roles["agent"]}"')
        assert as_role(roles["agent"]) is None
    with connection.cursor() as cursor:
        cursor.execute(f'GRANT DELETE ON network_devicechange TO "{roles["agent"]}"')
        cursor.execute(f'GRANT UPDATE ON clusters_virtualcluster TO "{roles["agent"]}"')
    assert as_role(roles["agent"]) == "it may write clusters_virtualcluster, network_devicechange"
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER ROLE "{roles["agent"]}" CREATEROLE')
    assert as_role(roles["agent"]) == "it may create and grant roles"

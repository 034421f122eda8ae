"""The audit log: who changed what, when, from which request, with before/after values and secrets masked."""

import re

import pytest
from django.db import connection
from django.urls import reverse

from network.models import Segment, SegmentMember, Site, VlanAllocation
from network.tests.factories import CoreTransportFactory, HostFactory, SiteFactory, SwitchFactory, VlanPoolFactory
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.audit import audit_actor, current, record
from portal.models import AuditEntry
from portal.secrets import MASK

pytestmark = pytest.mark.django_db


def entries_for(obj):
    return AuditEntry.objects.filter(content_type__model=obj._meta.model_name, object_id=str(obj.pk)).order_by("id")


def test_create_update_delete_with_before_and_after(root):
    with audit_actor("root", user=root, request_id="req-1"):
        site = Site.objects.create(name="brno", description="Brno")
        site.description = "Brno data centre"
        site.save()
        site.save()  # nothing changed: no entry
        pk = site.pk
        site.delete()
    create, update, delete = AuditEntry.objects.filter(object_id=str(pk)).order_by("id")
    assert (create.action, create.changes) == (
        "create",
        {"id": [None, pk], "name": [None, "brno"], "description": [None, "Brno"]},
    )
    assert (update.action, update.changes) == ("update", {"description": ["Brno", "Brno data centre"]})
    assert (delete.action, delete.changes["name"]) == ("delete", ["brno", None])
    for entry in (create, update, delete):
        assert (entry.actor, entry.user, entry.request_id, entry.object_repr) == ("root", root, "req-1", "brno")


def test_foreign_keys_are_recorded_by_id():
    a, b = SiteFactory(name="a"), SiteFactory(name="b")
    switch = SwitchFactory(site=a)
    switch.site = b
    switch.save()
    assert entries_for(switch).last().changes == {"site": [a.pk, b.pk]}


def test_many_to_many_from_both_sides():
    brno, pilsen = SiteFactory(name="brno"), SiteFactory(name="pilsen")
    core = CoreTransportFactory(name="backbone")
    core.sites.add(brno, pilsen)
    pilsen.core_transports.remove(core)  # from the other side: recorded on the core
    brno.core_transports.clear()
    core.sites.add(pilsen)
    core.sites.clear()
    changes = [e.changes for e in entries_for(core).filter(action="update")]
    assert changes == [
        {"sites": [None, {"added": ["brno", "pilsen"]}]},
        {"sites": [None, {"removed": ["pilsen"]}]},
        {"sites": [None, {"removed": ["brno"]}]},
        {"sites": [None, {"added": ["pilsen"]}]},
        {"sites": [None, {"removed": ["pilsen"]}]},
    ]


def test_secret_is_masked_and_only_its_change_recorded():
    switch = SwitchFactory(name="sw", password="first-secret")
    assert entries_for(switch).get(action="create").changes["password"] == [None, MASK]
    switch.description = "core switch"
    switch.save()
    assert "password" not in entries_for(switch).last().changes
    switch.password = "second-secret"
    switch.save()
    assert entries_for(switch).last().changes == {"password": [MASK, MASK]}
    switch.password = ""
    switch.save()
    assert entries_for(switch).last().changes == {"password": [MASK, ""]}
    switch.delete()
    with connection.cursor() as cursor:
        cursor.execute("SELECT changes, message, object_repr FROM portal_auditentry")
        stored = repr(cursor.fetchall())
    assert "first-secret" not in stored and "second-secret" not in stored and "gAAAA" not in stored


def test_request_id_and_user_from_an_admin_change(client, root, settings):
    settings.BEHIND_TLS_PROXY = True  # the proxy names the request
    site = SiteFactory(name="brno")
    client.force_login(root)
    response = client.post(
        reverse("admin:network_site_change", args=[site.pk]),
        {"name": "brno", "description": "changed in admin"},
        HTTP_X_REQUEST_ID="proxy-req-42",
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert response["X-Request-ID"] == "proxy-req-42"
    entry = entries_for(site).last()
    assert (entry.action, entry.actor, entry.user, entry.request_id) == ("update", "root", root, "proxy-req-42")
    assert entry.changes == {"description": ["", "changed in admin"]}


@pytest.mark.parametrize("incoming", ["bad id\nwith newline", "trailing-newline\n", "x" * 65, "", "ünïcode"])
def test_malformed_request_id_is_replaced(client, root, settings, incoming):
    settings.BEHIND_TLS_PROXY = True
    client.force_login(root)
    response = client.get(reverse("admin:index"), HTTP_X_REQUEST_ID=incoming)
    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


@pytest.mark.parametrize(("behind_proxy", "peer"), [(False, "127.0.0.1"), (True, "198.18.0.9")])
def test_a_client_names_no_request_but_through_the_tls_proxy(client, root, settings, behind_proxy, peer):
    """Without the proxy the header comes from whoever sent the request: it could file its changes in the audit
    log under another request's id. So does a request from elsewhere behind it (not TRUSTED_PROXIES: a client
    that reached the portal's port directly), as its X-Forwarded-For does. The portal makes its own."""
    settings.BEHIND_TLS_PROXY = behind_proxy
    site = SiteFactory(name="brno")
    client.force_login(root)
    response = client.post(
        reverse("admin:network_site_change", args=[site.pk]),
        {"name": "brno", "description": "changed in admin"},
        HTTP_X_REQUEST_ID="proxy-req-42",
        REMOTE_ADDR=peer,
    )
    assert response.status_code == 302
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])
    assert entries_for(site).last().request_id == response["X-Request-ID"]


def test_actor_outside_any_request_or_block_is_system():
    site = SiteFactory(name="brno")
    entry = entries_for(site).get()
    assert entry.actor == "system" and entry.user is None
    with audit_actor("reconciler"):
        inner = current().request_id
        record(site, "action", message="drift repaired")
    assert current().actor == "system"
    action = entries_for(site).last()
    assert (action.action, action.actor, action.request_id, action.message) == (
        "action",
        "reconciler",
        inner,
        "drift repaired",
    )


def test_audit_log_is_read_only_and_filterable_in_admin(client, root):
    SiteFactory(name="brno")
    SwitchFactory(name="sw")
    client.force_login(root)
    url = reverse("admin:portal_auditentry_changelist")
    assert client.get(url).status_code == 200
    site_type = AuditEntry.objects.get(object_repr="brno").content_type_id
    response = client.get(url, {"content_type__id__exact": site_type})
    assert response.status_code == 200
    site_entries = AuditEntry.objects.filter(content_type_id=site_type).count()
    assert response.context["cl"].result_count == site_entries < AuditEntry.objects.count()
    response = client.get(url, {"q": "brno"})
    assert [e.object_repr for e in response.context["cl"].result_list] == ["brno"]
    # the actors are searched, not listed in the sidebar: one per token and per address that guessed passwords
    assert not any(spec.title == "actor" for spec in response.context["cl"].filter_specs)
    assert client.get(url, {"q": "system"}).status_code == 200
    entry = AuditEntry.objects.first()
    assert client.get(reverse("admin:portal_auditentry_change", args=[entry.pk])).status_code == 200
    assert client.get(reverse("admin:portal_auditentry_add")).status_code == 403
    assert client.post(reverse("admin:portal_auditentry_delete", args=[entry.pk]), {"post": "yes"}).status_code == 403
    assert AuditEntry.objects.filter(pk=entry.pk).exists()


def test_a_host_joining_a_segment_is_audited_as_its_leaving_is(fabric):
    """Members are added in bulk (no save signal): each still gets its "create" entry, so the log shows a host
    joining a cluster's VLAN as well as leaving it (a migration's trail)."""
    from network import services

    brno, pilsen = fabric.hosts["brno1"], fabric.hosts["pilsen1"]
    segment = services.segment_create(owner="cluster:7", hosts=[brno], gateway=False)
    services.segment_set_hosts(segment=segment, hosts=[pilsen])
    entries = AuditEntry.objects.filter(content_type__model="segmentmember").order_by("id")
    assert [(e.action, e.object_repr) for e in entries] == [
        ("create", "cluster:7 on brno1"),
        ("delete", "cluster:7 on brno1"),
        ("create", "cluster:7 on pilsen1"),
    ]
    assert entries[2].changes["host"] == [None, pilsen.pk]


def test_rows_made_in_bulk_are_audited_on_a_database_that_returns_no_ids(fabric, monkeypatch):
    """SQLite before 3.35 gives no ids back from a bulk insert: the rows are saved one by one instead, each
    audited by its save (a cluster's create must not fail there)."""
    from network import services

    monkeypatch.setattr(connection.features, "can_return_rows_from_bulk_insert", False)
    segment = services.segment_create(owner="cluster:8", hosts=[fabric.hosts["brno1"]], gateway=False)
    entry = AuditEntry.objects.get(content_type__model="segmentmember", action="create")
    assert entry.object_repr == "cluster:8 on brno1" and SegmentMember.objects.get(segment=segment).pk


def test_every_inventory_model_is_audited():
    host = HostFactory()  # with its site, switch and port
    pool = VlanPoolFactory()  # with its core
    allocation = VlanAllocation.objects.create(pool=pool, vid=100, state="allocated", owner="cluster:1")
    segment = Segment.objects.create(owner_ref="cluster:1", allocation=allocation, vid=100)
    member = SegmentMember.objects.create(segment=segment, host=host)
    switch_port = host.switch_port
    for obj in (host.site, switch_port.switch, switch_port, host, pool.core, pool, allocation, segment, member):
        assert entries_for(obj).filter(action="create").exists(), type(obj).__name__


def test_audit_entries_written_in_sql_cut_the_repr_as_record_does(db):
    """``insert_for_rows`` (a service's one-statement change + audit, PostgreSQL) writes what ``record`` would:
    the current actor, and ``object_repr`` cut to the column's length."""
    from portal import audit

    if connection.vendor != "postgresql":
        pytest.skip("data-modifying WITH needs PostgreSQL")
    with audit.audit_actor("sql-writer"):
        sql, params = audit.insert_for_rows(
            "rows", Site, action="action", changes={"k": [1, 2]}, message="m", repr_sql="%s", repr_params=["x" * 300]
        )
        with connection.cursor() as cursor:
            cursor.execute(f"WITH rows AS (SELECT 7 AS id), logged AS ({sql}) SELECT 1", params)  # noqa: S608
    entry = AuditEntry.objects.get(message="m")
    assert (entry.actor, entry.object_id, entry.changes) == ("sql-writer", "7", {"k": [1, 2]})
    assert entry.object_repr == "x" * 200


def test_delete_rows_audits_as_delete_does_in_a_fixed_number_of_queries(django_assert_num_queries):
    """``delete_rows`` (a segment's members leaving at teardown) writes the entries ``delete()`` would, but
    in three statements however many rows go: ``delete()`` reads, signals and audits row by row, and a
    member's text reads its segment and host — three queries per member before."""
    from portal import audit

    segment = Segment.objects.create(owner_ref="cluster:9", state=Segment.State.PENDING)
    hosts = [HostFactory() for _ in range(5)]
    for host in hosts:
        SegmentMember.objects.create(segment=segment, host=host)
    kept = SegmentMember.objects.get(host=hosts[0])
    one = SegmentMember.objects.get(host=hosts[1])
    with audit_actor("by-hand"):
        one.delete()  # the row-by-row way, to compare with
    going = SegmentMember.objects.filter(segment=segment).exclude(pk=kept.pk)
    with audit_actor("teardown"), django_assert_num_queries(3):
        assert audit.delete_rows(going, related=SegmentMember.TEXT_RELATED) == 3
    assert list(SegmentMember.objects.filter(segment=segment)) == [kept]
    reference = AuditEntry.objects.get(action="delete", actor="by-hand")
    for host in hosts[2:]:
        entry = AuditEntry.objects.get(action="delete", object_repr=f"cluster:9 on {host.name}")
        assert (entry.actor, entry.content_type_id) == ("teardown", reference.content_type_id)
        assert entry.changes == {
            "id": [int(entry.object_id), None],
            "segment": [segment.pk, None],
            "host": [host.pk, None],
        }
        assert reference.changes.keys() == entry.changes.keys()
    assert audit.delete_rows(SegmentMember.objects.none()) == 0
    with pytest.raises(TypeError, match="referenced by other models"):
        audit.delete_rows(Site.objects.all())

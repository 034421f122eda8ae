"""Drift detection and repair, ``manage.py network plan|reconcile`` and the admin's plan / reconcile now,
on the fake drivers. (The same against the lab is in ``test_lab_lifecycle``.)"""

from __future__ import annotations

import contextlib
import threading
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from network import convergence, services, tasks, workflows
from network.models import DeviceChange, Drift, Switch
from network.schedules import beat_schedule
from network.tests.fakefabric import fabric_fixture  # noqa: F401


@contextlib.contextmanager
def lock_held_elsewhere(switch: Switch):
    """The device lock of ``switch`` held by another worker's connection (a thread) while the block runs."""
    from django.db import connections

    from network import convergence

    held, release = threading.Event(), threading.Event()

    def converging() -> None:
        try:
            with convergence.device_lock("switch", switch.pk, wait=0) as got:
                assert got
                held.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=converging)
    thread.start()
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()
        thread.join(10)


@pytest.fixture
def active(fabric):
    seg = services.segment_create(owner="c1", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    return seg


def test_drift_by_hand_is_found_and_repaired_by_one_reconcile_run(fabric, active, settings):
    settings.RECONCILE_REPAIR = True
    v = active.vid
    old = services.segment_create(owner="gone", hosts=[fabric.hosts["brno1"]], gateway=False)
    services.segment_delete(segment=old)  # a VLAN the portal once used
    fabric.poke_switch("sw-brno", "uplink", [])  # VLAN removed by hand
    fabric.poke_switch("sw-brno", "h1", [v, old.vid])  # a stale VLAN left behind
    fabric.poke_switch("sw-pilsen", "h2", [999])  # a VLAN the portal never handed out

    result = tasks.reconcile.apply().get()
    assert result == {"switches": 3, "hosts": 6}

    found = {(d.device, d.port, d.kind, d.vlans) for d in Drift.objects.all()}
    assert found == {
        ("sw-brno", "uplink", "missing", str(v)),
        ("sw-brno", "h1", "stale", str(old.vid)),
        ("sw-pilsen", "h2", "foreign", "999"),
    }
    assert all(d.repaired_at and d.repair_id for d in Drift.objects.all())
    assert fabric.switch_ports("sw-brno")["uplink"] == {v}
    assert fabric.switch_ports("sw-brno")["h1"] == {v}
    assert fabric.switch_ports("sw-pilsen")["h2"] == frozenset()
    repair = DeviceChange.objects.get(device="sw-pilsen", cause__startswith="reconcile")
    assert repair.status == "ok" and repair.segment is None and "- h2 vlan 999" in repair.diff

    tasks.reconcile.apply().get()  # in sync now: nothing new
    assert Drift.objects.count() == 3


def test_a_host_vlan_cut_off_its_bridge_is_missing_drift_and_repaired(fabric, active, settings):
    """The bridge is still there but the VLAN no longer reaches it (a NIC reset took the VLAN interface): the
    host's VMs are cut off. It counted as carried — no drift — until some unrelated change converged the host."""
    settings.RECONCILE_REPAIR = True
    v = active.vid
    host = next(h for h in fabric.hosts.values() if v in fabric.host_vlans(h.name))
    fabric.break_host_vlan(host.name, v)
    tasks.reconcile.apply().get()
    drift = Drift.objects.get(device=host.name)
    assert (drift.kind, drift.vlans) == ("missing", str(v)) and drift.repaired_at
    repair = DeviceChange.objects.get(device=host.name, cause__startswith="reconcile")
    assert repair.status == "ok" and f"~ repair br-v{v}" in repair.diff
    tasks.reconcile.apply().get()  # whole again: nothing new
    assert Drift.objects.count() == 1


def test_host_carried_counts_a_broken_vlan_missing_only_where_it_is_wanted():
    from network.convergence import host_carried

    class Session:
        def vlans(self):
            return frozenset({100, 200, 300})

        def broken(self):
            return frozenset({100, 200})

    assert host_carried(Session(), frozenset({100, 300})) == {200, 300}  # 200 not wanted: stale, removed by a repair
    assert host_carried(Session(), frozenset()) == {100, 200, 300}


def test_drift_of_a_trunk_with_thousands_of_vlans_is_recorded(fabric, active, settings):
    """A busy trunk's VLAN sets, scattered ids, run to thousands of characters (the columns held 500: the
    reconcile failed at every run on PostgreSQL, its drift never recorded nor repaired)."""
    settings.RECONCILE_REPAIR = False
    foreign = list(range(1001, 4001, 2))  # (no range to merge: 1,500 ids)
    fabric.poke_switch("sw-pilsen", "h2", foreign)
    tasks.reconcile.apply().get()
    drift = Drift.objects.get(device="sw-pilsen", port="h2", kind="foreign")
    assert len(drift.vlans) > 7000 and drift.vlans.startswith("1001,1003,") and drift.repaired_at is None


def test_static_vlans_are_carried_kept_after_teardown_and_never_drift(fabric, settings):
    """A host trunk's static VLAN (the hypervisor's own network) is on the port with the clusters' VLANs,
    stays when they leave, is no drift, and comes back when removed by hand; a switch where only static
    VLANs are is not part of a cluster's devices."""
    settings.RECONCILE_REPAIR = True
    port = Switch.objects.get(name="sw-brno").ports.get(name="h1")
    port.static_vlans = "10,20-21"
    port.full_clean()
    port.save()
    seg = services.segment_create(owner="c1", hosts=[fabric.hosts["brno1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    assert fabric.switch_ports("sw-brno")["h1"] == {10, 20, 21, seg.vid}
    assert fabric.switch_ports("sw-brno")["h2"] == frozenset()

    tasks.reconcile.apply().get()
    assert not Drift.objects.exists()
    fabric.poke_switch("sw-brno", "h1", [seg.vid, 10])  # 20-21 removed by hand
    tasks.reconcile.apply().get()
    drift = Drift.objects.get()
    assert (drift.port, drift.kind, drift.vlans, drift.repaired_at is not None) == ("h1", "missing", "20-21", True)
    assert fabric.switch_ports("sw-brno")["h1"] == {10, 20, 21, seg.vid}

    other = services.segment_create(owner="c2", hosts=[fabric.hosts["pilsen1"]], gateway=False)
    workflows.provision(other.pk).apply().get()
    assert not DeviceChange.objects.filter(segment=other, switch__name="sw-brno").exists()

    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    assert fabric.switch_ports("sw-brno")["h1"] == {10, 20, 21}


def test_without_repair_drift_is_only_recorded_and_closes_when_fixed(fabric, active):
    fabric.poke_switch("sw-brno", "uplink", [])
    tasks.reconcile_device.apply(("switch", fabric.switches["brno"].pk, False)).get()
    drift = Drift.objects.get()
    assert drift.kind == "missing" and drift.repaired_at is None
    assert fabric.switch_ports("sw-brno")["uplink"] == frozenset()
    tasks.reconcile_device.apply(("switch", fabric.switches["brno"].pk, False)).get()
    assert Drift.objects.count() == 1  # the same drift, seen again
    workflows.provision(active.pk).apply().get()  # a convergence fixes it ...
    tasks.reconcile_device.apply(("switch", fabric.switches["brno"].pk, False)).get()
    drift.refresh_from_db()
    assert drift.repaired_at is not None  # ... and the next pass closes it


def test_host_drift(fabric, active):
    from network.tests import fakes

    args = {"state_dir": fabric.state_dir}
    state = fakes.load(args, "host", "pilsen1")
    state["vlans"] = []
    fakes.save(args, "host", "pilsen1", state)
    tasks.reconcile_device.apply(("host", fabric.hosts["pilsen1"].pk, True)).get()
    drift = Drift.objects.get()
    assert (drift.device, drift.port, drift.kind) == ("pilsen1", "", "missing")
    assert fabric.host_vlans("pilsen1") == {active.vid}


def test_plan_command_prints_the_diff_and_changes_nothing(fabric, active):
    seg = services.segment_create(owner="c2", hosts=[fabric.hosts["prague1"]], gateway=False)
    out = StringIO()
    call_command("network", "plan", "--switch", "sw-prague", "--host", "prague1", "--switch", "sw-brno", stdout=out)
    text = out.getvalue()
    assert f"switch sw-prague:\n  + h1 vlan {seg.vid}" in text
    assert "switch sw-brno: in sync" in text
    assert f"host prague1:\n  + vlan {seg.vid}" in text
    assert fabric.switch_ports("sw-prague") == {}  # nothing committed
    assert not DeviceChange.objects.filter(segment=seg).exists()
    with pytest.raises(CommandError, match="no enabled device named nope"):
        call_command("network", "plan", "--switch", "nope")


def test_a_plan_waits_for_the_devices_lock_and_says_busy_when_it_stays_held(fabric, active, monkeypatch):
    """A dry run is a session on the device like any other: beside a commit it would overwrite the candidate
    (IOS loads every merge into one file on flash, its discard empties it). It takes the device's lock; held
    by a convergence past ``PLAN_LOCK_WAIT``, the plan says the device is busy (nothing opened), then works."""
    from network import convergence

    monkeypatch.setattr(convergence, "PLAN_LOCK_WAIT", 0.2)
    seg = services.segment_create(owner="c2", hosts=[fabric.hosts["prague1"]], gateway=False)
    switch = Switch.objects.get(name="sw-prague")
    with lock_held_elsewhere(switch):
        opened = len(fabric.switch_state("sw-prague")["sessions"])
        answer = tasks.plan_device("switch", switch.pk)
        assert answer["diff"] == "" and "busy" in answer["error"], answer
        assert len(fabric.switch_state("sw-prague")["sessions"]) == opened  # the switch was not touched
    assert tasks.plan_device("switch", switch.pk) == {"diff": f"+ h1 vlan {seg.vid}", "error": ""}


def test_reconcile_command(fabric, active):
    fabric.poke_switch("sw-pilsen", "h2", [998])
    out = StringIO()
    call_command("network", "reconcile", "--no-repair", "--switch", "sw-pilsen", stdout=out)
    assert "switch sw-pilsen: drift sw-pilsen:h2 foreign VLAN 998 (not repaired)" in out.getvalue()
    out = StringIO()
    call_command("network", "reconcile", "--repair", stdout=out)
    assert "drift sw-pilsen:h2 foreign VLAN 998 (repaired)" in out.getvalue()
    assert "host brno1: in sync" in out.getvalue()


def test_beat_schedule_runs_the_reconciler_every_interval():
    entry = beat_schedule(300)["network-reconcile"]
    assert entry["task"] == tasks.reconcile.name and entry["schedule"] == 300.0
    entry = beat_schedule(300)["network-retry-rollbacks"]
    assert entry["task"] == tasks.retry_rollbacks.name and entry["schedule"] == 300.0
    from django.conf import settings

    assert settings.CELERY_BEAT_SCHEDULE["network-retry-rollbacks"]["task"] == "network.retry_rollbacks"


def test_admin_plan_and_reconcile_now(fabric, active, client, root, django_capture_on_commit_callbacks):
    client.force_login(root)
    fabric.poke_switch("sw-brno", "uplink", [])
    url = reverse("admin:network_switch_changelist")
    ids = [str(s.pk) for s in Switch.objects.all()]
    page = client.post(url, {"action": "plan_dry_run", "_selected_action": ids})
    assert page.status_code == 200
    assert f"+ uplink vlan {active.vid}" in page.content.decode()
    assert fabric.switch_ports("sw-brno")["uplink"] == frozenset()  # only planned
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"action": "reconcile_now", "_selected_action": ids})
    assert response.status_code == 302
    assert fabric.switch_ports("sw-brno")["uplink"] == {active.vid}
    # the repair says whose request it was (it read as the periodic reconciler's, as if no one had asked)
    repair = DeviceChange.objects.get(device="sw-brno", cause__startswith="reconcile")
    assert repair.cause.startswith("reconcile (root (admin: reconcile now)): ") and repair.status == "ok"
    for name in ("segment", "devicechange", "drift", "vlanallocation"):
        assert client.get(reverse(f"admin:network_{name}_changelist")).status_code == 200
    assert client.get(reverse("admin:network_segment_change", args=[active.pk])).status_code == 200


# --- against the netns lab -------------------------------------------------------------------------------------


@pytest.mark.lab
def test_lab_drift_by_hand_is_detected_and_repaired_by_one_reconcile_run(clean_lab, db, settings):
    from network.drivers import switch_session
    from network.tests.labinventory import inventory_for

    settings.RECONCILE_REPAIR = True
    lab = clean_lab
    inv = inventory_for(lab)
    hosts = inv["hosts"]
    seg = services.segment_create(owner="c", hosts=[hosts["h-s1-1"], hosts["h-s2-1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    ovs = lab.switch_driver_args("sw-s2")["port_map"]
    # By hand on switch sw-s2, as an operator with ovs-vsctl: the cluster VLAN removed from the uplink and
    # a foreign VLAN added to the host trunk.
    lab.ovsdb().run(["set", "Port", ovs["up"], "trunks=4095"], ["set", "Port", ovs["p-h1"], f"trunks={seg.vid},777"])
    with switch_session(lab.switch_spec("sw-s2")) as session:
        assert session.port_vlans()["up"] == frozenset()

    tasks.reconcile.apply().get()

    found = {(d.device, d.port, d.kind, d.vlans) for d in Drift.objects.all()}
    assert found == {("sw-s2", "up", "missing", str(seg.vid)), ("sw-s2", "p-h1", "foreign", "777")}
    assert all(d.repaired_at for d in Drift.objects.all())
    with switch_session(lab.switch_spec("sw-s2")) as session:
        vlans = session.port_vlans()
    assert vlans["up"] == {seg.vid} and vlans["p-h1"] == {seg.vid}
    out = StringIO()
    call_command("network", "plan", stdout=out)
    assert "ERROR" not in out.getvalue() and out.getvalue().count("in sync") == 3 + 6


@pytest.mark.lab
def test_lab_a_hosts_own_vlan_network_made_after_the_first_converge_is_put_on_its_uplink(clean_lab, db, settings):
    """An OVS host (XCP-ng) whose uplink the portal gave an explicit list gets a VLAN network of its own
    afterwards (an internal port of tag 20): the uplink did not carry it, cut off until some cluster's change
    converged that host, and the reconciler saw nothing. It is missing drift on the host's own network, repaired."""
    from network.drivers.ovsdb import Ovsdb, as_set
    from network.tests.labinventory import inventory_for

    settings.RECONCILE_REPAIR = True
    lab = clean_lab
    inv = inventory_for(lab)
    seg = services.segment_create(owner="c", hosts=[inv["hosts"]["h-s1-1"], inv["hosts"]["h-s2-1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    args = lab.host_driver_args("h-s2-1")
    db_ = Ovsdb(device="h-s2-1", db=args["db"])
    bridge = lab.state["hosts"]["h-s2-1"]["bridge"]
    db_.run(["add-port", bridge, "xapi20", "tag=20"], ["set", "Interface", "xapi20", "type=internal"])
    try:
        tasks.reconcile.apply().get()
        drift = Drift.objects.get(device="h-s2-1")
        assert (drift.port, drift.kind, drift.vlans) == (convergence.HOSTS_OWN, "missing", "20") and drift.repaired_at
        trunks = set(as_set(db_.list_rows("Port", ["trunks"], args["uplink"])[0]["trunks"]))
        assert trunks == {20, seg.vid}
        tasks.reconcile.apply().get()  # whole: nothing new
        assert Drift.objects.filter(repaired_at=None).count() == 0
    finally:
        db_.run(["--if-exists", "del-port", bridge, "xapi20"])


@pytest.mark.lab
def test_lab_static_vlans_stay_on_a_real_trunk_through_a_clusters_life(clean_lab, db):
    """Open vSwitch: a host trunk with a static VLAN carries it beside the cluster's, and only it after the
    teardown (the VLAN the operator keeps for the hypervisor is never taken away)."""
    from network.drivers import switch_session
    from network.tests.labinventory import inventory_for

    lab = clean_lab
    inv = inventory_for(lab)
    port = Switch.objects.get(name="sw-s1").ports.get(name="p-h1")
    port.static_vlans = "10"
    port.full_clean()
    port.save()
    seg = services.segment_create(owner="c", hosts=[inv["hosts"]["h-s1-1"], inv["hosts"]["h-s2-1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    with switch_session(lab.switch_spec("sw-s1")) as session:
        assert session.port_vlans()["p-h1"] == {10, seg.vid}
    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    with switch_session(lab.switch_spec("sw-s1")) as session:
        vlans = session.port_vlans()
    assert vlans["p-h1"] == {10} and vlans["up"] == frozenset()


def test_plan_and_workers_say_so_when_the_broker_is_down(fabric, monkeypatch, capsys):
    """A device whose worker cannot be asked (the broker is down) is an error row of the plan, the others are
    planned; ``network workers`` fails with the reason, not a traceback."""
    from celery.app.control import Inspect
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from kombu.exceptions import OperationalError

    from network import tasks
    from network.models import Host

    def broker_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    Host.objects.filter(name="brno1").update(agent_queue="host.brno1")
    monkeypatch.setattr(tasks.plan_device, "apply_async", broker_down)
    monkeypatch.setattr(Inspect, "active_queues", broker_down)
    hosts = list(Host.objects.select_related("site").filter(name__in=["brno1", "brno2"]).order_by("name"))
    assert tasks.plan_devices("host", hosts) == [
        {
            "device": "brno1",
            "diff": "",
            "error": "could not ask queue host.brno1: OperationalError: Error 111 connecting to 127.0.0.1:6379. "
            "Connection refused.",
        },
        {"device": "brno2", "diff": "", "error": ""},
    ]
    with pytest.raises(CommandError, match="cannot ask the workers, the broker did not answer: Error 111"):
        call_command("network", "workers")


def test_a_device_the_reconciler_cannot_reach_says_so_and_is_counted(fabric, active, alice, caplog):
    """An unreachable switch (a rotated password, an ACL, its site worker down) looked exactly like a healthy
    one until a cluster's provisioning failed on it: the error was only in the task's result. Now the device
    records when it was last reconciled and why its last attempt failed, the log says it, and /metrics counts
    the failing and the overdue devices."""
    from datetime import timedelta

    from django.utils import timezone
    from rest_framework.test import APIClient

    from network.models import Host
    from portal.models import TokenScope
    from portal.tokens import token_create

    def figures() -> dict:
        client = APIClient()
        client.credentials(
            HTTP_AUTHORIZATION=f"Bearer {token_create(user=alice, name='m', scopes=[TokenScope.METRICS])[1]}"
        )
        found = {}
        for line in client.get("/metrics").content.decode().splitlines():
            if line.startswith("virtcloud_devices_reconcile_"):
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found

    assert figures()['virtcloud_devices_reconcile_overdue{kind="switch"}'] == 3  # never reconciled yet
    tasks.reconcile.apply().get()
    assert all(s.last_reconciled_at and not s.reconcile_error for s in Switch.objects.all())
    assert all(h.last_reconciled_at for h in Host.objects.all())
    assert figures() == {
        'virtcloud_devices_reconcile_failing{kind="switch"}': 0,
        'virtcloud_devices_reconcile_failing{kind="host"}': 0,
        'virtcloud_devices_reconcile_overdue{kind="switch"}': 0,
        'virtcloud_devices_reconcile_overdue{kind="host"}': 0,
    }

    fabric.set_switch_args("sw-brno", reachable_from="the-brno-worker")  # this worker cannot reach it
    before = Switch.objects.get(name="sw-brno").last_reconciled_at
    tasks.reconcile.apply().get()
    brno = Switch.objects.get(name="sw-brno")
    assert brno.last_reconciled_at == before and "sw-brno" in brno.reconcile_error
    assert f"reconcile switch sw-brno: {brno.reconcile_error}" in caplog.text
    Switch.objects.filter(name="sw-pilsen").update(last_reconciled_at=timezone.now() - timedelta(days=1))
    found = figures()
    assert found['virtcloud_devices_reconcile_failing{kind="switch"}'] == 1
    assert found['virtcloud_devices_reconcile_overdue{kind="switch"}'] == 1  # pilsen: not compared for a day

    fabric.set_switch_args("sw-brno")  # reachable again: the next run clears the error
    tasks.reconcile.apply().get()
    brno.refresh_from_db()
    assert brno.reconcile_error == "" and brno.last_reconciled_at > before


def test_an_in_sync_device_costs_no_look_at_the_segment_history(fabric, active):
    """Segments are kept for good; the reconciler asked "which VLAN ids did the portal ever give" of all of them
    for every device every interval. Now only about VLANs a device carries beyond its desired state."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from network import convergence

    switch = Switch.objects.get(name="sw-brno")
    with CaptureQueriesContext(connection) as ctx:
        assert convergence.reconcile_device("switch", switch, repair=False).drifts == []
    assert not [q["sql"] for q in ctx.captured_queries if '"network_segment"."vid"' in q["sql"]]
    fabric.poke_switch("sw-brno", "h1", [active.vid, 999])
    with CaptureQueriesContext(connection) as ctx:
        drifts = convergence.reconcile_device("switch", switch, repair=False).drifts
    assert [(d.kind, d.vlans) for d in drifts] == [("foreign", "999")]
    asked = [q["sql"] for q in ctx.captured_queries if '"network_segment"."vid"' in q["sql"]]
    assert len(asked) == 1 and "IN (999)" in asked[0]


def test_a_device_busy_converging_counts_as_reconciled(fabric, active):
    """The reconciler skips a device whose lock a convergence holds (that convergence verifies it against the
    desired state): skipped interval after interval — a busy core switch — it was counted overdue, a false alert."""
    from datetime import timedelta

    from django.utils import timezone

    from network import convergence

    switch = Switch.objects.get(name="sw-brno")
    Switch.objects.filter(pk=switch.pk).update(last_reconciled_at=timezone.now() - timedelta(days=1))
    with lock_held_elsewhere(switch):  # another worker's convergence
        assert convergence.reconcile_device("switch", switch, repair=True).busy
    switch.refresh_from_db()
    assert timezone.now() - switch.last_reconciled_at < timedelta(minutes=1) and switch.reconcile_error == ""


def test_a_device_a_workflow_has_work_queued_for_is_busy_not_drifted(fabric, active):
    """A provisioning recorded its changes and its task waits in the queue (or in its backoff): the switches do not
    carry the new VLAN yet, which is the workflow's work to come, not drift "removed by hand" for the reconciler to
    record and repair as its own. Once the work is done, the device is reconciled as ever."""
    from datetime import timedelta

    from django.utils import timezone

    from network import convergence

    seg = services.segment_create(owner="c2", hosts=[fabric.hosts["brno2"]], gateway=False)
    queued = workflows.provision(seg.pk)  # recorded, not run yet
    switch = Switch.objects.get(name="sw-brno")
    report = convergence.reconcile_device("switch", switch, repair=True)
    assert report.busy and not report.drifts and not report.repaired
    assert not Drift.objects.exists()
    assert not DeviceChange.objects.filter(cause__startswith="reconcile").exists()
    queued.apply().get()
    report = convergence.reconcile_device("switch", switch, repair=True)
    assert not report.busy and not report.drifts
    # work recorded more than an interval ago is a workflow's that ended without it: the reconciler does it
    gone = services.segment_create(owner="c3", hosts=[fabric.hosts["brno1"]], gateway=False)
    workflows.provision(gone.pk)  # (never run)
    DeviceChange.objects.filter(segment=gone).update(created_at=timezone.now() - timedelta(hours=1))
    report = convergence.reconcile_device("switch", switch, repair=True)
    assert not report.busy and report.repaired
    assert not DeviceChange.objects.filter(segment=gone, switch=switch, status__in=DeviceChange.OPEN).exists()


def test_a_time_limit_during_a_repair_settles_its_change_as_interrupted(fabric, active, monkeypatch):
    """The task's soft time limit fires while the reconciler repairs a switch: the repair's change is not
    left running (nor failed as the driver's error) — it settles as interrupted, and the limit ends the task."""
    import contextlib

    from celery.exceptions import SoftTimeLimitExceeded

    from network import convergence

    fabric.poke_switch("sw-brno", "uplink", [])
    real = convergence.switch_session

    @contextlib.contextmanager
    def time_up_on_commit(spec):
        with real(spec) as session:

            def converge(desired):
                raise SoftTimeLimitExceeded()

            session.converge = converge
            yield session

    monkeypatch.setattr(convergence, "switch_session", time_up_on_commit)
    with pytest.raises(SoftTimeLimitExceeded):
        convergence.reconcile_device("switch", fabric.switches["brno"], repair=True)
    change = DeviceChange.objects.get(cause__startswith="reconcile")
    assert change.status == "failed" and change.error.startswith("interrupted: SoftTimeLimitExceeded")


@pytest.mark.parametrize("down", [True, False])
def test_a_port_that_is_down_is_no_missing_vlan(fabric, active, settings, monkeypatch, down):
    """EOS, IOS and NX-OS list a VLAN's ports that are up: a hypervisor's port that is down (the host powered
    off) shows none of its VLANs. The reconciler asks the session which ports are down: no "missing" drift every
    pass, and no "repair" that changes nothing; a port that is up and lacks its VLAN is drift."""
    from network import convergence

    settings.RECONCILE_REPAIR = False
    real = convergence.switch_session

    @contextlib.contextmanager
    def with_a_port_down(spec):
        with real(spec) as session:
            shown = session.port_vlans()

            class Blind:
                def port_vlans(self):
                    return {**shown, "h1": frozenset()} if spec.name == "sw-brno" else shown

                def down_ports(self, ports):
                    return {p for p in ports if p == "h1"} if down and spec.name == "sw-brno" else set()

            yield Blind()

    monkeypatch.setattr(convergence, "switch_session", with_a_port_down)
    report = convergence.reconcile_device("switch", Switch.objects.get(name="sw-brno"), repair=False)
    assert report.error == ""
    found = [(d.port, d.kind) for d in report.drifts]
    assert found == ([] if down else [("h1", "missing")])


def disabled_while_it_reads(monkeypatch) -> None:
    """The device a reconcile pass reads is disabled by an operator just after it found its drift."""
    from network import convergence

    record = convergence._record_drift

    def disabled_meanwhile(kind, device, found):
        Switch.objects.filter(pk=device.pk).update(enabled=False)
        return record(kind, device, found)

    monkeypatch.setattr(convergence, "_record_drift", disabled_meanwhile)


def test_a_device_disabled_during_the_reconcilers_pass_is_not_repaired(fabric, active, monkeypatch):
    """The pass read the device and found drift; meanwhile an operator disabled it for maintenance: the repair
    committed to it all the same (the pass asked whether it was enabled once, when it began). A disabled device is
    never touched: the drift is recorded and stays open."""
    from network import convergence

    v = active.vid
    fabric.poke_switch("sw-brno", "uplink", [])  # VLAN removed by hand
    disabled_while_it_reads(monkeypatch)
    report = convergence.reconcile_device("switch", Switch.objects.get(name="sw-brno"), repair=True)
    assert [(d.port, d.kind) for d in report.drifts] == [("uplink", "missing")] and not report.repaired
    assert fabric.switch_ports("sw-brno")["uplink"] == frozenset() and v not in fabric.switch_ports("sw-brno")["uplink"]
    assert not DeviceChange.objects.filter(device="sw-brno", cause__startswith="reconcile", status="ok").exists()
    assert Drift.objects.get(device="sw-brno").repaired_at is None


def test_reconcile_repair_fails_the_command_when_drift_is_left(fabric, active, monkeypatch):
    """A repair that settled without an error of the pass (the device disabled meanwhile, a change claimed too many
    times) left the drift and the command exited 0: ``reconcile --repair && …`` went on as if the devices agreed."""
    from django.core.management import CommandError

    fabric.poke_switch("sw-brno", "uplink", [])  # VLAN removed by hand
    disabled_while_it_reads(monkeypatch)
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match="1 device"):
        call_command("network", "reconcile", "--repair", "--switch", "sw-brno", stdout=out, stderr=err)
    assert "(not repaired)" in out.getvalue() and "switch sw-brno: drift left" in err.getvalue()
    monkeypatch.undo()
    Switch.objects.filter(name="sw-brno").update(enabled=True)
    call_command("network", "reconcile", "--no-repair", "--switch", "sw-brno", stdout=StringIO())  # (only records)


@pytest.mark.django_db(transaction=True)
def test_the_central_workers_devices_are_planned_side_by_side(fabric, monkeypatch):
    """A plan (the admin's action, ``manage.py network plan``) of the central worker's devices ran them one after
    another in the caller: twenty switches' sessions took minutes and the admin's page timed out at the proxy.
    They run side by side now (each waits here until all have started: one after another, none would), in order,
    each on a connection of its own, who asked going along."""
    from network import convergence, tasks
    from portal.audit import audit_actor, current

    switches = list(Switch.objects.order_by("name"))
    assert len(switches) > 1 and not any(s.queue for s in switches)
    started = threading.Barrier(len(switches), timeout=20)
    real = convergence.plan
    actors = []

    def plan(kind, device):
        started.wait()
        actors.append(current().actor)
        return real(kind, device)

    monkeypatch.setattr(convergence, "plan", plan)
    with audit_actor("admin-plan"):
        rows = tasks.plan_devices("switch", switches)
    assert [(row["device"], row["error"]) for row in rows] == [(s.name, "") for s in switches]
    assert actors == ["admin-plan"] * len(switches)

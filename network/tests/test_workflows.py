"""Provisioning, teardown, compensation and batching on the fake drivers (eager Celery), and the same
canvases on a real Celery worker over Redis (``-m worker``), including a worker killed mid-convergence."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections

from network import convergence, selectors, services, tasks, workflows
from network.errors import DeviceChangeFailed
from network.models import DeviceChange, DeviceKind, Host, Segment, Switch, VlanAllocation
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.testing_celery import wait_for

NONE = frozenset()


@pytest.fixture(autouse=True)
def eager_with_errbacks(settings):
    """Eager Celery as on a worker: a failing task calls its error callbacks (compensation) instead of
    raising on the spot (``task_eager_propagates`` skips them); retries without waiting long."""
    from portal.celery import app

    settings.DEVICE_RETRY_BACKOFF = 0.01
    settings.DEVICE_RETRY_MAX = 3
    before = app.conf.task_eager_propagates
    app.conf.task_eager_propagates = False
    yield
    app.conf.task_eager_propagates = before


def device_view(fabric) -> dict:
    """Everything the fake devices carry: switch → port → VLANs, host → VLANs."""
    view = {}
    for switch in fabric.switches.values():
        ports = fabric.switch_ports(switch.name)
        view[switch.name] = {p: v for p, v in ports.items() if v}
    for host in fabric.hosts.values():
        view[host.name] = fabric.host_vlans(host.name)
    return view


def desired_view(fabric) -> dict:
    view = {}
    for pk, ports in selectors.switch_desired().items():
        name = next(s.name for s in fabric.switches.values() if s.pk == pk)
        view[name] = {p: v for p, v in ports.items() if v}
    for pk, vids in selectors.host_desired().items():
        view[next(h.name for h in fabric.hosts.values() if h.pk == pk)] = vids
    return view


def three_sites(fabric):
    return [fabric.hosts["brno1"], fabric.hosts["pilsen1"], fabric.hosts["prague2"]]


def test_provision_then_teardown_leaves_nothing_behind(fabric):
    seg = services.segment_create(owner="cluster:1", hosts=three_sites(fabric), gateway=True)
    result = workflows.provision(seg.pk).apply()
    assert result.get()["state"] == "active"
    seg.refresh_from_db()
    assert seg.state == Segment.State.ACTIVE
    v = frozenset({seg.vid})
    assert device_view(fabric) == desired_view(fabric)
    assert fabric.switch_ports("sw-brno") == {"h1": v, "h2": NONE, "uplink": v, "gw": v}
    assert fabric.switch_ports("sw-prague")["h2"] == v
    assert fabric.host_vlans("pilsen1") == v and fabric.host_vlans("pilsen2") == NONE
    changes = DeviceChange.objects.filter(segment=seg)
    assert {c.device for c in changes} == {"sw-brno", "sw-pilsen", "sw-prague", "brno1", "pilsen1", "prague2"}
    assert all(c.status == "ok" and c.attempts == 1 and c.diff and c.finished_at for c in changes)
    assert f"+ uplink vlan {seg.vid}" in changes.get(device="sw-brno").diff

    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.CLOSED
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not ports for name, ports in device_view(fabric).items())
    # Running it again changes nothing.
    workflows.provision  # noqa: B018
    assert workflows.teardown(seg.pk).apply().get()["state"] == "closed"


def test_pending_changes_of_one_switch_are_applied_in_one_session(fabric):
    a = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    b = services.segment_create(owner="b", hosts=[fabric.hosts["brno2"], fabric.hosts["pilsen2"]], gateway=False)
    first, second = workflows.provision(a.pk), workflows.provision(b.pk)  # both recorded, neither run
    first.apply().get()
    assert fabric.switch_ports("sw-brno")["uplink"] == frozenset({a.vid, b.vid})
    assert fabric.switch_state("sw-brno")["commits"] == 1
    assert DeviceChange.objects.filter(segment=b, device="sw-brno").get().status == "ok"
    second.apply().get()  # its switch changes are already settled: no new session, no commit
    assert fabric.switch_state("sw-brno")["commits"] == 1
    assert len(fabric.switch_state("sw-brno")["sessions"]) == 1
    assert Segment.objects.get(pk=b.pk).state == Segment.State.ACTIVE


@pytest.mark.parametrize("k", [0, 1, 2])
def test_commit_failing_on_switch_k_rolls_everything_back(fabric, k):
    other = services.segment_create(owner="other", hosts=three_sites(fabric), gateway=False)
    workflows.provision(other.pk).apply().get()
    before = device_view(fabric)
    names = ["sw-brno", "sw-pilsen", "sw-prague"]
    fabric.set_switch_args(names[k], fail_commit="permanent")
    seg = services.segment_create(owner="new", hosts=three_sites(fabric), gateway=True)
    with pytest.raises(DeviceChangeFailed) as exc:
        workflows.provision(seg.pk).apply().get()
    assert exc.value.device == names[k] and "Invalid input detected" in exc.value.message
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED
    assert seg.error.startswith(f"{names[k]}: commit_config: % Invalid input")
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert device_view(fabric) == before  # every device back to its prior VLAN set
    failed = DeviceChange.objects.get(segment=seg, device=names[k], cause="provision new")
    assert failed.status == "failed" and "Invalid input" in failed.error


def test_host_failure_rolls_back_switches_and_other_hosts(fabric):
    fabric.hosts["prague2"].driver_args = {**fabric.hosts["prague2"].driver_args, "fail_commit": True}
    fabric.hosts["prague2"].save()
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    with pytest.raises(DeviceChangeFailed, match="prague2: ip link add br-v: Operation not permitted"):
        workflows.provision(seg.pk).apply().get()
    assert all(not v for v in device_view(fabric).values())
    assert Segment.objects.get(pk=seg.pk).state == Segment.State.FAILED


def test_a_vlan_a_host_refuses_fails_only_its_own_cluster_on_that_host(fabric):
    """Host brno1 refuses one cluster's VLAN (its own network has that id) while another cluster's change is in
    the same session: the refusal failed every change the session settled, the other cluster's provisioning
    with it. Only the refused VLAN's cluster fails and rolls back; the other's VLAN is on the host and it gets
    ready."""
    a = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    b = services.segment_create(owner="b", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen2"]], gateway=False)
    first, second = workflows.provision(a.pk), workflows.provision(b.pk)  # both recorded: one host session
    Host.objects.filter(name="brno1").update(driver_args={**fabric.args, "refuse": [a.vid]})
    with pytest.raises(DeviceChangeFailed, match=f"brno1: VLAN {a.vid} is the host's own"):
        first.apply().get()
    assert DeviceChange.objects.get(segment=b, device="brno1").status == "ok"
    assert second.apply().get()["state"] == "active"
    assert fabric.host_vlans("brno1") == {b.vid}
    assert Segment.objects.get(pk=a.pk).state == Segment.State.FAILED
    assert fabric.host_vlans("pilsen1") == NONE  # a's rollback took it off its other host


def _pilsen1_fails_then_at_the_rollback(fabric, monkeypatch, happen) -> Segment:
    """Provision a three-site segment whose host pilsen1 rejects its change; ``happen()`` runs once, when the
    rollback starts (after sw-brno took the VLAN). The failed segment, reloaded."""
    from network import tasks

    real, happened = tasks._compensation_cause, []

    def at_the_rollback(seg):
        if not happened:
            happened.append(happen())
        return real(seg)

    monkeypatch.setattr(tasks, "_compensation_cause", at_the_rollback)
    fabric.hosts["pilsen1"].driver_args = {**fabric.args, "fail_commit": "permanent"}
    fabric.hosts["pilsen1"].save(update_fields=["driver_args"])
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    with pytest.raises(DeviceChangeFailed, match="pilsen1"):
        workflows.provision(seg.pk).apply().get()
    seg.refresh_from_db()
    return seg


def test_a_rollback_that_kept_the_vlan_is_retried_until_the_vlan_goes_back(fabric, monkeypatch):
    """A switch that took the VLAN cannot be converged back during the rollback: the VLAN is kept (another
    owner would share it with that switch). ``retry_rollbacks`` (periodic) rolls back again — while the
    switch is still broken nothing changes; once it is repaired it is cleaned and the VLAN released."""
    from network import tasks

    seg = _pilsen1_fails_then_at_the_rollback(
        fabric, monkeypatch, lambda: fabric.set_switch_args("sw-brno", fail_commit="permanent")
    )
    assert seg.state == Segment.State.FAILED and "not rolled back (VLAN kept): sw-brno" in seg.error, seg.error
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert fabric.switch_ports("sw-brno")["uplink"] == {seg.vid}

    assert tasks.retry_rollbacks.apply().get() == [seg.pk]  # still broken: kept again
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    fabric.set_switch_args("sw-brno")  # repaired
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED and seg.error.startswith("pilsen1: "), seg.error
    assert "not rolled back" not in seg.error
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())
    assert tasks.retry_rollbacks.apply().get() == []  # nothing kept any more


def _pilsen_takes_the_change_then_fails(fabric, monkeypatch, error) -> Segment:
    """Provision a brno–pilsen segment whose switch sw-pilsen takes the change, then fails with ``error``
    and cannot be reached any more (through the rollback too): the failed segment, reloaded."""
    from network.drivers import TemporaryDeviceError
    from network.drivers.simulated import FakeSwitch

    real, calls = FakeSwitch.converge, []

    def converge(self, desired):
        if self.spec.name != "sw-pilsen":
            return real(self, desired)
        calls.append(desired)
        if len(calls) == 1:
            real(self, desired)  # the commit took effect …
            raise error
        raise TemporaryDeviceError(self.spec.name, "get_vlans: timed out")

    monkeypatch.setattr(FakeSwitch, "converge", converge)
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    with pytest.raises(DeviceChangeFailed):
        workflows.provision(seg.pk).apply().get()
    seg.refresh_from_db()
    assert fabric.switch_ports("sw-pilsen")["uplink"] == {seg.vid}
    return seg


def test_a_rollback_keeps_the_vlan_of_a_switch_whose_commit_answer_was_lost(fabric, monkeypatch):
    """sw-pilsen's commit reaches the switch but its answer never comes back (a temporary error), and the
    switch stays unreachable, through the rollback too. Its change never ended OK, yet it carries the VLAN:
    the VLAN is kept (handed to another owner it would join two clusters on sw-pilsen) — while a device that
    refused its change outright (pilsen1 below, sw-s<k> in the lab test) does not hold the VLAN back."""
    from network.drivers import TemporaryDeviceError

    lost = TemporaryDeviceError("sw-pilsen", "commit_config: CommandTimeoutException: timed out")
    seg = _pilsen_takes_the_change_then_fails(fabric, monkeypatch, lost)
    assert seg.state == Segment.State.FAILED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert "not rolled back (VLAN kept): sw-pilsen: " in seg.error, seg.error


def test_a_rollback_keeps_the_vlan_a_reconcile_put_on_a_switch_it_cannot_reach(fabric):
    """The segment is in the desired state from its creation on: the reconciler's repair puts its VLAN on
    sw-pilsen before the provisioning does. sw-pilsen then becomes unreachable and the provisioning fails on
    sw-brno: the rollback cannot reach sw-pilsen, so the VLAN is kept, not released."""
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    from network import tasks

    tasks.reconcile_device(DeviceKind.SWITCH, Switch.objects.get(name="sw-pilsen").pk, True)
    assert fabric.switch_ports("sw-pilsen")["uplink"] == {seg.vid}
    fabric.set_switch_args("sw-pilsen", reachable_from="site-worker-only")
    fabric.set_switch_args("sw-brno", fail_commit="permanent")
    with pytest.raises(DeviceChangeFailed):
        workflows.provision(seg.pk).apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert "not rolled back (VLAN kept): sw-pilsen: " in seg.error, seg.error
    assert "sw-brno: " not in seg.error.partition("not rolled back")[2]  # it refused: it holds nothing


def test_a_switch_whose_failed_change_may_be_on_it_holds_the_vlan_back(fabric, monkeypatch):
    """sw-pilsen took the change, its verification failed and its own rollback too (the error says the
    change may be on the device); during the segment's rollback it cannot be reached: the VLAN is kept."""
    from network.drivers import PermanentDeviceError

    failed = PermanentDeviceError("sw-pilsen", "rollback: rejected", may_have_applied=True)
    seg = _pilsen_takes_the_change_then_fails(fabric, monkeypatch, failed)
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED, seg.error
    assert not DeviceChange.objects.get(segment=seg, device="sw-pilsen", cause="provision c").refused


def test_an_interrupted_batch_still_holds_back_the_teardown_of_a_kept_bridge(fabric, monkeypatch):
    """brno1 keeps A's bridge for a VM port and finishes its session; the task's soft time limit then cuts
    the batch: A's teardown change on brno1 waits (pending), it is not settled done with the bridge there."""
    from celery.exceptions import SoftTimeLimitExceeded

    from network.tests import fakes

    a = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], fabric.hosts["brno2"]], gateway=False)
    workflows.provision(a.pk).apply().get()
    state = fakes.load(fabric.args, "host", "brno1")
    fakes.save(fabric.args, "host", "brno1", {**state, "vm_ports": {str(a.vid): 1}})
    services.segment_delete(segment=a)
    hosts = (fabric.hosts["brno1"], fabric.hosts["brno2"])
    changes = [convergence.change_create(device=host, cause="teardown a", segment=a) for host in hosts]

    def run_sessions(active):
        for w in active:
            if w.device.name == "brno1":
                convergence._drive(w)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(convergence, "_run_sessions", run_sessions)
    with pytest.raises(SoftTimeLimitExceeded):
        convergence.converge_changes([c.pk for c in changes])
    assert a.vid in fabric.host_vlans("brno1")
    assert DeviceChange.objects.get(pk=changes[0].pk).status == "pending"


def test_a_vlan_kept_for_a_switch_that_then_left_the_inventory_is_released(fabric, monkeypatch):
    """A rollback kept the VLAN because sw-brno2 could not be converged back; sw-brno2 is then removed from
    the inventory: the next retry releases the VLAN (a device that left the inventory is no longer ours), and
    the retries stop."""
    from network import tasks
    from network.choices import PortRole
    from network.tests.factories import SwitchFactory, SwitchPortFactory

    extra = SwitchFactory(name="sw-brno2", site=fabric.sites["brno"], platform="fake", driver_args=fabric.args)
    SwitchPortFactory(switch=extra, name="uplink", role=PortRole.CORE_UPLINK, core=fabric.core)
    seg = _pilsen1_fails_then_at_the_rollback(
        fabric, monkeypatch, lambda: fabric.set_switch_args("sw-brno2", fail_commit="permanent")
    )
    assert "not rolled back (VLAN kept): sw-brno2" in seg.error, seg.error
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED
    Switch.objects.get(name="sw-brno2").delete()  # decommissioned
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED and "not rolled back" not in seg.error
    assert tasks.retry_rollbacks.apply().get() == []


def test_each_layer_of_one_task_has_retries_of_its_own(fabric):
    """Switches and hosts on the central worker converge in ONE task, layer after layer. The switch layer used
    two of the three retries (a locked configuration database); the host layer then gets three of its own — it
    had one left, and its second temporary error failed the provisioning and rolled the cluster back."""
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["pilsen1"]], gateway=False)
    canvas = workflows.provision(seg.pk)
    fabric.set_switch_args("sw-pilsen", fail_times=2)
    Host.objects.filter(name="pilsen1").update(driver_args={**fabric.args, "fail_times": 2})
    canvas.apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.ACTIVE
    assert seg.vid in fabric.host_vlans("pilsen1") and seg.vid in fabric.switch_ports("sw-pilsen")["h1"]
    switch, host = (DeviceChange.objects.get(segment=seg, device=d) for d in ("sw-pilsen", "pilsen1"))
    assert (switch.status, switch.attempts, host.status, host.attempts) == ("ok", 3, "ok", 3)

    # a layer's own retries are still bounded: four temporary errors in a row fail it
    seg2 = services.segment_create(owner="d", hosts=[fabric.hosts["pilsen2"]], gateway=False)
    canvas = workflows.provision(seg2.pk)
    Host.objects.filter(name="pilsen2").update(driver_args={**fabric.args, "fail_times": 4})
    with pytest.raises(DeviceChangeFailed, match="pilsen2: ovsdb transaction"):
        canvas.apply().get()
    assert DeviceChange.objects.get(segment=seg2, device="pilsen2", cause="provision d").status == "failed"


def test_a_later_layer_waits_for_locks_only_within_the_tasks_time_and_goes_on_in_a_task_of_its_own(
    fabric, monkeypatch, settings
):
    """The layers of one task share its time limit. A later layer waits for a device lock no longer than the time
    left after one device session's (each layer waited half the limit afresh: two busy locks and the soft limit
    cut the task, failing the provisioning with no device to blame); with no time left it goes on in a task of its
    own, at once, with retries of its own (the hand-off is none of them)."""
    from network import tasks

    settings.CELERY_TASK_SOFT_TIME_LIMIT, settings.DEVICE_TIMEOUT = 120, 30
    waits = []
    converge_changes = convergence.converge_changes

    def spy(change_ids, **kwargs):
        waits.append(kwargs.get("wait"))
        return converge_changes(change_ids, **kwargs)

    monkeypatch.setattr(convergence, "converge_changes", spy)
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["pilsen1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    assert waits[0] is None and 0 < waits[1] <= 60  # the first layer: half the limit; the next: what is left
    assert Segment.objects.get(pk=seg.pk).state == Segment.State.ACTIVE

    # no time left after the switches: the hosts go on in a retry of their own, with all three of their retries
    waits.clear()
    monkeypatch.setattr(tasks, "_session_time", lambda: 1000.0)
    seg2 = services.segment_create(owner="d", hosts=[fabric.hosts["pilsen2"]], gateway=False)
    canvas = workflows.provision(seg2.pk)
    Host.objects.filter(name="pilsen2").update(driver_args={**fabric.args, "fail_times": 3})
    canvas.apply().get()
    assert Segment.objects.get(pk=seg2.pk).state == Segment.State.ACTIVE
    host = DeviceChange.objects.get(segment=seg2, device="pilsen2")
    assert (host.status, host.attempts) == ("ok", 4)
    assert waits == [None, None, None, None, None]  # switches; then the hosts' task and its three retries


def test_a_temporary_failure_of_a_device_renamed_since_its_change_was_recorded_is_retried(fabric):
    """The workflow recorded its change as "sw-pilsen"; the switch is renamed, then its config database is
    locked: the temporary error is still that change's (retried, then the provisioning fails and is rolled
    back), not lost — it made the segment ACTIVE without the VLAN on the switch, its change pending."""
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    canvas = workflows.provision(seg.pk)
    Switch.objects.filter(name="sw-pilsen").update(
        name="sw-pilsen-a", driver_args={**fabric.args, "fail_commit": "temporary"}
    )
    with pytest.raises(DeviceChangeFailed, match="configuration database locked"):
        canvas.apply().get()
    seg.refresh_from_db()
    change = DeviceChange.objects.get(segment=seg, device="sw-pilsen", cause="provision c")
    assert seg.state == Segment.State.FAILED and change.status == "failed" and change.attempts > 1


def _held_for_disabled(fabric, name: str, model=Switch) -> Segment:
    """A provisioned segment torn down while device ``name`` (a ``model``) was disabled: CLOSED, holding its
    VLAN."""
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflows.provision(seg.pk).apply().get()
    model.objects.filter(name=name).update(enabled=False)
    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.CLOSED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    return seg


@pytest.mark.parametrize(("kind", "name"), [("switch", "sw-pilsen"), ("host", "pilsen1")])
def test_a_teardown_keeps_the_vlan_while_a_disabled_device_may_carry_it(fabric, kind, name):
    """A device disabled (maintenance) is never touched, so a teardown cannot take the VLAN off it: the VLAN
    stays with the closed segment — handed to another owner it would join the two on that device — until
    the device is enabled again; then ``retry_rollbacks`` (periodic) tears the segment down again, the
    device is cleaned and the VLAN goes into quarantine."""
    from network import tasks

    model = Switch if kind == "switch" else Host
    seg = _held_for_disabled(fabric, name, model)
    assert seg.allocation.owner == "c"
    kept = f"VLAN {seg.vid} kept: {kind} {name} disabled and may still carry it"
    assert seg.error == f"{kept}; released once enabled again and cleaned"
    left = {device: vlans for device, vlans in device_view(fabric).items() if vlans}
    assert set(left) == {name}  # every enabled device is clean; the disabled one was not touched
    assert services.segments_holding_vlan().get() == seg

    assert tasks.retry_rollbacks.apply().get() == []  # still disabled: nothing to do
    model.objects.filter(name=name).update(enabled=True)
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert (seg.state, seg.error) == (Segment.State.CLOSED, "")
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())
    assert tasks.retry_rollbacks.apply().get() == []


def test_a_device_the_teardown_cleaned_and_that_is_disabled_since_holds_nothing(fabric):
    """The teardown left pilsen1 (disabled) carrying the VLAN and cleaned every other device; then sw-brno goes
    into maintenance (clean: the teardown took the VLAN off it). Once pilsen1 is back, the teardown runs again and
    the VLAN is released — sw-brno, disabled but cleaned, holds nothing (it held the VLAN for as long as it stayed
    disabled: for good, were it retired)."""
    from network import tasks

    seg = _held_for_disabled(fabric, "pilsen1", Host)
    Switch.objects.filter(name="sw-brno").update(enabled=False)
    assert selectors.vlan_holders(seg) == ["host pilsen1"]
    Host.objects.filter(name="pilsen1").update(enabled=True)
    assert selectors.vlan_holders(seg) == []
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert (seg.state, seg.error) == (Segment.State.CLOSED, "")
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())


def test_a_change_abandoned_before_it_started_holds_nothing(fabric):
    """A provisioning's later layer never ran (an earlier one failed for good): its changes are abandoned,
    failed, never started — nothing touched those devices, so one of them disabled holds no VLAN (it held it
    for as long as it stayed disabled, and the rollback's retries stopped)."""
    from datetime import timedelta

    from django.utils import timezone

    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    host = Host.objects.get(name="pilsen1")
    change = convergence.change_create(device=host, segment=seg, cause="provision c")
    DeviceChange.objects.filter(pk=change.pk).update(created_at=timezone.now() - timedelta(hours=1))
    assert convergence.changes_abandon_stale(older_than=timedelta(minutes=24)) == 1
    assert DeviceChange.objects.get(pk=change.pk).status == "failed"
    Host.objects.filter(pk=host.pk).update(enabled=False)
    assert selectors.vlan_holders(seg) == []


@pytest.mark.parametrize(("kind", "name"), [("switch", "sw-pilsen"), ("host", "pilsen1")])
def test_a_device_enabled_again_while_the_teardown_ran_keeps_the_vlan_until_it_is_cleaned(fabric, kind, name):
    """The teardown is built without a disabled device; the device is enabled again before the teardown ends:
    it is no longer a disabled holder, but nothing cleaned it — it still carries the VLAN. The VLAN stays with
    the closed segment, saying why (released, the id would join another owner to this one there), and
    ``retry_rollbacks`` tears it down again, which cleans the device and releases the VLAN."""
    from network import tasks

    model = Switch if kind == "switch" else Host
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflows.provision(seg.pk).apply().get()
    model.objects.filter(name=name).update(enabled=False)
    services.segment_delete(segment=seg)
    canvas = workflows.teardown(seg.pk)  # built while it is disabled
    model.objects.filter(name=name).update(enabled=True)  # maintenance over before the teardown ended
    canvas.apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.CLOSED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert f"{kind} {name} enabled again during the teardown and not cleaned by it" in seg.error
    assert {device for device, vlans in device_view(fabric).items() if vlans} == {name}

    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert (seg.state, seg.error) == (Segment.State.CLOSED, "")
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())


def test_a_rollback_that_a_teardown_took_over_before_its_end_leaves_the_vlan_to_the_teardown(fabric, monkeypatch):
    """The rollback's last step reads the segment rolling back, then a teardown takes it (DELETING) before the
    step's transaction: the step locks the segment first and finds it gone from rolling back — the VLAN is left
    to the teardown, which releases it once every device is clean (it was released under the teardown, and
    the two locked the rows in opposite orders)."""
    from network import tasks

    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflows.provision(seg.pk).apply().get()
    Segment.objects.filter(pk=seg.pk).update(state=Segment.State.COMPENSATING)

    def teardown_meanwhile(*args, **kwargs):  # (every device rolled back clean, as far as the step can tell)
        Segment.objects.filter(pk=seg.pk).update(state=Segment.State.DELETING)
        return []

    monkeypatch.setattr(selectors, "vlan_not_cleaned", teardown_meanwhile)
    assert tasks.segment_compensated(seg.pk)["state"] == Segment.State.DELETING
    seg.refresh_from_db()
    assert seg.state == Segment.State.DELETING and seg.allocation.state == VlanAllocation.State.ALLOCATED


def test_a_device_enabled_again_while_the_rollback_ran_keeps_the_vlan_until_it_is_rolled_back(fabric, monkeypatch):
    """As for a teardown: a rollback built while sw-pilsen was disabled, which is enabled again before the
    rollback ends, leaves the VLAN there — the segment keeps it, and the rollback run again cleans it."""
    from network import tasks

    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflows.provision(seg.pk).apply().get()
    Switch.objects.filter(name="sw-pilsen").update(enabled=False)
    converge_changes = convergence.converge_changes

    def enabled_after_the_hosts(change_ids, **kwargs):
        outcome = converge_changes(change_ids, **kwargs)
        Switch.objects.filter(name="sw-pilsen").update(enabled=True)  # maintenance over mid-rollback
        return outcome

    with monkeypatch.context() as patch:
        patch.setattr(convergence, "converge_changes", enabled_after_the_hosts)
        workflows.compensate(seg.pk).apply()
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert "switch sw-pilsen: enabled again during the rollback, not touched" in seg.error
    assert {device for device, vlans in device_view(fabric).items() if vlans} == {"sw-pilsen"}

    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())


def test_a_held_vlan_whose_teardown_could_not_be_sent_is_tried_again(fabric, monkeypatch):
    """The retry claims the held segment, then the broker refuses the teardown: the segment is closed (and
    held) again, so the next run sends it."""
    from network import tasks

    seg = _held_for_disabled(fabric, "sw-brno")
    Switch.objects.filter(name="sw-brno").update(enabled=True)

    class BrokerDown:
        def on_error(self, _errback):
            return self

        def delay(self):
            raise ConnectionError("broker unreachable")

    real = workflows.teardown
    monkeypatch.setattr(workflows, "teardown", lambda segment_id: BrokerDown())
    with pytest.raises(ConnectionError):
        tasks.retry_rollbacks.apply().get()
    assert services.segments_holding_vlan().get() == seg
    monkeypatch.setattr(workflows, "teardown", real)
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())


def test_a_teardown_that_stalled_is_torn_down_again_and_releases_the_vlan(fabric):
    """A teardown whose worker died (or whose chain failed with nobody to hear of it) leaves its segment
    DELETING, holding its VLAN: once it has made no progress for longer than a rollback may take,
    ``retry_rollbacks`` tears it down again; a teardown still under way is left alone."""
    from datetime import timedelta

    from django.utils import timezone

    from network import tasks

    seg = _held_for_disabled(fabric, "sw-brno")
    Switch.objects.filter(name="sw-brno").update(enabled=True)
    Segment.objects.filter(pk=seg.pk).update(state=Segment.State.DELETING)  # a teardown under way
    assert tasks.retry_rollbacks.apply().get() == []
    long_ago = timezone.now() - services.rollback_stalled_after() - timedelta(seconds=1)
    Segment.objects.filter(pk=seg.pk).update(updated_at=long_ago)  # ... that stalled
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert (seg.state, seg.allocation.state) == (Segment.State.CLOSED, VlanAllocation.State.QUARANTINED)
    assert all(not vlans for vlans in device_view(fabric).values())


def test_a_device_disabled_before_it_took_the_vlan_fails_the_provisioning_and_holds_nothing(fabric):
    """A switch disabled after the provisioning recorded its change but before the change ran settles it
    untouched: the nodes behind it would have no network, so the provisioning fails naming it (never "ready"
    without it) and is rolled back; it never carried the VLAN, so the rollback releases it."""
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    canvas = workflows.provision(seg.pk)  # the device changes are recorded now
    Switch.objects.filter(name="sw-pilsen").update(enabled=False)
    with pytest.raises(DeviceChangeFailed, match="sw-pilsen: disabled while the network was being provisioned"):
        canvas.apply().get()
    assert DeviceChange.objects.get(segment=seg, device="sw-pilsen", cause="provision c").error == (
        DeviceChange.NOT_TOUCHED
    )
    assert not any(fabric.switch_ports("sw-pilsen").values())  # never touched
    seg.refresh_from_db()
    assert (seg.state, seg.allocation.state) == (Segment.State.FAILED, VlanAllocation.State.QUARANTINED)
    assert all(not vlans for vlans in device_view(fabric).values())


def _kept_until_enabled_again(fabric, seg: Segment, disabled) -> None:
    """The rollback of ``seg`` (pilsen1 failed) kept its VLAN for the ``disabled`` device: ``retry_rollbacks`` waits
    while it stays disabled; with pilsen1 repaired and the device enabled, the retry cleans every device and the
    VLAN goes into quarantine."""
    from network import tasks

    assert tasks.retry_rollbacks.apply().get() == []  # waits for the device
    fabric.hosts["pilsen1"].driver_args = fabric.args
    fabric.hosts["pilsen1"].save(update_fields=["driver_args"])
    disabled.update(enabled=True)
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED and "not rolled back" not in seg.error
    assert all(not vlans for vlans in device_view(fabric).values())


def test_a_rollback_keeps_the_vlan_while_a_disabled_switch_may_carry_it(fabric, monkeypatch):
    """A switch that took the VLAN and is disabled before the rollback reaches it: the rollback keeps the
    VLAN (the reason names the switch) and is not retried while it stays disabled."""
    seg = _pilsen1_fails_then_at_the_rollback(
        fabric, monkeypatch, lambda: Switch.objects.filter(name="sw-brno").update(enabled=False)
    )
    assert seg.state == Segment.State.FAILED
    assert "not rolled back (VLAN kept): switch sw-brno: disabled, not touched" in seg.error, seg.error
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert fabric.switch_ports("sw-brno")["uplink"] == {seg.vid}
    _kept_until_enabled_again(fabric, seg, Switch.objects.filter(name="sw-brno"))


def test_a_rollback_keeps_the_vlan_while_a_disabled_host_whose_change_failed_may_carry_it(fabric, monkeypatch):
    """A host's change that failed may have applied part of it (a host fails half-way through its VLANs): the
    host disabled before the rollback reaches it may carry the VLAN, so the rollback keeps it, naming the host,
    until the host is enabled and cleaned. (A switch that refused its change outright holds nothing.)"""
    seg = _pilsen1_fails_then_at_the_rollback(
        fabric, monkeypatch, lambda: Host.objects.filter(name="pilsen1").update(enabled=False)
    )
    assert seg.state == Segment.State.FAILED
    assert DeviceChange.objects.get(segment=seg, device="pilsen1", cause="provision c").status == "failed"
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED, seg.error
    assert "pilsen1" in seg.error.partition("not rolled back")[2], seg.error
    _kept_until_enabled_again(fabric, seg, Host.objects.filter(name="pilsen1"))


def test_a_rollback_runs_once_and_a_stalled_one_is_run_again(fabric):
    """Celery may call a workflow's errback twice (the failed task's and its chord's): the second call finds
    the rollback claimed and adds nothing. A rollback whose worker died before handing the work on stays
    claimed; ``retry_rollbacks`` runs it again once it has made no progress for long."""
    from datetime import timedelta

    from django.utils import timezone

    from network import tasks

    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflows.provision(seg.pk).apply().get()
    Segment.objects.filter(pk=seg.pk).update(state=Segment.State.COMPENSATING)  # claimed by a first call
    before = DeviceChange.objects.count()
    assert tasks.segment_compensate.apply((seg.pk,)).get() == {
        "segment": seg.pk,
        "state": "being compensated elsewhere",
    }
    assert DeviceChange.objects.count() == before
    assert tasks.retry_rollbacks.apply().get() == []  # not stalled yet
    Segment.objects.filter(pk=seg.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED and seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert all(not vlans for vlans in device_view(fabric).values())


def test_temporary_errors_are_retried_then_succeed(fabric):
    fabric.set_switch_args("sw-pilsen", fail_times=2)
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflows.provision(seg.pk).apply().get()
    change = DeviceChange.objects.get(segment=seg, device="sw-pilsen")
    assert change.status == "ok" and change.attempts == 3
    assert change.orphaned == 0  # claimed three times, never found running: no worker died
    assert fabric.switch_ports("sw-pilsen")["h1"] == frozenset({seg.vid})


def test_a_device_whose_worker_died_every_time_is_not_driven_again(fabric):
    """A driver that crashes its process on one device (out of memory, a segfault): the message goes back to the
    queue each time (``reject_on_worker_lost``) and crashed worker after worker, for good. A claim that finds a
    change still running counts an orphan; past ``ORPHANED_MAX`` the device's changes fail, saying why, and the
    device is left alone; the workflow fails and rolls back. (Counting every claim instead failed healthy
    changes held back or retried after temporary errors: those are pending again between claims, never
    orphans.)"""
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflow = workflows.provision(seg.pk)  # (records the devices' changes)
    # as if every earlier delivery had died mid-session: claimed, never settled
    DeviceChange.objects.filter(segment=seg, device="sw-pilsen").update(
        status="running", attempts=9, orphaned=convergence.ORPHANED_MAX
    )
    with pytest.raises(DeviceChangeFailed, match="sw-pilsen: found still running 4 times"):
        workflow.apply().get()
    change = DeviceChange.objects.get(segment=seg, device="sw-pilsen", cause="provision c")
    assert change.status == "failed" and change.orphaned == convergence.ORPHANED_MAX + 1
    assert "the worker converging this device died every time" in change.error
    assert fabric.switch_ports("sw-pilsen").get("h1", frozenset()) == frozenset()  # never driven
    assert Segment.objects.get(pk=seg.pk).state == Segment.State.FAILED


@pytest.mark.parametrize("before", [0, convergence.ORPHANED_MAX - 1])
def test_a_change_found_running_up_to_orphaned_max_times_is_done_again(fabric, before):
    """Worker deaths (killed, a reboot) up to ``ORPHANED_MAX`` are taken in stride: the change is claimed again
    and done."""
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    workflow = workflows.provision(seg.pk)
    DeviceChange.objects.filter(segment=seg, device="sw-pilsen").update(status="running", attempts=1, orphaned=before)
    assert workflow.apply().get()["state"] == "active"
    change = DeviceChange.objects.get(segment=seg, device="sw-pilsen")
    assert (change.status, change.orphaned) == ("ok", before + 1)


def test_temporary_errors_give_up_after_the_retry_budget(fabric, settings):
    settings.DEVICE_RETRY_MAX = 2
    fabric.set_switch_args("sw-pilsen", fail_commit="temporary")
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    with pytest.raises(DeviceChangeFailed, match="sw-pilsen: commit_config: configuration database locked"):
        workflows.provision(seg.pk).apply().get()
    change = DeviceChange.objects.get(segment=seg, device="sw-pilsen", cause="provision c")
    assert change.status == "failed" and change.attempts == 3
    assert Segment.objects.get(pk=seg.pk).state == Segment.State.FAILED


def test_an_update_that_left_a_disabled_host_untouched_does_not_fail_every_later_update(fabric):
    """A node add records its host's change, then the host is disabled before the change runs: that update
    fails, naming the host. The earlier untouched change no longer counts (before, it failed every later
    update) once the segment no longer needs the host (the node moved elsewhere), or once the host, enabled
    again, took a later change."""
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    workflows.provision(seg.pk, compensate_on_error=False).apply().get()
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]])
    canvas = workflows.provision(seg.pk, compensate_on_error=False)  # the changes are recorded now
    Host.objects.filter(name="prague1").update(enabled=False)
    with pytest.raises(DeviceChangeFailed, match="prague1: disabled while the network was being provisioned"):
        canvas.apply().get()
    assert Segment.objects.get(pk=seg.pk).state == Segment.State.PENDING

    # the node moves elsewhere while prague1 stays disabled: the segment no longer needs it
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]])
    assert workflows.provision(seg.pk, compensate_on_error=False).apply().get()["state"] == "active"

    Host.objects.filter(name="prague1").update(enabled=True)
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]])
    assert workflows.provision(seg.pk, compensate_on_error=False).apply().get()["state"] == "active"
    assert fabric.host_vlans("prague1") == {seg.vid}


def test_a_time_limit_during_a_device_session_stops_the_task_instead_of_failing_the_device(fabric, monkeypatch):
    """The task's soft time limit fires while a switch's session runs (the one-device path, in the task's own
    thread): it is not taken for the driver's error (a permanent failure, the task going on to its next
    layer): the change settles as interrupted and the limit ends the task."""
    from celery.exceptions import SoftTimeLimitExceeded

    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    switch = fabric.switches["brno"]
    change = convergence.change_create(device=switch, segment=seg, cause="provision c")

    class TimeUp:
        def __enter__(self):
            raise SoftTimeLimitExceeded()

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(convergence, "switch_session", lambda spec: TimeUp())
    with pytest.raises(SoftTimeLimitExceeded):
        convergence.converge_change(change.pk)
    change.refresh_from_db()
    assert change.status == "failed" and change.error.startswith("interrupted: SoftTimeLimitExceeded")


def test_migration_moves_the_vlan_and_cleans_the_source(fabric):
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    v = frozenset({seg.vid})
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]])
    workflows.provision(seg.pk).apply().get()  # target ready before the VM moves
    assert fabric.host_vlans("prague1") == v and fabric.switch_ports("sw-brno")["uplink"] == v
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["prague1"]])
    workflows.provision(seg.pk).apply().get()  # source cleaned after the move
    assert fabric.host_vlans("brno1") == NONE
    assert fabric.switch_ports("sw-brno") == {"h1": NONE, "h2": NONE, "uplink": NONE, "gw": NONE}
    assert fabric.switch_ports("sw-prague") == {"h1": v, "h2": NONE, "uplink": NONE}


def test_teardown_waits_for_vm_ports_and_keeps_the_vlan(fabric):
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    from network.tests import fakes

    args = {"state_dir": fabric.state_dir}
    state = fakes.load(args, "host", "brno1")
    state["vm_ports"] = {str(seg.vid): 1}
    fakes.save(args, "host", "brno1", state)
    services.segment_delete(segment=seg)
    with pytest.raises(DeviceChangeFailed, match="VM ports still attached"):
        workflows.teardown(seg.pk).apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.DELETING
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED  # never handed on while still in use


def test_a_vm_left_on_an_ended_clusters_bridge_holds_back_only_that_clusters_teardown(fabric):
    """A VM that the VM manager has not detached yet keeps cluster A's bridge on brno1, and A's teardown waits
    for it (above); cluster B provisioned onto brno1 meanwhile is not held back by it (it failed after its
    retries and was rolled back), and a reconciler's repair of brno1 fails saying why instead of leaving a
    pending change at every pass."""
    from network import tasks
    from network.tests import fakes

    a = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"]], gateway=False)
    workflows.provision(a.pk).apply().get()
    state = fakes.load(fabric.args, "host", "brno1")
    fakes.save(fabric.args, "host", "brno1", {**state, "vm_ports": {str(a.vid): 1}})
    services.segment_delete(segment=a)
    with pytest.raises(DeviceChangeFailed, match="VM ports still attached"):
        workflows.teardown(a.pk).apply().get()
    b = services.segment_create(owner="b", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    workflows.provision(b.pk).apply().get()
    b.refresh_from_db()
    assert b.state == Segment.State.ACTIVE and fabric.host_vlans("brno1") == {a.vid, b.vid}
    teardown = DeviceChange.objects.filter(segment=a, device="brno1", cause__startswith="teardown").latest("pk")
    assert teardown.status == "failed" and "VM ports still attached" in teardown.error
    for _ in range(2):
        tasks.reconcile_device(DeviceKind.HOST, fabric.hosts["brno1"].pk, True)
    repairs = DeviceChange.objects.filter(device="brno1", segment=None)
    assert set(repairs.values_list("status", flat=True)) == {"failed"}, list(repairs.values_list("status", "error"))
    assert f"VLAN {a.vid} kept: VM ports still attached" in repairs.first().error
    assert not DeviceChange.objects.filter(device="brno1", status__in=DeviceChange.OPEN).exists()


def test_changes_a_failed_workflow_left_open_fail_once_no_task_can_settle_them(fabric):
    """A node change (a workflow without rollback) whose switch layer fails for good: its host layer's
    changes, recorded up front, and a switch that failed only temporarily beside it stay open — no task will
    run them. The periodic reconcile fails them, saying so, once they are older than a stalled rollback (not
    before: a workflow may still be retrying them)."""
    from datetime import timedelta

    from django.utils import timezone

    from network import tasks

    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]])
    fabric.set_switch_args("sw-prague", fail_commit="permanent")
    fabric.set_switch_args("sw-pilsen", fail_commit="temporary")
    with pytest.raises(DeviceChangeFailed):
        workflows.provision(seg.pk, compensate_on_error=False).apply().get()
    left = DeviceChange.objects.filter(segment=seg, status__in=DeviceChange.OPEN)
    assert set(left.values_list("device", flat=True)) >= {"sw-pilsen", "prague1"}
    tasks.reconcile.apply(kwargs={"repair": False}).get()
    assert left.exists()  # young: left alone
    stalled = timezone.now() - services.rollback_stalled_after() - timedelta(seconds=1)
    left.update(created_at=stalled, started_at=stalled)
    ids = list(left.values_list("pk", flat=True))
    tasks.reconcile.apply(kwargs={"repair": False}).get()
    assert not left.exists()
    for change in DeviceChange.objects.filter(pk__in=ids):
        assert change.status == "failed" and change.error.endswith("its workflow ended without it"), change.error


def test_disabled_switch_is_never_touched(fabric):
    switch = fabric.switches["pilsen"]
    switch.enabled = False
    switch.save()
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    assert "sessions" not in fabric.switch_state("sw-pilsen") or not fabric.switch_state("sw-pilsen")["sessions"]


@pytest.mark.django_db(transaction=True)
def test_one_switch_is_never_configured_by_two_sessions_at_once(tmp_path):
    from network.tests.fakefabric import build_fabric

    fabric = build_fabric(tmp_path / "devices")
    fabric.set_switch_args("sw-brno", delay=0.2)
    segments = [
        services.segment_create(owner=f"c{i}", hosts=[fabric.hosts["brno1" if i % 2 else "brno2"]], gateway=False)
        for i in range(6)
    ]
    changes = [
        convergence.change_create(device=fabric.switches["brno"], segment=s, cause=f"provision {s.owner_ref}")
        for s in segments
    ]
    start = threading.Barrier(len(changes))

    def run(change):
        try:
            start.wait(timeout=30)
            return convergence.converge_change(change.pk).status
        finally:
            connections["default"].close()

    with ThreadPoolExecutor(max_workers=len(changes)) as pool:
        statuses = list(pool.map(run, changes))
    assert set(statuses) == {"ok"}
    sessions = sorted(fabric.switch_state("sw-brno")["sessions"])
    assert all(a[1] <= b[0] for a, b in zip(sessions, sessions[1:], strict=False)), "sessions overlapped"
    assert len(sessions) < len(changes)  # later ones were batched into an earlier session
    assert fabric.switch_ports("sw-brno")["h1"] | fabric.switch_ports("sw-brno")["h2"] == {s.vid for s in segments}


def _links(steps: list) -> list:
    """The links a workflow chains, as (task name, args, kwargs, queue); a group as a list of those."""

    def one(sig):
        return (sig.task, list(sig.args), dict(sig.kwargs), sig.options.get("queue", ""))

    return [[one(t) for t in link.tasks] if hasattr(link, "tasks") else one(link) for link in steps]


def test_a_layer_is_one_task_and_central_layers_are_merged(fabric, settings, monkeypatch):
    from celery import chain

    monkeypatch.setattr(workflows, "chain", lambda *steps: list(steps))  # the links, before Celery joins them
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    canvas = workflows.provision(seg.pk, compensate_on_error=False)
    changes = {c.device: c.pk for c in DeviceChange.objects.filter(segment=seg)}
    switches = [changes[n] for n in ("sw-brno", "sw-pilsen", "sw-prague")]
    hosts = [changes[n] for n in ("brno1", "pilsen1", "prague2")]
    # switches, then hosts (no agent queues): one task converging both layers in turn, then marking the
    # segment active
    assert _links(canvas) == [
        ("network.converge_devices", [switches], {"then": [hosts], "finish": ["provisioned", seg.pk, 0]}, ""),
    ]
    # hosts with agent queues: a group of tasks on their queues after the switch task; chunks of
    # DEVICE_BATCH_SIZE devices
    settings.DEVICE_BATCH_SIZE = 2
    for name in ("brno1", "pilsen1"):
        fabric.hosts[name].agent_queue = f"host.{name}"
        fabric.hosts[name].save(update_fields=["agent_queue"])
    canvas = workflows.provision(seg.pk, compensate_on_error=False)
    new = {c.device: c.pk for c in DeviceChange.objects.filter(segment=seg).exclude(pk__in=changes.values())}
    assert _links(canvas) == [
        [
            ("network.converge_devices", [[new["sw-brno"], new["sw-pilsen"]]], {}, ""),
            ("network.converge_devices", [[new["sw-prague"]]], {}, ""),
        ],
        ("network.segment_step", [seg.pk, "switches"], {}, ""),
        [
            ("network.converge_devices", [[new["brno1"]]], {}, "host.brno1"),
            ("network.converge_devices", [[new["pilsen1"]]], {}, "host.pilsen1"),
            ("network.converge_devices", [[new["prague2"]]], {}, ""),
        ],
        ("network.segment_provisioned", [seg.pk, 0], {}, ""),
    ]
    chain(*canvas).apply().get()  # and it runs: every device converged
    assert device_view(fabric) == desired_view(fabric)


def test_a_provisioning_overtaken_by_a_later_one_leaves_the_segment_pending_for_it(fabric):
    """The hosts change again while a provisioning is under way: when it ends, the segment still needs a device
    it did not converge, so it stays PENDING (not ACTIVE with a host still without its VLAN) and the earlier one
    does not fail — also before the later provisioning has recorded anything (its send waits for the commit, or
    for the sweep that resends it); the later one marks it ACTIVE. Open changes an earlier workflow left behind do
    not hold a provisioning back."""
    seg = services.segment_create(owner="cluster:1", hosts=three_sites(fabric)[:2], gateway=False)
    # an earlier workflow's change on a host since disabled: no session claims it (a disabled device is skipped)
    convergence.change_create(device=fabric.hosts["brno2"], segment=seg, cause="provision (its workflow died)")
    Host.objects.filter(name="brno2").update(enabled=False)
    assert workflows.provision(seg.pk).apply().get()["state"] == "active"
    assert DeviceChange.objects.filter(segment=seg, status__in=DeviceChange.OPEN).count() == 1

    services.segment_set_hosts(segment=seg, hosts=three_sites(fabric)[:2] + [fabric.hosts["pilsen2"]])
    second = workflows.provision(seg.pk)
    services.segment_set_hosts(segment=seg, hosts=three_sites(fabric))  # (the third not recorded yet)
    result = second.apply().get()
    assert (result["state"], result["superseded"]) == ("pending", True)
    seg.refresh_from_db()
    assert seg.state == Segment.State.PENDING
    assert fabric.host_vlans("prague2") == NONE  # the third's device, not converged yet
    third = workflows.provision(seg.pk)
    assert third.apply().get()["state"] == "active"
    seg.refresh_from_db()
    assert seg.state == Segment.State.ACTIVE
    assert device_view(fabric) == desired_view(fabric)
    assert fabric.host_vlans("prague2") == frozenset({seg.vid}) and fabric.host_vlans("pilsen2") == NONE
    # a late copy of the second's last step changes nothing (the segment is active: its own result)
    assert tasks.segment_provisioned(seg.pk, 1)["state"] == "active"


def test_an_overtaken_provisioning_does_not_fail_on_a_device_the_later_one_configures(fabric):
    """A device disabled while the earlier provisioning ran settled untouched: that is the later provisioning's
    to fail on (or to configure, once enabled again), not the earlier one's, which is superseded."""
    seg = services.segment_create(owner="cluster:1", hosts=three_sites(fabric)[:1], gateway=False)
    first = workflows.provision(seg.pk)
    Host.objects.filter(name="brno1").update(enabled=False)
    services.segment_set_hosts(segment=seg, hosts=three_sites(fabric)[:2])
    result = first.apply().get()
    assert result["superseded"] is True, result
    seg.refresh_from_db()
    assert seg.state == Segment.State.PENDING  # not FAILED: no rollback


def test_an_overtaken_provisioning_of_a_closed_segment_still_maps_its_vlan_to_the_gateways(fabric):
    """The later provisioning may never finish (its cluster's deadline ends it): the VLAN a closed segment has
    on the gateway trunks since the earlier one is marked as mapped all the same (it waits for the gateways
    before reuse)."""
    seg = services.segment_create(owner="cluster:1", hosts=three_sites(fabric)[:1], gateway=True)
    first = workflows.provision(seg.pk)
    services.segment_set_hosts(segment=seg, hosts=three_sites(fabric)[:2])
    workflows.provision(seg.pk)  # (never run)
    assert first.apply().get()["superseded"] is True
    assert VlanAllocation.objects.get(pk=seg.allocation_id).gateway_mapped


def _place_workers(fabric) -> None:
    """pilsen has a site worker; the prague switch a worker of its own; prague2 an agent; brno nothing."""
    pilsen = fabric.switches["pilsen"].site
    pilsen.worker_queue = "site.pilsen"
    pilsen.save(update_fields=["worker_queue"])
    Switch.objects.filter(name="sw-prague").update(worker_queue="switch.sw-prague")
    Host.objects.filter(name="prague2").update(agent_queue="host.prague2")


def test_each_device_task_goes_to_the_worker_that_reaches_it(fabric, monkeypatch):
    """A switch's task goes to its own worker queue, else its site's; a host's to its agent, else its site's
    worker; else the central worker — for provisioning, teardown and the periodic reconciler."""
    from network import tasks

    _place_workers(fabric)
    monkeypatch.setattr(workflows, "chain", lambda *steps: list(steps))
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    canvas = workflows.provision(seg.pk, compensate_on_error=False)
    c = {c.device: c.pk for c in DeviceChange.objects.filter(segment=seg)}
    assert _links(canvas) == [
        [
            ("network.converge_devices", [[c["sw-brno"]]], {}, ""),
            ("network.converge_devices", [[c["sw-pilsen"]]], {}, "site.pilsen"),
            ("network.converge_devices", [[c["sw-prague"]]], {}, "switch.sw-prague"),
        ],
        ("network.segment_step", [seg.pk, "switches"], {}, ""),
        [
            ("network.converge_devices", [[c["brno1"]]], {}, ""),
            ("network.converge_devices", [[c["pilsen1"]]], {}, "site.pilsen"),
            ("network.converge_devices", [[c["prague2"]]], {}, "host.prague2"),
        ],
        ("network.segment_provisioned", [seg.pk, 0], {}, ""),
    ]
    sent = []
    monkeypatch.setattr(tasks.reconcile_device, "apply_async", lambda args, **options: sent.append((args, options)))
    tasks.reconcile.apply(kwargs={"repair": False}).get()
    queues = {
        (Switch if kind == "switch" else Host).objects.get(pk=pk).name: options.get("queue", "")
        for (kind, pk, _repair, _actor), options in sent
    }
    assert queues == {
        "sw-brno": "",
        "sw-pilsen": "site.pilsen",
        "sw-prague": "switch.sw-prague",
        **{f"brno{i}": "" for i in (1, 2)},
        **{f"pilsen{i}": "site.pilsen" for i in (1, 2)},
        "prague1": "",
        "prague2": "host.prague2",
    }


def test_the_one_change_task_retries_temporary_errors(fabric):
    from network import tasks

    fabric.set_switch_args("sw-pilsen", fail_times=2)
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["pilsen1"]], gateway=False)
    change = convergence.change_create(device=fabric.switches["pilsen"], segment=seg, cause="one")
    assert tasks.converge_switch.si(change.pk).apply().get()["status"] == "ok"
    change.refresh_from_db()
    assert change.attempts == 3 and fabric.switch_ports("sw-pilsen")["h1"] == {seg.vid}


@contextlib.contextmanager
def lock_held_elsewhere(device, seconds: float):
    """Another worker holds ``device``'s lock (its own database connection, in a thread) for ``seconds``."""
    held = threading.Event()

    def hold():
        try:
            with convergence.device_lock(DeviceKind.SWITCH, device.pk, wait=5):
                held.set()
                time.sleep(seconds)
        finally:
            connections["default"].close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(5)
    try:
        yield
    finally:
        thread.join()


def test_a_device_disabled_while_its_change_waits_for_the_lock_is_not_touched(fabric, monkeypatch):
    """The switch is disabled for maintenance while the task waits for its lock (another operation holds
    it): once the lock is free its change settles untouched, and the switch gets no commit."""
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    change = convergence.change_create(device=fabric.switches["brno"], segment=seg, cause="provision c")
    real, tries = convergence._lock_devices, []

    def busy_then_free(keys):
        tries.append(keys)
        if len(tries) == 1:  # held elsewhere; meanwhile an admin disables the switch
            Switch.objects.filter(name="sw-brno").update(enabled=False)
            return [], lambda: None
        return real(keys)

    monkeypatch.setattr(convergence, "_lock_devices", busy_then_free)
    outcome = convergence.converge_changes([change.pk])
    assert len(tries) == 2 and outcome.changes[change.pk].error == DeviceChange.NOT_TOUCHED
    assert not fabric.switch_state("sw-brno").get("sessions") and not any(fabric.switch_ports("sw-brno").values())


def test_a_layer_converges_the_free_devices_while_a_locked_one_waits(fabric):
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    switches, _hosts = selectors.segment_devices(seg)
    ids = convergence.changes_create(devices=switches, segment=seg, cause="provision c")
    with lock_held_elsewhere(fabric.switches["brno"], 0.5):
        started = time.time()
        outcome = convergence.converge_changes(ids)
    assert [c.status for c in outcome.changes.values()] == ["ok"] * 3 and not outcome.temporary
    ((brno_start, _end),) = fabric.switch_state("sw-brno")["sessions"]
    assert brno_start >= started + 0.45  # waited for the lock ...
    for name in ("sw-pilsen", "sw-prague"):  # ... while the others did not
        ((_start, end),) = fabric.switch_state(name)["sessions"]
        assert end < started + 0.45
    switches_only = lambda view: {k: v for k, v in view.items() if k.startswith("sw-")}  # noqa: E731
    assert switches_only(device_view(fabric)) == switches_only(desired_view(fabric))


def test_a_device_locked_past_the_wait_is_a_temporary_error_of_its_change_only(fabric):
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    switches, _hosts = selectors.segment_devices(seg)
    ids = convergence.changes_create(devices=switches, segment=seg, cause="provision c")
    with lock_held_elsewhere(fabric.switches["brno"], 0.5):
        outcome = convergence.converge_changes(ids, wait=0.1)
    statuses = {c.device: c.status for c in outcome.changes.values()}
    assert statuses == {"sw-brno": "pending", "sw-pilsen": "ok", "sw-prague": "ok"}
    ((change_id, error),) = outcome.temporary.items()
    assert outcome.changes[change_id].device == "sw-brno" and "holds the device lock" in error.message
    assert not outcome.failed and not fabric.switch_state("sw-brno")["sessions"]
    # the retry (the task's, after its backoff) finishes it
    assert convergence.converge_changes(ids).changes[change_id].status == "ok"


def test_an_interrupted_layer_leaves_no_change_running_and_no_lock_held(fabric, monkeypatch):
    """The task's time limit (or a shutdown) lands while the sessions run: the devices that finished keep
    their outcome, the others are failed with the reason, nothing stays "running", the locks are free."""
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    switches, _hosts = selectors.segment_devices(seg)
    ids = convergence.changes_create(devices=switches, segment=seg, cause="provision c")
    real = convergence._drive
    others_done = threading.Barrier(3)  # the interruption lands once the two other sessions are over

    def drive(w):
        if w.device.name == "sw-pilsen":
            others_done.wait(timeout=10)
            raise KeyboardInterrupt  # a BaseException: what a time limit or a signal looks like here
        real(w)
        others_done.wait(timeout=10)

    monkeypatch.setattr(convergence, "_drive", drive)
    with pytest.raises(KeyboardInterrupt):
        convergence.converge_changes(ids)
    rows = {c.device: c for c in DeviceChange.objects.filter(pk__in=ids)}
    assert rows["sw-pilsen"].status == "failed" and rows["sw-pilsen"].error == "interrupted: KeyboardInterrupt"
    assert rows["sw-brno"].status == rows["sw-prague"].status == "ok"  # finished first: their outcome stays
    assert not DeviceChange.objects.filter(pk__in=ids, status__in=["pending", "running"]).exists()

    def free_elsewhere() -> list[bool]:  # another connection can take every switch's lock at once
        try:
            found = []
            for switch in switches:
                with convergence.device_lock(DeviceKind.SWITCH, switch.pk, wait=0) as held:
                    found.append(held)
            return found
        finally:
            connections["default"].close()

    with ThreadPoolExecutor(max_workers=1) as other:
        assert other.submit(free_elsewhere).result() == [True, True, True]
    monkeypatch.undo()
    again = convergence.changes_create(devices=switches, segment=seg, cause="retry")
    assert [c.status for c in convergence.converge_changes(again).changes.values()] == ["noop", "ok", "noop"]


def test_an_interrupted_layer_waits_for_its_running_sessions_before_releasing_the_locks(fabric, monkeypatch):
    """The layer's sessions run on threads kept between layers. When one is interrupted, the others that are
    still running finish (and keep their outcome) before ``converge_changes`` raises and frees the device
    locks: no session goes on unsupervised against a device another task may now lock."""
    seg = services.segment_create(owner="c", hosts=three_sites(fabric), gateway=False)
    switches, _hosts = selectors.segment_devices(seg)
    ids = convergence.changes_create(devices=switches, segment=seg, cause="provision c")
    real = convergence._drive
    finished = []

    def drive(w):
        if w.device.name == "sw-pilsen":
            raise KeyboardInterrupt
        time.sleep(0.3)  # still running when the interruption reaches the layer
        real(w)
        finished.append(w.device.name)

    monkeypatch.setattr(convergence, "_drive", drive)
    with pytest.raises(KeyboardInterrupt):
        convergence.converge_changes(ids)
    assert sorted(finished) == ["sw-brno", "sw-prague"]
    rows = {c.device: c for c in DeviceChange.objects.filter(pk__in=ids)}
    assert rows["sw-brno"].status == rows["sw-prague"].status == "ok"
    assert rows["sw-pilsen"].status == "failed" and rows["sw-pilsen"].error == "interrupted: KeyboardInterrupt"


# --- against the netns lab (Open vSwitch switches and hosts, QinQ core), for real ------------------------------


def lab_view(lab, inventory) -> dict:
    """What the lab's devices carry, read through the drivers: switch → owned port → VLANs (non-empty only),
    host → VLANs."""
    from network.drivers import host_session, switch_session

    view = {}
    for name in inventory["switches"]:
        with switch_session(lab.switch_spec(name)) as session:
            view[name] = {p: v for p, v in session.port_vlans().items() if v}
    for name in inventory["hosts"]:
        with host_session(lab.host_spec(name)) as session:
            view[name] = session.vlans()
    return view


def lab_desired(inventory) -> dict:
    names = {s.pk: n for n, s in inventory["switches"].items()}
    hosts = {h.pk: n for n, h in inventory["hosts"].items()}
    view = {names[pk]: {p: v for p, v in ports.items() if v} for pk, ports in selectors.switch_desired().items()}
    view.update({hosts[pk]: vids for pk, vids in selectors.host_desired().items()})
    return view


@pytest.fixture
def lab_inventory(clean_lab, db):
    from network.tests.labinventory import inventory_for

    return inventory_for(clean_lab)


@pytest.mark.lab
def test_lab_converge_three_sites_then_remove_leaves_nothing(clean_lab, lab_inventory):
    from network.lab import ping

    lab, hosts = clean_lab, lab_inventory["hosts"]
    seg = services.segment_create(
        owner="cluster:lab", hosts=[hosts["h-s1-1"], hosts["h-s2-1"], hosts["h-s3-2"]], gateway=True
    )
    workflows.provision(seg.pk).apply().get()
    v = frozenset({seg.vid})
    view = lab_view(lab, lab_inventory)
    assert view == lab_desired(lab_inventory)
    assert view["sw-s1"] == {"p-h1": v, "up": v, "gw": v}
    assert view["sw-s3"] == {"p-h2": v, "up": v}
    assert view["h-s2-1"] == v and view["h-s2-2"] == frozenset()
    # The promise, with packets: two VMs of the cluster at different sites reach each other over the core.
    lab.attach_vm("h-s1-1", seg.vid, "vm-a", "198.18.10.1/24")
    lab.attach_vm("h-s3-2", seg.vid, "vm-b", "198.18.10.2/24")
    assert ping(lab, "vm-a", "198.18.10.2", count=2, timeout=2)
    lab.detach_vm("vm-a")
    lab.detach_vm("vm-b")

    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    assert all(not v for v in lab_view(lab, lab_inventory).values())
    seg.refresh_from_db()
    assert seg.state == Segment.State.CLOSED and seg.allocation.state == VlanAllocation.State.QUARANTINED


@pytest.mark.lab
@pytest.mark.parametrize("k", [0, 1, 2])
def test_lab_switch_k_rejecting_the_change_rolls_every_switch_back(clean_lab, lab_inventory, k):
    lab, hosts = clean_lab, lab_inventory["hosts"]
    other = services.segment_create(owner="other", hosts=[hosts["h-s1-2"], hosts["h-s2-2"]], gateway=False)
    workflows.provision(other.pk).apply().get()
    before = lab_view(lab, lab_inventory)
    # Fault: on switch k the uplink now maps to an OVS port that does not exist, so the switch rejects the
    # candidate with its own message (what a vendor switch does with an unknown interface).
    name = f"sw-s{k + 1}"
    switch = lab_inventory["switches"][name]
    switch.driver_args = {**switch.driver_args, "port_map": {**switch.driver_args["port_map"], "up": "nosuchport"}}
    switch.save()
    seg = services.segment_create(owner="new", hosts=[hosts["h-s1-1"], hosts["h-s2-1"], hosts["h-s3-1"]], gateway=False)
    with pytest.raises(DeviceChangeFailed) as exc:
        workflows.provision(seg.pk).apply().get()
    assert exc.value.device == name
    seg.refresh_from_db()
    assert seg.state == Segment.State.FAILED and seg.allocation.state == VlanAllocation.State.QUARANTINED
    assert seg.error == f"{name}: no port up on this switch"  # the device's own message
    failed = DeviceChange.objects.get(segment=seg, device=name, cause="provision new")
    assert failed.status == "failed" and failed.error == "no port up on this switch"
    assert lab_view(lab, lab_inventory) == before


@pytest.mark.lab
def test_lab_a_disabled_switch_keeps_the_vlan_out_of_the_pool_until_it_is_cleaned(clean_lab, lab_inventory):
    """On the lab's Open vSwitch switches: a switch disabled while it carries a cluster's VLAN keeps it through
    the teardown (nothing touches a disabled device), so the id stays allocated (no other owner can get
    it, not even after the quarantine); once the switch is enabled again the periodic retry cleans it and
    the VLAN is released."""
    from network import tasks

    lab, hosts = clean_lab, lab_inventory["hosts"]
    seg = services.segment_create(owner="held", hosts=[hosts["h-s1-1"], hosts["h-s2-1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    v = frozenset({seg.vid})
    Switch.objects.filter(name="sw-s2").update(enabled=False)
    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    seg.refresh_from_db()
    assert seg.state == Segment.State.CLOSED and seg.allocation.state == VlanAllocation.State.ALLOCATED
    assert "switch sw-s2 disabled" in seg.error
    view = lab_view(lab, lab_inventory)
    assert view["sw-s2"] == {"p-h1": v, "up": v}  # what the real switch still carries
    assert all(not vlans for name, vlans in view.items() if name != "sw-s2")

    Switch.objects.filter(name="sw-s2").update(enabled=True)
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    seg.refresh_from_db()
    assert seg.allocation.state == VlanAllocation.State.QUARANTINED and seg.error == ""
    assert lab_view(lab, lab_inventory)["sw-s2"] == {}


# --- on a real Celery worker --------------------------------------------------------------------------------------


@pytest.fixture
def worker_fabric(transactional_db, tmp_path):
    from network.tests.fakefabric import build_fabric

    return build_fabric(tmp_path / "devices")


@pytest.mark.worker
def test_worker_runs_the_canvas_as_the_clusters_app_composes_it(worker_fabric, celery_worker):
    from celery import chain

    from network import tasks

    fabric = worker_fabric
    seg = services.segment_create(owner="cluster:w", hosts=three_sites(fabric), gateway=True)
    caller_next = tasks.segment_step.si(seg.pk, "clusters-ready")  # stands for the clusters app's next task
    result = chain(workflows.provision(seg.pk), caller_next).on_error(tasks.segment_step.si(seg.pk, "x")).delay()
    assert result.get(timeout=60) == {"segment": seg.pk, "step": "clusters-ready"}
    assert Segment.objects.get(pk=seg.pk).state == Segment.State.ACTIVE
    assert device_view(fabric) == desired_view(fabric) and fabric.host_vlans("prague2") == {seg.vid}

    fabric.set_switch_args("sw-prague", fail_commit="permanent")
    bad = services.segment_create(owner="cluster:bad", hosts=three_sites(fabric), gateway=False)
    before = device_view(fabric)
    result = chain(workflows.provision(bad.pk), tasks.segment_step.si(bad.pk, "never")).delay()
    with pytest.raises(DeviceChangeFailed) as exc:  # rebuilt from the result backend with device and message
        result.get(timeout=60)
    assert exc.value.device == "sw-prague" and "Invalid input detected" in exc.value.message
    wait_for(lambda: Segment.objects.get(pk=bad.pk).state == Segment.State.FAILED, what="compensation")
    bad.refresh_from_db()
    assert bad.allocation.state == VlanAllocation.State.QUARANTINED
    assert device_view(fabric) == before


@pytest.mark.worker
def test_worker_runs_layers_split_into_chunks_as_chords(worker_fabric, celery_worker, settings):
    """More devices than ``DEVICE_BATCH_SIZE``: each layer is a group of tasks joined before the next layer
    (a chord on the Redis backend), for provisioning and teardown, and a failing chunk still compensates."""
    fabric = worker_fabric
    settings.DEVICE_BATCH_SIZE = 1  # the canvas is built here, by the caller
    seg = services.segment_create(owner="cluster:chunks", hosts=three_sites(fabric), gateway=True)
    assert workflows.provision(seg.pk).delay().get(timeout=60)["state"] == "active"
    assert device_view(fabric) == desired_view(fabric) and fabric.host_vlans("prague2") == {seg.vid}
    services.segment_delete(segment=seg)
    assert workflows.teardown(seg.pk).delay().get(timeout=60)["state"] == "closed"
    assert all(not ports for ports in device_view(fabric).values())

    fabric.set_switch_args("sw-pilsen", fail_commit="permanent")
    bad = services.segment_create(owner="cluster:chunks-bad", hosts=three_sites(fabric), gateway=False)
    with pytest.raises(DeviceChangeFailed) as exc:
        workflows.provision(bad.pk).delay().get(timeout=60)
    assert exc.value.device == "sw-pilsen"
    wait_for(lambda: Segment.objects.get(pk=bad.pk).state == Segment.State.FAILED, what="compensation")
    assert all(not ports for ports in device_view(fabric).values())


@pytest.mark.worker
def test_worker_a_held_vlan_whose_teardown_fails_again_is_held_with_why_and_tried_later(worker_fabric, celery_worker):
    """``retry_rollbacks`` sends the teardown of a segment held for a device that was disabled; the device is
    back but refuses the change: the segment is CLOSED again, still holding its VLAN, with the device's
    message — not DELETING for good — and the next run, with the device mended, releases it."""
    from network import tasks

    fabric = worker_fabric
    seg = _held_for_disabled(fabric, "sw-brno")
    Switch.objects.filter(name="sw-brno").update(enabled=True)
    fabric.set_switch_args("sw-brno", fail_commit="permanent")
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]  # the teardown goes to the worker
    wait_for(lambda: Segment.objects.get(pk=seg.pk).state == Segment.State.CLOSED, what="the failed teardown")
    seg.refresh_from_db()
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED and seg.allocation.owner == "c"
    assert seg.error.startswith("VLAN kept: teardown failed again (sw-brno: ") and "Invalid input" in seg.error
    assert services.segments_holding_vlan().get() == seg

    fabric.set_switch_args("sw-brno")
    assert tasks.retry_rollbacks.apply().get() == [seg.pk]
    wait_for(
        lambda: VlanAllocation.objects.get(pk=seg.allocation_id).state == VlanAllocation.State.QUARANTINED,
        what="the teardown sent again",
    )
    assert all(not ports for ports in device_view(fabric).values())


@pytest.mark.worker
def test_worker_an_error_callback_in_a_host_agent_is_run_by_the_central_worker(worker_fabric, celery_worker, tmp_path):
    """A host that only its agent reaches refuses the teardown ``retry_rollbacks`` sends again: Celery runs the
    teardown's error callback in the agent, whose database role may not write the segment; the agent hands it
    on, and the central worker records why the VLAN is still held."""
    from network import tasks
    from portal.testing_celery import WorkerProcess

    fabric = worker_fabric
    seg = _held_for_disabled(fabric, "brno1", Host)  # brno1 still carries the VLAN
    # the hosts' layer one task, on the agent's queue (a layer on several queues is a chord, whose error
    # callback runs in whichever worker ends it last)
    Host.objects.update(agent_queue="host.brno1")
    Host.objects.filter(name="brno1").update(
        enabled=True, driver_args={**fabric.args, "reachable_from": "agent-brno1", "fail_commit": "permanent"}
    )
    keys = {"SECRET_KEY": "", "SECRETS_KEY": "", "ACCESS_CA_PASSPHRASE": ""}
    env = {**celery_worker.env, "VIRTCLOUD_WORKER": "agent-brno1", "PORTAL_ROLE": "agent", **keys}
    agent = WorkerProcess(env, tmp_path / "agent.log", queues=["host.brno1"], concurrency=2, name="agent-brno1")
    agent.start()
    try:
        assert tasks.retry_rollbacks.apply().get() == [seg.pk]
        wait_for(lambda: Segment.objects.get(pk=seg.pk).state == Segment.State.CLOSED, what="the failed teardown")
    finally:
        agent.stop()
    seg.refresh_from_db()
    assert seg.error.startswith("VLAN kept: teardown failed again (brno1: ") and "ip link add" in seg.error, seg.error
    assert seg.allocation.state == VlanAllocation.State.ALLOCATED
    # handed on: a task the central worker received (run inline in the agent, it would be no task of its own)
    assert "Task network.segment_release_failed[" in celery_worker.log()


@pytest.mark.worker
def test_worker_killed_mid_convergence_the_work_completes_after_restart(worker_fabric, celery_worker):
    fabric = worker_fabric
    # The worker must hand a killed worker's message on within seconds (Redis visibility timeout).
    celery_worker.stop()
    celery_worker.env["DJANGO_SETTINGS_MODULE"] = "network.tests.worker_settings"
    celery_worker.start()
    fabric.set_switch_args("sw-pilsen", delay=4)  # a slow switch session: the worker dies inside it
    seg = services.segment_create(owner="cluster:k", hosts=three_sites(fabric), gateway=False)
    result = workflows.provision(seg.pk).delay()
    change = DeviceChange.objects.get(segment=seg, device="sw-pilsen")
    wait_for(lambda: DeviceChange.objects.get(pk=change.pk).status == "running", what="the switch session")
    celery_worker.kill()
    assert DeviceChange.objects.get(pk=change.pk).status == "running"
    assert fabric.switch_ports("sw-pilsen") == {}
    fabric.set_switch_args("sw-pilsen", delay=0)
    celery_worker.start()
    assert result.get(timeout=90)["state"] == "active"
    change.refresh_from_db()
    assert change.status == "ok" and change.attempts >= 2  # claimed again by the redelivered task
    assert change.orphaned == 1  # found running once: the killed worker's
    assert device_view(fabric) == desired_view(fabric)
    assert fabric.switch_ports("sw-pilsen")["h1"] == {seg.vid}


@pytest.mark.worker
def test_worker_a_rollback_whose_host_times_out_on_every_retry_still_rolls_the_switches_back(
    worker_fabric, celery_worker, monkeypatch
):
    """Every device on the central worker (no agents): a rollback meets host pilsen1 timing out on every
    attempt. Each attempt is a task of its own: after its retries the host's change fails, the switches are
    rolled back and the segment is FAILED, naming the host that may still carry the VLAN. (The rollback ran
    inline in ONE task, whose soft time limit the host's attempts used up before the switches: they kept the
    VLAN, and the segment stayed rolling back.)"""
    from network import tasks

    fabric = worker_fabric
    celery_worker.stop()
    celery_worker.env.update(
        CELERY_TASK_SOFT_TIME_LIMIT="5",
        CELERY_TASK_TIME_LIMIT="20",
        DEVICE_TIMEOUT="3",  # (below the soft limit, or the worker refuses to start)
        DEVICE_RETRY_MAX="3",
        DEVICE_RETRY_BACKOFF="0.1",
    )
    celery_worker.pool, celery_worker.concurrency = "prefork", 2  # (a threads pool enforces no time limit)
    celery_worker.start()
    for task in (tasks.segment_compensate, tasks.converge_devices):  # a task's limits travel with its message
        monkeypatch.setattr(task, "soft_time_limit", 5)
        monkeypatch.setattr(task, "time_limit", 20)
    seg = services.segment_create(owner="cluster:slow", hosts=three_sites(fabric), gateway=False)
    assert workflows.provision(seg.pk).delay().get(timeout=60)["state"] == "active"
    host = Host.objects.get(name="pilsen1")
    host.driver_args = {**fabric.args, "delay": 1.6, "fail_times": 100}  # busy on each of 4 attempts: 6.4 s and more
    host.save(update_fields=["driver_args"])
    workflows.compensate(seg.pk).delay()
    wait_for(lambda: Segment.objects.get(pk=seg.pk).state == Segment.State.FAILED, what="the rollback", timeout=60)
    seg.refresh_from_db()
    assert seg.error.split(selectors.NOT_ROLLED_BACK)[-1].startswith("pilsen1: ")
    rollback = DeviceChange.objects.filter(segment=seg, cause="compensate cluster:slow")
    assert {c.device: c.status for c in rollback} == {
        "sw-brno": "ok",
        "sw-pilsen": "ok",
        "sw-prague": "ok",
        "brno1": "ok",
        "pilsen1": "failed",
        "prague2": "ok",
    }
    assert rollback.get(device="pilsen1").attempts == 4
    assert all(not vids for name in fabric.switches for vids in fabric.switch_ports(name).values())


@pytest.mark.worker
def test_worker_on_the_demo_defaults_filesystem_broker_and_django_db_results(worker_fabric, tmp_path):
    """The embedded default (kombu filesystem transport, django-db results, chords through chord_unlock)."""
    import json
    import os
    import subprocess
    import sys

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("needs the PostgreSQL test database (a worker process cannot see an in-memory SQLite one)")
    settings_dict = connection.settings_dict
    db_url = (
        f"postgres://{settings_dict['USER']}@{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}/"
    )
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings_test",
        DATABASE_URL=db_url + settings_dict["NAME"],
        CELERY_TASK_ALWAYS_EAGER="false",
        CELERY_BROKER_URL="filesystem://localhost/",
        CELERY_RESULT_BACKEND="django-db",
        DATA_DIR=str(tmp_path / "data"),
    )
    fabric = worker_fabric
    seg = services.segment_create(owner="cluster:fs", hosts=three_sites(fabric), gateway=False)
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "portal.testing_celery", "worker", "--pool=threads", "-c", "4"]
        + ["--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"fs-{os.getpid()}@localhost"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        code = (
            "import json; from network import workflows; "
            f"print(json.dumps(workflows.provision({seg.pk}).delay().get(timeout=90)))"
        )
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["state"] == "active"
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert device_view(fabric) == desired_view(fabric)


def test_closing_a_public_segment_puts_it_on_the_gateway_trunk(fabric):
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["prague1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    assert fabric.switch_ports("sw-brno") == {}
    services.segment_set_gateway(segment=seg, gateway=True)
    assert seg.state == Segment.State.PENDING
    workflows.provision(seg.pk).apply().get()
    v = frozenset({seg.vid})
    assert fabric.switch_ports("sw-brno") == {"h1": NONE, "h2": NONE, "uplink": v, "gw": v}
    assert fabric.switch_ports("sw-prague")["uplink"] == v
    services.segment_set_gateway(segment=seg, gateway=False)
    workflows.provision(seg.pk).apply().get()
    assert fabric.switch_ports("sw-brno") == {"h1": NONE, "h2": NONE, "uplink": NONE, "gw": NONE}
    assert fabric.switch_ports("sw-prague") == {"h1": v, "h2": NONE, "uplink": NONE}


@pytest.mark.worker
def test_worker_rollback_reaches_each_device_through_its_own_worker(worker_fabric, celery_worker, tmp_path):
    """A host that only its agent reaches (``reachable_from``): when another host fails for good, the
    rollback converges it through the agent's queue too — the central worker, which runs the rest, cannot
    reach it — so nothing is left on it and the VLAN goes back to the pool."""
    from celery import chain

    from network import tasks
    from portal.testing_celery import WorkerProcess

    fabric = worker_fabric
    Host.objects.filter(name="brno1").update(
        agent_queue="host.brno1", driver_args={**fabric.args, "reachable_from": "agent-brno1"}
    )
    Host.objects.filter(name="pilsen1").update(driver_args={**fabric.args, "fail_commit": "permanent"})
    # the agent as on a hypervisor: none of the portal's keys (settings_test fills in only what is absent)
    keys = {"SECRET_KEY": "", "SECRETS_KEY": "", "ACCESS_CA_PASSPHRASE": ""}
    env = {**celery_worker.env, "VIRTCLOUD_WORKER": "agent-brno1", "PORTAL_ROLE": "agent", **keys}
    agent = WorkerProcess(env, tmp_path / "agent.log", queues=["host.brno1"], concurrency=2, name="agent-brno1")
    agent.start()
    try:
        # on the test database's own role: the agent says so when it starts (network.agentdb)
        log = (tmp_path / "agent.log").read_text()
        assert "which is not restricted to an agent's privileges: it is a superuser" in log, log[-2000:]
        seg = services.segment_create(owner="cluster:agents", hosts=three_sites(fabric), gateway=False)
        with pytest.raises(DeviceChangeFailed) as exc:
            workflows.provision(seg.pk).delay().get(timeout=60)
        assert exc.value.device == "pilsen1"
        wait_for(lambda: Segment.objects.get(pk=seg.pk).state == Segment.State.FAILED, what="compensation")
        # as the clusters app runs it: the caller's next task follows the whole routed rollback
        other = services.segment_create(owner="cluster:agents-2", hosts=[fabric.hosts["brno1"]], gateway=False)
        after = tasks.segment_step.si(other.pk, "after the rollback")
        assert chain(workflows.compensate(other.pk), after).delay().get(timeout=60)["step"] == "after the rollback"
        assert Segment.objects.get(pk=other.pk).state == Segment.State.FAILED
        # the dry run too: asked of the agent (here the host cannot be reached), and a queue nobody
        # consumes is an error row after the timeout, not a failed plan
        brno1 = Host.objects.select_related("site").get(name="brno1")
        assert "reachable from worker agent-brno1 only" in tasks.plan_device("host", brno1.pk)["error"]
        Host.objects.filter(name="prague2").update(agent_queue="host.nobody")
        assert tasks.plan_devices("host", [brno1], timeout=30) == [{"device": "brno1", "diff": "", "error": ""}]
        prague2 = Host.objects.select_related("site").get(name="prague2")
        assert tasks.plan_devices("host", [prague2], timeout=1) == [
            {"device": "prague2", "diff": "", "error": "no answer from a worker of queue host.nobody in 1 s"}
        ]
        from io import StringIO

        from django.core.management import call_command
        from django.core.management.base import CommandError

        from network.tests import fakes

        # so is ``manage.py network reconcile``: a VLAN put on brno1 by hand is found and removed by the agent
        # (here it would be a "reachable from" error), and a queue nobody consumes fails the command, naming it
        state = fakes.load(fabric.args, "host", "brno1")
        fakes.save(fabric.args, "host", "brno1", {**state, "vlans": [777]})
        out = StringIO()
        call_command("network", "reconcile", "--host", "brno1", stdout=out)
        assert out.getvalue() == "host brno1: drift brno1 foreign VLAN 777 (repaired)\n", out.getvalue()
        assert fabric.host_vlans("brno1") == frozenset()
        repairs = DeviceChange.objects.filter(device="brno1", cause__startswith="reconcile")
        assert list(repairs.values_list("status", "diff")) == [("ok", "- br-v777")]
        err = StringIO()
        with pytest.raises(CommandError, match=r"1 device\(s\) could not be reached or changed"):
            call_command("network", "reconcile", "--host", "prague2", "--timeout", "1", stdout=out, stderr=err)
        assert err.getvalue() == "host prague2: ERROR no answer from a worker of queue host.nobody in 1 s\n"
    finally:
        agent.stop()
    seg.refresh_from_db()
    assert seg.error.startswith("pilsen1: ip link add") and "not rolled back" not in seg.error, seg.error
    assert VlanAllocation.objects.get(pk=seg.allocation_id).state == VlanAllocation.State.QUARANTINED
    rollback = DeviceChange.objects.get(segment=seg, device="brno1", cause="compensate cluster:agents")
    assert (rollback.status, rollback.error) in (("ok", ""), ("noop", "")), (rollback.status, rollback.error)
    assert fabric.host_vlans("brno1") == frozenset()
    assert all(not ports for ports in device_view(fabric).values())


@pytest.mark.worker
def test_worker_network_workers_names_the_queues_nobody_consumes(worker_fabric, celery_worker, capsys):
    """``manage.py network workers`` asks the running workers: every device queue with its consumers, and
    an error (exit 1) naming the queue that has none."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    fabric = worker_fabric
    call_command("network", "workers")  # every device on the central worker's queue, which the worker consumes
    out = capsys.readouterr().out
    assert out.startswith("celery: test-") and "switch sw-brno" in out and "NO WORKER" not in out
    site = fabric.switches["pilsen"].site
    site.worker_queue = "site.pilsen"
    site.save(update_fields=["worker_queue"])
    with pytest.raises(CommandError, match=r"no worker answered for queue\(s\) site.pilsen within 2 s"):
        call_command("network", "workers")
    lines = capsys.readouterr().out.splitlines()
    assert "site.pilsen: NO WORKER — switch sw-pilsen, host pilsen1, host pilsen2" in lines, lines

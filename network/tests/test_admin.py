"""Django admin for the inventory: every page works, secrets are write-only, list pages stay cheap."""

import logging

import pytest
from django.db import connection, connections
from django.urls import reverse

from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool
from network.tests.factories import HostFactory, SwitchFactory, SwitchPortFactory
from network.tests.test_topology import DEMO
from network.topology import load_topology, topology_import
from portal.models import AuditEntry
from portal.secrets import MASK

pytestmark = pytest.mark.django_db

MODELS = [Site, CoreTransport, Switch, SwitchPort, Host, VlanPool]


@pytest.fixture
def demo(db):
    data, lines = load_topology(DEMO.read_text())
    return topology_import(data=data, source="demo", lines=lines)


@pytest.fixture
def admin_client(client, root):
    client.force_login(root)
    return client


def raw_password(switch) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM network_switch WHERE id = %s", [switch.pk])
        return cursor.fetchone()[0]


def switch_form(switch, **changes) -> dict:
    """The admin change form of a switch without ports, as a browser would post it."""
    data = {
        "name": switch.name,
        "site": switch.site_id,
        "platform": switch.platform,
        "address": switch.address,
        "username": switch.username,
        "password": "",
        "driver_args": "{}",
        "enabled": "on",
        "description": switch.description,
        "ports-TOTAL_FORMS": "0",
        "ports-INITIAL_FORMS": "0",
        "ports-MIN_NUM_FORMS": "0",
        "ports-MAX_NUM_FORMS": "1000",
        "_save": "Save",
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_list_add_and_change_pages_work(admin_client, demo, model):
    opts = model._meta
    changelist = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count == model.objects.count() > 0
    assert admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_add")).status_code == 200
    obj = model.objects.first()
    change = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk]))
    assert change.status_code == 200
    assert str(obj) in change.content.decode()


def test_list_filters_and_search(admin_client, demo):
    url = reverse("admin:network_host_changelist")
    brno = Site.objects.get(name="brno")
    response = admin_client.get(url, {"site__id__exact": brno.pk})
    assert sorted(h.name for h in response.context["cl"].result_list) == ["brno-h1", "brno-h2"]
    response = admin_client.get(url, {"q": "pilsen-sw"})
    assert sorted(h.name for h in response.context["cl"].result_list) == ["pilsen-h1", "pilsen-h2"]
    response = admin_client.get(reverse("admin:network_switchport_changelist"), {"role__exact": "core_uplink"})
    assert response.context["cl"].result_count == 3


def test_lists_show_the_worker_queue_of_each_device(admin_client, demo):
    """The queue a device's work goes to: its own, its site's worker, or the central worker's."""
    Site.objects.filter(name="brno").update(worker_queue="site.brno")
    switches = admin_client.get(reverse("admin:network_switch_changelist")).content.decode()
    assert "site.brno" in switches and "celery (central)" in switches
    Host.objects.filter(name="brno-h2").update(agent_queue="")
    hosts = admin_client.get(reverse("admin:network_host_changelist"), {"q": "brno"}).content.decode()
    assert "host.brno-h1" in hosts and "site.brno" in hosts  # brno-h1: its agent; brno-h2: its site's worker


def test_switch_page_shows_ports_inline(admin_client, demo):
    switch = Switch.objects.get(name="brno-sw")
    page = admin_client.get(reverse("admin:network_switch_change", args=[switch.pk])).content.decode()
    assert 'name="ports-TOTAL_FORMS" value="4"' in page
    assert "gateway_trunk" in page


def test_switch_page_fits_the_screen_no_icons_beside_each_ports_core(admin_client, demo):
    """At 1280px: each port row's core picker has no add/change/delete/view icons (the switch's site has)."""
    switch = Switch.objects.get(name="brno-sw")
    page = admin_client.get(reverse("admin:network_switch_change", args=[switch.pk])).content.decode()
    assert 'id="id_ports-0-core"' in page
    assert 'id="add_id_ports-0-core"' not in page and 'id="change_id_ports-0-core"' not in page
    assert 'id="view_id_ports-0-core"' not in page and 'id="delete_id_ports-0-core"' not in page
    assert 'id="add_id_site"' in page
    listing = admin_client.get(reverse("admin:network_switch_changelist")).content.decode()
    assert "column-port_count" in listing and "column-platform" not in listing


def test_switch_change_page_never_shows_the_password(admin_client):
    switch = SwitchFactory(name="sw", password="do-not-show-me")
    page = admin_client.get(reverse("admin:network_switch_change", args=[switch.pk])).content.decode()
    assert "do-not-show-me" not in page
    assert raw_password(switch) not in page
    assert 'name="password"' in page and 'type="password"' in page
    listing = admin_client.get(reverse("admin:network_switch_changelist")).content.decode()
    assert "do-not-show-me" not in listing and raw_password(switch) not in listing


def test_a_new_switch_refused_for_another_field_keeps_the_password_typed(admin_client):
    """Adding a switch with a password and a mistake elsewhere: the page came back with the password box empty,
    and the corrected form saved the switch without a password (convergence failed on authentication later)."""
    from network.tests.factories import SiteFactory

    site = SiteFactory(name="brno")
    new = SwitchFactory.build(name="sw-new", site=site, platform="ios", address="198.18.0.9", username="netops")
    form = switch_form(new, password="typed-once", driver_args="{not json")
    response = admin_client.post(reverse("admin:network_switch_add"), form)
    assert response.status_code == 200 and not Switch.objects.filter(name="sw-new").exists()
    assert 'value="typed-once"' in response.content.decode()  # (sent back in the box, as typed)
    response = admin_client.post(reverse("admin:network_switch_add"), {**form, "driver_args": "{}"})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Switch.objects.get(name="sw-new").password == "typed-once"


@pytest.mark.parametrize(
    ("driver_args", "message"),
    [
        ('{"port": NaN}', "must not hold NaN or an infinity"),
        ('{"port": Infinity}', "must not hold NaN or an infinity"),
        ("[" * 100_000 + "]" * 100_000, "Nested too deeply."),
    ],
)
def test_switch_driver_args_the_database_cannot_hold_are_the_fields_error(admin_client, driver_args, message):
    switch = SwitchFactory(name="sw", platform="ovs")
    url = reverse("admin:network_switch_change", args=[switch.pk])
    response = admin_client.post(url, switch_form(switch, driver_args=driver_args))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["driver_args"]
    assert any(message in e for e in errors), errors
    assert Switch.objects.get(pk=switch.pk).driver_args == switch.driver_args


def test_password_set_in_admin_is_stored_encrypted_and_audited_masked(admin_client):
    switch = SwitchFactory(name="sw", password="")
    url = reverse("admin:network_switch_change", args=[switch.pk])
    response = admin_client.post(url, switch_form(switch, password="new-admin-secret"))
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    stored = raw_password(switch)
    assert stored.startswith("gAAAA") and "new-admin-secret" not in stored
    assert Switch.objects.get(pk=switch.pk).password == "new-admin-secret"
    entry = AuditEntry.objects.filter(object_id=str(switch.pk), action="update").last()
    assert entry.changes == {"password": ["", MASK]} and entry.actor == "root"
    # An empty password field keeps the stored one; the box clears it.
    admin_client.post(url, switch_form(switch, description="renamed"))
    assert Switch.objects.get(pk=switch.pk).password == "new-admin-secret"
    assert Switch.objects.get(pk=switch.pk).description == "renamed"
    admin_client.post(url, switch_form(switch, clear_password="on"))
    assert Switch.objects.get(pk=switch.pk).password == ""
    assert "new-admin-secret" not in str(list(AuditEntry.objects.values_list("changes", flat=True)))


def test_admin_shows_model_validation_naming_the_object(admin_client):
    host = HostFactory(name="h1")
    gateway = SwitchPortFactory(switch=host.switch_port.switch, name="gw", role="gateway_trunk")
    response = admin_client.post(
        reverse("admin:network_host_change", args=[host.pk]),
        {
            "name": "h1",
            "site": host.site_id,
            "switch_port": gateway.pk,
            "trunk_interface": "eth0",
            "driver": "ovs",
            "driver_args": "{}",
            "agent_queue": "",
            "enabled": "on",
        },
    )
    assert response.status_code == 200
    assert "host h1: port" in response.content.decode() and "not a host trunk" in response.content.decode()


def test_switch_changelist_query_count_is_flat(admin_client, django_assert_max_num_queries):
    for index in range(30):
        switch = SwitchFactory(name=f"sw{index}")
        SwitchPortFactory.create_batch(3, switch=switch)
    # Measured 6 for 30 switches with 90 ports (session, user, counts, the page with its sites and port
    # counts, the site filter): constant, never one per switch or per port.
    with django_assert_max_num_queries(6):
        response = admin_client.get(reverse("admin:network_switch_changelist"))
    assert response.status_code == 200
    assert response.context["cl"].result_count == 30


def test_secrets_never_reach_the_logs(admin_client, caplog, monkeypatch):
    """Every log line of the changes that handle a secret: admin, topology import, audit, SQL."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    monkeypatch.setattr(connections["default"], "force_debug_cursor", True)  # log every SQL statement and its params
    monkeypatch.setenv("LOG_SWITCH_PASSWORD", "secret-from-env")
    data, _ = load_topology(DEMO.read_text())
    data["switches"][0]["password_env"] = "LOG_SWITCH_PASSWORD"
    topology_import(data=data, source="demo")
    switch = Switch.objects.get(name="brno-sw")
    admin_client.post(
        reverse("admin:network_switch_change", args=[switch.pk]),
        {
            **switch_form(switch, password="secret-from-admin", driver_args="{}"),
            "ports-TOTAL_FORMS": "0",
        },
    )
    assert Switch.objects.get(pk=switch.pk).password == "secret-from-admin"
    logging.getLogger("test").info("loaded %r", Switch.objects.get(pk=switch.pk).password)
    text = caplog.text
    assert "UPDATE" in text  # the SQL log is really captured
    assert "secret-from-env" not in text and "secret-from-admin" not in text


def test_host_port_picker_offers_only_host_trunks(admin_client, demo):
    response = admin_client.get(
        reverse("admin:autocomplete"),
        {"app_label": "network", "model_name": "host", "field_name": "switch_port", "term": "brno-sw"},
    )
    assert response.status_code == 200
    assert sorted(r["text"] for r in response.json()["results"]) == ["brno-sw:h1", "brno-sw:h2"]


def test_a_port_of_a_switch_that_may_still_carry_a_failed_clusters_vlan_is_kept(admin_client, demo):
    """A failed segment whose rollback could not clean a switch keeps its VLAN, which may still be on that
    switch's ports: deleting one is refused until the VLAN is released (the next rollback cleans owned ports
    only, then hands the id to the next cluster: the forgotten port would carry it into that one)."""
    from network import convergence, services
    from network.models import DeviceChange, Segment

    seg = services.segment_create(
        owner="cluster:1", hosts=list(Host.objects.filter(name__in=["brno-h1", "pilsen-h1"])), gateway=False
    )
    port = SwitchPort.objects.get(switch__name="brno-sw", name="core")
    change = convergence.change_create(device=port.switch, segment=seg, cause="provision")
    DeviceChange.objects.filter(pk=change.pk).update(status=DeviceChange.Status.OK)
    Segment.objects.filter(pk=seg.pk).update(state=Segment.State.FAILED)  # its rollback failed: VLAN kept
    page = admin_client.post(reverse("admin:network_switchport_delete", args=[port.pk]), {"post": "yes"})
    assert page.status_code == 200 and f"carries VLAN {seg.vid}" in page.content.decode()
    assert SwitchPort.objects.filter(pk=port.pk).exists()
    switch = port.switch
    switch.enabled = False  # disabled for maintenance: its ports still carry it, one by one they stay
    switch.save()
    page = admin_client.post(reverse("admin:network_switchport_delete", args=[port.pk]), {"post": "yes"})
    assert page.status_code == 200 and SwitchPort.objects.filter(pk=port.pk).exists()
    # a dead switch deleted whole: that is how its held VLAN is let go (the admin's and the import's deletes of
    # a switch ask this way; its hosts, which the admin protects, aside)
    from network import selectors

    assert selectors.ports_carrying([port.pk], leaving_switches=[switch.pk]) == {}
    switch.enabled = True
    switch.save()
    assert selectors.ports_carrying([port.pk], leaving_switches=[switch.pk]) == {port.pk: frozenset({seg.vid})}


def test_ports_carrying_live_vlans_and_cores_live_clusters_need_are_kept(admin_client, demo):
    """Deleting a port (its page, a switch's inline, the switch) that carries a live VLAN is refused, as is
    taking from a core a site that a live segment spans; a new switch's core uplink must enter a core that
    joins its site (the port's own check needs a saved switch)."""
    from network import services

    seg = services.segment_create(
        owner="cluster:1", hosts=list(Host.objects.filter(name__in=["brno-h1", "pilsen-h1"])), gateway=False
    )
    port = SwitchPort.objects.get(switch__name="brno-sw", name="core")
    page = admin_client.post(reverse("admin:network_switchport_delete", args=[port.pk]), {"post": "yes"})
    assert page.status_code == 200 and f"carries VLAN {seg.vid} of live clusters" in page.content.decode()
    switch = port.switch
    page = admin_client.post(reverse("admin:network_switch_delete", args=[switch.pk]), {"post": "yes"})
    assert page.status_code == 200 and SwitchPort.objects.filter(pk=port.pk).exists()
    ports = list(switch.ports.order_by("pk"))
    form = switch_form(switch, **{"ports-TOTAL_FORMS": str(len(ports)), "ports-INITIAL_FORMS": str(len(ports))})
    for i, p in enumerate(ports):
        form.update({f"ports-{i}-id": p.pk, f"ports-{i}-switch": switch.pk, f"ports-{i}-name": p.name})
        form.update({f"ports-{i}-role": p.role, f"ports-{i}-core": p.core_id or "", f"ports-{i}-description": ""})
        if p.pk == port.pk:
            form[f"ports-{i}-DELETE"] = "on"
    page = admin_client.post(reverse("admin:network_switch_change", args=[switch.pk]), form)
    assert page.status_code == 200 and "carries VLAN" in page.content.decode()
    assert SwitchPort.objects.filter(pk=port.pk).exists()

    core = CoreTransport.objects.get()
    keep = list(core.sites.exclude(name="pilsen").values_list("pk", flat=True))
    change = {"name": core.name, "kind": core.kind, "sites": keep, "vid_min": core.vid_min, "vid_max": core.vid_max}
    change.update({"service_tag": core.service_tag, "description": core.description, "_save": "Save"})
    page = admin_client.post(reverse("admin:network_coretransport_change", args=[core.pk]), change)
    assert (
        page.status_code == 200
        and "must keep joining the sites and carrying the VLANs of core uplink pilsen-sw:core" in page.content.decode()
    )
    assert core.sites.filter(name="pilsen").exists()

    elsewhere = Site.objects.create(name="ostrava")
    new = switch_form(Switch(name="ostrava-sw", site=elsewhere, platform="ovs", address="lab", description=""))
    new.update({"ports-TOTAL_FORMS": "1", "ports-0-name": "up", "ports-0-role": "core_uplink"})
    new.update({"ports-0-core": core.pk, "ports-0-description": ""})
    page = admin_client.post(reverse("admin:network_switch_add"), new)
    assert page.status_code == 200 and "core cesnet-qinq does not join site ostrava" in page.content.decode()
    assert not Switch.objects.filter(name="ostrava-sw").exists()


def test_device_change_list_says_the_duration_is_in_seconds(admin_client):
    from datetime import timedelta

    from django.utils import timezone

    from network.models import DeviceChange

    started = timezone.now()
    DeviceChange.objects.create(
        kind="switch", device="brno-sw", cause="reconcile", status="changed",
        started_at=started, finished_at=started + timedelta(microseconds=18_639),
    )  # fmt: skip
    page = admin_client.get("/admin/network/devicechange/").content.decode()
    assert "Seconds" in page and ">0.019<" in page and "0.018639" not in page


@pytest.fixture
def unusable_switch(db):
    """A switch whose driver arguments pass the model's checks but which its driver cannot use (the driver
    raises a ValueError, not a device error)."""
    from network.choices import PortRole
    from network.tests.factories import SiteFactory

    switch = SwitchFactory(
        name="sw-bad",
        site=SiteFactory(name="brno"),
        platform="ovs",
        address="unix:/nonexistent.sock",
        driver_args={"transport": "ssh", "ssh_host": "ovs1", "ssh_port": "22a"},
    )
    switch.full_clean()
    SwitchPortFactory(switch=switch, name="h1", role=PortRole.HOST_TRUNK)
    return switch


def test_plan_and_reconcile_of_a_switch_its_driver_cannot_use_say_why(admin_client, unusable_switch):
    """Admin Plan shows the device's row with the error (it was a 500), and ``manage.py network plan`` /
    ``reconcile`` fail with their "could not be reached or changed" message (they died with a traceback)."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    admin_client.raise_request_exception = False
    url = reverse("admin:network_switch_changelist")
    r = admin_client.post(url, {"action": "plan_dry_run", "_selected_action": [unusable_switch.pk]})
    assert r.status_code == 200 and "ValueError" in r.content.decode()
    for args in (["plan"], ["reconcile", "--no-repair"]):
        with pytest.raises(CommandError, match="could not be reached"):
            call_command("network", *args)


@pytest.mark.django_db(transaction=True)
def test_reconcile_now_with_the_broker_down_says_so(admin_client, monkeypatch):
    from network import tasks

    enabled, disabled = HostFactory(name="h1"), HostFactory(name="h2", enabled=False)

    def down(*args, **kwargs):
        raise ConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    monkeypatch.setattr(tasks.reconcile_device, "apply_async", down)
    monkeypatch.setattr(tasks.reconcile_device, "delay", down)
    admin_client.raise_request_exception = False
    r = admin_client.post(
        reverse("admin:network_host_changelist"),
        {"action": "reconcile_now", "_selected_action": [enabled.pk, disabled.pk]},
        follow=True,
    )
    assert r.status_code == 200
    text = [str(m) for m in r.context["messages"]]
    assert any(t.startswith("Reconcile could not be queued for h1 (ConnectionError: ") for t in text), text
    assert "Disabled, not reconciled: h2" in text, text


def core_form(core, **changes) -> dict:
    """The admin change form of a core, as a browser would post it."""
    data = {"name": core.name, "kind": core.kind, "sites": list(core.sites.values_list("pk", flat=True))}
    data.update({"vid_min": core.vid_min, "vid_max": core.vid_max, "service_tag": core.service_tag})
    data.update({"description": core.description, "_save": "Save"})
    data.update(changes)
    return data


def test_a_core_joins_a_site_only_where_its_pools_fit(admin_client):
    """A site added to a core brings the core's pools to the cores and switches already there: the pools'
    own checks (overlap with another core's pool at a common site, ids a switch keeps for itself) run with
    the sites the form gives the core; they ran only when a pool was saved."""
    from network.tests.factories import CoreTransportFactory, SiteFactory, VlanPoolFactory

    brno, pilsen, prague = SiteFactory(name="brno"), SiteFactory(name="pilsen"), SiteFactory(name="prague")
    north = CoreTransportFactory(name="north", sites=[brno])
    CoreTransportFactory(name="south", sites=[pilsen])
    VlanPoolFactory(name="physics", core=north, ranges="100-199,3960-3999")
    VlanPoolFactory(name="chemistry", core=CoreTransport.objects.get(name="south"), ranges="150-250")
    SwitchFactory(name="prague-nx", site=prague, platform="nxos")
    url = reverse("admin:network_coretransport_change", args=[north.pk])
    page = admin_client.post(url, core_form(north, sites=[brno.pk, pilsen.pk, prague.pk]))
    text = page.content.decode()
    assert page.status_code == 200
    assert (
        "pool physics: ids 150-199 overlap pool chemistry of core south, which meets core north at a common site"
        in text
    )
    assert (
        "pool physics: ids 3968-3999 are reserved on nxos (prague-nx): add them to the pool&#x27;s reserved ids" in text
    )
    assert list(north.sites.all()) == [brno]
    VlanPool.objects.filter(name="physics").update(ranges="100-149,3960-3967")
    page = admin_client.post(url, core_form(north, sites=[brno.pk, pilsen.pk, prague.pk]))
    assert page.status_code == 302 and north.sites.count() == 3


def test_a_core_keeps_the_sites_of_its_uplinks(admin_client):
    """Without any live cluster: an uplink into the core at a site it would leave keeps the site (named)."""
    from network.choices import PortRole
    from network.tests.factories import CoreTransportFactory, SiteFactory

    brno, pilsen = SiteFactory(name="brno"), SiteFactory(name="pilsen")
    core = CoreTransportFactory(name="backbone", sites=[brno, pilsen])
    SwitchPortFactory(
        switch=SwitchFactory(name="pilsen-sw", site=pilsen), name="up", role=PortRole.CORE_UPLINK, core=core
    )
    url = reverse("admin:network_coretransport_change", args=[core.pk])
    page = admin_client.post(url, core_form(core, sites=[brno.pk]))
    assert page.status_code == 200 and "core uplink pilsen-sw:up" in page.content.decode()
    assert core.sites.count() == 2


@pytest.mark.parametrize(
    ("platform", "static", "refusal"),
    [
        ("ovs", "150", "static VLAN 150 is handed out by pool clusters"),
        ("ios", "1002", "static VLAN 1002 is reserved on ios"),
    ],
)
def test_a_new_switchs_inline_ports_get_their_static_vlans_checked(admin_client, platform, static, refusal):
    """The add page validates the ports before it saves the switch: a port's check of its static VLANs ran only
    for a saved switch, so a new switch's port carried an id a pool hands out (a cluster given it would share the
    hypervisor's own network there), or one its platform reserves (every converge refused) — refused on every
    other way in."""
    from network.tests.factories import CoreTransportFactory, SiteFactory, VlanPoolFactory

    brno = SiteFactory(name="brno")
    VlanPoolFactory(name="clusters", core=CoreTransportFactory(name="backbone", sites=[brno]), ranges="100-199")
    new = switch_form(Switch(name="brno-new", site=brno, platform=platform, address="lab", description=""))
    new.update({"ports-TOTAL_FORMS": "1", "ports-0-name": "h1", "ports-0-role": "host_trunk"})
    new.update({"ports-0-static_vlans": static, "ports-0-description": ""})
    page = admin_client.post(reverse("admin:network_switch_add"), new)
    assert page.status_code == 200 and refusal in page.content.decode(), page.content.decode()[-3000:]
    assert not Switch.objects.filter(name="brno-new").exists()
    new["ports-0-static_vlans"] = "10"
    assert admin_client.post(reverse("admin:network_switch_add"), new).status_code == 302
    assert SwitchPort.objects.get(switch__name="brno-new").static_vlans == "10"

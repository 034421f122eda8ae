"""Topology import/export: the demo imports, a second run changes nothing, a bad file imports nothing and
reports every problem with its place, export round-trips and never carries a secret."""

from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanAllocation, VlanPool
from network.tests.factories import HostFactory, SwitchFactory
from network.topology import TopologyError, dump_topology, load_topology, topology_export, topology_import
from portal.models import AuditEntry

pytestmark = pytest.mark.django_db

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
DEMO = TOPOLOGIES / "demo.yaml"
SMALL = TOPOLOGIES / "small.yaml"


def import_file(path: Path, **kwargs):
    data, lines = load_topology(path.read_text(), source=str(path))
    return topology_import(data=data, source=str(path), lines=lines, **kwargs)


def import_text(text: str, **kwargs):
    data, lines = load_topology(text, source="test.yaml")
    return topology_import(data=data, source="test.yaml", lines=lines, **kwargs)


def inventory_counts() -> dict[str, int]:
    return {m.__name__: m.objects.count() for m in (Site, CoreTransport, Switch, SwitchPort, Host, VlanPool)}


def test_demo_imports():
    report = import_file(DEMO)
    assert inventory_counts() == {
        "Site": 3,
        "CoreTransport": 1,
        "Switch": 3,
        "SwitchPort": 10,
        "Host": 6,
        "VlanPool": 1,
    }
    assert report.total_created == 24 and report.total_updated == 0
    core = CoreTransport.objects.get(name="cesnet-qinq")
    assert (core.kind, core.vid_min, core.vid_max, core.service_tag) == ("qinq", 100, 3999, 1000)
    assert sorted(core.sites.values_list("name", flat=True)) == ["brno", "pilsen", "prague"]
    host = Host.objects.select_related("switch_port__switch").get(name="pilsen-h2")
    assert (str(host.switch_port), host.agent_queue, host.trunk_interface) == ("pilsen-sw:h2", "host.pilsen-h2", "eth0")
    pool = VlanPool.objects.get(name="clusters")
    assert pool.vlan_ids[0] == 110 and len(pool.vlan_ids) == 890
    assert SwitchPort.objects.get(switch__name="brno-sw", name="gw").role == "gateway_trunk"
    entries = AuditEntry.objects.filter(actor=f"topology-import:{DEMO}")
    assert entries.filter(action="create").count() == 24
    assert len(set(entries.values_list("request_id", flat=True))) == 1  # one import, one id


def test_second_import_changes_nothing_and_writes_no_audit_entries():
    import_file(DEMO)
    entries = AuditEntry.objects.count()
    report = import_file(DEMO)
    assert (report.total_created, report.total_updated, report.total_deleted) == (0, 0, 0)
    assert sum(report.unchanged.values()) == 24
    assert report.changes == []
    assert AuditEntry.objects.count() == entries


def test_changed_value_updates_only_that_object():
    import_file(DEMO)
    text = DEMO.read_text().replace("quarantine: 60", "quarantine: 90")
    before = AuditEntry.objects.count()
    report = import_text(text)
    assert report.changes == ["updated pool clusters (quarantine_seconds)"]
    assert AuditEntry.objects.count() == before + 1
    entry = AuditEntry.objects.first()
    assert entry.changes == {"quarantine_seconds": [60, 90]} and entry.actor == "topology-import:test.yaml"


def test_core_sites_are_updated_and_audited():
    import_file(DEMO)
    data, _ = load_topology(DEMO.read_text())
    data["cores"][0]["sites"] = ["pilsen", "prague"]
    data["switches"][0]["ports"] = [p for p in data["switches"][0]["ports"] if p["name"] != "core"]
    with pytest.raises(
        TopologyError,
        match="core cesnet-qinq must keep joining the sites and carrying the VLANs of core uplink brno-sw:core",
    ):
        topology_import(data=data, source="t")  # the uplink is still in the inventory (no --prune)
    report = topology_import(data=data, source="t", prune=True)
    assert report.changes == ["updated core cesnet-qinq (sites)", "deleted port brno-sw:core"]
    assert sorted(CoreTransport.objects.get().sites.values_list("name", flat=True)) == ["pilsen", "prague"]
    entry = AuditEntry.objects.filter(content_type__model="coretransport", changes__has_key="sites").first()
    assert entry.changes == {"sites": [None, {"removed": ["brno"]}]}


INVALID = """\
sites: [brno, pilsen]
colour: blue
cores:
  - {name: backbone, kind: qinq, sites: [brno, pilsen], vlans: "100-3999"}
  - {name: lambda, kind: warp, sites: [brno], vlans: "100-200"}
switches:
  - name: brno-sw
    site: brno
    platform: ovs
    address: lab
    ports:
      - {name: h1, role: host_trunk}
      - {name: up, role: uplink}
  - name: pilsen-sw
    site: pilsen
    platform: cisco
    address: lab
    ports:
      - {name: gw, role: gateway_trunk}
hosts:
  - {name: brno-h1, site: pilsen, switch: brno-sw, port: h1, colour: red}
  - {name: brno-h2, site: brno, switch: brno-sw, port: h9}
pools:
  - {name: clusters, core: backbone, ranges: "50-150", reserved: "10"}
"""


def test_invalid_file_imports_nothing_and_reports_every_problem_with_its_place():
    with pytest.raises(TopologyError) as info:
        import_text(INVALID)
    problems = info.value.problems
    expected = [
        "colour (line 2): unknown top-level key",
        "cores[0].service_tag (line 4): core backbone: a QinQ core needs its S-VLAN (service tag)",
        "cores[1].kind (line 5): 'warp' is not one of: qinq, dot1q, vpls, xponder, vxlan",
        "switches[0].ports[1].role (line 13): 'uplink' is not one of: host_trunk, core_uplink, gateway_trunk",
        "switches[1].platform (line 16): 'cisco' is not one of: ios, eos, junos, nxos, nxos_ssh, ovs, linuxbridge",
        "hosts[0].colour (line 21): unknown key",
        "hosts[0].port (line 21): host brno-h1: port brno-sw:h1 is on switch brno-sw at site brno, "
        "but the host is at site pilsen",
        "hosts[1].port (line 22): switch 'brno-sw' has no port 'h9' in this file",
        "pools[0].reserved (line 24): pool clusters: reserved ids 10 are not in its ranges",
    ]
    for item in expected:
        assert any(p.startswith(item) for p in problems), f"missing: {item}\n" + "\n".join(problems)
    assert len(problems) == len(expected), "\n".join(problems)
    assert inventory_counts() == dict.fromkeys(inventory_counts(), 0)
    assert not AuditEntry.objects.exists()


def test_invalid_file_keeps_the_existing_inventory_untouched():
    import_file(DEMO)
    before = inventory_counts()
    entries = AuditEntry.objects.count()
    broken = DEMO.read_text().replace("quarantine: 60", "quarantine: 90").replace('vlans: "100-3999"', "vlans: x")
    with pytest.raises(TopologyError) as info:
        import_text(broken)
    assert info.value.problems == ["cores[0].vlans (line 19): 'x' is not a range like 100-3999"]
    assert VlanPool.objects.get().quarantine_seconds == 60
    assert inventory_counts() == before and AuditEntry.objects.count() == entries


def test_pool_and_core_may_move_together():
    import_file(DEMO)
    moved = DEMO.read_text().replace('vlans: "100-3999"', 'vlans: "2000-3999"').replace('"100-999"', '"2000-2999"')
    import_text(moved.replace('reserved: "100-109"', 'reserved: "2000"'))
    assert VlanPool.objects.get().ranges == "2000-2999"
    # ... but a core may not leave a pool that stays behind outside its range.
    with pytest.raises(TopologyError) as info:
        import_text(moved.replace('reserved: "100-109"', 'reserved: "2000"').replace('"2000-3999"', '"3000-3999"'))
    assert any("outside what core cesnet-qinq carries (3000-3999)" in p for p in info.value.problems)


def test_duplicate_names_and_keys_are_reported():
    with pytest.raises(TopologyError) as info:
        import_text("sites: [brno, brno]\n")
    assert info.value.problems == ["sites[1].name (line 1): 'brno' is already defined at sites[0]"]
    with pytest.raises(TopologyError) as info:
        load_topology("sites: [a]\nsites: [b]\n")
    assert info.value.problems == ["sites (line 2): key given twice"]


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(TopologyError) as info:
        load_topology("sites:\n  - brno\n  pilsen: [\n", source="bad.yaml")
    assert info.value.problems[0].startswith("bad.yaml (line ")


def test_export_import_round_trip(monkeypatch):
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-1")
    import_file(SMALL)
    import_file(DEMO)
    exported = topology_export()
    text = dump_topology(exported)
    assert yaml.safe_load(text) == exported
    # Into an empty inventory: the same objects come back.
    before = inventory_counts()
    ports = sorted(SwitchPort.objects.values_list("switch__name", "name", "role", "core__name"))
    hosts = sorted(Host.objects.values_list("name", "site__name", "switch_port__name", "agent_queue", "driver"))
    Host.objects.all().delete()
    VlanPool.objects.all().delete()
    Switch.objects.all().delete()
    CoreTransport.objects.all().delete()
    Site.objects.all().delete()
    report = import_text(text)
    assert report.total_created == sum(before.values())
    assert inventory_counts() == before
    assert sorted(SwitchPort.objects.values_list("switch__name", "name", "role", "core__name")) == ports
    assert sorted(Host.objects.values_list("name", "site__name", "switch_port__name", "agent_queue", "driver")) == hosts
    assert topology_export() == exported
    # ... and over itself: nothing changes.
    assert import_text(text).changes == []


def test_export_never_contains_secrets(monkeypatch):
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-1")
    import_file(SMALL)
    SwitchFactory(name="extra", password="extra-secret-2", driver_args={"transport": "ssh"})
    text = dump_topology(topology_export())
    assert "small-secret-1" not in text and "extra-secret-2" not in text
    assert "password" not in text
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM network_switch WHERE password <> ''")
        ciphertexts = [row[0] for row in cursor.fetchall()]
    assert len(ciphertexts) == 2 and not any(c in text for c in ciphertexts)


def test_secret_driver_args_are_never_exported_and_kept_when_the_file_leaves_them_out(monkeypatch):
    """NAPALM reads secrets from optional args too (EOS's ``enable_password``, netmiko's ``passphrase``): the export
    wrote them in clear. It leaves them out, and importing it back keeps the stored ones (nothing changes)."""
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-1")
    import_file(SMALL)
    SwitchFactory(name="arista", platform="eos", driver_args={"enable_password": "en-secret-3", "transport": "https"})
    HostFactory(name="hv9", driver_args={"key_passphrase": "pp-secret-4", "bridge": "br0"})
    text = dump_topology(topology_export())
    assert "en-secret-3" not in text and "pp-secret-4" not in text and "enable_password" not in text
    assert "transport: https" in text
    data, lines = load_topology(text, source="export.yaml")
    report = topology_import(data=data, source="export.yaml", lines=lines)
    assert Switch.objects.get(name="arista").driver_args == {"enable_password": "en-secret-3", "transport": "https"}
    assert Host.objects.get(name="hv9").driver_args == {"key_passphrase": "pp-secret-4", "bridge": "br0"}
    assert not report.updated, report


def test_password_from_env_and_kept_when_left_out(monkeypatch):
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-1")
    import_file(SMALL)
    assert Switch.objects.get(name="alpha-sw").password == "small-secret-1"
    # A file without the password (an export, say) keeps the stored one.
    import_text(dump_topology(topology_export()))
    assert Switch.objects.get(name="alpha-sw").password == "small-secret-1"
    monkeypatch.delenv("SMALL_SWITCH_PASSWORD")
    with pytest.raises(TopologyError) as info:
        import_file(SMALL)
    assert info.value.problems == [
        "switches[0].password_env (line 13): environment variable SMALL_SWITCH_PASSWORD is not set"
    ]


def test_changed_password_is_audited_without_its_value(monkeypatch):
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-1")
    import_file(SMALL)
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-2")
    report = import_file(SMALL)
    assert report.changes == ["updated switch alpha-sw (password)"]
    entry = AuditEntry.objects.first()
    assert entry.changes == {"password": ["********", "********"]}
    assert "small-secret" not in str(AuditEntry.objects.values_list("changes", flat=True))


def test_prune_deletes_what_the_file_does_not_name(monkeypatch):
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "x")
    import_file(DEMO)
    import_file(SMALL)
    report = import_file(SMALL, prune=True)
    assert set(Site.objects.values_list("name", flat=True)) == {"alpha", "beta"}
    assert not Switch.objects.filter(name="brno-sw").exists()
    assert report.deleted["host"] == 6 and report.deleted["site"] == 3
    # Ports left out of a switch's list are pruned too.
    text = SMALL.read_text().replace("      - {name: eth10, role: core_uplink, core: dot1q}\n", "")
    report = import_text(text, prune=True)
    assert report.changes == ["deleted port alpha-sw:eth10"]


def test_prune_refuses_to_delete_what_is_in_use(monkeypatch):
    """A host that carries a live segment is held by a PROTECT reference: prune reports it (and what
    depends on it) and keeps nothing of the import."""
    from network.models import Segment, SegmentMember

    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "x")
    import_file(DEMO)
    segment = Segment.objects.create(owner_ref="cluster:1", vid=120, state=Segment.State.ACTIVE)
    SegmentMember.objects.create(segment=segment, host=Host.objects.get(name="brno-h1"))
    with pytest.raises(TopologyError) as info:
        import_file(SMALL, prune=True)
    problems = "\n".join(info.value.problems)
    assert "prune hosts: cannot delete host brno-h1: still used by segment member cluster:1 on brno-h1" in problems
    assert "prune sites: cannot delete site brno: still used by host brno-h1" in problems
    assert Host.objects.count() == 6 and not Site.objects.filter(name="alpha").exists()


def test_prune_needs_every_reference_in_the_file(monkeypatch):
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "x")
    import_file(SMALL)
    data, _ = load_topology(SMALL.read_text())
    del data["sites"][1]
    with pytest.raises(TopologyError) as info:
        topology_import(data=data, source="t", prune=True)
    assert "unknown site 'beta' (not defined in this file)" in "\n".join(info.value.problems)
    assert Site.objects.filter(name="beta").exists()


def test_command_import_and_export(tmp_path, capsys):
    call_command("topology", "import", str(DEMO))
    assert "24 created" in capsys.readouterr().out
    call_command("topology", "import", str(DEMO), "--dry-run")
    assert "0 created, 0 updated, 0 deleted, 24 unchanged (dry run" in capsys.readouterr().out
    out = tmp_path / "export.yaml"
    call_command("topology", "export", "-o", str(out))
    assert yaml.safe_load(out.read_text()) == topology_export()
    with pytest.raises(CommandError, match="cannot write .*missing/export.yaml: No such file or directory"):
        call_command("topology", "export", "-o", str(tmp_path / "missing" / "export.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(INVALID)
    with pytest.raises(CommandError) as info:
        call_command("topology", "import", str(bad))
    assert "nothing imported, 9 problem(s)" in str(info.value), str(info.value)
    assert "hosts[1].port (line 22)" in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"sites: [brno]\n\xff\xfe")
    with pytest.raises(CommandError, match="nothing imported, not UTF-8 text"):
        call_command("topology", "import", str(binary))


def test_the_command_reads_and_writes_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """The export was written in the locale's encoding (import reads UTF-8: a description in Czech came back "not
    UTF-8", or the export itself failed), and stdin was read in it (a traceback on other bytes)."""
    import io
    import sys

    Site.objects.create(name="brno", description="Brno, Masarykova univerzita — Žabovřesky")
    out = tmp_path / "export.yaml"
    call_command("topology", "export", "-o", str(out))
    assert "Žabovřesky" in out.read_text(encoding="utf-8")
    # (stdin in an ASCII locale: its text layer could not decode the file)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(out.read_bytes()), encoding="ascii"))
    call_command("topology", "import", "-")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"sites: [brno]\n\xff"), encoding="ascii"))
    with pytest.raises(CommandError, match="<stdin>: nothing imported, not UTF-8 text"):
        call_command("topology", "import", "-")


def test_dry_run_saves_nothing():
    report = import_file(DEMO, dry_run=True)
    assert report.total_created == 24 and report.dry_run
    assert inventory_counts() == dict.fromkeys(inventory_counts(), 0)
    assert not AuditEntry.objects.exists()


def test_worker_queues_of_sites_and_switches_import_and_export(monkeypatch):
    """``queue`` on a site (its worker) and on a switch (its own): imported, exported, validated."""
    monkeypatch.setenv("SMALL_SWITCH_PASSWORD", "small-secret-1")
    import_file(SMALL)
    data = topology_export()
    site = data["sites"][0]["name"]
    data["sites"][0]["queue"] = f"site.{site}"
    data["switches"][0]["queue"] = "switch.core-room"
    report = import_text(dump_topology(data))
    assert len(report.changes) == 2
    assert Site.objects.get(name=site).worker_queue == f"site.{site}"
    switch = Switch.objects.select_related("site").get(name=data["switches"][0]["name"])
    assert (switch.worker_queue, switch.queue) == ("switch.core-room", "switch.core-room")
    assert topology_export() == data
    data["sites"][0]["queue"] = "no spaces please"
    with pytest.raises(TopologyError) as exc:
        import_text(dump_topology(data))
    assert any(p.startswith("sites[0].queue") and "Celery queue name" in p for p in exc.value.problems), exc.value
    assert Site.objects.get(name=site).worker_queue == f"site.{site}"


# --- what live clusters need stays -------------------------------------------------------------------------------


def _live_segment(*hosts: str, gateway: bool = False):
    from network import services

    return services.segment_create(owner="cluster:1", hosts=list(Host.objects.filter(name__in=hosts)), gateway=gateway)


def test_a_port_that_carries_live_vlans_is_not_pruned():
    """A port the portal forgets is never converged again: pruned while it carried a live VLAN, the VLAN
    would stay on the device after the cluster ends, and the id go back to the pool."""
    import_file(DEMO)
    seg = _live_segment("brno-h1", "pilsen-h1")
    data, _ = load_topology(DEMO.read_text())
    data["switches"][0]["ports"] = [p for p in data["switches"][0]["ports"] if p["name"] != "core"]
    with pytest.raises(TopologyError, match=rf"cannot delete port brno-sw:core: it carries VLAN {seg.vid} of live"):
        topology_import(data=data, source="t", prune=True)
    assert SwitchPort.objects.filter(switch__name="brno-sw", name="core").exists()


def test_a_port_a_host_hangs_on_stays_a_host_trunk():
    """Else the host's VLANs would leave it and a gateway trunk's (every closed cluster's) would come."""
    import_file(DEMO)
    data, _ = load_topology(DEMO.read_text())
    data.pop("hosts")
    data["switches"][0]["ports"][0]["role"] = "gateway_trunk"
    with pytest.raises(TopologyError, match="port brno-sw:h1: host brno-h1 hangs on it, so it stays a host trunk"):
        topology_import(data=data, source="t")


def test_a_core_keeps_the_sites_of_live_segments_and_uplinks():
    import_file(DEMO)
    seg = _live_segment("brno-h1", "pilsen-h1")
    data, _ = load_topology(DEMO.read_text())
    data = {"cores": data["cores"]}
    data["cores"][0]["sites"] = ["brno", "prague"]
    with pytest.raises(TopologyError) as exc:
        topology_import(data=data, source="t")
    assert "core cesnet-qinq must keep joining the sites and carrying the VLANs of core uplink pilsen-sw:core" in str(
        exc.value
    )
    assert f"live segment cluster:1 (VLAN {seg.vid})" in str(exc.value)
    assert sorted(CoreTransport.objects.get().sites.values_list("name", flat=True)) == ["brno", "pilsen", "prague"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sites: &x [*x]\n", "YAML aliases"),
        (
            "sites: [brno]\nhosts:\n  - {name: h, site: brno, switch: [sw], port: h1}\n",
            r"switch \(line 3\): must be a name",
        ),
        (
            "sites: [brno]\nhosts:\n  - {name: h, site: brno, switch: {a: 1}, port: h1}\n",
            r"switch \(line 3\): must be a name",
        ),
        # a NUL (YAML's "\0"): PostgreSQL refuses it, as a database error, not the file's problem
        ('sites: [brno]\nhosts:\n  - {name: "h\\0", site: brno, switch: sw, port: h1}\n', "must not hold a NUL"),
        (
            'sites: [brno]\nswitches:\n  - {name: sw, site: brno, platform: ovs, driver_args: {bridge: "b\\0"}}\n',
            "must not hold a NUL",
        ),
        (
            "sites: [brno]\nswitches:\n  - {name: sw, site: brno, platform: ovs, driver_args: {timeout: .inf}}\n",
            "must not hold NaN or an infinity",
        ),
        # nesting: deep enough for Python's recursion limit, and merely absurd
        ("sites: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        ("sites: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
        (
            "sites: [brno]\ncores: [{name: c, kind: dot1q, sites: [brno], vlans: 1-9, mtu: " + "9" * 5000 + "}]\n",
            "not a usable value",
        ),
    ],
)
def test_malformed_files_are_problems_not_tracebacks(db, text, message):
    with pytest.raises(TopologyError, match=message):
        import_text(text)


def test_a_date_like_value_is_text():
    """YAML reads ``2024-02-30`` as a date (a ValueError: no such day): a topology holds no dates, it is text."""
    data, _ = load_topology(
        "sites:\n  - {name: brno, description: 2024-02-30}\n  - {name: praha, description: 2024-02-03}\n"
    )
    assert [s["description"] for s in data["sites"]] == ["2024-02-30", "2024-02-03"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a core with an empty site in its list: the core, its pools, uplinks and their hosts were skipped in silence
        (
            'sites: [brno]\ncores:\n  - {name: c, kind: dot1q, sites: [brno, ""], vlans: "100-199"}\n',
            r"cores\[0\]\.sites\[1\] \(line 3\): must be a site name",
        ),
        (
            "sites: [brno]\ncores:\n  - name: c\n    kind: dot1q\n    vlans: 100-199\n"
            "    sites:\n      - brno\n      -\n",
            "must be a site name",
        ),
        # a port's core given empty
        (
            "sites: [brno]\nswitches:\n  - name: sw\n    site: brno\n    platform: ovs\n    ports:\n"
            '      - {name: up, role: core_uplink, core: ""}\n',
            r"ports\[0\]\.core \(line \d+\): is required",
        ),
    ],
)
def test_an_empty_value_is_a_problem_never_an_object_skipped_in_silence(db, text, message):
    """Some empty values made the import skip objects (and what refers to them) without a problem: it committed the
    rest and exited 0. Every object left out now comes with its problem, and nothing is kept."""
    with pytest.raises(TopologyError, match=message):
        import_text(text)


def test_a_hosts_driver_left_empty_is_its_default(db):
    """``driver:`` left empty is the default driver, as when the key is not there (the host was skipped)."""
    from network.models import Host

    text = DEMO.read_text().replace(
        "trunk: eth0, driver: ovs, queue: host.brno-h1}", "trunk: eth0, driver: , queue: host.brno-h1}"
    )
    assert "driver: , queue: host.brno-h1" in text
    import_text(text)
    assert Host.objects.get(name="brno-h1").driver == "ovs" and Host.objects.count() == 6


def test_a_core_keeps_carrying_the_vlans_of_live_segments():
    """Shrinking a core's VLAN range (and its pool's, in the same file) past a live segment's VLAN would
    cut the cluster between its sites."""
    import_file(DEMO)
    seg = _live_segment("brno-h1", "pilsen-h1")
    data, _ = load_topology(DEMO.read_text())
    data = {"cores": data["cores"], "pools": data["pools"]}
    data["cores"][0]["vlans"] = f"{seg.vid + 1}-3999"
    data["pools"][0]["ranges"] = f"{seg.vid + 1}-{seg.vid + 50}"
    data["pools"][0].pop("reserved", None)
    # (the pool still holds the segment's id: the core may not stop carrying it, whichever check says so first)
    with pytest.raises(TopologyError, match=rf"pool clusters uses ids {seg.vid} outside|VLAN {seg.vid}\)"):
        topology_import(data=data, source="t")


SSH_SWITCH = """
sites: [brno]
switches:
  - name: brno-ovs
    site: brno
    platform: ovs
    address: unix:/run/openvswitch/db.sock
    driver_args: {transport: ssh, ssh_host: ovs1.example.org, ssh_options: [ProxyCommand=touch /tmp/x]}
"""


def test_ssh_driver_args_that_would_run_a_command_on_the_worker_are_refused():
    with pytest.raises(TopologyError) as info:
        import_text(SSH_SWITCH)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(
        "switches[0].driver_args (line 8): switch brno-ovs: ssh option 'ProxyCommand' is not allowed"
    )
    assert not Switch.objects.exists()
    import_text(SSH_SWITCH.replace("ProxyCommand=touch /tmp/x", "ConnectTimeout=5"))


NEXUS = """
sites: [brno]
cores: [{name: backbone, kind: dot1q, sites: [brno], vlans: "2-4094"}]
switches: [{name: brno-nx, site: brno, platform: nxos, address: 198.18.0.1}]
pools: [{name: clusters, core: backbone, ranges: "3900-3999", reserved: "3968-3999"}]
"""


def test_a_switch_that_keeps_ids_for_itself_and_the_pool_reserving_them_come_in_one_file():
    """The switch is checked against the pools after the file's pools are written (the file may reserve
    the ids in the same change); a pool only in the inventory still counts."""
    import_text(NEXUS)
    assert Switch.objects.get().platform == "nxos"
    SwitchFactory(name="brno-ovs", site=Site.objects.get(), platform="ovs")
    VlanPool.objects.create(name="old", core=CoreTransport.objects.get(), ranges="4000-4010")
    with pytest.raises(TopologyError) as info:
        import_text(NEXUS.replace("brno-nx, site", "brno-nx2, site"))
    assert info.value.problems == [
        "switches[0].platform (line 4): switch brno-nx2: pool old hands out ids 4000-4010, which are reserved on "
        "nxos: add them to the pool's reserved ids first"
    ]


def test_a_file_reserving_ids_a_live_cluster_holds_for_a_switch_that_keeps_them_is_refused():
    """The file adds a switch that keeps 3968-4094 for itself and reserves those ids in its pool in the same
    change, but a live cluster still holds 3970: it stays on the switches until released, and every converge of
    the new switch would refuse it. Refused, as the admin refuses such a switch; once released, it comes in."""
    from datetime import timedelta

    from network import services

    import_text(NEXUS.replace("platform: nxos", "platform: ovs").replace(', reserved: "3968-3999"', ""))
    pool = VlanPool.objects.get()
    services.vlan_pool_sync(pool=pool)
    held = pool.allocations.get(vid=3970)
    pool.allocations.filter(pk=held.pk).update(state="allocated", owner="cluster:9")
    with pytest.raises(TopologyError) as info:
        import_text(NEXUS.replace("brno-nx, site", "brno-nx2, site"))
    assert any("ids 3970 are reserved on nxos" in problem for problem in info.value.problems), info.value.problems
    assert not Switch.objects.filter(name="brno-nx2").exists()
    held.refresh_from_db()
    services.vlan_release(allocation=held)
    past = held.quarantine_until - timedelta(days=1)  # (its hold-down over)
    VlanAllocation.objects.filter(pk=held.pk).update(quarantine_until=past)
    import_text(NEXUS.replace("brno-nx, site", "brno-nx2, site"))
    assert Switch.objects.filter(name="brno-nx2").exists()


TWO_CORES = """
sites: [brno, praha]
cores:
  - {name: north, kind: dot1q, sites: [brno], vlans: "100-999"}
  - {name: south, kind: dot1q, sites: [praha], vlans: "100-999"}
switches: [{name: praha-nx, site: praha, platform: nxos, address: 198.18.0.1}]
"""


def test_a_core_joining_a_site_checks_the_pools_only_the_inventory_has():
    """A core the file moves onto another site takes its pools there, also those the file does not name (an
    import without prune keeps them): they must not overlap the pools of the cores already at that site, nor
    hand out ids a switch there keeps for itself — the same checks the admin form makes."""
    import_text(TWO_CORES)
    VlanPool.objects.create(name="south-pool", core=CoreTransport.objects.get(name="south"), ranges="100-199")
    VlanPool.objects.create(name="north-pool", core=CoreTransport.objects.get(name="north"), ranges="150-249")
    with pytest.raises(TopologyError) as info:
        import_text(TWO_CORES.replace("sites: [brno], vlans", "sites: [brno, praha], vlans"))
    assert info.value.problems == [
        "cores[0].sites (line 4): pool north-pool: ids 150-199 overlap pool south-pool of core south, which meets "
        "core north at a common site"
    ]
    assert list(CoreTransport.objects.get(name="north").sites.values_list("name", flat=True)) == ["brno"]

    VlanPool.objects.filter(name="north-pool").update(ranges="3960-3970")
    CoreTransport.objects.filter(name="north").update(vid_max=4000)
    wider = TWO_CORES.replace('sites: [brno], vlans: "100-999"', 'sites: [brno, praha], vlans: "100-4000"')
    with pytest.raises(TopologyError) as info:  # the switch is in the file: it reports the clash itself
        import_text(wider)
    assert info.value.problems == [
        "switches[0].platform (line 6): switch praha-nx: pool north-pool hands out ids 3968-3970, which are "
        "reserved on nxos: add them to the pool's reserved ids first"
    ]
    without_switch = wider.replace("switches: [", "# switches: [")  # the file leaves it out, no prune
    with pytest.raises(TopologyError) as info:  # only in the inventory: the core's check finds it
        import_text(without_switch)
    assert info.value.problems == [
        "cores[0].sites (line 4): pool north-pool: ids 3968-3970 are reserved on nxos (praha-nx): add them to the "
        "pool's reserved ids"
    ]
    VlanPool.objects.filter(name="north-pool").update(reserved="3968-3970")
    import_text(without_switch)
    assert CoreTransport.objects.get(name="north").sites.count() == 2


STATIC = """
sites: [brno]
cores: [{name: backbone, kind: dot1q, sites: [brno], vlans: "2-4094"}]
switches:
  - name: brno-sw
    site: brno
    platform: ios
    address: 198.18.0.1
    ports: [{name: Gi0/1, role: host_trunk, static_vlans: "10,20-21"}]
pools: [{name: clusters, core: backbone, ranges: "100-199"}]
"""


def test_static_vlans_of_ports_import_export_and_must_not_meet_a_pool():
    import_text(STATIC)
    assert SwitchPort.objects.get(name="Gi0/1").static_vids == {10, 20, 21}
    exported = topology_export()
    assert exported["switches"][0]["ports"] == [{"name": "Gi0/1", "role": "host_trunk", "static_vlans": "10,20-21"}]
    assert topology_import(data=exported, source="again").total_updated == 0
    with pytest.raises(TopologyError) as info:
        import_text(STATIC.replace('ranges: "100-199"', 'ranges: "10-199"'))
    assert info.value.problems == [
        "pools[0].ranges (line 10): pool clusters: ids 10,20-21 are static VLANs of port brno-sw:Gi0/1: add them to "
        "the pool's reserved ids"
    ]
    with pytest.raises(TopologyError) as info:
        import_text(STATIC.replace('static_vlans: "10,20-21"', 'static_vlans: "10,150"'))
    assert info.value.problems == [
        "switches[0].ports[0].static_vlans (line 9): port brno-sw:Gi0/1: static VLAN 150 is handed out by pool "
        "clusters (core backbone) at site brno: reserve it in the pool, or pick another id"
    ]


def test_a_switch_moving_to_another_site_meets_the_pools_there_that_only_the_inventory_has():
    """A switch the file moves takes its ports' static VLANs to the new site: a pool there that the file does not
    name (an import without prune keeps it) must not hand one of them out."""
    moving = TWO_CORES.replace(
        "switches: [{name: praha-nx, site: praha, platform: nxos, address: 198.18.0.1}]",
        "switches:\n  - {name: sw, site: brno, platform: ios, address: 198.18.0.2,"
        ' ports: [{name: gw, role: gateway_trunk, static_vlans: "120"}]}',
    )
    import_text(moving)
    VlanPool.objects.create(name="south-pool", core=CoreTransport.objects.get(name="south"), ranges="100-199")
    moved = moving.replace("site: brno, platform: ios", "site: praha, platform: ios")
    unlisted = moved.replace(' ports: [{name: gw, role: gateway_trunk, static_vlans: "120"}]', "")
    with pytest.raises(TopologyError) as info:  # the port not in the file: the switch's check finds it
        import_text(unlisted)
    assert info.value.problems == [
        "switches[0].site (line 7): switch sw: port gw: static VLAN 120 is handed out by pool south-pool (core "
        "south) at site praha: reserve it in the pool, or pick another id, before the switch moves there"
    ]
    with pytest.raises(TopologyError) as info:  # the port in the file: its own check, said once
        import_text(moved)
    assert info.value.problems == [
        "switches[0].ports[0].static_vlans (line 7): port sw:gw: static VLAN 120 is handed out by pool south-pool "
        "(core south) at site praha: reserve it in the pool, or pick another id"
    ]
    assert Switch.objects.get(name="sw").site.name == "brno"
    VlanPool.objects.filter(name="south-pool").update(reserved="120")
    import_text(unlisted)
    assert Switch.objects.get(name="sw").site.name == "praha"


def test_a_cores_mtu_imports_exports_and_is_checked():
    text = STATIC.replace('vlans: "2-4094"}', 'vlans: "2-4094", mtu: 1450}')
    import_text(text)
    assert CoreTransport.objects.get().mtu == 1450
    assert topology_export()["cores"][0]["mtu"] == 1450
    with pytest.raises(TopologyError) as info:
        import_text(text.replace("mtu: 1450", "mtu: 100"))
    assert info.value.problems == [
        "cores[0].mtu (line 3): core backbone: Ensure this value is greater than or equal to 576."
    ]


def test_a_pool_shrunk_by_the_file_drops_the_rows_of_the_ids_it_no_longer_hands_out():
    """In the import's own transaction: an id the same file gives another pool is never taken from this one by an
    allocation that read it before the import committed (``vlan_pool_sync``)."""
    from network.models import VlanAllocation
    from network.services import vlan_pool_sync

    import_file(DEMO)
    pool = VlanPool.objects.get()
    vlan_pool_sync(pool=pool)
    assert VlanAllocation.objects.filter(pool=pool, vid__gte=200).exists()
    import_text(DEMO.read_text().replace('"100-999"', '"100-199"'))
    assert not VlanAllocation.objects.filter(pool=pool, vid__gte=200).exists()
    assert VlanAllocation.objects.filter(pool=pool).count() == 90  # (100-199 but the reserved 100-109)

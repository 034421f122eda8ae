"""Vendor configurations for a desired state computed by the portal, checked against golden files a network
engineer reviewed (VLANs created, trunk allowed lists set on owned ports, nothing else), and the
commit → verify → rollback flow of a vendor platform through NAPALM's ``mock`` driver, driven by the
portal's convergence engine (``DeviceChange`` records included).

Regenerate the golden files after a reviewed template change: ``UPDATE_GOLDEN=1 pytest network/tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from network import convergence, selectors, services, workflows
from network.choices import PortRole
from network.drivers import base
from network.drivers.vendor import render
from network.errors import DeviceChangeFailed
from network.models import DeviceChange
from network.tests.factories import SwitchFactory, SwitchPortFactory
from network.tests.fakefabric import fabric_fixture  # noqa: F401

GOLDEN = Path(__file__).with_name("golden")
# The brno switch's owned ports, as each vendor spells its interfaces.
PORT_NAMES = {
    "ios": {
        "h1": "GigabitEthernet1/0/1",
        "h2": "GigabitEthernet1/0/2",
        "uplink": "TenGigabitEthernet1/1/1",
        "gw": "GigabitEthernet1/0/48",
    },
    "eos": {"h1": "Ethernet1", "h2": "Ethernet2", "uplink": "Ethernet49/1", "gw": "Ethernet48"},
    "junos": {"h1": "ge-0/0/1", "h2": "ge-0/0/2", "uplink": "xe-0/1/0", "gw": "ge-0/0/47"},
    "nxos": {"h1": "Ethernet1/1", "h2": "Ethernet1/2", "uplink": "Ethernet1/49", "gw": "Ethernet1/48"},
}
PORT_NAMES["junos_nonels"] = PORT_NAMES["junos"]  # non-ELS EX switches (template ``junos_nonels``)


@pytest.fixture
def brno_desired(fabric):
    """Three clusters: a spans brno and pilsen (uplink), b is closed on brno1 (gateway trunk, same site: no
    uplink), c is elsewhere (not on this switch at all);
    brno2 carries nothing (its trunk's allowed list must be emptied)."""
    h = fabric.hosts
    segs = [
        services.segment_create(owner="a", hosts=[h["brno1"], h["pilsen1"]], gateway=False),
        services.segment_create(owner="b", hosts=[h["brno1"]], gateway=True),
        services.segment_create(owner="c", hosts=[h["prague1"]], gateway=False),
    ]
    # Ids are drawn at random: name them 100, 101, 102 in creation order so the golden files are stable.
    fixed = {seg.vid: 100 + i for i, seg in enumerate(segs)}
    desired = selectors.switch_desired([fabric.switches["brno"].pk])[fabric.switches["brno"].pk]
    return {port: frozenset(fixed[v] for v in vids) for port, vids in desired.items()}


@pytest.mark.parametrize("platform", ["ios", "eos", "junos", "junos_nonels", "nxos"])
def test_rendered_configuration_matches_the_golden_file(brno_desired, platform):
    assert brno_desired == {"h1": {100, 101}, "h2": set(), "uplink": {100}, "gw": {101}}
    names = PORT_NAMES[platform]
    text = render(platform, {names[port]: vids for port, vids in brno_desired.items()})
    golden = GOLDEN / f"{platform}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    # Nothing but the owned ports and the VLANs in use.
    for other in ("GigabitEthernet1/0/3", "Ethernet3", "ge-0/0/3", "Ethernet1/3", "102"):
        assert other not in text


@pytest.mark.parametrize("platform", ["ios", "eos", "nxos"])
def test_a_trunks_native_vlan_1_kept_as_a_static_vlan_stays_on_its_allowed_list_and_is_never_created(fabric, platform):
    """The default native VLAN of an IOS/EOS/NX-OS trunk is 1: untagged frames (a hypervisor's management) pass
    only while 1 is on the allowed list. As a port's static VLAN it stays there, beside the clusters' VLANs, and
    is never created, renamed or removed."""
    port = fabric.switches["brno"].ports.get(name="h1")
    port.static_vlans = "1"
    port.full_clean()
    port.save()
    seg = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"]], gateway=False)
    statics: dict = {}
    brno = fabric.switches["brno"].pk
    desired = selectors.switch_desired([brno], port_statics=statics)[brno]
    assert desired["h1"] == {1, seg.vid} and statics[brno] == {"h1": {1}}
    text = render(platform, {"Ethernet1": desired["h1"]}, existing=statics[brno]["h1"])
    assert f"allowed vlan 1,{seg.vid}" in text
    assert "vlan 1\n" not in text and f"vlan {seg.vid}\n" in text


# --- commit / verify / rollback through NAPALM's mock driver ----------------------------------------------------


def _mock_files(path: Path, files: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_text(json.dumps(data))


def _vlans(**ports) -> dict:
    """get_vlans() output: {vid: {"name", "interfaces"}} from port → vids."""
    out: dict = {}
    for port, vids in ports.items():
        for vid in vids:
            out.setdefault(str(vid), {"name": f"vc-{vid}", "interfaces": []})["interfaces"].append(port)
    return out


@pytest.fixture
def mock_switch(fabric, tmp_path, monkeypatch):
    """An EOS-templated switch on NAPALM's mock driver (platform ``mock``) at site pilsen, ports Ethernet1
    (host trunk of a new host) and Ethernet49/1 (core uplink); rollbacks are recorded."""
    monkeypatch.setitem(base._SWITCH_DRIVERS, "mock", "network.drivers.vendor")
    rollbacks: list[str] = []
    from napalm.base.mock import MockDriver

    monkeypatch.setattr(MockDriver, "rollback", lambda self: rollbacks.append(self.hostname))
    path = tmp_path / "mock"
    switch = SwitchFactory(
        name="sw-eos",
        site=fabric.sites["pilsen"],
        platform="mock",
        address="sw-eos.example.org",
        driver_args={"template": "eos", "path": str(path)},
    )
    trunk = SwitchPortFactory(switch=switch, name="Ethernet1", role=PortRole.HOST_TRUNK)
    SwitchPortFactory(switch=switch, name="Ethernet49/1", role=PortRole.CORE_UPLINK, core=fabric.core)
    from network.tests.factories import HostFactory

    host = HostFactory(name="pilsen9", site=fabric.sites["pilsen"], switch_port=trunk, driver="fake")
    host.driver_args = {"state_dir": fabric.state_dir}
    host.agent_queue = ""
    host.save()
    return {"switch": switch, "host": host, "path": path, "rollbacks": rollbacks}


def test_mock_vendor_switch_commit_and_verify(fabric, mock_switch):
    seg = services.segment_create(owner="c", hosts=[mock_switch["host"], fabric.hosts["brno1"]], gateway=False)
    v = seg.vid
    diff = f"+ vlan {v}\n+ interface Ethernet1 switchport trunk allowed vlan add {v}"
    _mock_files(
        mock_switch["path"],
        {
            "get_vlans.1": {},
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": diff},
            "commit_config.1": {},
            "get_vlans.2": _vlans(**{"Ethernet1": [v], "Ethernet49/1": [v]}),
        },
    )
    workflows.provision(seg.pk).apply().get()
    change = DeviceChange.objects.get(segment=seg, device="sw-eos")
    assert change.status == "ok" and change.diff == diff
    assert mock_switch["rollbacks"] == []


def test_mock_vendor_switch_empty_diff_does_not_commit(fabric, mock_switch):
    # No commit_config.1 file: a commit would fail the test with NotImplementedError.
    _mock_files(
        mock_switch["path"],
        {
            "get_vlans.1": {},
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": ""},
            "discard_config.1": {},
            "get_vlans.2": {},
        },
    )
    change = convergence.change_create(device=mock_switch["switch"], cause="test")
    assert convergence.converge_change(change.pk).status == "noop"


def test_mock_vendor_switch_failed_verify_rolls_back_and_fails_the_change(fabric, mock_switch):
    seg = services.segment_create(owner="c", hosts=[mock_switch["host"], fabric.hosts["brno1"]], gateway=False)
    v = seg.vid
    _mock_files(
        mock_switch["path"],
        {
            "get_vlans.1": {},
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": f"+ vlan {v}"},
            "commit_config.1": {},
            # The switch accepted the commit but the uplink does not carry the VLAN.
            "get_vlans.2": _vlans(**{"Ethernet1": [v]}),
        },
    )
    change = convergence.change_create(device=mock_switch["switch"], segment=seg, cause="provision c")
    with pytest.raises(DeviceChangeFailed, match="verification failed after commit, rolled back") as exc:
        convergence.converge_change(change.pk)
    assert exc.value.device == "sw-eos"
    assert mock_switch["rollbacks"] == ["sw-eos.example.org"]
    change.refresh_from_db()
    assert change.status == "failed" and f"Ethernet49/1 has none, wanted {v}" in change.error

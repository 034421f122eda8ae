"""Vendor platforms: rendering is a pure function of the desired state (golden files live with the VLAN
life-cycle tests); the session flow is exercised lightly with NAPALM's replaying ``mock`` driver."""

from __future__ import annotations

import json

import pytest

from network.drivers import PermanentDeviceError, SwitchSpec, TemporaryDeviceError
from network.drivers.vendor import PLATFORMS, open_switch, render, vlan_list

DESIRED = {"Ethernet2": frozenset(), "Ethernet1": frozenset({100, 101, 102, 200})}


def test_vlan_list_is_compact():
    assert vlan_list({5, 1, 2, 3, 7, 8}) == "1-3,5,7-8"
    assert vlan_list(()) == ""


@pytest.mark.parametrize("platform", PLATFORMS)
def test_render_touches_only_the_owned_ports_and_their_vlans(platform):
    text = render(platform, DESIRED, {100: "physics"})
    assert "Ethernet1" in text and "Ethernet2" in text
    assert "physics" in text and "vc-200" in text
    assert "no vlan" not in text and "delete vlans" not in text  # VLANs are never deleted
    assert render(platform, DESIRED, {100: "physics"}) == text  # pure: same input, same text
    assert render(platform, {}, {}).strip() in ("", "end")


def test_render_ios_allowed_lists():
    text = render("ios", DESIRED, {})
    assert "interface Ethernet1\n switchport mode trunk\n switchport trunk allowed vlan 100-102,200\n" in text
    assert "interface Ethernet2\n switchport mode trunk\n switchport trunk allowed vlan none\n" in text
    assert "vlan 100\n name vc-100\n" in text


def test_render_junos_replaces_member_lists():
    text = render("junos", DESIRED, {})
    members = "set interfaces Ethernet1 unit 0 family ethernet-switching vlan members [ 100-102 200 ]"
    assert members in text
    assert text.index("delete interfaces Ethernet1 unit 0 family ethernet-switching vlan members") < text.index(members)
    assert "set vlans vc-200 vlan-id 200" in text
    assert "Ethernet2 unit 0 family ethernet-switching vlan members [" not in text


def test_render_unknown_platform_is_permanent():
    with pytest.raises(PermanentDeviceError, match="no configuration template"):
        render("ftos", DESIRED, {})


def mock_device(tmp_path, files: dict) -> SwitchSpec:
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    return SwitchSpec(
        name="sw-mock",
        platform="mock",
        address="192.0.2.1",
        driver_args={"path": str(tmp_path), "template": "eos"},
        owned_ports=("Ethernet1", "Ethernet2"),
    )


BEFORE = {"1": {"name": "default", "interfaces": ["Ethernet3"]}}
AFTER = {
    "100": {"name": "vc-100", "interfaces": ["Et1"]},
    "200": {"name": "vc-200", "interfaces": ["Ethernet1", "Ethernet2"]},
}


def test_mock_converge_commits_and_verifies(tmp_path):
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": BEFORE,
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": "+vlan 100\n+vlan 200"},
            "commit_config.1": {},
            "get_vlans.2": AFTER,
        },
    )
    with open_switch(spec) as session:
        result = session.converge({"Ethernet1": frozenset({100, 200}), "Ethernet2": frozenset({200})})
        assert session.device.calls["load_merge_candidate"] == 1 and session.device.calls["commit_config"] == 1
    assert result.changed and result.diff == "+vlan 100\n+vlan 200"
    assert result.before == {"Ethernet1": frozenset(), "Ethernet2": frozenset()}
    assert result.after == {"Ethernet1": frozenset({100, 200}), "Ethernet2": frozenset({200})}


def test_mock_failed_verification_rolls_back(tmp_path, monkeypatch):
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": BEFORE,
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": "+vlan 100"},
            "commit_config.1": {},
            "get_vlans.2": BEFORE,  # the device did not apply it
        },
    )
    rolled_back = []
    with open_switch(spec) as session:
        monkeypatch.setattr(session.device, "rollback", lambda: rolled_back.append(True), raising=False)
        with pytest.raises(PermanentDeviceError, match="sw-mock: verification failed.*Ethernet1 has none, wanted 100"):
            session.converge({"Ethernet1": frozenset({100})})
    assert rolled_back == [True]


def test_mock_empty_diff_commits_nothing(tmp_path):
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": AFTER,
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": ""},
            "discard_config.1": {},
            "get_vlans.2": AFTER,
        },
    )
    with open_switch(spec) as session:
        result = session.converge({"Ethernet2": frozenset({200})})
        assert "commit_config" not in session.device.calls
    assert not result.changed and result.diff == ""


def test_mock_rejected_config_is_permanent(tmp_path):
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": BEFORE,
            "load_merge_candidate.1": {
                "exception": "napalm.base.exceptions.MergeConfigException",
                "args": ["% Invalid input detected at '^' marker."],
            },
        },
    )
    with open_switch(spec) as session:
        with pytest.raises(PermanentDeviceError, match="sw-mock: load_merge_candidate: rejected: % Invalid input"):
            session.converge({"Ethernet1": frozenset({100})})


def test_mock_unreachable_is_temporary(tmp_path):
    spec = mock_device(tmp_path, {})
    spec = SwitchSpec(**{**spec.__dict__, "driver_args": {**spec.driver_args, "fail_on_open": True}})
    with pytest.raises(TemporaryDeviceError, match="sw-mock: open"):
        with open_switch(spec):
            pass


def test_mock_locked_config_is_temporary(tmp_path):
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": BEFORE,
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": "+vlan 100"},
            "commit_config.1": {"exception": "napalm.base.exceptions.SessionLockedException", "args": ["locked"]},
        },
    )
    with open_switch(spec) as session:
        with pytest.raises(TemporaryDeviceError, match="commit_config: SessionLockedException"):
            session.converge({"Ethernet1": frozenset({100})})

"""Vendor platforms: rendering is a pure function of the desired state (golden files live with the VLAN
life-cycle tests); the session flow is exercised lightly with NAPALM's replaying ``mock`` driver."""

from __future__ import annotations

import json

import pytest

from network.drivers import PermanentDeviceError, SwitchSpec, TemporaryDeviceError
from network.drivers.naming import vlan_name
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
    """The allowed list first, the trunk mode after it: an access port made a trunk first allowed every VLAN until
    the next line (IOS and NX-OS apply a merge line by line)."""
    text = render("ios", DESIRED, {})
    assert "interface Ethernet1\n switchport trunk allowed vlan 100-102,200\n switchport mode trunk\n" in text
    assert "interface Ethernet2\n switchport trunk allowed vlan none\n switchport mode trunk\n" in text
    nxos = render("nxos", DESIRED, {})
    assert "  switchport\n  switchport trunk allowed vlan 100-102,200\n  switchport mode trunk\n" in nxos
    assert "vlan 100\n name vc-100\n" in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_render_carries_static_vlans_but_never_creates_or_renames_them(platform):
    """A port's static VLANs (the hypervisor's management VLAN, say) are in its allowed list, and the
    operator's VLAN stays as it is: no "vlan 10 / name vc-10" over its own name."""
    desired = {"Ethernet1": frozenset({10, 100})}
    text = render(platform, desired, {100: "physics"}, existing=frozenset({10}))
    assert "physics" in text
    assert "vc-10" not in text and "vlan 10\n" not in text and "vlan-id 10\n" not in text
    assert "10" in text.split("Ethernet1", 1)[1]  # the trunk carries it
    if platform == "ios":
        assert " switchport trunk allowed vlan 10,100\n" in text


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


# --- what the real NAPALM drivers need (their classes, only the device I/O stubbed) ------------------------------


class _Stubbed:
    """A real NAPALM driver class of ``platform`` with its device I/O replaced: ``get_vlans`` answers from
    ``states`` in turn, the candidate calls are recorded, ``commit_config`` runs the driver's own checks."""

    @staticmethod
    def make(platform: str, states: list[dict], diff: str = "+ switchport trunk allowed vlan 100"):
        from napalm import get_network_driver

        driver = get_network_driver(platform)

        class Stub(driver):
            def __init__(self):
                super().__init__("192.0.2.1", "u", "p", timeout=5, optional_args={})
                self.states, self.calls = list(states), []

            def get_vlans(self):
                return self.states.pop(0) if len(self.states) > 1 else self.states[0]

            def load_merge_candidate(self, filename=None, config=None):
                self.calls.append(("load", config))

            def compare_config(self):
                return diff

            def discard_config(self):
                self.calls.append(("discard",))

            def rollback(self):
                self.calls.append(("rollback",))

            def commit_config(self, message="", revert_in=None):
                self.calls.append(("commit", message))
                if message and platform != "junos":  # the real driver's first check (it raises here)
                    return super().commit_config(message=message, revert_in=revert_in)
                return None  # past the driver's checks: the device would commit now

        return Stub()


@pytest.mark.parametrize("platform", ["ios", "eos", "nxos", "nxos_ssh", "junos"])
def test_a_commit_passes_the_real_drivers_own_checks(platform):
    """NAPALM's ios, eos and nxos drivers refuse any commit message (NotImplementedError, before doing
    anything): every change on them failed. Only Junos takes one."""
    from napalm import get_network_driver

    from network.drivers.vendor import NapalmSwitchSession

    if platform != "junos":  # what every commit ran into: the driver's refusal of any message
        with pytest.raises(NotImplementedError, match="Commit message not implemented"):
            get_network_driver(platform).commit_config(None, message="virtcloud")
    port = "ge-0/0/1" if platform == "junos" else "Ethernet1"
    device = _Stubbed.make(platform, [{}])
    spec = SwitchSpec(name="sw", platform=platform, address="x", owned_ports=(port,))
    session = NapalmSwitchSession(spec, device, lambda desired: "config")
    with pytest.raises(PermanentDeviceError) as failed:
        session.converge({port: frozenset({100})})  # the stub's device never shows the VLAN: verification fails
    assert "Commit message not implemented" not in str(failed.value), failed.value
    commits = [c for c in device.calls if c[0] == "commit"]
    assert commits and commits[0][1] == ("virtcloud: converge VLAN membership" if platform == "junos" else "")


def test_junos_ports_are_read_through_their_logical_unit():
    """Junos' ``get_vlans`` names the logical unit (``ge-0/0/1.0``, an active one with ``*``): read as the
    owned port, or every Junos change failed its verification and was rolled back."""
    from network.drivers.vendor import NapalmSwitchSession

    before = {"1": {"name": "default", "interfaces": ["ge-0/0/1.0*"]}}
    after = {"100": {"name": "vc-100", "interfaces": ["ge-0/0/1.0"]}}
    device = _Stubbed.make("junos", [before, after, after])
    spec = SwitchSpec(name="ex", platform="junos", address="x", owned_ports=("ge-0/0/1",))
    session = NapalmSwitchSession(spec, device, lambda desired: render("junos", desired))
    assert session.port_vlans() == {"ge-0/0/1": frozenset({1})}
    result = session.converge({"ge-0/0/1": frozenset({100})})
    assert result.changed and result.after == {"ge-0/0/1": frozenset({100})}


def test_junos_tolerates_deleting_members_a_port_does_not_have(monkeypatch):
    """The candidate sets each owned port's members absolutely (``delete`` then ``set``): on a port without
    members Junos warns "statement not found", which PyEZ raises unless told to ignore it."""
    from napalm import get_network_driver

    seen = {}

    class Junos(get_network_driver("junos")):
        def __init__(self, hostname, username, password, timeout=60, optional_args=None):
            seen.update(optional_args or {})
            super().__init__(hostname, username, password, timeout=timeout, optional_args=optional_args)

        def open(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr("network.drivers.vendor.get_network_driver", lambda platform: Junos)
    spec = SwitchSpec(name="ex", platform="junos", address="x", owned_ports=("ge-0/0/1",))
    with open_switch(spec):
        pass
    assert seen["ignore_warning"] == "statement not found"


def _transport_errors():
    import jnpr.junos.exception as junos
    import pyeapi.eapilib as eapi
    from lxml import etree
    from netmiko import exceptions as netmiko

    device = type("Device", (), {"hostname": "ex", "_hostname": "ex", "_port": 830})()

    def rpc_error(message: str):
        return etree.XML(
            f"<rpc-error><error-severity>error</error-severity><error-message>{message}</error-message></rpc-error>"
        )

    return [
        (netmiko.ReadTimeout("Pattern not detected: 'sw1#' in output"), TemporaryDeviceError),
        (netmiko.NetmikoTimeoutException("TCP connection to device failed"), TemporaryDeviceError),
        (netmiko.NetmikoAuthenticationException("Authentication to device failed"), PermanentDeviceError),
        (eapi.ConnectionError("https", "timed out"), TemporaryDeviceError),
        (junos.RpcTimeoutError(device, "get-vlan-information", 30), TemporaryDeviceError),
        (junos.ConnectRefusedError(device), TemporaryDeviceError),
        (junos.ConnectAuthError(device), PermanentDeviceError),
        # a commit the device rejected (EOS and Junos commit atomically: nothing of it applied), raised unwrapped by
        # NAPALM: permanent, named as refused — not a "driver bug"; a locked database stays temporary
        (eapi.CommandError(1002, 'CLI command 2 of 3 "vlan 5000" failed: invalid command'), "rejected"),
        (junos.CommitError(rsp=rpc_error("vlan-id 5000 out of range")), "rejected"),
        (junos.ConfigLoadError(rsp=rpc_error("syntax error")), "rejected"),
        (junos.LockError(rsp=rpc_error("configuration database locked by root")), TemporaryDeviceError),
    ]


@pytest.mark.parametrize(("error", "kind"), _transport_errors(), ids=lambda v: type(v).__name__)
def test_the_transports_own_errors_are_classified(error, kind):
    """netmiko, pyeapi and PyEZ errors that NAPALM lets through: a timeout or a lost connection (a switch
    reloading) is retried, a refused login is not — they failed as a "driver bug", never retried."""
    from network.drivers.vendor import classified

    refused = kind == "rejected"  # a refusal: permanent, said as rejected with the device's own words
    with pytest.raises(PermanentDeviceError if refused else kind) as caught, classified("sw", "get_vlans"):
        raise error
    if refused:
        assert "rejected" in caught.value.message and str(error) in caught.value.message


def test_a_failed_verification_is_undone_by_merging_the_ports_previous_state(tmp_path):
    """On the platforms whose NAPALM rollback replaces the whole configuration (EOS, IOS, NX-OS), the
    ports' previous state is merged back instead (``undo: merge``; here on the mock driver): nothing else of
    the device is replaced; its own rollback only when that merge does not bring the ports back."""
    before = {"100": {"name": "vc-100", "interfaces": ["Ethernet2"]}}
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": before,
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": "+vlan 200"},
            "commit_config.1": {},
            "get_vlans.2": before,  # the device did not apply it
            "load_merge_candidate.2": {},
            "compare_config.2": {"diff": "-vlan 200"},
            "commit_config.2": {},
            "get_vlans.3": before,
        },
    )
    spec = SwitchSpec(**{**spec.__dict__, "driver_args": {**spec.driver_args, "undo": "merge"}})
    with open_switch(spec) as session:
        with pytest.raises(PermanentDeviceError, match="verification failed after commit, undone"):
            session.converge({"Ethernet1": frozenset({200}), "Ethernet2": frozenset({100})})
        assert "rollback" not in session.device.calls
        assert session.device.calls["commit_config"] == 2  # the change, then the previous state merged back


@pytest.mark.parametrize(("platform", "vid"), [("ios", 1002), ("ios", 1005), ("nxos", 3968), ("nxos", 4094)])
def test_a_vlan_the_platform_reserves_is_refused(platform, vid):
    with pytest.raises(PermanentDeviceError, match=f"VLAN ids {vid} are reserved on {platform}"):
        render(platform, {"Ethernet1": frozenset({100, vid})})


@pytest.mark.parametrize("platform", ["ios", "eos", "nxos"])
def test_a_long_allowed_list_goes_on_with_add_lines(platform):
    """A fragmented set of VLANs is cut into lines of at most 200 characters of list: the first sets the
    allowed list, the others add to it (a short list is one line, as before)."""
    vids = frozenset(range(2, 1000, 2))
    text = render(platform, {"Ethernet1": vids})
    lines = [line.strip() for line in text.splitlines() if "allowed vlan" in line]
    assert lines[0].startswith("switchport trunk allowed vlan 2,4,") and len(lines) > 1
    assert all(line.startswith("switchport trunk allowed vlan add ") for line in lines[1:])
    assert max(len(line) for line in lines) <= len("switchport trunk allowed vlan add ") + 200
    listed = ",".join(line.rsplit(" ", 1)[1] for line in lines)
    assert sorted(int(v) for v in listed.split(",")) == sorted(vids)


@pytest.mark.parametrize("up", [False, True])
def test_a_port_that_is_down_does_not_fail_the_verification_of_a_live_vlan_list(up):
    """EOS, NX-OS and IOS list a VLAN's ports that are up: a hypervisor's port that is down shows none of
    its VLANs after the commit. That is no failed change (its configuration is what was committed): the
    session asks the device which ports are down; a port that is up and still lacks the VLAN fails."""
    from network.drivers.vendor import NapalmSwitchSession

    before = {"1": {"name": "default", "interfaces": []}}
    after = {"100": {"name": "vc-100", "interfaces": ["Ethernet1"]}}  # Ethernet2 is not listed
    device = _Stubbed.make("eos", [before, after, after])
    device.get_interfaces = lambda: {
        "Ethernet1": {"is_up": True},
        "Ethernet2": {"is_up": up},
    }
    spec = SwitchSpec(name="sw", platform="eos", address="x", owned_ports=("Ethernet1", "Ethernet2"))
    session = NapalmSwitchSession(spec, device, lambda desired: render("eos", desired), undo_by_merge=False)
    desired = {"Ethernet1": frozenset({100}), "Ethernet2": frozenset({100})}
    if up:
        with pytest.raises(PermanentDeviceError, match="Ethernet2 has none, wanted 100"):
            session.converge(desired)
    else:
        assert session.converge(desired).after == desired


def test_ios_can_set_the_trunk_encapsulation_first():
    """Catalysts that also speak ISL refuse ``switchport mode trunk`` while the encapsulation is "auto":
    ``trunk_encapsulation: dot1q`` (driver args) sets it first; without it nothing changes."""
    text = render("ios", {"Ethernet1": frozenset({100})}, trunk_encapsulation="dot1q")
    assert "interface Ethernet1\n switchport trunk encapsulation dot1q\n switchport trunk allowed vlan 100\n" in text
    assert text.index("encapsulation dot1q") < text.index("switchport mode trunk")
    assert "encapsulation" not in render("ios", {"Ethernet1": frozenset({100})})
    with pytest.raises(PermanentDeviceError, match="only dot1q"):
        render("ios", {"Ethernet1": frozenset({100})}, trunk_encapsulation="isl")


def test_an_undo_leaves_a_port_that_is_down_as_committed():
    """A port that is down reads as carrying nothing on EOS (its "before" is blind): the undo of a failed
    verification merges back only the ports that are up — it emptied the down port's real allowed list."""
    from network.drivers.vendor import NapalmSwitchSession

    before = {"50": {"name": "vc-50", "interfaces": []}}  # Ethernet2 is down: not listed
    device = _Stubbed.make("eos", [before, before, before, before])  # nothing shows: verification fails
    device.get_interfaces = lambda: {"Ethernet1": {"is_up": True}, "Ethernet2": {"is_up": False}}
    spec = SwitchSpec(name="sw", platform="eos", address="x", owned_ports=("Ethernet1", "Ethernet2"))
    session = NapalmSwitchSession(spec, device, lambda desired: render("eos", desired))
    with pytest.raises(PermanentDeviceError, match="undone \\(the ports that are up are as before\\)") as failed:
        session.converge({"Ethernet1": frozenset({100}), "Ethernet2": frozenset({50, 100})})
    undo = [call[1] for call in device.calls if call[0] == "load"][-1]
    assert "Ethernet1" in undo and "Ethernet2" not in undo
    # the down port keeps the change (VLAN 100): the device may carry it, it did not refuse it — it holds the
    # VLAN back from the pool until converged without it (it was recorded refused, so released while carried)
    assert failed.value.may_have_applied


def test_a_rollback_that_fails_says_the_change_may_be_on_the_device():
    """Verification fails after a commit, and the device's own rollback is refused: the error says the
    change may have been applied (its device then holds the segment's VLAN back in a rollback), unlike a
    change the device refused outright."""
    from napalm.base.exceptions import NapalmException

    from network import convergence
    from network.drivers.vendor import NapalmSwitchSession
    from network.models import DeviceKind

    device = _Stubbed.make("junos", [{"1": {"name": "default", "interfaces": []}}])

    def rollback():
        raise NapalmException("rollback refused")

    device.rollback = rollback
    spec = SwitchSpec(name="sw", platform="junos", address="x", owned_ports=("ge-0/0/1",))
    w = convergence._Device(DeviceKind.SWITCH, type("Switch", (), {"name": "sw"})(), claimed=[])
    w.spec, w.desired = spec, {"ge-0/0/1": frozenset({100})}
    convergence._drive(w, session=NapalmSwitchSession(spec, device, lambda desired: "config"))
    assert w.status == "failed" and "rollback refused" in w.error and w.exc.may_have_applied
    assert not w.refused


@pytest.mark.parametrize(("platform", "refused"), [("ios", False), ("nxos", False), ("eos", True), ("junos", True)])
def test_a_rejected_commit_was_refused_only_where_commits_are_all_or_nothing(platform, refused):
    """The device rejects the commit. EOS sessions and Junos commits take all of the candidate or none: the
    switch refused the change. IOS and NX-OS merge line by line and may have kept the lines before the one
    they rejected: the change may be on the switch (a rollback then holds the VLAN back)."""
    from napalm.base.exceptions import MergeConfigException

    from network import convergence
    from network.drivers.vendor import NapalmSwitchSession
    from network.models import DeviceKind

    device = _Stubbed.make(platform, [{"1": {"name": "default", "interfaces": []}}])

    def commit_config(message="", revert_in=None):
        raise MergeConfigException("% Invalid input detected at '^' marker.")

    device.commit_config = commit_config
    port = "ge-0/0/1" if platform == "junos" else "Ethernet1"
    spec = SwitchSpec(name="sw", platform=platform, address="x", owned_ports=(port,))
    w = convergence._Device(DeviceKind.SWITCH, type("Switch", (), {"name": "sw"})(), claimed=[])
    w.spec, w.desired = spec, {port: frozenset({100})}
    convergence._drive(w, session=NapalmSwitchSession(spec, device, lambda desired: "config"))
    assert w.status == "failed" and "Invalid input detected" in w.error
    assert (w.refused, w.exc.may_have_applied) == (refused, not refused)


@pytest.mark.parametrize("platform", ["eos", "junos"])
@pytest.mark.parametrize("after", ["applied", "unreadable"])
def test_a_commit_error_once_the_change_is_live_is_not_a_refusal(platform, after):
    """NAPALM's EOS commit sends ``write memory`` after the session's commit, and Junos unlocks after ``commit``:
    an error there comes once the change is live. The device showing the change (or not readable to tell) makes
    it one that may have applied — it was recorded refused, and a refused change lets the VLAN go back to the
    pool while the switch carries it."""
    from napalm.base.exceptions import CommitError

    from network import convergence
    from network.drivers.base import TemporaryDeviceError
    from network.drivers.vendor import NapalmSwitchSession
    from network.models import DeviceKind

    port = "ge-0/0/1" if platform == "junos" else "Ethernet1"
    empty = {"1": {"name": "default", "interfaces": []}}
    live = {**empty, "100": {"name": "vc-100", "interfaces": [port]}}
    device = _Stubbed.make(platform, [empty, live])

    def commit_config(message="", revert_in=None):
        raise CommitError("write memory: % Error copying system:/running-config to startup-config")

    device.commit_config = commit_config
    if after == "unreadable":

        def get_vlans():
            if not device.states:
                raise TemporaryDeviceError("sw", "connection reset")
            return device.states.pop(0)

        device.states = [empty]
        device.get_vlans = get_vlans
    spec = SwitchSpec(name="sw", platform=platform, address="x", owned_ports=(port,))
    w = convergence._Device(DeviceKind.SWITCH, type("Switch", (), {"name": "sw"})(), claimed=[])
    w.spec, w.desired = spec, {port: frozenset({100})}
    convergence._drive(w, session=NapalmSwitchSession(spec, device, lambda desired: "config"))
    assert w.status == "failed" and "write memory" in w.error
    assert w.exc.may_have_applied and not w.refused
    assert ("the device shows it on " + port if after == "applied" else "could not be read") in w.error


@pytest.mark.parametrize(
    "name_format",
    [
        "vc-{vid}\ninterface Gi0/1\n shutdown",  # a newline would start another statement on the switch
        "vc {vid}",
        'vc-"{vid}"',
        "{vid.__class__}",  # anything but the id
        "{0}",
        "x" * 40 + "{vid}",
        "vc-{vid",
        "",
    ],
)
def test_a_vlan_name_format_that_would_write_more_than_a_name_is_refused(name_format):
    with pytest.raises(ValueError, match="vlan_name_format"):
        vlan_name(name_format, 100)


def test_vlan_names_are_plain_words():
    assert vlan_name("vc-{vid}", 100) == "vc-100"
    assert vlan_name("grid{vid:04d}", 7) == "grid0007"
    assert vlan_name("virtcloud", 7) == "virtcloud"
    with pytest.raises(PermanentDeviceError, match="not plain words"):
        render("ios", {"Gi1/0/1": frozenset({100})}, {100: "a\nb"})


def test_a_switch_session_refuses_a_bad_vlan_name_format_before_loading_anything(tmp_path):
    spec = mock_device(tmp_path, {"get_vlans.1": BEFORE})
    spec = SwitchSpec(
        name=spec.name, platform=spec.platform, address=spec.address, owned_ports=spec.owned_ports,
        driver_args={**spec.driver_args, "vlan_name_format": "vc {vid}"},
    )  # fmt: skip
    with open_switch(spec) as session:
        with pytest.raises(PermanentDeviceError, match="vlan_name_format"):
            session.converge({"Ethernet1": frozenset({100})})
        assert session.device.calls.get("load_merge_candidate", 0) == 0


# --- the network engineer's review ------------------------------------------------------------------------------


def _opened(monkeypatch, device, spec: SwitchSpec):
    """``open_switch(spec)`` over ``device`` (a ``_Stubbed`` real driver: its open and close do nothing)."""
    device.open = device.close = lambda: None
    device.get_interfaces = lambda: {}
    monkeypatch.setattr("network.drivers.vendor.get_network_driver", lambda platform: lambda **kwargs: device)
    return open_switch(spec)


def _loads(device) -> list[str]:
    return [call[1] for call in device.calls if call[0] == "load"]


@pytest.mark.parametrize(
    ("platform", "port"), [("ios", "Gi1/0/1"), ("eos", "Ethernet1"), ("nxos", "Ethernet1/1"), ("junos", "ge-0/0/1")]
)
def test_a_vlan_the_device_already_has_is_carried_never_created_or_renamed(monkeypatch, platform, port):
    """get_vlans lists every VLAN of the device: one it has (the operator's "ops-100"; under IOS VTP server
    mode it is not even in the running configuration) is only put on the trunk, by id — "vlan 100 / name
    vc-100" renamed it, and Junos refused "set vlans vc-100 vlan-id 100" beside its own name."""
    device_vlans = {"100": {"name": "ops-100", "interfaces": []}, "1": {"name": "default", "interfaces": []}}
    after = {**device_vlans, "100": {"name": "ops-100", "interfaces": [port]}}
    after["200"] = {"name": "vc-200", "interfaces": [port]}
    device = _Stubbed.make(platform, [device_vlans, after])
    if platform == "junos":
        device.device = type("PyEZ", (), {"facts": {"switch_style": "VLAN_L2NG"}})()
    spec = SwitchSpec(name="sw", platform=platform, address="x", owned_ports=(port,))
    with _opened(monkeypatch, device, spec) as session:
        session.converge({port: frozenset({100, 200})})
    config = _loads(device)[0]
    assert "ops-100" not in config and "vc-100" not in config
    assert "\nvlan 100\n" not in "\n" + config and "vlan-id 100\n" not in config
    assert ("set vlans vc-200 vlan-id 200" if platform == "junos" else "vlan 200\n") in config
    assert ("vlan members [ 100 200 ]" if platform == "junos" else "switchport trunk allowed vlan 100,200\n") in config


def test_a_dry_run_renders_as_converge_does(tmp_path):
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": {"100": {"name": "ops-100", "interfaces": []}},
            "load_merge_candidate.1": {},
            "compare_config.1": {"diff": "+ switchport trunk allowed vlan 100"},
            "discard_config.1": {},
        },
    )
    with open_switch(spec) as session:
        loaded = []
        original = session.device.load_merge_candidate
        session.device.load_merge_candidate = lambda config=None: loaded.append(config) or original(config=config)
        assert session.plan({"Ethernet1": frozenset({100})}) == "+ switchport trunk allowed vlan 100"
    assert "\nvlan 100\n" not in "\n" + loaded[0] and "switchport trunk allowed vlan 100\n" in loaded[0]


def test_an_undo_creates_no_vlan_and_restores_reserved_ids_as_they_were():
    """The undo of a failed verification restores the allowed lists exactly as get_vlans read them: no
    "vlan 1 / name vc-1" (IOS: "%Default VLAN 1 may not have its name changed") and IOS' 1002-1005, under
    which it lists a trunk, are no reason to give up the undo for the device's whole-configuration rollback."""
    from network.drivers.vendor import NapalmSwitchSession

    port = "GigabitEthernet1/0/1"
    before = {str(v): {"name": f"v{v}", "interfaces": [port]} for v in (1, 10, 1002, 1003, 1004, 1005)}
    device = _Stubbed.make("ios", [before])  # the change never shows: verification fails, the undo "works"
    device.get_interfaces = lambda: {}
    spec = SwitchSpec(name="sw", platform="ios", address="x", owned_ports=(port,))
    session = NapalmSwitchSession(spec, device, lambda desired, **context: render("ios", desired, **context))
    with pytest.raises(PermanentDeviceError, match="undone \\(the ports are as before\\)"):
        session.converge({port: frozenset({10, 100})})
    assert ("rollback",) not in device.calls
    change, undo = _loads(device)
    assert "vlan 100\n name vc-100\n" in change  # the change itself still creates its VLAN
    assert "vlan " not in undo.split("interface", 1)[0] and " name " not in undo
    assert " switchport trunk allowed vlan 1,10,1002-1005\n" in undo
    with pytest.raises(PermanentDeviceError, match="reserved on ios"):  # the converge keeps the check
        session.converge({port: frozenset({1002})})


@pytest.mark.parametrize("failure", ["not restored", "commit refused"])
def test_an_undo_that_committed_never_calls_the_device_rollback(failure):
    """NAPALM's ios/eos/nxos commit snapshots the device first: after the undo's commit the device's own
    rollback would restore the failed change, not the state before it. The change is said to be possibly on
    the device (``may_have_applied``), and nothing is "rolled back"."""
    from napalm.base.exceptions import CommitError

    from network.drivers.vendor import NapalmSwitchSession

    before = {"50": {"name": "vc-50", "interfaces": ["Ethernet1"]}}
    wrong = {"50": {"name": "vc-50", "interfaces": []}}
    device = _Stubbed.make("eos", [before, wrong])  # neither the change nor its undo shows
    device.get_interfaces = lambda: {"Ethernet1": {"is_up": True}}
    commit = device.commit_config

    def commit_config(message="", revert_in=None):
        commit(message=message, revert_in=revert_in)
        if failure == "commit refused" and len([c for c in device.calls if c[0] == "commit"]) == 2:
            raise CommitError("undo refused")

    device.commit_config = commit_config
    spec = SwitchSpec(name="sw", platform="eos", address="x", owned_ports=("Ethernet1",))
    session = NapalmSwitchSession(spec, device, lambda desired: render("eos", desired))
    with pytest.raises(PermanentDeviceError, match="the undo did not restore the ports") as failed:
        session.converge({"Ethernet1": frozenset({50, 100})})
    assert failed.value.may_have_applied and "rolled back" not in str(failed.value)
    assert "may be on the device" in str(failed.value)
    assert ("undo refused" if failure == "commit refused" else "Ethernet1 has none, was 50") in str(failed.value)
    assert ("rollback",) not in device.calls
    assert len([c for c in device.calls if c[0] == "commit"]) == 2


def test_an_undo_that_never_committed_falls_back_to_the_device_rollback():
    """The undo's compare fails: its candidate is discarded, nothing of it was committed, so the device's
    rollback (its snapshot is still the one from before the change) runs."""
    from napalm.base.exceptions import CommandErrorException

    from network.drivers.vendor import NapalmSwitchSession

    before = {"50": {"name": "vc-50", "interfaces": ["Ethernet1"]}}
    device = _Stubbed.make("eos", [before, {}])
    device.get_interfaces = lambda: {"Ethernet1": {"is_up": True}}
    compares = []

    def compare_config():
        compares.append(1)
        if len(compares) == 2:
            raise CommandErrorException("show session-config diffs failed")
        return "+ switchport trunk allowed vlan 50,100"

    device.compare_config = compare_config
    spec = SwitchSpec(name="sw", platform="eos", address="x", owned_ports=("Ethernet1",))
    session = NapalmSwitchSession(spec, device, lambda desired: render("eos", desired))
    with pytest.raises(PermanentDeviceError, match="verification failed after commit, rolled back"):
        session.converge({"Ethernet1": frozenset({50, 100})})
    kinds = [call[0] for call in device.calls]
    assert kinds == ["load", "commit", "load", "discard", "rollback"]


@pytest.mark.parametrize("discard", [{}, {"exception": "napalm.base.exceptions.CommandErrorException", "args": ["x"]}])
def test_a_failed_compare_discards_the_candidate(tmp_path, discard):
    """EOS: a config session left open after a failed compare made NAPALM's lock refuse every later load
    (SessionLockedException: temporary, retried forever). The compare's own error is the one raised."""
    spec = mock_device(
        tmp_path,
        {
            "get_vlans.1": BEFORE,
            "load_merge_candidate.1": {},
            "compare_config.1": {"exception": "napalm.base.exceptions.ConnectionException", "args": ["eAPI reset"]},
            "discard_config.1": discard,
        },
    )
    with open_switch(spec) as session:
        with pytest.raises(TemporaryDeviceError, match="compare_config: ConnectionException: eAPI reset"):
            session.converge({"Ethernet1": frozenset({100})})
        assert session.device.calls["discard_config"] == 1
        assert "commit_config" not in session.device.calls


class _PyEZ:
    def __init__(self, facts):
        self._facts = facts

    @property
    def facts(self):
        if isinstance(self._facts, Exception):
            raise self._facts
        return self._facts


@pytest.mark.parametrize(
    ("facts", "args", "mode"),
    [
        ({"switch_style": "VLAN"}, {}, "port-mode trunk"),  # EX2200/3300/4200
        ({"switch_style": "VLAN_L2NG"}, {}, "interface-mode trunk"),  # ELS
        ({}, {}, "interface-mode trunk"),
        (ConnectionError("facts RPC failed"), {}, "interface-mode trunk"),  # in doubt: ELS, no error
        ({"switch_style": "VLAN"}, {"template": "junos"}, "interface-mode trunk"),  # the operator's word
        ({"switch_style": "VLAN_L2NG"}, {"template": "junos_nonels"}, "port-mode trunk"),
    ],
)
def test_junos_non_els_switches_get_port_mode_trunk(monkeypatch, facts, args, mode):
    """Non-ELS EX switches (PyEZ fact switch_style "VLAN", what NAPALM's own get_vlans reads) know no
    "interface-mode trunk": the ``junos_nonels`` template, chosen by itself unless ``template`` is given."""
    device = _Stubbed.make("junos", [{}])
    device.device = _PyEZ(facts)
    spec = SwitchSpec(name="ex", platform="junos", address="x", owned_ports=("ge-0/0/1",), driver_args=args)
    with _opened(monkeypatch, device, spec) as session:
        text = session.render({"ge-0/0/1": frozenset({100})})
    assert f"set interfaces ge-0/0/1 unit 0 family ethernet-switching {mode}\n" in text
    assert "vlan members [ 100 ]" in text and "set vlans vc-100 vlan-id 100" in text


LONG = frozenset(range(2, 1000, 2))  # 499 VLANs: several lines


@pytest.mark.parametrize("platform", ["ios", "nxos"])
def test_a_long_allowed_list_is_changed_by_add_and_remove_lines_from_the_known_list(platform):
    """IOS and NX-OS apply a merge line by line: "allowed vlan <first chunk>" dropped every VLAN of the
    later "add" lines for a moment (spanning tree, MAC flush) on the trunks carrying the most VLANs, at every
    converge. A port whose list is known changes only by what differs; one carrying its set is not touched."""
    desired = {"Eth1": LONG | {1001, 1007}, "Eth2": LONG, "Eth3": LONG, "Eth4": frozenset({100})}
    current = {"Eth1": LONG - {2, 500} | {7, 9}, "Eth2": LONG, "Eth4": frozenset({100, 200})}  # Eth3: unknown
    existing = LONG | {7, 9, 100, 200, 1001, 1007}  # (the device has every VLAN: none is created)
    text = render(platform, desired, existing=existing, current=current)
    port = {name: text.split(f"interface {name}\n", 1)[1].split("interface", 1)[0] for name in ("Eth1", "Eth3", "Eth4")}
    lines = [line.strip() for line in port["Eth1"].splitlines() if "allowed vlan" in line]
    assert lines == ["switchport trunk allowed vlan add 2,500,1001,1007", "switchport trunk allowed vlan remove 7,9"]
    assert "interface Eth2\n" not in text  # already carries exactly its set
    # unknown (down: no traffic to disrupt) or fitting one line: the absolute form, as before
    assert port["Eth3"].count("switchport trunk allowed vlan 2,4,") == 1
    assert "switchport trunk allowed vlan 100\n" in port["Eth4"]
    assert render(platform, desired) == render(platform, desired, current=None)  # pure


@pytest.mark.parametrize("platform", ["ios", "nxos"])
def test_a_vlan_created_is_removed_from_the_long_lists_that_must_not_carry_it(platform):
    """The device shows a port's VLANs among those it has: an id whose VLAN was deleted by hand may still be on
    a long allowed list, unseen, and would be carried there once the VLAN is created again. So a converge that
    creates VLANs removes them from every long list it changes by add/remove lines that must not carry them —
    also from one whose known VLANs are already right; a VLAN that exists is left to the lists as shown."""
    desired = {"Eth1": LONG | {1001}, "Eth2": LONG, "Eth3": LONG | {1001}}
    current = {"Eth1": LONG, "Eth2": LONG, "Eth3": LONG}
    text = render(platform, desired, existing=LONG | {7}, current=current)
    port = {name: text.split(f"interface {name}\n", 1)[1].split("interface", 1)[0] for name in ("Eth1", "Eth2")}
    assert [line.strip() for line in port["Eth2"].splitlines() if "allowed vlan" in line] == [
        "switchport trunk allowed vlan remove 1001"
    ]
    assert [line.strip() for line in port["Eth1"].splitlines() if "allowed vlan" in line] == [
        "switchport trunk allowed vlan add 1001"
    ]
    assert text.index("vlan 1001\n") < text.index("interface Eth1\n")
    assert "interface Eth2\n" not in render(platform, desired, existing=LONG | {1001}, current=current)
    # an undo creates nothing, so removes nothing more
    undone = render(platform, {"Eth2": LONG}, existing=LONG | {7, 1001}, current={"Eth2": LONG | {1001}}, undo=True)
    assert [line.strip() for line in undone.splitlines() if "allowed vlan" in line] == [
        "switchport trunk allowed vlan remove 1001"
    ]


def applied(lines: list[str], allowed: frozenset[int]) -> frozenset[int]:
    """What a trunk allowing ``allowed`` allows after IOS/NX-OS apply ``lines`` one by one; each step's list too
    (``applied.steps``), to see what a line in between dropped."""
    steps = []
    for line in lines:
        words = line.split()
        verb, ids = (words[4], words[5]) if words[4] in ("add", "remove") else ("set", words[4])
        vids = set()
        for part in ("" if ids == "none" else ids).split(","):
            if part:
                low, _, high = part.partition("-")
                vids |= set(range(int(low), int(high or low) + 1))
        allowed = {"set": frozenset(vids), "add": allowed | vids, "remove": allowed - vids}[verb]
        steps.append(allowed)
    applied.steps = steps
    return allowed


EVERYTHING = frozenset(range(1, 4095))


@pytest.mark.parametrize("platform", ["ios", "nxos"])
def test_a_port_that_may_allow_all_gets_its_long_list_with_no_wanted_vlan_dropped_in_between(platform):
    """A trunk that allows "all" (the default; NX-OS lists no reserved id for it) shows every VLAN the device has:
    remove lines from what it shows would leave it carrying every VLAN created later. Its long list was set
    absolutely: the first line cut it to the first chunk until the "add" lines after it, and a trunk toward a router
    or a switch learned the later VLANs again through spanning tree. Now every wanted VLAN is added, then every other
    id removed (but those the platform keeps): the wanted list exactly, from "all", never one dropped in between.
    A port showing fewer than all of them (a list the portal set) changes by add/remove lines from its list."""
    from network.drivers.vendor import PLATFORM_RESERVED

    device = frozenset({1}) | LONG | {7, 9}
    desired = {"Eth1": LONG | {1001}}
    text = render(platform, desired, existing=device, current={"Eth1": device})
    lines = [line.strip() for line in text.splitlines() if "allowed vlan" in line]
    assert all(" add " in line or " remove " in line for line in lines)
    kept = PLATFORM_RESERVED.get(platform, frozenset())
    assert applied(lines, EVERYTHING) == desired["Eth1"] | kept
    assert all(desired["Eth1"] <= step for step in applied.steps)  # (no wanted VLAN dropped at any line)
    assert all(len(line.rsplit(" ", 1)[1]) <= 200 for line in lines)
    text = render(platform, desired, existing=device, current={"Eth1": device - {1}})
    lines = [line.strip() for line in text.splitlines() if "allowed vlan" in line]
    assert lines == ["switchport trunk allowed vlan add 1001", "switchport trunk allowed vlan remove 7,9"]


@pytest.mark.parametrize("platform", ["ios", "nxos"])
def test_a_port_showing_one_vlan_may_be_no_trunk_yet_and_gets_exactly_its_list(platform):
    """An owned port still in access (or dynamic) mode shows one VLAN; made a trunk, its allowed list is the
    default "all": add/remove lines from the one VLAN it shows would leave 2-4094 — every VLAN of the switch on a
    hypervisor's port. It gets every wanted VLAN added and every other id removed: exactly its list."""
    from network.drivers.vendor import PLATFORM_RESERVED

    text = render(platform, {"Eth1": LONG}, existing=LONG | {1}, current={"Eth1": frozenset({1})})
    lines = [line.strip() for line in text.splitlines() if "allowed vlan" in line]
    assert applied(lines, EVERYTHING) == LONG | PLATFORM_RESERVED.get(platform, frozenset())
    assert text.index("allowed vlan") < text.index("switchport mode trunk")


def test_add_and_remove_lines_are_cut_at_the_line_width():
    current = {"Eth1": frozenset(range(1007, 2000, 2))}
    text = render("ios", {"Eth1": LONG}, current=current)
    lines = [line.strip() for line in text.splitlines() if "allowed vlan" in line]
    adds = [line for line in lines if line.startswith("switchport trunk allowed vlan add ")]
    removes = [line for line in lines if line.startswith("switchport trunk allowed vlan remove ")]
    assert len(adds) > 1 and len(removes) > 1 and lines == adds + removes
    assert all(len(line.rsplit(" ", 1)[1]) <= 200 for line in lines)
    assert sorted(int(v) for line in adds for v in line.rsplit(" ", 1)[1].split(",")) == sorted(LONG)


@pytest.mark.parametrize("platform", ["eos", "junos"])
def test_atomic_platforms_keep_the_absolute_allowed_list(platform):
    """EOS config sessions and Junos commits apply at once: their long lists stay set absolutely."""
    text = render(platform, {"Eth1": LONG}, current={"Eth1": LONG - {2}})
    assert "allowed vlan add 2\n" not in text and ("vlan members [ 2 4 " in text or "allowed vlan 2,4," in text)


def test_a_list_ios_shows_as_all_gets_exactly_the_wanted_list():
    """A trunk IOS lists under 1002-1005 carries the default "all", not a list the portal set: an add/remove from
    the VLANs that exist today would leave every future one allowed. Every other id is removed (but 1002-1005,
    which IOS keeps on every trunk)."""
    text = render("ios", {"Eth1": LONG}, current={"Eth1": LONG | {1, 1002, 1003, 1004, 1005}})
    lines = [line.strip() for line in text.splitlines() if "allowed vlan" in line]
    assert applied(lines, EVERYTHING) == LONG | {1002, 1003, 1004, 1005}
    assert all(LONG <= step for step in applied.steps)


def test_an_ios_session_changes_a_long_trunk_by_add_and_remove_lines(monkeypatch):
    port = "TenGigabitEthernet1/1/1"
    now = {str(v): {"name": f"vc-{v}", "interfaces": [port]} for v in LONG - {500}}
    now["7"] = {"name": "ops-7", "interfaces": [port]}
    after = {str(v): {"name": f"vc-{v}", "interfaces": [port]} for v in LONG}
    for vlans in (now, after):  # the default VLAN, which the trunk (set by the portal) does not carry
        vlans["1"] = {"name": "default", "interfaces": ["GigabitEthernet1/0/9"]}
    device = _Stubbed.make("ios", [now, after])
    spec = SwitchSpec(name="sw", platform="ios", address="x", owned_ports=(port,))
    with _opened(monkeypatch, device, spec) as session:
        session.converge({port: LONG})
    config = _loads(device)[0]
    assert "vlan 500\n name vc-500\n" in config and "vlan 2\n" not in config  # only the missing VLAN created
    lines = [line.strip() for line in config.splitlines() if "allowed vlan" in line]
    assert lines == ["switchport trunk allowed vlan add 500", "switchport trunk allowed vlan remove 7"]


def test_nxos_over_ssh_is_a_platform_of_its_own_with_the_nxos_configuration():
    """NX-OS without NX-API (NAPALM's ``nxos_ssh``) takes the CLI lines ``nxos`` does — the long-list add/remove form
    included — and keeps the ids NX-OS reserves; an inventory switch may say so."""
    from network.choices import Platform
    from network.drivers.base import _SWITCH_DRIVERS

    long = frozenset(range(100, 1000, 2))
    current = {"Ethernet1": long - {100}, "Ethernet2": frozenset({7})}
    for desired, kwargs in (
        (DESIRED, {}),
        ({"Ethernet1": long, "Ethernet2": frozenset()}, {"current": current, "existing": long}),
    ):
        assert render("nxos_ssh", desired, {100: "physics"}, **kwargs) == render(
            "nxos", desired, {100: "physics"}, **kwargs
        )
    assert "switchport trunk allowed vlan add 100\n" in render(
        "nxos_ssh", {"Ethernet1": long}, {}, current=current, existing=long
    )
    with pytest.raises(PermanentDeviceError, match="reserved on nxos_ssh"):
        render("nxos_ssh", {"Ethernet1": frozenset({4000})}, {})
    assert "nxos_ssh" in Platform.values and _SWITCH_DRIVERS["nxos_ssh"] == "network.drivers.vendor"


@pytest.mark.parametrize("platform", ["junos", "ios", "nxos"])
def test_a_vlan_is_never_created_with_a_name_another_vlan_of_the_device_has(platform):
    """``set vlans vc-100 vlan-id 100`` where the switch has a VLAN named vc-100 with id 555 re-tags that VLAN
    (Junos), and every port in it; IOS and NX-OS may refuse the name. Refused before anything is loaded, naming
    both; a VLAN that exists already (carried by id) or a name nobody has is fine."""
    from network.drivers.vendor import NapalmSwitchSession

    port = "xe-0/0/1" if platform == "junos" else "Ethernet1/1"
    with pytest.raises(PermanentDeviceError, match="vc-100 is VLAN 555's, not 100's"):
        render(platform, {port: frozenset({100})}, taken={"vc-100": 555})
    assert "vc-100" not in render(platform, {port: frozenset({100})}, existing=frozenset({100}), taken={"vc-100": 100})
    assert "vc-101" in render(platform, {port: frozenset({101})}, taken={"vc-100": 555})

    device = _Stubbed.make(platform, [{"555": {"name": "vc-100", "interfaces": []}}])
    spec = SwitchSpec(name="sw", platform=platform, address="x", owned_ports=(port,))
    session = NapalmSwitchSession(spec, device, lambda desired, **context: render(platform, desired, **context))
    with pytest.raises(PermanentDeviceError, match="rename them there, or change vlan_name_format"):
        session.converge({port: frozenset({100})})
    assert device.calls == []  # nothing loaded, nothing committed


def test_a_port_the_device_names_otherwise_is_refused_before_anything_is_changed():
    """An inventory port that ``get_vlans`` lists under no VLAN read as a port carrying nothing — also one the
    device names otherwise, or a typo: a failed change's undo then committed "allowed vlan none" to the real port
    and said it was as before. A port listed nowhere must be an interface of the device (asked only then); the
    case of a name does not matter (``ethernet1`` is the device's ``Ethernet1``)."""
    from network.drivers.vendor import NapalmSwitchSession

    def session_for(port: str, states: list[dict], interfaces: dict):
        device = _Stubbed.make("eos", states)
        device.get_interfaces = lambda: interfaces
        spec = SwitchSpec(name="sw", platform="eos", address="x", owned_ports=(port,))
        return device, NapalmSwitchSession(spec, device, lambda desired, **context: render("eos", desired, **context))

    carrying = {
        "1": {"name": "default", "interfaces": ["Ethernet1"]},
        "300": {"name": "x", "interfaces": ["Ethernet1"]},
    }
    device, session = session_for("ethernet1", [carrying], {"Ethernet1": {"is_up": True}})
    assert session.port_vlans() == {"ethernet1": frozenset({1, 300})}  # (in any case)

    device, session = session_for("Ethernet9", [carrying], {"Ethernet1": {"is_up": True}})
    with pytest.raises(PermanentDeviceError, match="ports Ethernet9 are not interfaces of the switch"):
        session.converge({"Ethernet9": frozenset({100})})
    assert device.calls == []  # nothing loaded, nothing committed

    added = {**carrying, "100": {"name": "vc-100", "interfaces": ["Ethernet2"]}}
    device, session = session_for("Ethernet2", [carrying, added], {"Ethernet1": {}, "Ethernet2": {}})
    assert session.converge({"Ethernet2": frozenset({100})}).after == {"Ethernet2": frozenset({100})}

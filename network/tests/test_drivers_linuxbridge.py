"""Tests of the ``linuxbridge`` switch driver (NAPALM) and host driver, and a two-switch isolation check.

Two kinds of tests:

- Command-layer and format tests run everywhere: the ssh transport against a stateful fake runner that
  speaks iproute2's JSON, and real subprocess failures of the ssh client.
- Kernel tests need 802.1Q (VLAN devices, VLAN-aware bridges) and root. Where the running kernel has it
  they run directly; this machine's kernel (and CI's) lacks it, so they are skipped here with a reason and
  run inside the QEMU guest of ``scripts/vm-lane.sh`` (``make test`` runs it), where a skip is a failure.

No Django and no database: the guest runs ``pytest -p no:django`` with ``network/lab/vmlane/pytest.ini``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from napalm.base.exceptions import CommitError, ConnectionException, MergeConfigException
from napalm.base.models import FactsDict, VlanDict

from network.drivers.base import (
    HostSpec,
    PermanentDeviceError,
    SwitchSpec,
    TemporaryDeviceError,
    host_session,
    switch_session,
)
from network.drivers.linuxbridge import (
    LinuxBridgeAuthError,
    LinuxBridgeCommitError,
    LinuxBridgeConfigError,
    LinuxBridgeDriver,
    LinuxBridgeUnreachable,
    LocalRunner,
    RunResult,
    SshRunner,
    driver_for,
    format_vids,
    parse_bridge_vlan_json,
    parse_candidate,
    parse_vids,
)


def _load_fabric():
    # By path, not ``import network.lab...``: the lane must not pull in the OVS lab package (and whatever it
    # imports) inside the guest; the vmlane helper is self-contained.
    path = Path(__file__).resolve().parents[1] / "lab" / "vmlane" / "fabric.py"
    spec = importlib.util.spec_from_file_location("vmlane_fabric", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vmlane = _load_fabric()
IN_GUEST = os.environ.get("VIRTCLOUD_VMLANE") == "1"


# ============================================================================ format and command layer


def test_vlan_lists_round_trip_and_reject_bad_ids():
    assert format_vids([]) == "none"
    assert format_vids([200, 100, 101, 102, 4094]) == "100-102,200,4094"
    assert parse_vids("100-102,200,4094") == {100, 101, 102, 200, 4094}
    assert parse_vids("none") == frozenset()
    for bad in ("0", "4095", "100-90", "10,,20", "ten", "100 200"):
        with pytest.raises(ValueError):
            parse_vids(bad)


def test_candidate_parser_takes_tagged_lists_only():
    text = "! comment\n# comment\n\nport p-h1 vlans 100,200\nport p-h2 vlans none\nport p-h1 vlans 300\n"
    assert parse_candidate(text) == {"p-h1": frozenset({300}), "p-h2": frozenset()}  # later lines win
    for bad in ("port p-h1 vlan 100", "interface p-h1", "port p-h1 vlans 100 pvid 5", "port p-h1 vlans 4095"):
        with pytest.raises(ValueError, match="line 1"):
            parse_candidate(bad)


def test_bridge_json_parser_handles_ranges_untagged_and_old_iproute2():
    new = [
        {"ifname": "p-h1", "vlans": [{"vlan": 100}, {"vlan": 102, "vlanEnd": 104}]},
        {"ifname": "acc", "vlans": [{"vlan": 5, "flags": ["PVID", "Egress Untagged"]}, {"vlan": 7}]},
    ]
    ports = parse_bridge_vlan_json(new, ["p-h1", "acc", "empty"])
    assert ports["p-h1"].tagged == {100, 102, 103, 104} and not ports["p-h1"].untagged
    assert (ports["acc"].tagged, ports["acc"].untagged, ports["acc"].pvid) == ({7}, {5}, 5)
    assert ports["empty"].tagged == frozenset() and ports["empty"].pvid is None
    old = {"p-h1": [{"vlan": 100}, {"vlan": 200}]}  # iproute2 < 5 printed an object keyed by port
    assert parse_bridge_vlan_json(old, ["p-h1"])["p-h1"].tagged == {100, 200}


class FakeLinuxBox:
    """A stateful stand-in for a remote Linux switch: answers iproute2's JSON and runs ``bridge -batch``.

    ``reject`` holds ports the fake kernel refuses VLAN changes on (like a port that left the bridge);
    ``-batch`` stops at the first failure unless ``-force``, as iproute2 does.
    """

    def __init__(self, ports: dict[str, set[int]], reject=(), fail_with: Exception | None = None, native=None):
        self.tagged = {port: set(vids) for port, vids in ports.items()}
        self.native = dict(native or {})  # port -> its PVID, untagged VLAN
        self.reject = set(reject)
        self.fail_with = fail_with
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv, *, input=None, timeout):
        self.calls.append((list(argv), input))
        if self.fail_with is not None:
            raise self.fail_with
        argv = [a for a in argv if a not in ("sudo", "-n")]
        if argv[:3] == ["ip", "-json", "link"]:
            links = [{"ifname": "lo"}] if argv[-1] == "lo" else [{"ifname": "lo"}, {"ifname": "eth0"}]
            return RunResult(0, json.dumps(links), "")
        if argv[:3] == ["ip", "-json", "-details"]:
            links = [
                {"ifname": "lo"},
                {"ifname": "br0", "linkinfo": {"info_kind": "bridge", "info_data": {"vlan_filtering": 1}}},
            ] + [{"ifname": p, "master": "br0", "linkinfo": {"info_kind": "veth"}} for p in self.tagged]
            return RunResult(0, json.dumps(links), "")
        if argv[:3] == ["bridge", "-json", "vlan"]:
            data = [
                {
                    "ifname": p,
                    "vlans": [{"vlan": v} for v in sorted(vids - {self.native.get(p)})]
                    + ([{"vlan": self.native[p], "flags": ["PVID", "Egress Untagged"]}] if p in self.native else []),
                }
                for p, vids in self.tagged.items()
            ]
            data.append({"ifname": "mgmt", "vlans": [{"vlan": 5, "flags": ["PVID", "Egress Untagged"]}]})
            return RunResult(0, json.dumps(data), "")
        if argv[0] == "bridge" and argv[-2:] == ["-batch", "-"]:
            force, errors = "-force" in argv, []
            for number, line in enumerate(input.splitlines(), start=1):
                _, action, _, port, _, vid = line.split()
                if port in self.reject:
                    errors.append(f"RTNETLINK answers: Operation not supported\nCommand failed -:{number}")
                    if not force:
                        break
                    continue
                (self.tagged[port].add if action == "add" else self.tagged[port].discard)(int(vid))
            return RunResult(1 if errors else 0, "", "\n".join(errors))
        if argv == ["uname", "-r"]:
            return RunResult(0, "6.1.0-test-amd64\n", "")
        if argv == ["cat", "/proc/uptime"]:
            return RunResult(0, "1234.5 2000.0\n", "")
        return RunResult(127, "", f"{argv[0]}: command not found")

    def batches(self):
        return [(argv, script) for argv, script in self.calls if "-batch" in argv]


def _ssh_driver(box, **extra):
    args = {"transport": "ssh", "runner": box, "owned_ports": ("p-h1", "p-h2"), "name": "sw-remote", **extra}
    return LinuxBridgeDriver("sw-remote.example.org", "netops", "", 10, args)


def test_ssh_command_layer_reads_merges_commits_and_rolls_back():
    box = FakeLinuxBox({"p-h1": {100, 200}, "p-h2": set()})
    with _ssh_driver(box, sudo=True) as driver:
        assert driver.get_vlans() == {  # mgmt is not a port of br0 on this box: its VLANs are not ours
            100: {"name": "vlan100", "interfaces": ["p-h1"]},
            200: {"name": "vlan200", "interfaces": ["p-h1"]},
        }
        assert driver.get_facts()["os_version"] == "6.1.0-test-amd64"
        driver.load_merge_candidate(config="port p-h1 vlans 100,300\n")
        assert driver.compare_config() == "-port p-h1 vlan 200\n+port p-h1 vlan 300\n"
        driver.commit_config()
        assert box.tagged == {"p-h1": {100, 300}, "p-h2": set()}
        argv, script = box.batches()[-1]
        assert argv == ["sudo", "-n", "bridge", "-batch", "-"]
        assert script == "vlan del dev p-h1 vid 200\nvlan add dev p-h1 vid 300\n"
        driver.rollback()
        assert box.tagged["p-h1"] == {100, 200}
    assert all(call[0][:2] == ["sudo", "-n"] for call in box.calls)


def _remote_spec(box, owned_ports: tuple[str, ...], **statics) -> SwitchSpec:
    """A Linux switch over ssh whose commands ``box`` answers, owning ``owned_ports``, with ``statics``."""
    return SwitchSpec(
        name="sw-remote",
        platform="linuxbridge",
        address="sw-remote.example.org",
        username="netops",
        driver_args={"transport": "ssh", "runner": box},
        owned_ports=owned_ports,
        timeout=10,
        **statics,
    )


def test_a_native_vlan_named_static_counts_as_carried_and_is_never_made_tagged():
    """A host trunk whose untagged PVID VLAN is the hypervisor's management network, put in the port's static VLANs
    as the README says: carried as it is — never added again (the kernel would take its PVID and untagged flags:
    the host's untagged traffic cut), never deleted; the cluster VLANs change beside it. Not named static: it is
    not the portal's, neither carried nor missing."""
    box = FakeLinuxBox({"p-h1": {100}, "p-h2": set()}, native={"p-h1": 5})
    spec = _remote_spec(box, ("p-h1", "p-h2"), static_vlans=frozenset({5}))
    with switch_session(spec) as session:
        assert session.port_vlans() == {"p-h1": {5, 100}, "p-h2": set()}
        result = session.converge({"p-h1": frozenset({5, 200}), "p-h2": frozenset({5})})
    scripts = [script for _argv, script in box.batches()]
    assert scripts == ["vlan del dev p-h1 vid 100\nvlan add dev p-h1 vid 200\nvlan add dev p-h2 vid 5\n"], scripts
    assert result.after["p-h1"] == {5, 200}
    with switch_session(replace(spec, static_vlans=frozenset())) as session:
        assert session.port_vlans()["p-h1"] == {200}  # (not the portal's: not counted)


def test_a_static_vlan_counts_as_carried_on_its_own_port_only():
    """The uplink names VLAN 10 static (carried untagged); a host trunk's own untagged PVID is also 10, not named
    static there. Counted switch-wide, 10 read as carried on the host trunk, whose verification then found
    "10,100, wanted 100" on every commit — every cluster at the switch failed; each port's own statics now."""
    box = FakeLinuxBox({"p-h1": set(), "uplink": set()}, native={"p-h1": 10, "uplink": 10})
    spec = _remote_spec(box, ("p-h1", "uplink"), static_vlans=frozenset({10}), port_static_vlans={"uplink": {10}})
    with switch_session(spec) as session:
        assert session.port_vlans() == {"p-h1": set(), "uplink": {10}}
        result = session.converge({"p-h1": frozenset({100}), "uplink": frozenset({10, 100})})
    assert result.after == {"p-h1": {100}, "uplink": {10, 100}}
    assert [script for _argv, script in box.batches()] == ["vlan add dev p-h1 vid 100\nvlan add dev uplink vid 100\n"]


def test_ssh_command_layer_restores_touched_ports_when_the_box_rejects_a_change():
    box = FakeLinuxBox({"p-h1": {100}, "p-h2": set()}, reject={"p-h2"})
    with _ssh_driver(box) as driver:
        driver.load_merge_candidate(config="port p-h1 vlans 100,200\nport p-h2 vlans 300\n")
        with pytest.raises(LinuxBridgeCommitError) as caught:
            driver.commit_config()
    assert isinstance(caught.value, PermanentDeviceError) and isinstance(caught.value, CommitError)
    assert "Operation not supported" in str(caught.value) and "ports restored" in str(caught.value)
    assert not caught.value.may_have_applied  # refused: nothing of it stayed
    assert box.tagged == {"p-h1": {100}, "p-h2": set()}
    (first, script), (restore, restore_script) = box.batches()
    assert script.startswith("vlan add dev p-h1 vid 200\n") and "-force" not in first
    assert "-force" in restore and restore_script == "vlan del dev p-h1 vid 200\n"


def test_a_rejected_change_whose_restore_fails_too_says_it_may_have_been_applied():
    """p-h2 refuses its VLAN after p-h1 took VLAN 200, and then p-h1 refuses the restore: the error says the
    change may have been applied (p-h1 still carries 200), so a rollback never counts the switch as one
    that refused the change and releases a VLAN it still carries."""

    class RestoreFails(FakeLinuxBox):
        def __call__(self, argv, *, input=None, timeout):
            if "-force" in argv:
                self.reject.add("p-h1")
            return super().__call__(argv, input=input, timeout=timeout)

    box = RestoreFails({"p-h1": {100}, "p-h2": set()}, reject={"p-h2"})
    with _ssh_driver(box) as driver:
        driver.load_merge_candidate(config="port p-h1 vlans 100,200\nport p-h2 vlans 300\n")
        with pytest.raises(LinuxBridgeCommitError) as caught:
            driver.commit_config()
    assert "restoring the ports failed too" in caught.value.message and caught.value.may_have_applied
    assert box.tagged["p-h1"] == {100, 200}


def test_ssh_command_layer_refuses_unowned_and_unknown_ports_without_running_anything():
    box = FakeLinuxBox({"p-h1": set(), "p-h2": set(), "uplink": {999}})
    with _ssh_driver(box) as driver:
        with pytest.raises(LinuxBridgeConfigError, match="not owned by the portal: uplink") as caught:
            driver.load_merge_candidate(config="port uplink vlans none\n")
        assert isinstance(caught.value, MergeConfigException) and caught.value.permanent
        with pytest.raises(LinuxBridgeConfigError, match="line 1"):
            driver.load_merge_candidate(config="port p-h1 vlans 5000\n")
        assert driver.compare_config() == ""
    assert box.batches() == [] and box.tagged["uplink"] == {999}
    box = FakeLinuxBox({"p-h1": set()})
    with _ssh_driver(box) as driver:  # p-h2 is owned but not on this box
        with pytest.raises(LinuxBridgeConfigError, match="unknown port p-h2"):
            driver.load_merge_candidate(config="port p-h2 vlans 100\n")


@pytest.mark.parametrize(
    "failure",
    [subprocess.TimeoutExpired(["ssh"], 10), ConnectionError("ssh: connect to host sw port 22: Connection refused")],
)
def test_ssh_command_layer_timeouts_and_unreachable_boxes_are_temporary(failure):
    driver = _ssh_driver(FakeLinuxBox({}, fail_with=failure))
    with pytest.raises(LinuxBridgeUnreachable) as caught:
        driver.open()
    assert isinstance(caught.value, TemporaryDeviceError) and isinstance(caught.value, ConnectionException)
    assert caught.value.device == "sw-remote"


def test_ssh_runner_command_line():
    runner = SshRunner("sw1.example.org", user="netops", port=2222, identity_file="/keys/id", ssh_options=["Port=1"])
    assert runner.argv(["bridge", "-json", "vlan", "show", "dev", "p 1"], timeout=7.5) == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=7", "-p", "2222",
        "-i", "/keys/id", "-o", "IdentitiesOnly=yes", "-o", "Port=1",
        "--", "netops@sw1.example.org", "bridge -json vlan show dev 'p 1'",
    ]  # fmt: skip


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_real_ssh_client_failures_are_classified(tmp_path):
    """A real subprocess in place of ``ssh``: exit 255 (refused), a hang, and garbage output."""
    cases = [
        ("refused", "echo 'ssh: connect to host sw port 22: Connection refused' >&2; exit 255", TemporaryDeviceError),
        ("hangs", "exec sleep 30", TemporaryDeviceError),
        ("garbage", "echo 'this is not json'", PermanentDeviceError),
        ("missing", None, PermanentDeviceError),
    ]
    messages = {"refused": "Connection refused", "hangs": "timed out after 1 s", "garbage": "unreadable output"}
    messages["missing"] = "cannot run"
    for name, body, expected in cases:
        ssh = _script(tmp_path, name, body) if body else str(tmp_path / "no-such-ssh")
        args = {"transport": "ssh", "ssh_options": ["StrictHostKeyChecking=yes"], "name": "sw-remote"}
        driver = LinuxBridgeDriver("sw-remote.example.org", "netops", "", 1, args)
        driver._backend.runner.ssh_binary = ssh
        with pytest.raises(expected) as caught:
            driver.open()
        assert caught.value.device == "sw-remote", name
        assert messages[name] in caught.value.message, name


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on 127.0.0.1 inside a namespace of our own, key authentication only; and an
    ``ssh`` wrapper that enters that namespace. Yields (namespace, port, client key, wrapper path)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    if IN_GUEST:
        pytest.skip("runs in the main pytest run (needs no 802.1Q); ssh is slow under emulation")
    for binary in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"):
        if not os.path.exists(binary):
            pytest.skip(f"{binary} missing (openssh-server/openssh-client)")
    ns = vmlane.make_prefix("ssh") + "box"
    vmlane.run(["ip", "netns", "add", ns])
    vmlane.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    keys = {}
    for name in ("host", "client", "stranger"):
        keys[name] = tmp_path / name
        vmlane.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys[name])])
    (tmp_path / "authorized_keys").write_text((tmp_path / "client.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port 2222\nListenAddress 127.0.0.1\nHostKey {keys['host']}\nPidFile {tmp_path}/sshd.pid\n"
        f"AuthorizedKeysFile {tmp_path}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wrapper = _script(tmp_path, "ssh-in-ns", f'exec ip netns exec {ns} ssh "$@"')
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:2222 {(tmp_path / 'host.pub').read_text()}")
    try:
        for _ in range(50):  # until sshd accepts connections
            probe = vmlane.run(["ip", "netns", "exec", ns, "ssh-keyscan", "-p", "2222", "127.0.0.1"], check=False)
            if probe.returncode == 0 and probe.stdout.strip():
                break
            time.sleep(0.1)
        yield ns, keys, wrapper, tmp_path / "known_hosts"
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        vmlane.run(["ip", "netns", "del", ns], check=False)


def test_real_ssh_transport(sshd):
    """Through a real ssh client and sshd: reachability, facts, the bridge check; refused key and host key
    are permanent, a closed port is temporary."""
    ns, keys, wrapper, known_hosts = sshd
    bridge = ["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]
    vlan_aware = vmlane.run([*bridge, "vlan_filtering", "1"], check=False)
    if vlan_aware.returncode != 0:
        vmlane.run(bridge)

    def driver(key="client", port=2222, known=known_hosts):
        args = {
            "transport": "ssh",
            "port": port,
            "identity_file": str(keys[key]),
            "ssh_options": [f"UserKnownHostsFile={known}", "StrictHostKeyChecking=yes"],
            "name": "sw-ssh",
        }
        drv = LinuxBridgeDriver("127.0.0.1", "root", "", 10, args)
        drv._backend.runner.ssh_binary = wrapper
        return drv

    if vlan_aware.returncode == 0:
        with driver() as drv:
            assert drv.get_facts()["os_version"] == platform.release()
            assert drv.get_vlans() == {}
    else:
        with pytest.raises(PermanentDeviceError, match="sw-ssh: bridge br0 is not VLAN-aware"):
            driver().open()  # got through ssh, read the real ip -json output, found a plain bridge
        backend = driver()._backend
        assert backend.os_version() == platform.release() and "br0" in backend.interfaces()
    with pytest.raises(LinuxBridgeAuthError, match="Permission denied") as refused:
        driver(key="stranger").open()
    assert refused.value.permanent and isinstance(refused.value, ConnectionException)
    (known_hosts.parent / "wrong_known_hosts").write_text(
        f"[127.0.0.1]:2222 {(known_hosts.parent / 'stranger.pub').read_text()}"
    )
    with pytest.raises(LinuxBridgeAuthError, match="Host key verification failed"):
        driver(known=known_hosts.parent / "wrong_known_hosts").open()
    with pytest.raises(LinuxBridgeUnreachable, match="Connection refused"):
        driver(port=2223).open()


def test_dispatch_reaches_this_driver_and_a_missing_namespace_is_temporary():
    spec = SwitchSpec(name="sw-gone", platform="linuxbridge", address="vclb-no-such-namespace-0", owned_ports=("p1",))
    with pytest.raises(TemporaryDeviceError, match="sw-gone: network namespace 'vclb-no-such-namespace-0'"):
        with switch_session(spec):
            pass
    assert not os.path.exists("/run/netns/vclb-no-such-namespace-0")  # pyroute2 did not create it
    host = HostSpec(name="hv-gone", driver="linuxbridge", trunk_interface="eth0", driver_args={"netns": "vclb-gone-0"})
    with pytest.raises(TemporaryDeviceError, match="hv-gone"):
        with host_session(host):
            pass


# ======================================================================================== kernel tests


@pytest.fixture(scope="session")
def vlan_kernel():
    vmlane.remove_stale()
    reason = vmlane.kernel_8021q_missing(vmlane.make_prefix("p"))
    if reason:
        if IN_GUEST:
            pytest.fail(f"the VM lane guest must have 802.1Q: {reason}")
        pytest.skip(f"{reason}; these tests run in the QEMU guest of scripts/vm-lane.sh (make test runs it)")


_counter = iter(range(10**6))


@pytest.fixture
def fabric(vlan_kernel):
    fab = vmlane.Fabric(vmlane.make_prefix(f"t{next(_counter)}"))
    yield fab
    fab.destroy()


@pytest.fixture
def sw(fabric):
    """Switch sw1: bridge br0 with owned ports p-h1, p-h2; unowned ``mgmt`` (VLAN 999 + untagged PVID 5);
    ``loose``, a veth in sw1 that is not a bridge port. The far ends sit in namespace ``nb``."""
    fabric.switch("sw1")
    fabric.namespace("nb")
    fabric.wire(
        ("sw1", "p-h1", "nb", "eth-h1", "br0"),
        ("sw1", "p-h2", "nb", "eth-h2", "br0"),
        ("sw1", "mgmt", "nb", "eth-mg", "br0"),
        ("sw1", "loose", "nb", "eth-lo"),
    )
    fabric.batch("sw1", ["vlan add dev mgmt vid 999", "vlan add dev mgmt vid 5 pvid untagged"], tool="bridge")
    return fabric


def _spec(fabric, owned=("p-h1", "p-h2"), **args):
    return SwitchSpec(
        name="sw1",
        platform="linuxbridge",
        address=fabric.ns("sw1"),
        driver_args=args,
        owned_ports=tuple(owned),
        timeout=20,
    )


@pytest.fixture(params=["netns", "ssh-command-layer"])
def transport(request, sw):
    """The same tests through pyroute2 and through the ssh command layer (run locally in the namespace)."""
    if request.param == "netns":
        return {"transport": "netns"}
    return {"transport": "ssh", "runner": LocalRunner(sw.ns("sw1"))}


def _mgmt_untouched(fabric):
    out = vmlane.run(["bridge", "-n", fabric.ns("sw1"), "-json", "vlan", "show", "dev", "mgmt"]).stdout
    entries = {v["vlan"]: sorted(v.get("flags", [])) for v in json.loads(out)[0]["vlans"]}
    assert entries == {5: ["Egress Untagged", "PVID"], 999: []}


@pytest.mark.lab
@pytest.mark.vmlane
def test_facts_and_vlans_in_napalm_format(sw, transport):
    with driver_for(_spec(sw, **transport)) as driver:
        facts = driver.get_facts()
        assert set(facts) == set(FactsDict.__annotations__)
        assert {"br0", "p-h1", "p-h2", "mgmt", "loose", "lo"} <= set(facts["interface_list"])
        assert facts["os_version"] == platform.release() and facts["uptime"] > 0
        assert (facts["vendor"], facts["hostname"]) == ("Linux", "sw1")
        vlans = driver.get_vlans()
        assert vlans == {5: {"name": "vlan5", "interfaces": ["mgmt"]}, 999: {"name": "vlan999", "interfaces": ["mgmt"]}}
        assert all(set(v) == set(VlanDict.__annotations__) for v in vlans.values())
        assert driver.is_alive() == {"is_alive": True}
        running = driver.get_config()["running"]
        assert running.splitlines() == [
            "! linuxbridge sw1 bridge br0",
            "port mgmt vlans 999 untagged 5 pvid 5",
            "port p-h1 vlans none",
            "port p-h2 vlans none",
        ]
        assert driver.get_config(retrieve="candidate") == {"running": "", "candidate": "", "startup": ""}


@pytest.mark.lab
@pytest.mark.vmlane
def test_merge_compare_commit_rollback(sw, transport, tmp_path):
    with driver_for(_spec(sw, **transport)) as driver:
        candidate = tmp_path / "candidate.cfg"
        candidate.write_text("port p-h1 vlans 100,200\n")
        driver.load_merge_candidate(filename=str(candidate))
        driver.load_merge_candidate(config="port p-h2 vlans 100\n")  # a second load merges
        assert driver.compare_config() == "+port p-h1 vlan 100\n+port p-h1 vlan 200\n+port p-h2 vlan 100\n"
        assert driver.get_config()["candidate"] == "port p-h1 vlans 100,200\nport p-h2 vlans 100\n"
        assert sw.bridge_vlans("sw1").get("p-h1", set()) == set()  # nothing before commit
        driver.commit_config()
        assert sw.bridge_vlans("sw1")["p-h1"] == {100, 200} and sw.bridge_vlans("sw1")["p-h2"] == {100}
        assert driver.compare_config() == ""  # the candidate is consumed
        assert driver.get_vlans()[100] == {"name": "vlan100", "interfaces": ["p-h1", "p-h2"]}

        driver.load_merge_candidate(config="port p-h1 vlans 100,300\n")
        assert driver.compare_config() == "-port p-h1 vlan 200\n+port p-h1 vlan 300\n"  # p-h2 not mentioned
        driver.commit_config()
        assert sw.bridge_vlans("sw1")["p-h1"] == {100, 300}
        assert "port p-h1 vlans 100,300\n" in driver.get_config()["running"]

        driver.rollback()  # back to before the last commit
        assert sw.bridge_vlans("sw1")["p-h1"] == {100, 200} and sw.bridge_vlans("sw1")["p-h2"] == {100}
        driver.rollback()  # nothing left to roll back: no-op
        assert sw.bridge_vlans("sw1")["p-h1"] == {100, 200}
    _mgmt_untouched(sw)


@pytest.mark.lab
@pytest.mark.vmlane
def test_discard_and_idempotent_commit(sw):
    with driver_for(_spec(sw)) as driver:
        driver.load_merge_candidate(config="port p-h1 vlans 100\n")
        driver.discard_config()
        assert driver.compare_config() == "" and driver.get_config()["candidate"] == ""
        driver.commit_config()  # nothing loaded: nothing happens
        assert sw.bridge_vlans("sw1").get("p-h1", set()) == set()
        driver.rollback()  # no commit in this session: no-op
        driver.load_merge_candidate(config="port p-h1 vlans none\nport p-h2 vlans none\n")
        assert driver.compare_config() == ""  # already so


@pytest.mark.lab
@pytest.mark.vmlane
def test_ports_not_owned_or_not_on_the_bridge_are_refused_and_never_touched(sw):
    sw.batch("sw1", ["vlan add dev p-h2 vid 300"], tool="bridge")
    with driver_for(_spec(sw)) as driver:
        with pytest.raises(LinuxBridgeConfigError, match="not owned by the portal: mgmt"):
            driver.load_merge_candidate(config="port p-h1 vlans 100\nport mgmt vlans none\n")
        assert driver.compare_config() == ""  # the whole load was refused
    for port in ("loose", "p-zz"):
        with driver_for(_spec(sw, owned=("p-h1", port))) as driver:
            with pytest.raises(LinuxBridgeConfigError, match=f"unknown port {port}") as caught:
                driver.load_merge_candidate(config=f"port {port} vlans 100\n")
            assert caught.value.permanent
    with switch_session(_spec(sw)) as session:
        with pytest.raises(PermanentDeviceError, match="not owned by the portal: mgmt"):
            session.converge({"mgmt": frozenset()})
        session.converge({"p-h1": frozenset({100})})  # p-h2 is owned but not in the desired mapping
    assert sw.bridge_vlans("sw1")["p-h2"] == {300}
    _mgmt_untouched(sw)


@pytest.mark.lab
@pytest.mark.vmlane
def test_device_errors_are_classified(fabric):
    fabric.namespace("plain")
    fabric.batch("plain", ["link add br0 type bridge", "link add d0 type dummy"])
    cases = [
        ({"netns": fabric.ns("nowhere")}, TemporaryDeviceError, "network namespace .* does not exist"),
        ({"netns": fabric.ns("plain")}, PermanentDeviceError, "not VLAN-aware"),
        ({"netns": fabric.ns("plain"), "bridge": "br9"}, PermanentDeviceError, "bridge br9 does not exist"),
        ({"netns": fabric.ns("plain"), "bridge": "d0"}, PermanentDeviceError, "d0 is a dummy link"),
        ({"transport": "carrier-pigeon"}, PermanentDeviceError, "unknown transport"),
    ]
    for args, expected, message in cases:
        with pytest.raises(expected, match=message):
            with switch_session(_spec(fabric, **args)):
                pass
    assert not os.path.exists(f"/run/netns/{fabric.ns('nowhere')}")


@pytest.mark.lab
@pytest.mark.vmlane
def test_kernel_rejection_restores_the_touched_ports(sw, transport, monkeypatch):
    """p-h2 leaves the bridge between load and commit (an operator, a race): the kernel refuses VLAN 300 on
    it after VLAN 200 was already added to p-h1 — the commit fails as a whole."""
    sw.batch("sw1", ["vlan add dev p-h1 vid 100"], tool="bridge")
    with driver_for(_spec(sw, **transport)) as driver:
        driver.load_merge_candidate(config="port p-h1 vlans 100,200\nport p-h2 vlans 300\n")
        backend, real_apply = driver._backend, driver._backend.apply

        def apply_after_a_race(bridge, ops, force=False):
            if not force:
                sw.batch("sw1", ["link set p-h2 nomaster"])
            return real_apply(bridge, ops, force)

        monkeypatch.setattr(backend, "apply", apply_after_a_race)
        with pytest.raises(LinuxBridgeCommitError) as caught:
            driver.commit_config()
    assert isinstance(caught.value, CommitError) and caught.value.permanent
    assert "Operation not supported" in caught.value.message and "ports restored" in caught.value.message
    assert sw.bridge_vlans("sw1")["p-h1"] == {100}
    assert "p-h2" not in sw.bridge_vlans("sw1")


@pytest.mark.lab
@pytest.mark.vmlane
def test_session_plan_converge_verify(sw):
    spec = _spec(sw)
    with switch_session(spec) as session:
        assert session.render({"p-h1": frozenset({100, 200})}) == "port p-h1 vlans 100,200\n"
        assert session.plan({"p-h1": frozenset({100, 200})}) == "+port p-h1 vlan 100\n+port p-h1 vlan 200\n"
        assert session.port_vlans() == {"p-h1": frozenset(), "p-h2": frozenset()}  # dry run changed nothing
        result = session.converge({"p-h1": frozenset({100, 200}), "p-h2": frozenset({200})})
        assert result.changed and result.device == "sw1"
        assert result.diff == "+port p-h1 vlan 100\n+port p-h1 vlan 200\n+port p-h2 vlan 200\n"
        assert result.before == {"p-h1": frozenset(), "p-h2": frozenset()}
        assert result.after == {"p-h1": {100, 200}, "p-h2": {200}}
        again = session.converge({"p-h1": frozenset({100, 200}), "p-h2": frozenset({200})})
        assert (again.changed, again.diff, again.after) == (False, "", result.after)
        shrink = session.converge({"p-h1": frozenset({200})})
        assert shrink.diff == "-port p-h1 vlan 100\n" and shrink.after["p-h2"] == {200}
    assert sw.bridge_vlans("sw1")["p-h1"] == {200}


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_native_vlan_on_an_owned_trunk_is_neither_the_portals_nor_a_failed_verification(sw):
    """An owned trunk with a native (PVID, untagged) VLAN: the session reads and verifies the tagged set only
    (it counted the native VLAN as tagged: every change failed its verification and was rolled back), and the
    native VLAN stays."""
    sw.batch("sw1", ["vlan add dev p-h1 vid 5 pvid untagged"], tool="bridge")
    with switch_session(_spec(sw)) as session:
        assert session.port_vlans()["p-h1"] == frozenset()
        result = session.converge({"p-h1": frozenset({100, 200})})
        assert result.changed and result.after["p-h1"] == {100, 200}
    assert sw.bridge_vlans("sw1")["p-h1"] >= {5, 100, 200}
    # named in the port's static VLANs (the hypervisor's management network): carried as it is, never added
    # again — the kernel would take its PVID and untagged flags away
    with switch_session(replace(_spec(sw), static_vlans=frozenset({5}))) as session:
        assert session.port_vlans()["p-h1"] == {5, 100, 200}
        result = session.converge({"p-h1": frozenset({5, 100})})
        assert result.diff == "-port p-h1 vlan 200\n" and result.after["p-h1"] == {5, 100}
    shown = subprocess.run(
        ["bridge", "-n", sw.ns("sw1"), "-json", "vlan", "show", "dev", "p-h1"], capture_output=True, text=True
    )
    shown = json.loads(shown.stdout)
    flags = {v["vlan"]: set(v.get("flags", [])) for item in shown for v in item["vlans"]}
    assert flags[5] == {"PVID", "Egress Untagged"}, flags


@pytest.mark.lab
@pytest.mark.vmlane
def test_session_rolls_back_when_verification_fails(sw, monkeypatch):
    sw.batch("sw1", ["vlan add dev p-h1 vid 100"], tool="bridge")
    with switch_session(_spec(sw)) as session:
        real_commit = session.driver.commit_config

        def commit_then_someone_removes_300(*args, **kwargs):
            real_commit(*args, **kwargs)
            sw.batch("sw1", ["vlan del dev p-h1 vid 300"], tool="bridge")

        monkeypatch.setattr(session.driver, "commit_config", commit_then_someone_removes_300)
        with pytest.raises(
            PermanentDeviceError, match="verification failed .* p-h1 has 100,200 not 100,200,300.*rolled"
        ):
            session.converge({"p-h1": frozenset({100, 200, 300})})
    assert sw.bridge_vlans("sw1")["p-h1"] == {100}


# ---------------------------------------------------------------------------------------------- hosts


@pytest.fixture
def hv(fabric):
    """Host namespace ``hv`` with trunk ``eth0`` (a veth to ``sw``, administratively down at first)."""
    fabric.namespace("hv", "sw")
    fabric.batch("sw", [f"link add up0 type veth peer name eth0 netns {fabric.ns('hv')}", "link set up0 up"])
    return fabric


def _host(fabric, trunk="eth0", ns="hv"):
    return HostSpec(name="hv1", driver="linuxbridge", trunk_interface=trunk, driver_args={"netns": fabric.ns(ns)})


def _carried(fabric, ns="hv"):
    """What the kernel shows: VLAN interface name -> (vlan id, master, up) for every VLAN sub-interface."""
    out = {}
    for name, link in fabric.links(ns).items():
        info = link.get("linkinfo", {})
        if info.get("info_kind") == "vlan":
            out[name] = (info["info_data"]["id"], link.get("master"), "UP" in link["flags"])
    return out


@pytest.mark.lab
@pytest.mark.vmlane
def test_host_converge_is_idempotent_and_brings_the_trunk_up_first(hv):
    with host_session(_host(hv)) as host:
        assert host.vlans() == frozenset()
        result = host.converge(frozenset({100, 200}))
        assert result.changed and result.after == {"hv1": {100, 200}} and result.before == {"hv1": frozenset()}
        assert result.diff.splitlines()[:3] == ["~ up eth0", "+ bridge br-v100", "+ vlan eth0.100 master br-v100"]
        assert host.attachment_point(200) == "br-v200"
        again = host.converge(frozenset({100, 200}))
        assert (again.changed, again.diff) == (False, "")
    assert _carried(hv) == {"eth0.100": (100, "br-v100", True), "eth0.200": (200, "br-v200", True)}
    links = hv.links("hv")
    assert "UP" in links["eth0"]["flags"] and links["br-v100"]["linkinfo"]["info_kind"] == "bridge"


@pytest.mark.lab
@pytest.mark.vmlane
def test_host_adopts_what_exists_and_repairs_half_made_vlans(hv):
    hv.batch(
        "hv",
        [
            "link set eth0 up",
            "link add br-v100 type bridge",  # made by hand (or a crashed run), down, nothing enslaved
            "link add link eth0 name eth0.100 type vlan id 100",
            "link add br-v200 type bridge",  # bridge without its sub-interface
            "link add link eth0 name eth0.300 type vlan id 300",  # orphan sub-interface, bridge gone …
            "link set eth0.300 alias virtcloud",  # … that the portal made (a crashed half-removal)
            "link add link eth0 name eth0.20 type vlan id 20",  # the hypervisor's own (management) …
            "address add 198.18.20.5/24 dev eth0.20",  # … with its address
            "link add link eth0 name eth0.21 type vlan id 21",  # and one the portal did not make
        ],
    )
    with host_session(_host(hv)) as host:
        assert host.vlans() == frozenset()  # (not marked: not the portal's until a cluster's VLAN adopts them)
        result = host.converge(frozenset({100, 200}))
        assert result.after == {"hv1": {100, 200}}
        assert "+ bridge br-v100" not in result.diff and "~ up br-v100" in result.diff
        assert "~ vlan eth0.100 master br-v100" in result.diff and "+ vlan eth0.200 master br-v200" in result.diff
        touched = {line.split()[2] for line in result.diff.splitlines() if line.split()[1] == "vlan"}
        assert "- vlan eth0.300" in result.diff and touched == {"eth0.100", "eth0.200", "eth0.300"}
    carried = _carried(hv)
    assert set(carried) == {"eth0.100", "eth0.200", "eth0.20", "eth0.21"}  # the hypervisor's own are left alone
    assert carried["eth0.100"] == (100, "br-v100", True) and carried["eth0.200"] == (200, "br-v200", True)


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_vlan_interface_of_the_hosts_own_is_never_given_to_a_cluster(hv):
    """A cluster whose VLAN id is that of the hypervisor's own VLAN interface (with its address) is refused
    on that host: the interface would have been enslaved to the cluster's bridge, the host's network with it."""
    hv.batch(
        "hv",
        [
            "link set eth0 up",
            "link add link eth0 name eth0.20 type vlan id 20",
            "address add 198.18.20.5/24 dev eth0.20",
        ],
    )
    with host_session(_host(hv)) as host:
        with pytest.raises(PermanentDeviceError, match="eth0.20 has addresses of the host's own"):
            host.converge(frozenset({20}))
    assert _carried(hv)["eth0.20"][1] is None  # not enslaved
    assert "br-v20" not in hv.links("hv")  # and nothing made for it


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_bridge_of_the_hosts_own_named_like_the_portals_is_never_counted_removed_or_given(hv):
    """The hypervisor's storage bridge happens to be called ``br-v20`` and holds the host's address over
    ``eth0.20``: no converge counts it as a VLAN the host carries (no foreign drift), removes it (the host
    would lose that network) or gives VLAN 20 to a cluster."""
    hv.batch(
        "hv",
        [
            "link set eth0 up",
            "link add br-v20 type bridge",
            "link add link eth0 name eth0.20 type vlan id 20",
            "link set eth0.20 master br-v20",
            "address add 198.18.20.5/24 dev br-v20",
            "link set br-v20 up",
            "link set eth0.20 up",
            # a portal's bridge made before its links were kept free of IPv6: a link-local address only
            "link add br-v30 type bridge",
            "link add link eth0 name eth0.30 type vlan id 30",
            "link set eth0.30 alias virtcloud",
            "link set eth0.30 master br-v30",
            "address add fe80::30/64 dev br-v30",
            # the host's own unnumbered bridge so named: a link-local address only, and no sub-interface of ours
            "link add br-v40 type bridge",
            "address add fe80::40/64 dev br-v40",
        ],
    )
    with host_session(_host(hv)) as host:
        assert host.vlans() == {30}
        assert host.converge(frozenset()).diff == "- vlan eth0.30\n- bridge br-v30\n"
        result = host.converge(frozenset({100}))
        assert result.before == {"hv1": frozenset()} and result.after == {"hv1": {100}}
        assert "br-v20" not in result.diff
        assert hv.links("hv")["br-v100"].get("ifalias") == "virtcloud"  # the portal marks the bridges it makes
        with pytest.raises(PermanentDeviceError, match="br-v20 has addresses of the host's own"):
            host.converge(frozenset({20}))
        assert host.converge(frozenset()).after == {"hv1": frozenset()}
    assert _carried(hv)["eth0.20"] == (20, "br-v20", True)  # untouched
    assert "br-v100" not in hv.links("hv") and "br-v40" in hv.links("hv")


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_portal_bridge_the_operator_put_an_address_on_is_the_hosts_and_never_removed(hv):
    """The portal made br-v100; the operator then put an address of the host's on it: the host's network from then
    on — a converge without VLAN 100 removes neither the bridge nor its sub-interface (not even as a crashed
    half-removal's leftover); once the address is gone, it is the portal's again, and goes."""
    with host_session(_host(hv)) as host:
        host.converge(frozenset({100}))
    hv.batch("hv", ["address add 198.18.100.5/24 dev br-v100"])
    with host_session(_host(hv)) as host:
        result = host.converge(frozenset())
        assert "- bridge br-v100" not in result.diff and "- vlan" not in result.diff, result.diff
    links = hv.links("hv")
    assert "br-v100" in links and "eth0.100" in links
    hv.batch("hv", ["address del 198.18.100.5/24 dev br-v100"])
    with host_session(_host(hv)) as host:
        assert host.converge(frozenset()).diff == "- vlan eth0.100\n- bridge br-v100\n"


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_host_never_counts_removes_or_joins_to_a_cluster_an_operators_bridge_named_like_the_portals(hv):
    """An operator's ``br-v50`` for infrastructure VMs (no address: a plain L2 bridge), over its own ``eth0.50``:
    while its VMs are off it has no taps — it was counted as the portal's, a foreign VLAN the reconciler's
    repair deleted, sub-interface and all, and the VMs could not start again. It is not the portal's: never
    counted or removed; and with a VM on it, never adopted for a cluster given VLAN 50 (the cluster would join
    the operator's VMs). A bare one is adopted, as a crashed run's would be."""
    hv.batch(
        "hv",
        [
            "link set eth0 up",
            "link add br-v50 type bridge",
            "link set br-v50 addrgenmode none",  # (unnumbered: no link-local address either, which is the host's)
            "link add link eth0 name eth0.50 type vlan id 50",
            "link set eth0.50 master br-v50",
            "link set br-v50 up",
            "link set eth0.50 up",
        ],
    )
    with host_session(_host(hv)) as host:
        assert host.vlans() == frozenset()
        assert host.converge(frozenset({100})).after == {"hv1": {100}}
        assert host.converge(frozenset()).diff == "- vlan eth0.100\n- bridge br-v100\n"
        assert "br-v50" in hv.links("hv") and _carried(hv)["eth0.50"] == (50, "br-v50", True)
        hv.vm("infra1", "hv", "br-v50", "198.18.50.1/24")  # an operator's VM on its bridge
        with pytest.raises(PermanentDeviceError, match="br-v50 is not the portal's and has ports v-infra1"):
            host.converge(frozenset({50}))
        assert hv.links("hv")["br-v50"].get("ifalias") != "virtcloud"
    assert _carried(hv)["eth0.50"] == (50, "br-v50", True)


@pytest.mark.lab
@pytest.mark.vmlane
def test_the_host_has_no_ipv6_address_on_a_tenants_vlan(hv):
    """A tenant's bridge and sub-interface get no IPv6 address of the host's (no link-local address a root
    user in a VM could reach the hypervisor on); a bridge of the host's own still gets its usual one."""
    with host_session(_host(hv)) as host:
        host.converge(frozenset({100}))
    hv.batch("hv", ["link add br-mine type bridge", "link set br-mine up"])
    time.sleep(1)  # past the kernel's address generation (and DAD)

    def inet6(dev):
        command = ["ip", "-n", hv.ns("hv"), "-6", "-o", "addr", "show", "dev", dev]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    assert inet6("br-mine")  # the namespace has IPv6: the check below means something
    assert inet6("br-v100") == "" and inet6("eth0.100") == ""


@pytest.mark.lab
@pytest.mark.vmlane
def test_host_keeps_a_bridge_while_a_vm_port_is_on_it(hv):
    with host_session(_host(hv)) as host:
        host.converge(frozenset({100, 200}))
        hv.vm("vm1", "hv", "br-v200", "198.18.0.1/24")
        assert host.vm_ports(200) == ["v-vm1"]
        kept = host.converge(frozenset({100}))
        assert kept.diff == "! keep br-v200: VM ports v-vm1 still attached\n" and not kept.changed
        assert kept.after == {"hv1": {100, 200}}
        assert "eth0.200" in _carried(hv)  # the VM stays connected
        hv.batch("hv", ["link del v-vm1"])
        gone = host.converge(frozenset({100}))
        assert gone.changed and gone.diff == "- vlan eth0.200\n- bridge br-v200\n"
        assert gone.after == {"hv1": {100}}
    assert "br-v200" not in hv.links("hv") and set(_carried(hv)) == {"eth0.100"}


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_vlan_interface_in_a_bridge_of_the_hosts_is_never_taken_over(hv):
    """The host's storage network: ``eth0.20`` in ``br-storage``, the address on the bridge. A cluster given VLAN
    20 took ``eth0.20`` out of it into ``br-v20`` (the check looked for addresses on ``eth0.20`` only), cutting the
    host's storage, and deleted it at teardown. Refused, and nothing made."""
    hv.batch(
        "hv",
        [
            "link set eth0 up",
            "link add br-storage type bridge",
            "link add link eth0 name eth0.20 type vlan id 20",
            "link set eth0.20 master br-storage",
            "address add 198.18.20.5/24 dev br-storage",
        ],
    )
    with host_session(_host(hv)) as host:
        with pytest.raises(PermanentDeviceError, match="eth0.20 is in br-storage, not the portal's") as refused:
            host.converge(frozenset({20, 100}))
    # that VLAN only: another cluster's in the same session is converged (VlansRefused: only its change fails)
    assert set(refused.value.refused) == {20} and refused.value.result.after == {"hv1": {100}}
    assert _carried(hv)["eth0.20"][1] == "br-storage" and "br-v20" not in hv.links("hv")
    assert _carried(hv)["eth0.100"] == (100, "br-v100", True)


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_vlan_id_the_host_has_under_another_name_is_refused_at_once(hv):
    """``mgmt30`` is VLAN 30 on the trunk: the kernel refuses a second interface of that id (EEXIST), which was
    taken for a concurrent run's and then retried as "vanished" until the retries ran out, a bridge left behind."""
    hv.batch(
        "hv",
        ["link set eth0 up", "link add link eth0 name mgmt30 type vlan id 30", "address add 198.18.30.5/24 dev mgmt30"],
    )
    with host_session(_host(hv)) as host:
        with pytest.raises(PermanentDeviceError, match="VLAN 30 is on eth0 already as mgmt30"):
            host.converge(frozenset({30}))
    assert "br-v30" not in hv.links("hv")
    # an 802.1ad interface of the same id is no clash: the kernel takes an 802.1Q one beside it
    hv.batch("hv", ["link add link eth0 name eth0.ad40 type vlan proto 802.1ad id 40"])
    with host_session(_host(hv)) as host:
        assert host.converge(frozenset({40})).after == {"hv1": {40}}


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_vlan_whose_bridge_lost_its_interface_or_went_down_is_broken_and_repaired(hv):
    """A NIC reset takes its VLAN interfaces with it, or someone deletes one or sets a bridge down: the bridge
    is still there, so the VLAN looked carried and the reconciler saw no drift while the VMs were cut off. It is
    ``broken``, counted missing where it is wanted (still there where it is not: a repair removes it), and the
    next converge makes it whole (``network.convergence.host_carried`` is what the reconciler compares)."""
    with host_session(_host(hv)) as host:
        host.converge(frozenset({100, 200}))
        assert host.broken() == frozenset()
        hv.batch("hv", ["link del eth0.100", "link set br-v200 down"])
        assert host.vlans() == {100, 200} and host.broken() == {100, 200}
        repaired = host.converge(frozenset({100, 200}))
        assert "+ vlan eth0.100 master br-v100" in repaired.diff and "~ up br-v200" in repaired.diff
        assert host.broken() == frozenset() and host.vlans() == {100, 200}
    assert _carried(hv) == {"eth0.100": (100, "br-v100", True), "eth0.200": (200, "br-v200", True)}


@pytest.mark.lab
@pytest.mark.vmlane
def test_a_vm_plugged_while_its_bridge_is_removed_keeps_the_bridge(hv, monkeypatch):
    """The VM manager plugs a VM in between the check for VM ports and the bridge's deletion: it was cut loose
    with the bridge and the teardown reported done. The bridge is read again before it goes: kept, and said."""
    with host_session(_host(hv)) as host:
        host.converge(frozenset({200}))
        real = host._delete

        def plugged_meanwhile(what, index):
            real(what, index)
            if what == "deleting eth0.200":
                hv.vm("vm1", "hv", "br-v200", "198.18.0.1/24")

        monkeypatch.setattr(host, "_delete", plugged_meanwhile)
        kept = host.converge(frozenset())
        assert kept.diff == "- vlan eth0.200\n! keep br-v200: VM ports v-vm1 still attached\n"
        assert kept.after == {"hv1": {200}}
    assert "br-v200" in hv.links("hv")


@pytest.mark.lab
@pytest.mark.vmlane
def test_host_errors_are_classified(hv):
    hv.batch("hv", ["link add br-v700 type dummy"])
    cases = [
        (_host(hv, ns="nowhere"), {100}, TemporaryDeviceError, "network namespace .* does not exist"),
        (_host(hv, trunk="eth9"), {100}, PermanentDeviceError, "trunk interface eth9 does not exist"),
        (_host(hv, trunk="lo"), {100}, PermanentDeviceError, "creating lo.100"),  # the kernel refuses VLANs on lo
        (_host(hv), {700}, PermanentDeviceError, "br-v700 exists but is a dummy link"),
        (_host(hv), {5000}, PermanentDeviceError, "outside 1-4094"),
        (_host(hv, trunk="enp129s0f1np1"), {100}, PermanentDeviceError, "too long"),
    ]
    for spec, vids, expected, message in cases:
        with pytest.raises(expected, match=message):
            with host_session(spec) as host:
                host.converge(frozenset(vids))
    assert not os.path.exists(f"/run/netns/{hv.ns('nowhere')}")


# ------------------------------------------------------------------------------------- isolation check


def _capture(fabric, ns, ifname, expression, action):
    """Run ``action`` while tcpdump listens on ``ifname`` in ``ns``; return what it printed (-e: tags)."""
    cmd = ["ip", "netns", "exec", fabric.ns(ns), "tcpdump", "-l", "-nn", "-e", "-c", "1", "-i", ifname, expression]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as dump:
        try:
            for _ in range(5):  # tcpdump says "listening on ..." once the capture is armed
                if "listening on" in dump.stderr.readline():
                    break
            action()
            out, _ = dump.communicate(timeout=30)
        finally:
            if dump.poll() is None:
                dump.kill()
    return out


@pytest.mark.lab
@pytest.mark.vmlane
@pytest.mark.parametrize("core", ["dot1q", "qinq"])
def test_two_switches_isolate_two_clusters_with_the_same_subnet(fabric, core):
    """Clusters A (VLAN 100) and B (VLAN 200) share 198.18.0.0/24 across two switches, configured by the
    drivers under test. Same-cluster VMs reach each other across the core; nothing crosses between
    clusters (no reply, and no bridge anywhere learned a MAC of the other cluster in its VLAN)."""
    f = fabric
    f.switch("sw1", "sw2")
    f.namespace("h1", "h2")
    links = [("sw1", "p-h1", "h1", "eth0", "br0"), ("sw2", "p-h2", "h2", "eth0", "br0")]
    if core == "dot1q":
        f.wire(*links, ("sw1", "core", "sw2", "core", "br0", "br0"))
        tap = ("sw1", "core", "vlan 100 and icmp")
    else:  # provider bridges carry the customer VLANs in S-VLAN 1000 (802.1ad)
        f.switch("pe1", "pe2", protocol="802.1ad")
        f.wire(
            *links,
            ("sw1", "core", "pe1", "c-sw1", "br0", "br0"),
            ("sw2", "core", "pe2", "c-sw2", "br0", "br0"),
            ("pe1", "s-core", "pe2", "s-core", "br0", "br0"),
        )
        for pe, customer in (("pe1", "c-sw1"), ("pe2", "c-sw2")):
            f.batch(pe, [f"vlan add dev {customer} vid 1000 pvid untagged", "vlan add dev s-core vid 1000"], "bridge")
        tap = ("pe1", "s-core", "vlan 1000 and vlan 100 and icmp")

    vids = frozenset({100, 200})
    for name, port in (("sw1", "p-h1"), ("sw2", "p-h2")):
        spec = SwitchSpec(name=name, platform="linuxbridge", address=f.ns(name), owned_ports=(port, "core"))
        with switch_session(spec) as session:
            assert session.converge({port: vids, "core": vids}).after == {port: vids, "core": vids}
    for name in ("h1", "h2"):
        spec = HostSpec(name=name, driver="linuxbridge", trunk_interface="eth0", driver_args={"netns": f.ns(name)})
        with host_session(spec) as host:
            assert host.converge(vids).after == {name: vids}

    f.vms(
        ("a1", "h1", "br-v100", "198.18.0.1/24"),
        ("a2", "h2", "br-v100", "198.18.0.2/24"),
        ("b1", "h1", "br-v200", "198.18.0.1/24"),  # the same address as a1, in the other cluster
        ("b2", "h2", "br-v200", "198.18.0.3/24"),  # an address only cluster B has
    )

    seen = _capture(f, *tap, action=lambda: f.ping("a1", "198.18.0.2", wait=5, count=2))
    if core == "dot1q":
        assert "ethertype 802.1Q (0x8100)" in seen and "vlan 100" in seen
    else:
        assert "802.1Q-QinQ (0x88a8)" in seen and "vlan 1000" in seen and "vlan 100," in seen
    assert f.ping("a1", "198.18.0.2", wait=5) and f.ping("a2", "198.18.0.1", wait=5)
    assert f.ping("b1", "198.18.0.3", wait=5) and f.ping("b2", "198.18.0.1", wait=5)
    assert not f.ping("a1", "198.18.0.3", wait=1)  # only B has .3
    assert not f.ping("b2", "198.18.0.2", wait=1)  # only A has .2
    # Flood broadcasts in cluster A (ARP for a B-only address, broadcast ping): had any crossed into VLAN
    # 200, the bridges there would have learned A's MACs, which the FDB checks below look for.
    f.exec("a2", "arping", "-c", "2", "-W", "0.3", "-i", "eth0", "198.18.0.3")
    f.exec("a2", "ping", "-b", "-c", "2", "-i", "0.2", "-W", "1", "198.18.0.255")

    macs = {vm: f.mac(vm) for vm in ("a1", "a2", "b1", "b2")}
    cluster_vid = {"a1": 100, "a2": 100, "b1": 200, "b2": 200}
    learned_on_switches = 0
    for sw_name in ("sw1", "sw2"):
        for entry in f.fdb(sw_name, "br0"):
            for vm, mac in macs.items():
                if entry.get("mac") == mac and "vlan" in entry:
                    assert entry["vlan"] == cluster_vid[vm], f"{vm}'s MAC leaked into VLAN {entry['vlan']} on {sw_name}"
                    learned_on_switches += 1
    assert learned_on_switches >= 4  # the check above looked at real entries
    for host in ("h1", "h2"):
        for vid, foreign in ((100, ("b1", "b2")), (200, ("a1", "a2"))):
            learned = {entry.get("mac") for entry in f.fdb(host, f"br-v{vid}")}
            assert not learned & {macs[vm] for vm in foreign}, f"cluster frames leaked into br-v{vid} on {host}"

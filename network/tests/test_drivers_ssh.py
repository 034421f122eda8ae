"""The ssh command lines the drivers run on a worker: what an administrator writes in the inventory chooses
the box, never a command on the worker (``network.drivers.sshargs``), and the OVSDB-over-SSH transport
works against a real OpenSSH server."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import pytest

from network.drivers.base import PermanentDeviceError, TemporaryDeviceError
from network.drivers.linuxbridge import LinuxBridgeDriver, SshRunner
from network.drivers.ovsdb import Ovsdb
from network.drivers.sshargs import ssh_problems
from network.tests.test_drivers_linuxbridge import _script, sshd  # noqa: F401 (the throwaway sshd fixture)

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def ovsdb_args(**extra) -> dict:
    return {"transport": "ssh", "ssh_host": "ovs1.example.org", **extra}


@pytest.mark.parametrize(
    "args,named",
    [
        ({"ssh_host": "-oProxyCommand=touch /tmp/x"}, "ssh host '-oProxyCommand=touch /tmp/x' starts with '-'"),
        ({"ssh_user": "-F/tmp/evil"}, "ssh user '-F/tmp/evil' starts with '-'"),
        ({"ssh_host": "ovs1 -oProxyCommand=x"}, "contains whitespace or control characters"),
        ({"ssh_options": ["ProxyCommand=touch /tmp/x"]}, "ssh option 'ProxyCommand' is not allowed"),
        ({"ssh_options": ["localcommand touch /tmp/x"]}, "ssh option 'localcommand' is not allowed"),
        ({"ssh_options": ["KnownHostsCommand=/bin/true"]}, "ssh option 'KnownHostsCommand' is not allowed"),
        ({"ssh_options": ["Port=22\nProxyCommand x"]}, "contains control characters"),
        ({"ssh_options": ["StrictHostKeyChecking=accept-new"]}, "StrictHostKeyChecking may only be yes"),
        ({"ssh_options": "ProxyCommand=x"}, "ssh_options must be a list"),
    ],
)
def test_ovsdb_ssh_transport_refuses_what_would_run_a_command_on_the_worker(args, named):
    with pytest.raises(PermanentDeviceError, match="sw1") as refused:
        Ovsdb.from_args("sw1", "unix:/run/openvswitch/db.sock", ovsdb_args(**args))
    assert named in refused.value.message and refused.value.permanent


def test_harmless_ssh_options_pass():
    options = ["Port=2222", "ConnectTimeout 5", "StrictHostKeyChecking = yes", "userknownhostsfile=/etc/ssh/known"]
    assert ssh_problems(host="ovs1.example.org", user="netops", options=options) == []
    Ovsdb.from_args("sw1", "unix:/x", ovsdb_args(ssh_user="netops", ssh_options=options))


def test_ssh_destination_comes_after_the_end_of_options():
    ovsdb = Ovsdb.from_args("sw1", "unix:/x", ovsdb_args(ssh_user="netops", ssh_port=2222, ssh_key="/keys/id"))
    argv = ovsdb.argv([["list-br"]])
    assert argv[argv.index("--") + 1 :] == ["netops@ovs1.example.org", argv[-1]] and argv[-1].startswith("ovs-vsctl ")
    runner = SshRunner("sw1.example.org", user="netops", ssh_options=["ConnectTimeout=3"])
    assert runner.argv(["bridge", "-json", "link"], timeout=5)[-3:] == [
        "--",
        "netops@sw1.example.org",
        "bridge -json link",
    ]


def test_a_proxy_command_never_runs_through_a_real_ssh_client(tmp_path):
    """The real ``ssh``: before the check, ``ssh_options: [ProxyCommand=...]`` ran the command on the worker
    (the portal's own user, usually root on a site worker); a destination that looks like an option stays a
    destination even when the check is bypassed."""
    marker = tmp_path / "ran"
    args = ovsdb_args(ssh_host="127.0.0.1", ssh_options=[f"ProxyCommand=touch {marker}"], timeout=3)
    with pytest.raises(PermanentDeviceError, match="ProxyCommand"):
        Ovsdb.from_args("sw1", "unix:/x", args).run(["list-br"])
    unchecked = Ovsdb("sw1", "unix:/x", transport="ssh", ssh_host=f"-oProxyCommand=touch {marker}", timeout=3)
    with pytest.raises(TemporaryDeviceError, match="ssh to -oProxyCommand"):
        unchecked.run(["list-br"])  # ssh took it for a host name, and found no such host
    assert not marker.exists()


@pytest.mark.parametrize(
    "address,username,options,named",
    [
        ("-oProxyCommand=touch /tmp/x", "netops", [], "ssh host '-oProxyCommand=touch /tmp/x' starts with '-'"),
        ("sw1.example.org", "-oProxyCommand=x", [], "ssh user '-oProxyCommand=x' starts with '-'"),
        ("sw1.example.org", "netops", ["PermitLocalCommand=yes"], "ssh option 'PermitLocalCommand' is not allowed"),
    ],
)
def test_linuxbridge_ssh_transport_refuses_the_same(address, username, options, named):
    args = {"transport": "ssh", "ssh_options": options, "name": "sw-remote"}
    with pytest.raises(PermanentDeviceError, match="sw-remote") as refused:
        LinuxBridgeDriver(address, username, "", 10, args)
    assert named in refused.value.message


@pytest.fixture
def ovsdb_server(tmp_path):
    """A throwaway ovsdb-server with the Open vSwitch schema on a unix socket (no ovs-vswitchd: writes do not
    wait for one). Yields the socket path; stopped by its PID."""
    for binary in ("ovsdb-server", "ovsdb-tool"):
        if subprocess.run(["sh", "-c", f"command -v {binary}"], capture_output=True).returncode:
            pytest.skip(f"{binary} missing (openvswitch-switch)")
    if not os.path.exists(SCHEMA):
        pytest.skip(f"{SCHEMA} missing")
    run = tmp_path / "ovs"
    run.mkdir()
    subprocess.run(["ovsdb-tool", "create", str(run / "conf.db"), SCHEMA], check=True)
    socket_path = run / "db.sock"
    server = subprocess.Popen(
        ["ovsdb-server", str(run / "conf.db"), f"--remote=punix:{socket_path}", f"--unixctl={run / 'ctl'}"],
        env={**os.environ, "OVS_RUNDIR": str(run), "OVS_LOGDIR": str(run), "OVS_DBDIR": str(run)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if socket_path.exists():
                break
            time.sleep(0.05)
        yield socket_path
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_ovsdb_over_ssh_against_a_real_sshd(sshd, ovsdb_server, tmp_path):  # noqa: F811
    """The whole transport: a real ssh client logs in to a real sshd with a key and a known host key, runs
    ovs-vsctl there, and the bridge it adds is in the database; the reads come back parsed."""
    ns, keys, _wrapper, known_hosts = sshd
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # the "ssh" the transport runs: the real client, inside the namespace where the sshd listens
    _script(bindir, "ssh", f'exec ip netns exec {ns} /usr/bin/ssh "$@"')
    args = {
        "transport": "ssh",
        "ssh_host": "127.0.0.1",
        "ssh_user": "root",
        "ssh_port": 2222,
        "ssh_key": str(keys["client"]),
        "ssh_options": [f"UserKnownHostsFile={known_hosts}", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes"],
        "wait": False,
    }
    ovsdb = Ovsdb.from_args("ovs-remote", f"unix:{ovsdb_server}", args, timeout=10)
    ovsdb = dataclasses.replace(ovsdb, env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    ovsdb.run(["add-br", "br-remote"])
    assert [row["name"] for row in ovsdb.list_rows("Bridge", ["name"])] == ["br-remote"]
    local = subprocess.run(
        ["ovs-vsctl", f"--db=unix:{ovsdb_server}", "--no-wait", "list-br"], capture_output=True, text=True, check=True
    )
    assert local.stdout.split() == ["br-remote"]

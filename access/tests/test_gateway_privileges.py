"""OpenVPN on the gateway drops its privileges after start, and its hooks — which parse the certificates clients
send — run unprivileged too: ``gateway config --vpn-user/--vpn-group`` (nobody:nogroup by default, kept in
``local.json`` for the pulls), and the state installed so that the account reads what it needs and writes only its
own records. (The real OpenVPN running that way: ``test_e2e_vpn.py``.)"""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from access import services
from access.gateway import config as gateway_config
from access.gateway import pull, vpnconf
from access.gateway.state import RunAs
from access.tests.fixtures import gateway, make_cluster

ROOT = Path(__file__).resolve().parents[2]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another group takes root")


def run(*args) -> str:
    out = io.StringIO()
    call_command("gateway", *args, stdout=out, stderr=out)
    return out.getvalue()


def owners(state: Path) -> dict[str, tuple[str, str, str]]:
    """Each file and directory of ``vpn/`` (relative name) -> (mode, owner, group), as ``ls -l`` would say."""
    out = {}
    for path in [state / "vpn", *(state / "vpn").rglob("*")]:
        st = os.lstat(path)
        user, group = pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
        out[str(path.relative_to(state))] = (f"{stat.S_IMODE(st.st_mode):04o}", user, group)
    return out


SHARED = ("vpn/ca.pem", "vpn/crl.pem", "vpn/aa.pem", "vpn/vlans.json", "vpn/revoked.json", "vpn/server.pem")
SECRET = ("vpn/server.key", "vpn/tls-crypt.key")
WRITTEN = ("vpn/run/ac-cache", "vpn/run/peer-certs", "vpn/run/sessions")


def test_the_server_config_drops_privileges_to_the_account_it_is_given(tmp_path):
    dropped = vpnconf.render_server_config(state_dir=tmp_path, dev="tap-vc", user="nobody", group="nogroup")
    lines = dropped.splitlines()
    assert {"user nobody", "group nogroup", "persist-key", "persist-tun"} <= set(lines)
    # what it made as root before the drop stays root's: the unprivileged account may not drive it
    assert "management-client-user root" in lines
    root = vpnconf.render_server_config(state_dir=tmp_path, dev="tap-vc").splitlines()
    assert not [line for line in root if line.startswith(("user ", "group ", "management-client-user "))]
    assert {"persist-key", "persist-tun"} <= set(root)
    for bad in ("nobody\nup /bin/sh", "no body", "-x"):
        with pytest.raises(vpnconf.ProfileError, match="invalid user"):
            vpnconf.render_server_config(state_dir=tmp_path, dev="tap-vc", user=bad, group="nogroup")


def test_local_json_keeps_the_account_and_an_older_one_means_root():
    local = {
        "state_dir": "/var/lib/virtcloud-gateway",
        "dev": "tap-vc",
        "vpn_local": None,
        "ssh_listen": "0.0.0.0",
        "python": "/usr/bin/python3",
        "code_root": "/opt/virtcloud",
        "portal_url": "https://portal.example",
        "token_file": None,
        "trunk": None,
        "vpn_user": "openvpn",
        "vpn_group": "openvpn",
    }
    text = gateway_config.local_json(local)
    assert gateway_config.check_local(json.loads(text)) == local
    root = {**local, "vpn_user": None, "vpn_group": None}
    assert gateway_config.check_local(json.loads(gateway_config.local_json(root))) == root
    older = {k: v for k, v in json.loads(text).items() if k not in ("vpn_user", "vpn_group")}
    assert gateway_config.check_local(older) == root  # written before the option existed: OpenVPN stays root
    assert gateway_config.run_as(root) is None
    with pytest.raises(gateway_config.LocalConfigError, match="together"):
        gateway_config.check_local({**json.loads(text), "vpn_group": None})
    with pytest.raises(gateway_config.LocalConfigError, match="vpn_user is not a user"):
        gateway_config.check_local({**json.loads(text), "vpn_user": "open vpn"})
    portal = {"serves_vpn": True, "serves_ssh": False, "vpn_port": 1194, "vpn_proto": "udp", "reneg_sec": 600}
    conf = gateway_config.render({**portal, "ssh_port": 22, "ssh_port_base": 0, "ssh_user": "x"}, local)
    assert "\nuser openvpn\ngroup openvpn\n" in conf["openvpn.conf"]


@as_root
@pytest.mark.django_db
def test_config_installs_the_state_for_the_account_and_pulls_keep_it(alice, gateway, tmp_path):
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state))
    assert json.loads((state / "local.json").read_text())["vpn_user"] == "nobody"
    conf = (state / "openvpn.conf").read_text().splitlines()
    assert {"user nobody", "group nogroup", "persist-key", "persist-tun"} <= set(conf)
    expected = {
        "vpn": ("0750", "root", "nogroup"),
        "vpn/run": ("0750", "root", "nogroup"),
        **{name: ("0640", "root", "nogroup") for name in SHARED},  # read after the drop, never written by it
        **{name: ("0600", "root", "root") for name in SECRET},  # read before it
        **{name: ("0700", "nobody", "nogroup") for name in WRITTEN},  # the hooks' (and tls-export-cert's) own
    }
    assert owners(state) == expected

    # A pull that changes the state and the settings: the files are rewritten for the same account.
    make_cluster(alice, name="mpi")
    gateway.vpn_port = 1195
    gateway.save()
    report = pull.install_state(state, services.gateway_state(gateway=gateway))
    assert str(state / "vpn" / "vlans.json") in report.written and report.configs == ["openvpn.conf"]
    conf = (state / "openvpn.conf").read_text().splitlines()
    assert {"port 1195", "user nobody", "group nogroup"} <= set(conf)
    assert owners(state) == expected


@as_root
@pytest.mark.django_db
def test_the_state_moves_to_the_account_and_back_to_root(gateway, tmp_path):
    """A gateway set up to run OpenVPN as root (``--vpn-user ''``) whose operator then turns the drop on, then
    off again: ``gateway config`` (and every pull) gives the directories, the files and the records the hooks
    wrote as root the owners and modes of the new way — and never follows a link planted among the records."""
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), "--vpn-user", "")
    assert json.loads((state / "local.json").read_text())["vpn_user"] is None
    assert not [line for line in (state / "openvpn.conf").read_text().splitlines() if line.startswith("user ")]
    rooted = owners(state)
    assert rooted["vpn"] == rooted["vpn/run"] == ("0700", "root", "root")
    assert {rooted[name] for name in SHARED} == {("0644", "root", "root")}
    assert {rooted[name] for name in WRITTEN} == {("0700", "root", "root")}
    record = state / "vpn" / "run" / "sessions" / "17.json"
    record.write_text('{"serial": 17, "peers": [["198.18.0.9", "1194"]]}')
    record.chmod(0o600)
    victim = tmp_path / "victim"
    victim.write_text("root's")
    (state / "vpn" / "run" / "ac-cache" / "planted.json").symlink_to(victim)

    run("config", "gw1", "--dir", str(state))
    dropped = owners(state)
    assert dropped["vpn"] == ("0750", "root", "nogroup")
    assert dropped["vpn/run/sessions/17.json"] == ("0600", "nobody", "nogroup")  # client-disconnect rewrites it
    assert dropped["vpn/run/ac-cache/planted.json"][1:] == ("nobody", "nogroup")  # the link itself
    assert (victim.stat().st_uid, victim.stat().st_gid) == (0, 0)  # not what it points to

    run("config", "gw1", "--dir", str(state), "--vpn-user", "")
    again = owners(state)
    assert again["vpn"] == again["vpn/run"] == ("0700", "root", "root")
    assert {again[name] for name in WRITTEN} == {("0700", "root", "root")}  # nobody plants records any more
    assert again["vpn/run/sessions/17.json"][1:] == ("root", "root")
    assert {again[name] for name in SHARED} == {("0644", "root", "root")}


@as_root
@pytest.mark.django_db
def test_an_account_this_host_does_not_have(gateway, tmp_path):
    state = tmp_path / "state"
    with pytest.raises(CommandError, match="no user 'vc-no-such-user' on this host.*--vpn-user ''"):
        run("config", "gw1", "--dir", str(state), "--vpn-user", "vc-no-such-user")
    with pytest.raises(CommandError, match="--vpn-user needs a --vpn-group"):
        run("config", "gw1", "--dir", str(state), "--vpn-group", "")
    run("config", "gw1", "--dir", str(state))
    set_up = owners(state)
    local = json.loads((state / "local.json").read_text())
    (state / "local.json").write_text(json.dumps({**local, "vpn_group": "vc-no-such-group"}))  # edited by hand
    report = pull.install_state(state, services.gateway_state(gateway=gateway))
    assert any("cannot run as nobody:vc-no-such-group (no group 'vc-no-such-group'" in n for n in report.notes)
    # OpenVPN, still running as nobody:nogroup, must still read the CRL: the state keeps the account it is set up for
    assert any("the VPN state stays set up for nobody:nogroup (its owners" in n for n in report.notes)
    assert owners(state) == set_up


@as_root
@pytest.mark.django_db
@pytest.mark.parametrize("broken", ["{not json", json.dumps({"format": 1, "dev": "tap-vc"}), "keep-root"])
def test_a_local_json_that_cannot_be_used_leaves_the_vpn_state_set_up_as_it_was(alice, gateway, tmp_path, broken):
    """A malformed ``local.json`` (edited by hand, truncated): the pull installs the new state for the account the
    directory is set up for — not root's, which OpenVPN (as nobody) could not read — and changes no owner or mode.
    A directory set up for root stays root's."""
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), *(["--vpn-user", ""] if broken == "keep-root" else []))
    set_up = owners(state)
    (state / "local.json").write_text("{not json" if broken == "keep-root" else broken)
    make_cluster(alice, name="mpi")  # (a state that changes: vlans.json is written again)
    report = pull.install_state(state, services.gateway_state(gateway=gateway))
    assert str(state / "vpn" / "vlans.json") in report.written
    assert owners(state) == set_up
    account = "root" if broken == "keep-root" else "nobody:nogroup"
    assert any(
        f"the VPN state stays set up for {account} (its owners and modes as they are)" in n for n in report.notes
    )
    assert any("the configuration files stay as they are" in n for n in report.notes)


@as_root
@pytest.mark.django_db
def test_a_pull_says_what_the_account_cannot_reach(alice, gateway, tmp_path):
    """tmp_path is under a 0700 directory of root's, so OpenVPN's hooks could not read the state there: said by
    ``gateway config`` and each pull that installs something. A state directory, Python and code the account
    reaches: nothing to say."""
    state = tmp_path / "state"
    out = run("config", "gw1", "--dir", str(state))
    assert "OpenVPN's hooks run as nobody:nogroup, who cannot reach the state (/tmp/pytest-of-" in out, out
    reachable = Path(tempfile.mkdtemp(prefix="vc-priv-"))
    try:
        reachable.chmod(0o755)
        run_as = RunAs.lookup("nobody", "nogroup")
        python = "/usr/bin/python3"
        if run_as.cannot_reach(python, 1) or run_as.cannot_reach(ROOT / "access" / "gateway" / "vpn.py"):
            pytest.skip("this checkout or /usr/bin/python3 is not where nobody reaches them")
        out = run("config", "gw1", "--dir", str(reachable / "state"), "--python", python)
        assert "cannot reach" not in out, out
        make_cluster(alice, name="mpi")  # (a pull that installs something)
        assert pull.install_state(reachable / "state", services.gateway_state(gateway=gateway)).notes == []
    finally:
        shutil.rmtree(reachable)


def _in_thread(call, timeout: float = 20):
    """``call()``'s result (or its exception), failing the test rather than hanging it when it blocks on a FIFO."""
    import threading

    out: dict = {}

    def target():
        try:
            out["result"] = call()
        except Exception as exc:  # noqa: BLE001 - raised again below, in the test's thread
            out["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)
        pytest.fail(f"{call} hangs")
    if "error" in out:
        raise out["error"]
    return out.get("result")


@as_root
@pytest.mark.django_db
def test_what_a_compromised_hook_plants_among_its_records_is_never_followed_by_the_root_pull(gateway, tmp_path):
    """The hooks' account writes ``vpn/run/sessions`` and ``vpn/run/ac-cache``; the pull, as root, reads and chowns
    what is there. A link to a file of root's, a FIFO (a read would block every pull, and after max_age everyone is
    refused), a hard link to a file of root's (chowned to nobody where fs.protected_hardlinks=0 let the account make
    it) or a huge file: the pull completes, follows nothing, gives nothing of root's away, and drops the entries."""
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state))
    sessions, cache = state / "vpn" / "run" / "sessions", state / "vpn" / "run" / "ac-cache"
    record = {"serial": 17, "common_name": "alice", "peers": [["203.0.113.5", "40001"]]}
    linked, hard = tmp_path / "root-linked.json", tmp_path / "root-hard.json"
    for victim in (linked, hard):
        victim.write_text(json.dumps(record))
        victim.chmod(0o600)
    (sessions / "17.json").symlink_to(linked)
    os.mkfifo(sessions / "18.json")
    os.link(hard, sessions / "19.json")  # (as root: what the account could do with protected_hardlinks off)
    (sessions / "20.json").write_text(json.dumps({**record, "pad": " " * 100_000}))
    os.link(hard, cache / f"{'cd' * 32}.json")
    os.mkfifo(cache / f"{'ef' * 32}.json")

    doc = services.gateway_state(gateway=gateway)  # (here: the thread has no database connection)
    report = _in_thread(lambda: pull.install_state(state, doc))
    for victim in (linked, hard):
        assert (os.lstat(victim).st_uid, os.lstat(victim).st_gid, stat.S_IMODE(os.lstat(victim).st_mode)) == (
            0,
            0,
            0o600,
        )
        assert json.loads(victim.read_text()) == record
    assert any("sessions/19.json has 3 names (a hard link?)" in note for note in report.notes), report.notes
    assert any(f"{'ef' * 32}.json is not a regular file" in note for note in report.notes), report.notes

    from access.gateway import vpn as gateway_vpn
    from access.gateway.state import VpnState

    vpn = VpnState.at(state)
    closed = _in_thread(lambda: pull.fail_closed(state, now=4e9))  # (an expired state: every record is read)
    assert closed is not None and closed.cut == [] and closed.cut_errors == []  # no peer read from any of them
    assert gateway_vpn.recorded_serials(vpn) == set()  # each dropped: the entry, not what it named
    assert json.loads(linked.read_text()) == record and json.loads(hard.read_text()) == record
    env = {"tls_digest_sha256_0": "ef" * 32, "UV_VCLUSTER": "mpi"}
    with pytest.raises(gateway_vpn.Refused, match="no verified AC"):  # (the hook's own read: no hang either)
        _in_thread(lambda: gateway_vpn.client_connect(vpn, str(tmp_path / "cc"), env))

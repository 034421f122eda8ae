"""A gateway follows the portal's settings for it: the state carries them (``config``), and the agent's pull renders
``openvpn.conf``, ``sshd_config`` and the units again from them and the operator's ``local.json`` — only from
values it checked, so a compromised portal cannot write a directive into a file root runs."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from access import services
from access.gateway import pull
from access.gateway.config import CONFIG_CHANGED, LOCAL
from access.gateway.state import StateError
from access.models import GatewayKind
from access.tests.fixtures import gateway, make_cluster

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "access" / "gateway" / "agent.py"
# What a gateway host has: no Django settings, none of the portal's secrets (as in test_gateway_units)
BARE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "http_proxy": "http://127.0.0.1:9"}
CONFIGS = ("openvpn.conf", "sshd_config", "systemd/virtcloud-gateway-pull.service")


def run(*args) -> str:
    out = io.StringIO()
    call_command("gateway", *args, stdout=out, stderr=out)
    return out.getvalue()


def snapshot(state: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file of the state directory: its content and when it was last written."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in state.rglob("*") if p.is_file()}


def mtimes(state: Path, names=CONFIGS) -> dict[str, int]:
    return {name: (state / name).stat().st_mtime_ns for name in names}


@pytest.mark.django_db
def test_the_state_carries_the_gateways_settings_and_its_etag_follows_them(gateway, settings):
    doc = services.gateway_state(gateway=gateway)
    assert doc["config"] == {
        "serves_vpn": True,
        "serves_ssh": True,
        "vpn_port": 1194,
        "vpn_proto": "udp",
        "ssh_port": 22,
        "ssh_port_base": 0,
        "ssh_user": "virtcloud",
        "reneg_sec": settings.GATEWAY_STATE_MAX_AGE,
    }
    assert services.gateway_state(gateway=gateway)["etag"] == doc["etag"]  # (nothing changed: the same ETag)
    gateway.vpn_port = 1195
    gateway.save()
    moved = services.gateway_state(gateway=gateway)
    assert moved["config"]["vpn_port"] == 1195 and moved["etag"] != doc["etag"]
    gateway.vpn_proto, gateway.ssh_user = "tcp", "bastion"
    gateway.save()
    changed = services.gateway_state(gateway=gateway)
    assert (changed["config"]["vpn_proto"], changed["config"]["ssh_user"]) == ("tcp", "bastion")
    assert changed["ssh"]["account"] == "bastion" and changed["etag"] not in (doc["etag"], moved["etag"])
    settings.GATEWAY_STATE_MAX_AGE = 900  # the portal's side of it: OpenVPN's reneg-sec
    longer = services.gateway_state(gateway=gateway)
    assert longer["config"]["reneg_sec"] == 900 and longer["etag"] != changed["etag"]


@pytest.mark.django_db(transaction=True)
def test_the_agent_rewrites_the_configuration_when_an_admin_changes_the_gateway(
    live_server, alice, root, team, gateway, tmp_path
):
    """The standalone agent (a process, no Django) installs what a change of the gateway's settings makes of its
    files — exactly what ``gateway config`` renders — and names them to the --on-change hook until a run of it
    succeeds; a change of the state alone leaves them untouched."""
    make_cluster(alice, name="mpi", group=team)
    state = tmp_path / "state"
    options = ("--portal-url", live_server.url, "--python", sys.executable, "--dev", "vcnotap0")
    run("config", "gw1", "--dir", str(state), *options)
    local = state / LOCAL
    assert stat.S_IMODE(local.stat().st_mode) == 0o644
    assert json.loads(local.read_text()) == {
        "format": 1,
        "state_dir": str(state),
        "dev": "vcnotap0",
        "vpn_local": None,
        "ssh_listen": "0.0.0.0",
        "python": sys.executable,
        "code_root": str(ROOT),
        "portal_url": live_server.url,
        "token_file": None,
        "trunk": None,
        "vpn_user": "nobody",
        "vpn_group": "nogroup",
    }
    (state / "token").write_text(services.gateway_token_issue(gateway=gateway, by=root) + "\n")
    seen, broken = tmp_path / "seen", tmp_path / "broken"
    hook = tmp_path / "restart.sh"  # what an operator's hook gets: the files to act on
    hook.write_text(f'#!/bin/sh\necho "[$VIRTCLOUD_CONFIG_CHANGED]" >> {seen}\n[ -e {broken} ] && exit 4\nexit 0\n')
    hook.chmod(0o755)
    argv = [sys.executable, "-I", str(AGENT), "pull", "--url", live_server.url, "--token-file", str(state / "token")]
    argv += ["--dir", str(state), "--on-change", str(hook)]

    def agent(*, code: int = 0) -> str:
        done = subprocess.run(argv, env=BARE_ENV, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == code, done.stdout + done.stderr
        return done.stdout + done.stderr

    before = mtimes(state)
    out = agent()  # its first pull: the state gateway config installed is current (its etag: a 304)
    assert "unchanged" in out and "configuration changed" not in out
    make_cluster(alice, name="other", group=team)
    out = agent()  # the state changed, the settings did not: the files are not even written again
    assert "file(s) updated" in out and "configuration changed" not in out
    assert mtimes(state) == before and not (state / CONFIG_CHANGED).exists()

    gateway.vpn_port = 1195
    gateway.save()
    out = agent()
    assert "; configuration changed: openvpn.conf\n" in out
    conf = (state / "openvpn.conf").read_text()
    assert "\nport 1195\n" in conf and "\nport 1194\n" not in conf
    assert stat.S_IMODE((state / "openvpn.conf").stat().st_mode) == 0o644
    # exactly what `gateway config` renders for these settings and options
    printed = run("config", "gw1", "--state-dir", str(state), *options)
    assert f"# ---- openvpn.conf (state directory {state})\n{conf}" in printed
    unchanged = [name for name in CONFIGS if name != "openvpn.conf"]
    assert mtimes(state, unchanged) == {name: before[name] for name in unchanged}
    assert seen.read_text().splitlines() == ["[]", "[]", "[openvpn.conf]"]
    assert not (state / CONFIG_CHANGED).exists()  # the hook acted on it

    # A hook that fails: the files it must act on stay listed, and the next pull (a 304) gives them again.
    broken.touch()
    gateway.ssh_port_base = 30000  # a bastion per cluster: its own service, no principals command in sshd_config
    gateway.save()
    out = agent(code=1)
    assert "configuration changed: sshd_config, systemd/virtcloud-gateway-bastion.service" in out
    assert "AuthorizedPrincipalsCommand " not in (state / "sshd_config").read_text()
    assert "--port-base 30000" in (state / "systemd" / "virtcloud-gateway-bastion.service").read_text()
    assert (state / CONFIG_CHANGED).read_text().split() == ["sshd_config", "systemd/virtcloud-gateway-bastion.service"]
    broken.unlink()
    out = agent()
    assert "unchanged" in out and "--on-change ran" in out
    assert seen.read_text().splitlines()[-2:] == ["[sshd_config systemd/virtcloud-gateway-bastion.service]"] * 2
    assert not (state / CONFIG_CHANGED).exists()
    agent()
    assert len(seen.read_text().splitlines()) == 5  # (all acted on: no run of the hook)

    # The generated units' hook (legs.py) restarts nothing: with --on-change-leaves-config the rewritten files stay
    # pending after it ran — every pull and `status` say so — until the operator, having restarted what reads
    # them, runs `applied`.
    argv.append("--on-change-leaves-config")
    gateway.vpn_port = 1196
    gateway.save()
    out = agent()
    assert "--on-change ran" in out and "configuration not applied yet: openvpn.conf" in out, out
    assert (state / CONFIG_CHANGED).read_text().split() == ["openvpn.conf"]
    assert "configuration not applied yet: openvpn.conf" in agent()  # (and at every pull after)
    status = subprocess.run(
        [sys.executable, "-I", str(AGENT), "status", "--dir", str(state)], env=BARE_ENV, capture_output=True, text=True
    )
    assert status.returncode == 0 and "configuration not applied yet: openvpn.conf" in status.stdout, status.stdout
    applied = subprocess.run(
        [sys.executable, "-I", str(AGENT), "applied", "--dir", str(state)], env=BARE_ENV, capture_output=True, text=True
    )
    assert applied.returncode == 0 and "configuration applied: openvpn.conf" in applied.stdout
    assert not (state / CONFIG_CHANGED).exists() and "not applied" not in agent()


# Values a compromised portal might send to write a directive of its own into a file root runs.
MALICIOUS = [
    ("vpn_port", "1194\nscript-security 3\nup /bin/sh"),
    ("vpn_port", 70000),
    ("vpn_port", 0),
    ("vpn_port", True),
    ("vpn_port", 1194.5),
    ("vpn_proto", "udp\nup /tmp/x"),
    ("vpn_proto", "tcp-client"),
    ("vpn_proto", 'udp"'),
    ("ssh_port", -22),
    ("ssh_port", "22\nPermitRootLogin yes"),
    ("ssh_port_base", 65000),
    ("ssh_user", "virtcloud\n"),  # ("$" would have let it through)
    ("ssh_user", "virtcloud\nForceCommand /bin/sh"),
    ("ssh_user", 'root"'),
    ("ssh_user", "Root"),
    ("ssh_user", "x" * 33),
    ("ssh_user", None),
    ("reneg_sec", "600\nup /bin/sh"),
    ("reneg_sec", 10),
    ("serves_vpn", False),  # while the document carries the VPN state
    ("serves_ssh", "yes"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("key", "value"), MALICIOUS)
def test_malicious_settings_are_refused_and_nothing_is_installed(gateway, tmp_path, key, value):
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state))
    before = snapshot(state)
    doc = services.gateway_state(gateway=gateway)
    doc["config"]["vpn_port"] = 1195  # a change the gateway would otherwise install
    doc["config"][key] = value
    with pytest.raises(StateError, match=f"config.{key}") as refused:
        pull.install_state(state, doc)
    assert "\n" not in str(refused.value)  # (the log line says what it got, escaped)
    assert snapshot(state) == before


@pytest.mark.django_db
def test_a_config_section_that_is_not_a_map_is_refused_and_one_missing_changes_nothing(gateway, tmp_path):
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), "--vpn-user", "")  # (as nobody, OpenVPN could not reach tmp_path)
    before = snapshot(state)
    doc = services.gateway_state(gateway=gateway)
    with pytest.raises(StateError, match="config is not a map"):
        pull.install_state(state, {**doc, "config": ["port 1195"]})
    assert snapshot(state) == before
    gateway.vpn_port = 1195
    gateway.save()
    doc = services.gateway_state(gateway=gateway)
    del doc["config"]  # an older portal: the files stay as gateway config wrote them
    report = pull.install_state(state, doc)
    assert report.configs == [] and report.notes == []
    assert "\nport 1194\n" in (state / "openvpn.conf").read_text()


@pytest.mark.django_db
def test_the_real_agent_refuses_a_malicious_document_and_keeps_the_last_good_state(gateway, root, tmp_path):
    """Through the standalone agent, from a portal that sends an injected directive: exit 75, nothing written."""
    import http.server
    import threading

    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), "--python", sys.executable)
    (state / "token").write_text(services.gateway_token_issue(gateway=gateway, by=root) + "\n")
    doc = services.gateway_state(gateway=gateway)
    doc["config"]["vpn_proto"] = "udp\nscript-security 3\nup /bin/sh"
    doc["etag"] = "evil"
    body = json.dumps(doc).encode()

    class Portal(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("ETag", '"evil"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = snapshot(state)
    try:
        argv = [sys.executable, "-I", str(AGENT), "pull", "--url", f"http://127.0.0.1:{server.server_port}"]
        argv += ["--token-file", str(state / "token"), "--dir", str(state)]
        done = subprocess.run(argv, env=BARE_ENV, capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 75 and "config.vpn_proto" in done.stderr, done.stderr
    assert "keeping the last good state" in done.stderr
    assert snapshot(state) == before
    assert "up /bin/sh" not in (state / "openvpn.conf").read_text()


@pytest.mark.django_db(transaction=True)
def test_a_state_directory_without_local_json_keeps_its_configuration_and_says_so(live_server, root, gateway, tmp_path):
    """Set up by an older ``gateway config`` (no local.json): the pulls install the state and leave the
    configuration files alone, and say so once per change of the settings; the status says so too."""
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), "--portal-url", live_server.url)
    (state / LOCAL).unlink()
    token = services.gateway_token_issue(gateway=gateway, by=root)
    args = ("pull", "--url", live_server.url, "--token", token, "--dir", str(state))
    before = mtimes(state)
    out = run(*args)  # the state config installed is current, the settings those it wrote: nothing to say
    assert "unchanged" in out and LOCAL not in out

    gateway.vpn_port, gateway.ssh_port = 1195, 2222
    gateway.save()
    out = run(*args)
    assert "updated" in out and out.count(f"no {LOCAL} in {state}") == 1, out
    assert "stay as they are" in out and "configuration changed" not in out
    assert mtimes(state) == before and "\nport 1194\n" in (state / "openvpn.conf").read_text()
    assert not (state / CONFIG_CHANGED).exists()
    make_cluster(root, name="later")  # another change of the state, the same settings: said already
    out = run(*args)
    assert "updated" in out and LOCAL not in out
    assert mtimes(state) == before
    assert f"configuration: no {LOCAL}" in run("status", "--dir", str(state))


@pytest.mark.django_db(transaction=True)
def test_a_re_enrolment_the_portal_did_not_record_leaves_the_old_keys_in_place(gateway, tmp_path, monkeypatch):
    """``gateway config --re-enrol`` whose new keys were written but not recorded (the commit failed, or a file
    could not be written): the gateway keeps the keys the portal's profiles and bundles pin, every one of them —
    not a new TLS key the portal never heard of."""
    from access.management.commands import gateway as command

    state = tmp_path / "state"
    run("config", gateway.name, "--dir", str(state))
    keys = ("server.key", "server.pem", "tls-crypt.key", "host_key", "host_key-cert.pub")
    files = {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.name in keys}
    assert len(files) == len(keys), sorted(p.name for p in state.rglob("*"))
    gateway.refresh_from_db()
    pinned = (gateway.server_certificate, gateway.ssh_host_certificate)
    real = command.write_all_atomic

    def written_then_commit_fails(new):
        real(new)
        if any(path.name == "server.key" for path in new):  # (the enrolment's, not the put-back)
            raise OSError("could not commit: the database went away")

    monkeypatch.setattr(command, "write_all_atomic", written_then_commit_fails)
    with pytest.raises(CommandError, match="database went away"):  # (said, not a traceback)
        run("config", gateway.name, "--dir", str(state), "--re-enrol")
    assert {p: p.read_bytes() for p in files} == files
    gateway.refresh_from_db()
    assert (gateway.server_certificate, gateway.ssh_host_certificate) == pinned


@pytest.mark.django_db
def test_a_gateway_now_serving_ssh_without_a_host_key_is_told_to_enrol(tmp_path):
    from access.models import Gateway

    gw = Gateway.objects.create(name="gw2", kind=GatewayKind.VPN, address="198.18.100.2")
    state = tmp_path / "state"
    run("config", "gw2", "--dir", str(state))
    gw.kind = GatewayKind.BOTH
    gw.save()
    report = pull.install_state(state, services.gateway_state(gateway=gw), cut_sessions=False)
    assert "sshd_config" in report.configs and "systemd/virtcloud-gateway-sshd.service" in report.configs
    assert any("no host key: enrol it" in note for note in report.notes)


@pytest.mark.django_db(transaction=True)
def test_a_service_the_gateway_no_longer_serves_fails_closed_and_its_files_go(
    live_server, alice, root, team, gateway, tmp_path
):
    """An admin switches the gateway from both services to SSH only, then to VPN only. The state of the service it
    no longer serves is not left as it was (renewed by every pull, the VLAN of a cluster that ended may be another
    cluster's by then): the standalone agent empties its cluster maps — its hooks admit nobody — removes the files
    that run it and names them to the --on-change hook, which stops it, and says so."""
    from access.gateway import vpn as gateway_vpn
    from access.gateway.state import SshState, VpnState, load_vlan_map

    make_cluster(alice, name="mpi", group=team)
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), "--portal-url", live_server.url, "--python", sys.executable)
    (state / "token").write_text(services.gateway_token_issue(gateway=gateway, by=root) + "\n")
    (state / "token").chmod(0o644)  # (readable by others: every pull says so, below)
    seen = tmp_path / "seen"
    hook = tmp_path / "hook.sh"  # what an operator's hook does with a file that is gone: stops what ran it
    hook.write_text(f'#!/bin/sh\necho "[$VIRTCLOUD_CONFIG_CHANGED]" >> {seen}\n')
    hook.chmod(0o755)
    argv = [sys.executable, "-I", str(AGENT), "pull", "--url", live_server.url, "--token-file", str(state / "token")]
    argv += ["--dir", str(state), "--on-change", str(hook)]

    def agent() -> str:
        done = subprocess.run(argv, env=BARE_ENV, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    agent()
    vpn, ssh = VpnState.at(state), SshState.at(state)
    [label] = load_vlan_map(vpn.vlans)  # the cluster's name on the gateway
    assert (ssh.principals_dir / "virtcloud").read_text()
    vpn_files = ["openvpn.conf", "systemd/virtcloud-gateway-openvpn.service"]
    assert all((state / name).exists() for name in vpn_files)

    gateway.kind = GatewayKind.SSH
    gateway.save()
    out = agent()
    assert load_vlan_map(vpn.vlans) == {}  # client-connect has no VLAN for anyone
    assert not [name for name in vpn_files if (state / name).exists()]
    assert seen.read_text().splitlines()[-1] == f"[{' '.join(vpn_files)}]", out
    assert "the portal no longer has this gateway serve VPN (OpenVPN): it refuses everyone there" in out
    assert "removed openvpn.conf, systemd/virtcloud-gateway-openvpn.service" in out
    entry = {"serial": 77, "subject": "CN=alice", "ac_serial": 77, "fqans": [], "clusters": {label: "member"}}
    (vpn.ac_cache / f"{'ab' * 32}.json").write_text(json.dumps({**entry, "not_after": 4e9}))
    env = {"tls_digest_sha256_0": "ab" * 32, "UV_VCLUSTER": label}
    with pytest.raises(gateway_vpn.Refused, match=f"cluster {label} has no VLAN on this gateway"):
        gateway_vpn.client_connect(vpn, str(tmp_path / "cc"), env)
    assert (ssh.principals_dir / "virtcloud").read_text()  # (the service it still serves: as it was)
    runs = len(seen.read_text().splitlines())
    out = agent()  # done once: the next pulls have nothing more to do or say
    assert "no longer" not in out and len(seen.read_text().splitlines()) == runs

    gateway.kind = GatewayKind.VPN
    gateway.save()
    out = agent()
    assert (ssh.principals_dir / "virtcloud").read_text() == ""  # no principals: no login
    assert json.loads(ssh.clusters.read_text())["clusters"] == {}  # no leg in any cluster
    assert not (state / "sshd_config").exists() and not (state / "systemd/virtcloud-gateway-sshd.service").exists()
    assert "the portal no longer has this gateway serve SSH (the bastion)" in out
    changed = seen.read_text().splitlines()[-1]
    assert "sshd_config" in changed and "systemd/virtcloud-gateway-sshd.service" in changed
    assert "openvpn.conf" in changed and label in load_vlan_map(vpn.vlans)  # served again: back as it was
    # the token file others may read is reported at every pull (not refused: existing set-ups keep working) …
    assert "gateway pull: warning:" in out and "open to others than its owner (mode 644): chmod 600 it" in out
    (state / "token").chmod(0o600)
    assert "open to others than its owner" not in agent()  # … and no more once it is the owner's alone


@pytest.mark.django_db(transaction=True)
def test_without_a_hook_a_rewritten_configuration_stays_pending_until_the_operator_applies_it(
    live_server, root, gateway, tmp_path
):
    """No --on-change hook (a gateway set up without --trunk, one serving the VPN only): nothing restarts OpenVPN on
    the rewritten openvpn.conf. It was said once, in one pull's log line, and forgotten; it stays pending — every
    pull and the status say so — until ``applied``."""
    state = tmp_path / "state"
    run("config", "gw1", "--dir", str(state), "--portal-url", live_server.url)
    token = services.gateway_token_issue(gateway=gateway, by=root)
    args = ("pull", "--url", live_server.url, "--token", token, "--dir", str(state))
    run(*args)
    gateway.vpn_port = 1195
    gateway.save()
    assert "configuration not applied yet: openvpn.conf" in run(*args)
    assert "configuration not applied yet: openvpn.conf" in run(*args)  # (a 304: still said)
    assert "configuration not applied yet: openvpn.conf" in run("status", "--dir", str(state))
    assert "configuration applied: openvpn.conf" in run("applied", "--dir", str(state))
    assert "not applied" not in run(*args) and not (state / CONFIG_CHANGED).exists()


def test_applied_never_loses_a_file_a_pull_changes_meanwhile(tmp_path, monkeypatch):
    """``gateway applied`` read the list of changed files, then deleted it: a pull that changed another file in
    between lost it from the list, and it was never restarted. The list is taken in one rename."""
    from access.gateway import agent, config

    changed = tmp_path / config.CONFIG_CHANGED
    changed.write_text("openvpn.conf\n")
    real = agent.os.replace

    def a_pull_meanwhile(src, dst):
        real(src, dst)
        changed.write_text("sshd_config\n")  # (a pull renders sshd_config again just then)

    monkeypatch.setattr(agent.os, "replace", a_pull_meanwhile)
    assert agent.take_pending(tmp_path) == ["openvpn.conf"]
    assert config.pending(tmp_path) == ["sshd_config"]
    monkeypatch.undo()
    assert agent.take_pending(tmp_path) == ["sshd_config"] and config.pending(tmp_path) == []
    assert agent.take_pending(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == []

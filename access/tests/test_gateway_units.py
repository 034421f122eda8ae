"""The gateway's systemd units (``manage.py gateway config --dir``) and the standalone agent they run: a gateway
pulls, installs and reports its state without Django and without any of the portal's secrets."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from access import services
from access.gateway import systemd
from access.models import Credential, GatewayKind
from access.selectors import cluster_label
from access.tests.fixtures import gateway, make_cluster

ROOT = Path(__file__).resolve().parents[2]
# What a gateway host has: a PATH, no DJANGO_SETTINGS_MODULE, no SECRET_KEY/SECRETS_KEY/CA passphrase.
# And a proxy that refuses everything: the pull to a portal on this host never goes through one.
BARE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "http_proxy": "http://127.0.0.1:9"}


def config(*args) -> str:
    out = io.StringIO()
    call_command("gateway", "config", *args, stdout=out, stderr=out)
    return out.getvalue()


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def exec_argv(line: str) -> list[str]:
    """What systemd runs for an ``ExecStart=`` line (words, double quotes with backslash escapes; specifiers
    and variables doubled) — for the lines these units use, as shlex reads them."""
    return [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(line)]


def run_unit(unit: Path) -> subprocess.CompletedProcess:
    (line,) = unit_values(unit.read_text(), "ExecStart")
    return subprocess.run(exec_argv(line), env=BARE_ENV, cwd="/", capture_output=True, text=True, timeout=60)


def verify(paths: list[Path]) -> None:
    """``systemd-analyze verify``: the syntax, every key known, every command present and executable."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # pragma: no cover - Debian's systemd is installed by scripts/setup.sh
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "ignoring" not in done.stderr.lower(), done.stderr


def written_units(units: Path) -> list[str]:
    """The units ``gateway config`` wrote (without their ``virtcloud-gateway-`` prefix), each verified by
    systemd-analyze; beside them always the drop-in for Debian's ssh.service."""
    assert (units / "ssh.service.d" / "virtcloud-gateway.conf").is_file()
    files = sorted(p for p in units.iterdir() if p.is_file())
    verify(files)
    return [p.name.removeprefix("virtcloud-gateway-") for p in files]


def test_exec_line_reads_back_exactly_the_words():
    argv = ["/opt/v c/python", "-I", "", 'say "hi"', "back\\slash", "100%", "$HOME", "it's"]
    line = systemd.exec_line(argv)
    assert exec_argv(line) == argv
    assert "%%" in line and "$$HOME" in line
    with pytest.raises(ValueError, match="control characters"):  # a line break would add a directive
        systemd.exec_line(["/usr/bin/true", "https://p\nExecStartPost=/bin/touch /tmp/x"])


def test_units_for_a_state_directory_with_specifier_characters(tmp_path):
    """``%`` in a path would be read as a systemd specifier (a fatal error in WorkingDirectory=)."""
    state = tmp_path / "gw%state"
    units = systemd.render_units(
        state_dir=state, code_root=ROOT, python=sys.executable, portal_url="https://portal.example.org",
        serves_vpn=True, serves_ssh=True,
    )  # fmt: skip
    (tmp_path / "units").mkdir()
    for name, text in units.items():
        if name.endswith((".service", ".timer")):
            (tmp_path / "units" / name).write_text(text)
    verify(sorted((tmp_path / "units").iterdir()))
    service = units["virtcloud-gateway-openvpn.service"]
    assert f"WorkingDirectory={tmp_path}/gw%%state" in service
    assert exec_argv(unit_values(service, "ExecStart")[0])[-1] == f"{state}/openvpn.conf"


def test_the_agent_imports_nothing_of_the_portal():
    """A gateway runs access/gateway/ alone: no Django, no portal package (its settings want the secrets)."""
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import access.gateway.agent, access.gateway.systemd; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'portal', 'rest_framework', 'celery', "
        "'clusters', 'network'}))"
    )
    done = subprocess.run([sys.executable, "-I", "-c", probe], env=BARE_ENV, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.django_db(transaction=True)
def test_the_pull_unit_runs_the_standalone_agent_without_django_or_the_portals_secrets(
    live_server, alice, root, team, gateway, tmp_path
):
    cluster = make_cluster(alice, name="mpi", group=team)
    state = tmp_path / "state"
    config("gw1", "--dir", str(state), "--portal-url", live_server.url, "--python", sys.executable, "--dev", "vcnotap0")
    units = state / "systemd"
    assert written_units(units) == ["openvpn.service", "pull.service", "pull.timer", "sshd.service"]
    # Debian's ssh.service would delete /run/sshd when it stops: the drop-in keeps it
    drop_in = (units / "ssh.service.d" / "virtcloud-gateway.conf").read_text()
    assert "[Service]\nRuntimeDirectoryPreserve=yes\n" in drop_in
    sshd_unit = (units / "virtcloud-gateway-sshd.service").read_text()
    assert unit_values(sshd_unit, "ExecStart") == [f"/usr/sbin/sshd -D -e -f {state}/sshd_config"]
    assert "KillMode=process" in sshd_unit  # a restart leaves the users' sessions up
    assert unit_values((units / "virtcloud-gateway-pull.timer").read_text(), "OnUnitActiveSec") == ["60s"]
    openvpn = (units / "virtcloud-gateway-openvpn.service").read_text()
    assert unit_values(openvpn, "ExecStart") == [
        f"/usr/sbin/openvpn --suppress-timestamps --config {state}/openvpn.conf"
    ]
    # OpenVPN starts only with the persistent tap plugged into the trunk there (no such device here).
    (check,) = unit_values(openvpn, "ExecStartPre")
    done = subprocess.run(exec_argv(check), capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "vcnotap0" in done.stderr
    units_with_lo = systemd.render_units(
        state_dir=state, code_root=ROOT, python=sys.executable, portal_url="https://p", serves_vpn=True,
        serves_ssh=False, tap="lo",
    )  # fmt: skip
    (check,) = unit_values(units_with_lo["virtcloud-gateway-openvpn.service"], "ExecStartPre")
    assert subprocess.run(exec_argv(check), capture_output=True, check=False).returncode == 0
    # The unit's checks before it starts sshd pass: the privilege separation directory, then sshd -t on the config.
    for line in unit_values(sshd_unit, "ExecStartPre"):
        done = subprocess.run(exec_argv(line), capture_output=True, text=True, check=False)
        assert done.returncode == 0, (line, done.stderr)

    pull = units / "virtcloud-gateway-pull.service"
    # No token yet: the pull says so and changes nothing.
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    done = run_unit(pull)
    assert done.returncode == 2 and "cannot read the gateway token" in done.stderr
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before

    (state / "token").write_text(services.gateway_token_issue(gateway=gateway, by=root) + "\n")
    done = run_unit(pull)
    assert done.returncode == 0, done.stderr
    # what gateway config installed is the current state: asked with its etag, a 304
    assert done.stdout.strip() == "gateway pull: unchanged"
    assert json.loads((state / "vpn" / "vlans.json").read_text())["clusters"] == {
        cluster_label(cluster): cluster.vlan_id
    }
    done = run_unit(pull)
    assert (done.returncode, done.stdout.strip()) == (0, "gateway pull: unchanged")  # the ETag: a 304

    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    done = run_unit(pull)
    assert done.returncode == 0 and "updated" in done.stdout, done.stderr
    assert json.loads((state / "vpn" / "revoked.json").read_text()) == [credential.serial]

    status = [sys.executable, "-I", str(ROOT / "access/gateway/agent.py"), "status", "--dir", str(state)]
    done = subprocess.run(status, env=BARE_ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "current: trusted for" in done.stdout

    # The portal is gone: the agent keeps the last good state and says so (EX_TEMPFAIL).
    assert live_server.url in unit_values(pull.read_text(), "ExecStart")[0]
    pull.write_text(pull.read_text().replace(live_server.url, "http://127.0.0.1:9"))
    kept = {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.name != "virtcloud-gateway-pull.service"}
    done = run_unit(pull)
    assert done.returncode == 75 and "keeping the last good state" in done.stderr
    assert {p: p.read_bytes() for p in kept} == kept


@pytest.mark.django_db
def test_a_bastion_per_cluster_gets_its_service_and_the_pull_its_legs_hook(tmp_path):
    from access.models import Gateway

    Gateway.objects.create(name="gw2", kind=GatewayKind.SSH, address="198.18.100.2", ssh_port_base=30000)
    state = tmp_path / "state"
    config("gw2", "--dir", str(state), "--trunk", "vctrunk0", "--ssh-listen", "198.18.100.2")
    units = state / "systemd"
    assert written_units(units) == ["bastion.service", "pull.service", "pull.timer"]
    (bastion,) = unit_values((units / "virtcloud-gateway-bastion.service").read_text(), "ExecStart")
    argv = exec_argv(bastion)
    assert argv[1:] == [
        "-I",
        str(ROOT / "access/gateway/bastion.py"),
        "--state",
        str(state),
        "--listen",
        "198.18.100.2",
        "--port-base",
        "30000",
        "--sshd",
        "/usr/sbin/sshd",
    ]
    (pull,) = unit_values((units / "virtcloud-gateway-pull.service").read_text(), "ExecStart")
    argv = exec_argv(pull)
    assert argv[argv.index("--url") + 1] == "http://127.0.0.1:8000"  # SITE_URL
    hook = shlex.split(argv[argv.index("--on-change") + 1])  # as the agent splits it
    assert "--on-change-leaves-config" in argv  # (legs.py restarts nothing: the configuration stays pending)
    assert hook[1:] == [
        "-I",
        str(ROOT / "access/gateway/legs.py"),
        "--trunk",
        "vctrunk0",
        "--state",
        str(state),
        "--namespaces",
    ]
    # The hook's command line runs: legs.py refuses a trunk this machine does not have, before changing anything.
    done = subprocess.run(hook, env=BARE_ENV, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and "vctrunk0" in done.stderr, done.stderr
    # A gateway without --trunk gets no hook (its clusters are reached by VPN only).
    config("gw2", "--dir", str(state))
    assert "--on-change" not in (units / "virtcloud-gateway-pull.service").read_text()


def _principals_commands(text: str) -> list[str]:
    """The ``AuthorizedPrincipalsCommand`` lines of an sshd_config (not ``...CommandUser``)."""
    return [line for line in text.splitlines() if line.split()[:1] == ["AuthorizedPrincipalsCommand"]]


@pytest.mark.django_db
def test_each_clusters_bastion_has_exactly_its_own_principals_command(tmp_path):
    """With a bastion per cluster the gateway's sshd_config has no principals command and each cluster's
    configuration exactly one, its own, with nothing included: sshd takes the first value of a directive (9.2
    kept the last of this one by a quirk), so a second, unfiltered one would let every cluster's principals in on
    every cluster's port. sshd -T shows the one it takes, and no shell for anyone."""
    import os

    from access.gateway import bastion
    from access.gateway.sshd import NO_COMMAND
    from access.gateway.state import SshState
    from access.models import Gateway

    Gateway.objects.create(name="gw2", kind=GatewayKind.SSH, address="198.18.100.2", ssh_port_base=30000)
    state = tmp_path / "state"
    config("gw2", "--dir", str(state), "--ssh-listen", "198.18.100.2")
    shared = (state / "sshd_config").read_text()
    assert _principals_commands(shared) == [] and "AuthorizedPrincipalsCommandUser virtcloud\n" in shared
    b = bastion.Bastion(state, listen="127.0.0.1", base=30000, netns="vcl{vid}", sshd="/usr/sbin/sshd")
    command = f"{SshState.at(state).principals_command} %u %s c7"
    text = b.cluster_config("c7").read_text()
    assert _principals_commands(text) == [f"AuthorizedPrincipalsCommand {command}"]
    assert "Include" not in text and shared.splitlines()[1] in text
    # a gateway configured by an older `gateway config` (its file has the unfiltered command): still one
    (state / "sshd_config").write_text(
        shared + f"authorizedprincipalscommand={SshState.at(state).principals_command}\n"
    )
    assert _principals_commands(b.cluster_config("c7").read_text()) == [f"AuthorizedPrincipalsCommand {command}"]
    assert "authorizedprincipalscommand=" not in b.cluster_config("c7").read_text()
    # One bastion for every cluster: its own file keeps the (unfiltered) command.
    Gateway.objects.filter(name="gw2").update(ssh_port_base=0)
    config("gw2", "--dir", str(state), "--ssh-listen", "198.18.100.2")
    (one,) = _principals_commands((state / "sshd_config").read_text())
    assert one == f"AuthorizedPrincipalsCommand {SshState.at(state).principals_command} %u %s"

    if not os.path.exists("/usr/sbin/sshd"):  # pragma: no cover - scripts/setup.sh installs openssh-server
        pytest.skip("openssh-server (sshd) not installed")
    Gateway.objects.filter(name="gw2").update(ssh_port_base=30000)
    config("gw2", "--dir", str(state), "--ssh-listen", "198.18.100.2")
    os.makedirs(bastion.PRIVSEP_DIR, mode=0o755, exist_ok=True)  # sshd -T checks it (bastion.py makes it)
    shown = subprocess.run(
        ["/usr/sbin/sshd", "-T", "-f", str(b.cluster_config("c7"))], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0, shown.stderr
    effective = [line for line in shown.stdout.splitlines() if line.startswith("authorizedprincipalscommand ")]
    assert effective == [f"authorizedprincipalscommand {command}"]
    for line in (f"forcecommand {NO_COMMAND}", "permittty no", "x11forwarding no", "allowagentforwarding no"):
        assert line in shown.stdout.splitlines(), line
    assert "allowtcpforwarding local" in shown.stdout.splitlines()  # ProxyJump's direct-tcpip still works


@pytest.mark.django_db
def test_gateway_config_into_a_directory_that_is_a_file_is_an_error_not_a_traceback(tmp_path):
    from django.core.management import CommandError

    from access.tests.fixtures import make_gateway

    gateway = make_gateway("gw-file")
    target = tmp_path / "not-a-directory"
    target.write_text("x")
    with pytest.raises(CommandError, match="cannot write .*not-a-directory"):
        call_command("gateway", "config", gateway.name, "--dir", str(target), stdout=io.StringIO())

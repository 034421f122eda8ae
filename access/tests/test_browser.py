"""The download page in headless Chromium (Debian's, driven by Playwright): log in through the login form,
open "my clusters", download the VPN profile and the SSH bundle, check both are usable, revoke; and no
private key of the user is left in the database or the logs afterwards."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from django.db import connection

from access.models import Authority, AuthorityKind, Credential
from access.selectors import cluster_label
from access.tests.browser import browser_page, log_in
from access.tests.fixtures import gateway, make_cluster
from access.tests.profile_check import parse_profile


def _all_rows_text() -> str:
    chunks = []
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from introspection
            chunks.extend(repr(row) for row in cur.fetchall())
    return "\n".join(chunks)


def test_login_download_vpn_and_ssh_then_revoke(
    browser_page, live_server, alice, team, gateway, tmp_path, caplog, capfd
):
    cluster = make_cluster(alice, name="mpi", group=team)
    make_cluster(alice, name="hpc")
    label = cluster_label(cluster)
    page = browser_page

    log_in(page, live_server, "alice", "alice-password", next_url="/access/")
    assert "OpenVPN 2.x" in page.inner_text("#vpn")
    assert "OpenVPN Connect" in page.inner_text("#vpn")
    assert "ssh -F virtcloud.conf " in page.inner_text("#ssh")

    page.check(f"#vpn-form input[value='{cluster.pk}']")
    with page.expect_download() as info:
        page.click("#vpn-form button[type=submit]")
    download = info.value
    assert download.suggested_filename == f"virtcloud-{label}.ovpn"
    profile_path = tmp_path / download.suggested_filename
    download.save_as(profile_path)
    text = profile_path.read_text()
    parsed = parse_profile(text, aa_pem=Authority.objects.get(kind=AuthorityKind.AA).certificate)
    assert parsed.fqans == [f"/virtcloud/{label}/Role=member"]  # only the chosen cluster, not hpc
    assert parsed.directives["setenv"] == [f"UV_VCLUSTER {label}"]

    page.select_option("#id_cluster", str(cluster.pk))
    with page.expect_download() as info:
        page.click("#ssh-form button[type=submit]")
    bundle = info.value
    assert bundle.suggested_filename == f"virtcloud-{label}-ssh.zip"
    bundle_path = tmp_path / bundle.suggested_filename
    bundle.save_as(bundle_path)
    archive = zipfile.ZipFile(bundle_path)
    config = archive.read(f"virtcloud-{label}/virtcloud.conf").decode()
    assert f"Host {label}-*" in config and "ProxyJump" in config and "CertificateFile id_virtcloud-cert.pub" in config
    ssh_key = archive.read(f"virtcloud-{label}/id_virtcloud").decode()
    if shutil.which("ssh-keygen"):
        # The certificate is for the key in the same bundle.
        archive.extractall(tmp_path / "ssh")
        folder = tmp_path / "ssh" / f"virtcloud-{label}"
        os.chmod(folder / "id_virtcloud", 0o600)
        import subprocess

        listed = subprocess.run(
            ["ssh-keygen", "-L", "-f", folder / "id_virtcloud-cert.pub"], capture_output=True, text=True, check=True
        ).stdout
        assert f"{label}.alice" in listed
        derived = subprocess.run(
            ["ssh-keygen", "-y", "-f", folder / "id_virtcloud"], capture_output=True, text=True, check=True
        ).stdout.split()[:2]
        assert (folder / "id_virtcloud.pub").read_text().split()[:2] == derived

    # "I lost my laptop": revoke the VPN profile from the page.
    page.goto(f"{live_server.url}/access/")
    vpn_row = page.locator(f"tr[data-serial='{parsed.cert.serial_number}']")
    vpn_row.get_by_role("link", name=f"Revoke OpenVPN profile {parsed.cert.serial_number} (lost my laptop)").click()
    page.wait_for_load_state()
    assert "the access gateways refuse it" in page.inner_text("#what-happens")  # asked first, saying what happens
    page.get_by_role("button", name=f"Revoke OpenVPN profile {parsed.cert.serial_number}").click()
    page.wait_for_load_state()
    assert "revoked" in page.locator(f"tr[data-serial='{parsed.cert.serial_number}']").inner_text()
    assert Credential.objects.get(serial=parsed.cert.serial_number).revocation_reason == "key_compromise"

    # No private key of the user anywhere in the database or the logs after the responses.
    rows = _all_rows_text()
    logs = caplog.text + "".join(capfd.readouterr())
    assert "issued VPN profile" in logs and "issued SSH certificate" in logs  # the server's log lines are here
    for secret in (parsed.key_pem.decode().splitlines()[1], ssh_key.splitlines()[1]):
        assert secret not in rows
        assert secret not in logs


def test_on_a_phone_the_pages_do_not_scroll_sideways(browser_page, live_server, alice, team, gateway):
    """390 px wide: a wide table scrolls inside itself; the page itself stays as wide as the screen."""
    from access import services

    cluster = make_cluster(alice, name="mpi-with-a-rather-long-name", group=team, nodes=("node1", "node2", "node3"))
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    services.ssh_certificate_issue(user=alice, cluster=cluster)
    page = browser_page
    page.set_viewport_size({"width": 390, "height": 800})
    log_in(page, live_server, "alice", "alice-password", next_url="/access/")
    for path in ("/access/", "/"):
        page.goto(f"{live_server.url}{path}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)

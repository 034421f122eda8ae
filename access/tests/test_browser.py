"""The download page in headless Chromium (Debian's, driven by Playwright): log in through the login form
(a local account, and a directory account of a throwaway slapd), open "VPN and SSH access", download the VPN profile
and the SSH bundle, check both are usable, revoke; and no private key of the user is left in the database,
the logs or any file on disk (the portal's DATA_DIR, /tmp, the test's and Chromium's directories) afterwards,
but the downloaded file."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures and portal.tests.test_auth are
# parameters here)

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from django.conf import settings
from django.db import connection

from access.models import Authority, AuthorityKind, Credential
from access.selectors import cluster_label
from access.tests.browser import browser_page, log_in
from access.tests.fixtures import gateway, make_cluster
from access.tests.profile_check import parse_profile
from portal.tests.test_auth import directory, ldap_up  # a throwaway slapd, and the portal's settings pointing at it

MAX_SCANNED = 5 * 2**20  # bytes: larger files (databases of other runs, browser caches) are not read


def _all_rows_text() -> str:
    chunks = []
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from introspection
            chunks.extend(repr(row) for row in cur.fetchall())
    return "\n".join(chunks)


def _private_parts(pem: str) -> list[bytes]:
    """What of the PRIVATE KEY block in ``pem`` would betray the key in a file: its base64 lines that carry part
    of the private value (the others are the same in every key of a kind, or public), and the value's bytes."""
    m = re.search(r"-----BEGIN (OPENSSH )?PRIVATE KEY-----\n(.*?)\n-----END (OPENSSH )?PRIVATE KEY-----", pem, re.S)
    assert m, "no PRIVATE KEY block"
    load = serialization.load_ssh_private_key if m.group(1) else serialization.load_pem_private_key
    key = load(m.group(0).encode(), None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        value = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey), type(key)
        value = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    lines = m.group(2).split("\n")
    start = base64.b64decode("".join(lines)).index(value)
    first, end = start * 4 // 3, -(-(start + len(value)) * 4 // 3)  # the base64 characters that encode it
    parts, at = [], 0
    for line in lines:
        if at < end and at + len(line) > first:
            parts.append(line.encode())
        at += len(line)
    return [*parts, value]


def _files_holding(parts: list[bytes], roots: list[Path], *, besides: list[Path] = ()) -> list[str]:
    """Regular files under ``roots`` (not under ``besides``; symbolic links not followed; none larger than
    MAX_SCANNED) whose bytes contain any of ``parts``."""
    skip = {os.path.realpath(p) for p in besides}
    found, seen = [], set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            if os.path.realpath(folder) in skip:
                dirs[:] = []
                continue
            for name in files:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SCANNED or (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    with open(path, "rb") as f:
                        data = f.read(MAX_SCANNED)
                except OSError:  # gone meanwhile (other runs' files), or a socket's
                    continue
                if any(part in data for part in parts):
                    found.append(path)
    return found


def _key_left_on_disk(page, keys: list[str], *, downloads: Path, download, tmp_path: Path) -> list[str]:
    """Close the browser (so that Chromium has written everything it would keep), then the files holding any
    of ``keys`` in the portal's DATA_DIR, /tmp, the test's tmp dirs and Chromium's profile: all but
    ``downloads`` (where the test saved the files) and Playwright's download folder. The paths only: a failure
    message must not carry a key (it would end up on disk itself)."""
    parts = [part for key in keys for part in _private_parts(key)]
    # The search finds the key where it is: in the files the test saved.
    assert _files_holding(parts, [downloads]), "the search does not find the key in the downloaded file"
    saved_by_browser = Path(download.path()).parent
    page.context.close()
    roots = [Path(settings.DATA_DIR), Path("/tmp"), Path(tempfile.gettempdir()), tmp_path]
    roots.append(tmp_path / "chromium-profile")  # browser_page's --user-data-dir (also under tmp_path)
    return _files_holding(parts, roots, besides=[downloads, saved_by_browser])


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

    # A pasted key that is not one: the page comes back with it, and the error at the field.
    page.select_option("#ssh-cluster", str(cluster.pk))
    page.fill("#ssh-public_key", "ssh-ed25519 not-a-key")
    page.click("#ssh-form button[type=submit]")
    page.wait_for_load_state()
    assert page.input_value("#ssh-public_key") == "ssh-ed25519 not-a-key"
    assert "Not a valid OpenSSH public key" in page.inner_text("#ssh-public_key_error")
    assert page.evaluate("document.activeElement.id") == "ssh-public_key"  # focused there
    page.fill("#ssh-public_key", "")

    assert not page.query_selector("#credentials tr[data-serial]")
    page.check(f"#vpn-form input[value='{cluster.pk}']")
    with page.expect_download() as info:
        page.click("#vpn-form button[type=submit]")
    download = info.value
    assert download.suggested_filename == f"virtcloud-{label}.ovpn"
    # The page lists the new credential a moment later, without a reload.
    page.wait_for_selector("#credentials tr[data-serial]", timeout=10_000)
    downloads = tmp_path / "downloads"
    profile_path = downloads / download.suggested_filename
    download.save_as(profile_path)
    text = profile_path.read_text()
    parsed = parse_profile(text, aa_pem=Authority.objects.get(kind=AuthorityKind.AA).certificate)
    assert parsed.fqans == [f"/virtcloud/{label}/Role=member"]  # only the chosen cluster, not hpc
    assert parsed.directives["setenv"] == [f"UV_VCLUSTER {label}"]

    page.select_option("#ssh-cluster", str(cluster.pk))
    with page.expect_download() as info:
        page.click("#ssh-form button[type=submit]")
    bundle = info.value
    assert bundle.suggested_filename == f"virtcloud-{label}-ssh.zip"
    bundle_path = downloads / bundle.suggested_filename
    bundle.save_as(bundle_path)
    archive = zipfile.ZipFile(bundle_path)
    config = archive.read(f"virtcloud-{label}/virtcloud.conf").decode()
    assert f"Host *.{label}" in config and "ProxyJump" in config and "CertificateFile id_virtcloud-cert.pub" in config
    ssh_key = archive.read(f"virtcloud-{label}/id_virtcloud").decode()
    if shutil.which("ssh-keygen"):
        # The certificate is for the key in the same bundle.
        archive.extractall(downloads / "ssh")
        folder = downloads / "ssh" / f"virtcloud-{label}"
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

    # No private key of the user anywhere in the database, the logs or on disk after the responses.
    rows = _all_rows_text()
    logs = caplog.text + "".join(capfd.readouterr())
    assert "issued VPN profile" in logs and "issued SSH certificate" in logs  # the server's log lines are here
    for secret in (parsed.key_pem.decode().splitlines()[1], ssh_key.splitlines()[1]):
        assert secret not in rows
        assert secret not in logs
    on_disk = _key_left_on_disk(page, [text, ssh_key], downloads=downloads, download=download, tmp_path=tmp_path)
    assert on_disk == [], f"the user's private key is left in {on_disk}"


@pytest.mark.skipif(not shutil.which("slapd") and not os.path.exists("/usr/sbin/slapd"), reason="needs slapd")
def test_directory_user_logs_in_opens_my_clusters_and_downloads_a_vpn_profile(
    browser_page, live_server, ldap_up, gateway, tmp_path
):
    """The issue's path: LDAP login → VPN and SSH access → download. alice exists only in the directory."""
    from django.contrib.auth.models import Group, User

    from portal.models import DirectoryAccount

    page = browser_page
    assert not User.objects.filter(username="alice").exists()
    log_in(page, live_server, "alice", ldap_up.passwords["alice"], next_url="/")
    alice = User.objects.get(username="alice")
    assert DirectoryAccount.objects.get(user=alice).dn == f"uid=alice,{ldap_up.people_base}"
    assert not alice.has_usable_password()  # it was the directory that said yes
    physics = Group.objects.get(name="physics")  # from the directory's groups
    cluster = make_cluster(alice, name="mpi", group=physics)
    label = cluster_label(cluster)

    page.get_by_role("navigation").get_by_role("link", name="VPN and SSH access").click()
    page.wait_for_url(f"{live_server.url}/access/")
    assert page.inner_text("h1") == "VPN and SSH access"  # as the link says
    assert label in page.inner_text(f"#clusters tr[data-cluster='{cluster.pk}']")
    page.check(f"#vpn-form input[value='{cluster.pk}']")
    with page.expect_download() as info:
        page.click("#vpn-form button[type=submit]")
    download = info.value
    assert download.suggested_filename == f"virtcloud-{label}.ovpn"
    downloads = tmp_path / "downloads"
    download.save_as(downloads / download.suggested_filename)
    text = (downloads / download.suggested_filename).read_text()
    parsed = parse_profile(text, aa_pem=Authority.objects.get(kind=AuthorityKind.AA).certificate)
    assert parsed.fqans == [f"/virtcloud/{label}/Role=member"]
    assert Credential.objects.get(serial=parsed.cert.serial_number).user == alice

    on_disk = _key_left_on_disk(page, [text], downloads=downloads, download=download, tmp_path=tmp_path)
    assert on_disk == [], f"alice's private key is left in {on_disk}"


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
    # Each credential is a card: its "Revoke" link is on the screen, not in a column scrolled out of sight.
    page.goto(f"{live_server.url}/access/")
    for link in page.locator("#credentials a", has_text="Revoke (lost my laptop)").all():
        link.scroll_into_view_if_needed()
        box = link.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, box


def test_after_a_failed_login_the_password_is_focused(browser_page, live_server, alice):
    page = browser_page
    page.goto(f"{live_server.url}/login/")
    assert page.evaluate("document.activeElement.id") == "id_username"
    page.fill("#id_username", "alice")
    page.fill("#id_password", "wrong")
    page.click("form.login button[type=submit]")
    page.wait_for_load_state()
    assert page.input_value("#id_username") == "alice"
    assert page.evaluate("document.activeElement.id") == "id_password"
    assert page.evaluate("getComputedStyle(document.getElementById('id_password')).fontSize") == "16px"

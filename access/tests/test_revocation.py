"""Every event that takes access away revokes: cluster ended, user left the group, the cluster changed
group/owner or stopped being closed, admin action, "I lost my laptop"; and the gateway is told."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import pytest
from cryptography import x509
from django.contrib.auth.models import Group

from access import services
from access.models import Credential, RevocationReason
from access.selectors import cluster_label
from access.tests.fixtures import cluster, gateway, make_cluster, other_cluster

pytestmark = pytest.mark.django_db


def issue_both(user, cluster):
    services.vpn_profile_issue(user=user, clusters=[cluster])
    services.ssh_certificate_issue(user=user, cluster=cluster)


def crl_serials() -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(services.crl_current().encode())}


def krl_revokes(serial: int) -> bool:
    # The KRL's certificate section lists serials as big-endian u64 (PROTOCOL.krl); good enough here,
    # test_services checks the KRL with ssh-keygen -Q.
    return serial.to_bytes(8, "big") in services.krl_current()


def test_cluster_ended_signal_revokes_everything_for_it(
    alice, bob, team, cluster, gateway, django_capture_on_commit_callbacks
):
    from clusters.signals import cluster_ended

    second = make_cluster(alice, name="keep")
    issue_both(alice, cluster)
    issue_both(bob, cluster)
    services.vpn_profile_issue(user=alice, clusters=[second])
    cluster.state = "torn_down"
    with django_capture_on_commit_callbacks(execute=True):
        cluster.save()
        cluster_ended.send(type(cluster), cluster=cluster)
    gone = Credential.objects.filter(clusters__cluster_id=cluster.pk)
    assert gone.count() == 4
    assert all(c.revoked_at and c.revocation_reason == RevocationReason.CESSATION_OF_OPERATION for c in gone)
    assert Credential.objects.get(clusters__cluster_id=second.pk).revoked_at is None
    vpn = {c.serial for c in gone if c.kind == "vpn"}
    assert vpn <= crl_serials()
    assert all(krl_revokes(c.serial) for c in gone if c.kind == "ssh")
    state = services.gateway_state(gateway=gateway)
    assert {s["serial"] for s in state["vpn"]["revoked_sessions"]} == vpn
    assert "mpi" not in " ".join(state["vpn"]["vlans"])


def test_leaving_the_group_revokes_only_that_users_credentials(alice, bob, team, cluster, gateway):
    issue_both(alice, cluster)
    issue_both(bob, cluster)
    bob.groups.remove(team)
    bobs = Credential.objects.filter(user=bob)
    assert all(c.revocation_reason == RevocationReason.AFFILIATION_CHANGED for c in bobs)
    assert "may no longer enter" in bobs.first().revocation_note
    assert not Credential.objects.filter(user=alice, revoked_at__isnull=False).exists()
    assert {c.serial for c in bobs if c.kind == "vpn"} <= crl_serials()


def test_group_removal_from_the_group_side_and_clear(alice, bob, team, cluster, gateway):
    charlie_like = type(bob).objects.create_user("dave", "dave@example.org", "x")
    charlie_like.groups.add(team)
    issue_both(bob, cluster)
    issue_both(charlie_like, cluster)
    team.user_set.remove(bob)
    assert not Credential.objects.filter(user=bob, revoked_at__isnull=True).exists()
    assert Credential.objects.filter(user=charlie_like, revoked_at__isnull=True).count() == 2
    team.user_set.clear()
    assert not Credential.objects.filter(user=charlie_like, revoked_at__isnull=True).exists()
    # alice owns the cluster: she keeps access without the group.
    issue_both(alice, cluster)
    alice.groups.clear()
    assert Credential.objects.filter(user=alice, revoked_at__isnull=True).count() == 2


def test_leaving_a_group_that_still_admits_through_another_keeps_access(alice, bob, team, cluster, gateway):
    other = Group.objects.create(name="chemistry")
    bob.groups.add(other)
    issue_both(bob, cluster)
    bob.groups.remove(other)
    assert Credential.objects.filter(user=bob, revoked_at__isnull=True).count() == 2


def test_cluster_changing_group_or_becoming_public_revokes(alice, bob, team, cluster, gateway):
    issue_both(alice, cluster)
    issue_both(bob, cluster)
    cluster.group = None
    cluster.save()
    assert not Credential.objects.filter(user=bob, revoked_at__isnull=True).exists()
    assert Credential.objects.filter(user=alice, revoked_at__isnull=True).count() == 2
    cluster.connectivity = "public"
    cluster.save()
    alices = Credential.objects.filter(user=alice)
    assert all(c.revocation_reason == RevocationReason.CESSATION_OF_OPERATION for c in alices)


def test_teardown_start_revokes(alice, cluster, gateway):
    issue_both(alice, cluster)
    cluster.state = "tearing_down"
    cluster.save()
    assert all(c.revoked_at for c in Credential.objects.all())
    assert "tearing_down" in Credential.objects.first().revocation_note


def test_update_state_keeps_access(alice, cluster, gateway):
    issue_both(alice, cluster)
    cluster.state = "updating"
    cluster.save()
    cluster.state = "ready"
    cluster.save()
    assert not Credential.objects.filter(revoked_at__isnull=False).exists()


def test_revoke_for_user_by_admin(alice, root, cluster, gateway):
    issue_both(alice, cluster)
    count = services.credentials_revoke_for(user=alice, reason=RevocationReason.PRIVILEGE_WITHDRAWN, by=root)
    assert count == 2
    assert services.credentials_revoke_for(user=alice, reason=RevocationReason.PRIVILEGE_WITHDRAWN, by=root) == 0
    assert all(c.revoked_by == root for c in Credential.objects.all())


def test_revocation_reaches_a_local_gateway_at_once(
    alice, cluster, gateway, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    """A gateway on the portal's host gets the new CRL/KRL installed after commit, and the revoked
    session (found by serial, see access.gateway.vpn.session_address) is cut through the management
    interface (replaced at that seam: its protocol has its own tests with a real OpenVPN)."""
    from access.gateway import management, pull
    from access.gateway.state import VpnState

    cut: list[str] = []
    monkeypatch.setattr(pull, "session_address", lambda state, serial: "198.18.250.2:40000")
    monkeypatch.setattr(management, "kill_address", lambda path, address, **kw: cut.append(address) or 1)
    gateway.local_state_dir = str(tmp_path)
    gateway.save()
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    credential = Credential.objects.get()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    assert cut == [] and not VpnState.at(tmp_path).crl.exists()  # nothing before the commit
    for callback in callbacks:
        callback()
    crl = x509.load_pem_x509_crl(VpnState.at(tmp_path).crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(credential.serial) is not None
    assert cut == ["198.18.250.2:40000"]


def test_a_broken_local_gateway_does_not_fail_the_revocation(
    alice, cluster, gateway, tmp_path, django_capture_on_commit_callbacks
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    gateway.local_state_dir = str(blocker)
    gateway.save()
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    with django_capture_on_commit_callbacks(execute=True):
        assert services.credential_revoke(credential=Credential.objects.get(), reason="key_compromise", by=alice)
    assert Credential.objects.get().revoked_at is not None


def test_the_clusters_teardown_service_revokes_through_its_signal(
    alice, bob, cluster, gateway, django_capture_on_commit_callbacks
):
    """The real sender: clusters.services.cluster_finish_teardown sends cluster_ended after commit."""
    from clusters import services as cluster_services
    from clusters.models import VirtualCluster

    issue_both(bob, cluster)
    # The teardown workflow moves the cluster with conditional UPDATEs (no save(), no post_save).
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="tearing_down")
    assert not Credential.objects.filter(revoked_at__isnull=False).exists()
    assert cluster_label(cluster) not in services.gateway_state(gateway=gateway)["vpn"]["vlans"]  # already shut
    with django_capture_on_commit_callbacks(execute=True):
        cluster_services.cluster_finish_teardown(cluster_id=cluster.pk, generation=cluster.workflow_generation)
    assert all(c.revocation_reason == "cessation_of_operation" for c in Credential.objects.all())
    assert Credential.objects.count() == 2

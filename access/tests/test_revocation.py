"""Every event that takes access away revokes: cluster ended, user left the group, the cluster changed
group/owner or stopped being closed, admin action, "I lost my laptop"; and the gateway is told."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from django.contrib.auth.models import Group

from access import services
from access.errors import AccessError
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


def test_an_owner_leaving_the_group_ends_the_share_for_its_people(alice, bob, team, cluster, gateway):
    """A cluster is shared with its group while its owner is a member (as an image is): the owner leaving takes
    the share along — the group's people lose their credentials for it, its principals, the cluster itself in
    their lists, and get no new credential; the owner keeps theirs."""
    from rest_framework.test import APIClient

    from access import selectors
    from clusters.selectors import clusters_visible

    issue_both(alice, cluster)
    issue_both(bob, cluster)
    assert f"{cluster_label(cluster)}.bob" in services.cluster_principals([cluster])[cluster.pk]
    alice.groups.remove(team)
    bobs = Credential.objects.filter(user=bob)
    assert bobs.count() == 2 and all(c.revocation_reason == RevocationReason.AFFILIATION_CHANGED for c in bobs)
    assert {c.serial for c in bobs if c.kind == "vpn"} <= crl_serials()
    assert Credential.objects.filter(user=alice, revoked_at__isnull=True).count() == 2
    assert not selectors.clusters_user_belongs_to(bob).exists()
    assert [p for p in services.cluster_principals([cluster])[cluster.pk] if "bob" in p] == []
    request = type("R", (), {"user": bob, "auth": None})()
    assert not clusters_visible(request).filter(pk=cluster.pk).exists()
    api = APIClient()
    api.force_authenticate(bob)
    assert api.get(f"/api/clusters/{cluster.pk}/").status_code == 404
    with pytest.raises(AccessError):
        services.vpn_profile_issue(user=bob, clusters=[cluster])
    alice.groups.add(team)  # back in it: shared again
    assert selectors.clusters_user_belongs_to(bob).filter(pk=cluster.pk).exists()


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
    session (found by serial, see access.gateway.vpn.session_peers) is cut through the management
    interface (replaced at that seam: its protocol has its own tests with a real OpenVPN)."""
    from access.gateway import management, pull
    from access.gateway.state import VpnState

    cut: list[str] = []
    monkeypatch.setattr(pull, "session_peers", lambda state, serial: [("198.18.250.2", "40000")])
    monkeypatch.setattr(management, "kill_peers", lambda path, peers, **kw: cut.extend(peers) or 1)
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
    assert cut == [("198.18.250.2", "40000")]


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


def test_deleting_a_group_revokes_its_members_credentials(
    alice, bob, charlie, team, cluster, gateway, django_capture_on_commit_callbacks
):
    """``Group.delete()`` drops memberships and the clusters' group in bulk (no ``m2m_changed``): bob, who
    entered alice's cluster through the group, loses his credentials; alice, the owner, keeps hers. However many
    it revokes, the CRL and the KRL are signed once each, and the local gateways get the new state once."""
    from access.models import Authority, AuthorityKind

    charlie.groups.add(team)
    issue_both(alice, cluster)
    issue_both(bob, cluster)
    issue_both(bob, cluster)
    issue_both(charlie, cluster)
    numbers = dict(Authority.objects.values_list("kind", "revocation_number"))
    with django_capture_on_commit_callbacks() as hooks:
        team.delete()
    after = dict(Authority.objects.values_list("kind", "revocation_number"))
    assert Credential.objects.filter(user__in=[bob, charlie], revoked_at__isnull=False).count() == 6
    for kind in (AuthorityKind.VPN, AuthorityKind.SSH_USER):
        assert after[kind] == numbers[kind] + 1, kind
    assert [h.__name__ for h in hooks].count("_install_local_gateways") == 1, hooks
    bobs = Credential.objects.filter(user=bob)
    assert all(c.revocation_reason == RevocationReason.AFFILIATION_CHANGED for c in bobs), list(bobs)
    assert not Credential.objects.filter(user=alice, revoked_at__isnull=False).exists()
    assert {c.serial for c in bobs if c.kind == "vpn"} <= crl_serials()
    assert all(krl_revokes(c.serial) for c in bobs if c.kind == "ssh")


def test_deactivating_an_account_revokes_everything_it_holds(alice, bob, cluster, gateway, django_assert_num_queries):
    issue_both(alice, cluster)
    services.vpn_profile_issue(user=alice, clusters=[cluster], publish=True)
    issue_both(bob, cluster)
    with django_assert_num_queries(1):  # an active account's save (every login) costs the receiver nothing
        alice.save(update_fields=["last_login"])
    alice.is_active = False
    alice.save()
    revoked = Credential.objects.filter(user=alice)
    assert revoked.count() == 3
    assert {(c.revocation_reason, c.revocation_note) for c in revoked} == {
        (RevocationReason.PRIVILEGE_WITHDRAWN, "account alice deactivated")
    }
    assert {c.serial for c in revoked if c.kind == "vpn"} <= crl_serials()
    assert not Credential.objects.filter(user=bob, revoked_at__isnull=False).exists()


@pytest.mark.parametrize("event", ["leaves the group", "cluster torn down", "account deactivated"])
def test_an_event_while_a_profile_is_signed_refuses_it(alice, bob, team, cluster, gateway, monkeypatch, event):
    """The right is asked again when the credential is recorded: an event that committed while the key was
    generated and the certificate signed makes the issuance fail, and no credential is left behind."""
    from access import pki
    from access.errors import ClusterNotReady, NotAllowed
    from clusters.models import VirtualCluster

    real = pki.generate_client_key

    def meanwhile(*args, **kwargs):
        if event == "leaves the group":
            bob.groups.remove(team)
        elif event == "cluster torn down":
            VirtualCluster.objects.filter(pk=cluster.pk).update(state="torn_down")
        else:
            type(bob).objects.filter(pk=bob.pk).update(is_active=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(pki, "generate_client_key", meanwhile)
    with pytest.raises(ClusterNotReady if event == "cluster torn down" else NotAllowed):
        services.vpn_profile_issue(user=bob, clusters=[cluster.pk])
    assert not Credential.objects.filter(user=bob).exists()


def removed_while_recorded(monkeypatch, remove, *, user, cluster) -> Credential:
    """On PostgreSQL with two connections: ``remove`` (another connection) runs after ``user``'s VPN issuance made
    its last check under the locks, before its commit. Asserts the removal waited for that commit; the credential
    as it is then."""
    import threading
    import time

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")
    checked, removed_at = threading.Event(), []
    real = services.clusters_authorize

    def authorize_then_pause(**kwargs):
        chosen = real(**kwargs)
        if kwargs.get("lock"):  # the re-check under the locks: let the removal start now
            checked.set()
            time.sleep(0.5)
        return chosen

    def run():
        try:
            checked.wait(10)
            remove()
            removed_at.append(time.monotonic())
        finally:
            connection.close()

    monkeypatch.setattr(services, "clusters_authorize", authorize_then_pause)
    remover = threading.Thread(target=run)
    remover.start()
    profile = services.vpn_profile_issue(user=user, clusters=[cluster.pk])
    committed = time.monotonic()
    remover.join(10)
    assert removed_at and removed_at[0] >= committed  # the removal waited for the issuance's commit
    return Credential.objects.get(pk=profile.credential.pk)


@pytest.mark.django_db(transaction=True)
def test_leaving_the_group_while_a_credential_is_recorded_revokes_it(alice, bob, team, cluster, gateway, monkeypatch):
    """The other order, on PostgreSQL with two connections: bob is removed from the group after the
    issuance's last check but before its commit. The removal waits for the holder's row lock, then finds
    the new credential and revokes it — without the lock it would scan before the row exists and bob
    would keep a valid credential for a cluster he left."""
    credential = removed_while_recorded(monkeypatch, lambda: bob.groups.remove(team), user=bob, cluster=cluster)
    assert credential.revocation_reason == RevocationReason.AFFILIATION_CHANGED
    assert credential.serial in crl_serials()


def test_a_revoked_ssh_certificate_stays_in_the_krl_while_a_lagging_gateway_clock_still_accepts_it(
    alice, cluster, gateway
):
    """sshd checks a certificate's validity with the gateway's clock. A revoked certificate that has just
    expired by the portal's clock is still good for a gateway a few minutes behind (the skew every window of
    the service tolerates): a KRL re-signed then must still list it, as the CRL does for VPN certificates."""
    from django.utils import timezone

    lost = services.ssh_certificate_issue(user=alice, cluster=cluster).credential
    services.credential_revoke(credential=lost, reason="key_compromise", by=alice)
    Credential.objects.filter(pk=lost.pk).update(not_after=timezone.now() - dt.timedelta(minutes=2))
    other = services.ssh_certificate_issue(user=alice, cluster=cluster).credential
    services.credential_revoke(credential=other, reason="key_compromise", by=alice)  # re-signs the KRL
    assert krl_revokes(other.serial)
    assert krl_revokes(lost.serial)


def test_deleting_a_cluster_revokes_its_credentials(alice, bob, cluster, gateway):
    """A cluster's row deleted (admin refuses it for a live cluster, but a script or the shell can): its
    credentials go with it, as when it ends — else a live session of its certificate is never cut, and the
    certificate stays off the CRL until it expires (days; months for a publish profile)."""
    second = make_cluster(alice, name="keep")
    issue_both(alice, cluster)
    issue_both(bob, cluster)
    services.vpn_profile_issue(user=alice, clusters=[second])
    pk = cluster.pk
    cluster.delete()
    gone = Credential.objects.filter(clusters__cluster_id=pk)
    assert gone.count() == 4
    assert all(c.revocation_reason == RevocationReason.CESSATION_OF_OPERATION for c in gone)
    assert {c.serial for c in gone if c.kind == "vpn"} <= crl_serials()
    assert all(krl_revokes(c.serial) for c in gone if c.kind == "ssh")
    assert Credential.objects.get(clusters__cluster_id=second.pk).revoked_at is None


def test_the_sweep_revokes_what_an_ending_missed(alice, bob, cluster, gateway, settings):
    """A cluster that ended without its ``cluster_ended`` having run (the worker died between the commit and
    the signal) keeps live credentials until the periodic sweep finds them; the sweep leaves the credentials
    of clusters that may still be entered alone and costs nothing the second time."""
    from access import tasks  # noqa: F401 (the worker finds it by autodiscovery)
    from clusters.models import VirtualCluster
    from portal.celery import app

    public = make_cluster(alice, name="web")
    second = make_cluster(alice, name="keep")
    issue_both(alice, cluster)
    issue_both(bob, cluster)
    services.vpn_profile_issue(user=alice, clusters=[second])
    services.ssh_certificate_issue(user=alice, cluster=public)
    # ended behind the signals' back, as _end does, with the after-commit revocation lost
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="torn_down")
    VirtualCluster.objects.filter(pk=public.pk).update(connectivity="public")
    assert Credential.objects.filter(revoked_at__isnull=True).count() == 6

    task = settings.CELERY_BEAT_SCHEDULE["access-sweep-credentials"]["task"]
    assert app.tasks[task].apply().get() == 5
    gone = Credential.objects.filter(clusters__cluster_id__in=[cluster.pk, public.pk])
    assert all(c.revoked_at and c.revocation_reason == RevocationReason.CESSATION_OF_OPERATION for c in gone)
    assert {c.serial for c in gone if c.kind == "vpn"} <= crl_serials()
    assert all(krl_revokes(c.serial) for c in gone if c.kind == "ssh")
    assert Credential.objects.get(clusters__cluster_id=second.pk).revoked_at is None
    assert services.credentials_sweep() == 0


def _certify_node(user, cluster, *, as_admin=False):
    from access import ssh

    key = ssh.generate_user_key().public_line
    return services.node_host_certificate_issue(
        user=user, cluster=cluster, node="node1", public_key=key, as_admin=as_admin
    ), key


def test_a_nodes_host_certificate_ends_with_its_cluster_and_its_key_is_refused_after(
    alice, bob, charlie, team, cluster, other_cluster, gateway, django_capture_on_commit_callbacks
):
    """A node's host certificate vouches for the node, not for whoever asked: people leaving the group, the
    requester's account going, the group changing leave it; the cluster's end revokes it. Revoked, its key is
    in every SSH profile's known_hosts as @revoked (ssh refuses it and its certificates) and is not certified
    again."""
    from access.errors import BadPublicKey
    from access.selectors import credentials_of
    from clusters.models import Node
    from clusters.signals import cluster_ended

    # closed clusters may share addresses: charlie's node1 is at the address alice's had
    Node.objects.filter(cluster__in=[cluster, other_cluster], name="node1").update(address="10.9.0.1")
    issued, key = _certify_node(alice, cluster)
    assert issued.credential not in credentials_of(alice, ended=5)  # not hers to "lose with a laptop"
    issue_both(bob, cluster)
    bob.groups.remove(team)
    cluster.group = None
    cluster.save()
    alice.is_active = False
    alice.save()
    issued.credential.refresh_from_db()
    assert issued.credential.revoked_at is None
    assert Credential.objects.filter(user=bob, revoked_at__isnull=False).count() == 2
    assert (
        " ".join(key.split()[:2]) not in services.ssh_certificate_issue(user=charlie, cluster=other_cluster).known_hosts
    )

    cluster.state = "torn_down"
    with django_capture_on_commit_callbacks(execute=True):
        cluster.save()
        cluster_ended.send(type(cluster), cluster=cluster)
    issued.credential.refresh_from_db()
    assert issued.credential.revocation_reason == RevocationReason.CESSATION_OF_OPERATION
    known_hosts = services.ssh_certificate_issue(user=charlie, cluster=other_cluster).known_hosts
    # a host certificate names the node's alias only (never the address the two clusters share), and charlie's
    # bundle trusts the host CA for his own aliases only: alice's revoked key can pass for none of his nodes,
    # so it needs no @revoked line there (never one for every host), and no name of alice's cluster appears
    assert list(issued.principals) == [f"node1.{cluster_label(cluster)}"]
    assert "@revoked" not in known_hosts and issued.principals[0] not in known_hosts
    with pytest.raises(BadPublicKey, match="was revoked"):
        services.node_host_certificate_issue(user=charlie, cluster=other_cluster, node="node1", public_key=key)


def test_the_sweep_revokes_host_certificates_of_clusters_that_ended_unseen(alice, cluster, gateway):
    from clusters.models import VirtualCluster

    public = make_cluster(alice, name="web", connectivity="public")
    ended, _ = _certify_node(alice, cluster)
    kept, _ = _certify_node(alice, public)
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="torn_down")  # the signal's revocation lost
    assert services.credentials_sweep() == 1
    ended.credential.refresh_from_db()
    kept.credential.refresh_from_db()
    assert ended.credential.revocation_reason == RevocationReason.CESSATION_OF_OPERATION
    assert kept.credential.revoked_at is None  # a public cluster's node: reached directly, its certificate stays
    assert services.credentials_sweep() == 0


def test_a_host_key_that_is_a_gateways_or_another_nodes_is_not_certified(alice, cluster, gateway):
    """Whoever asks chooses the key: certifying (then revoking) the bastion's key or another node's would have
    it refused for that host's names. The same node asking again (a longer lifetime) is fine."""
    from access import ssh
    from access.errors import BadPublicKey

    first, key = _certify_node(alice, cluster)
    again = services.node_host_certificate_issue(user=alice, cluster=cluster, node="node1", public_key=key)
    assert again.credential.pk != first.credential.pk
    second = make_cluster(alice, name="web2")
    with pytest.raises(BadPublicKey, match="another node"):
        services.node_host_certificate_issue(user=alice, cluster=second, node="node1", public_key=key)
    bastion = ssh.generate_user_key()
    gateway.ssh_host_certificate = services.ssh_host_certificate_issue(
        public_key=bastion.public_line, principals=[gateway.address]
    )
    gateway.save()
    with pytest.raises(BadPublicKey, match=f"gateway {gateway.name}"):
        services.node_host_certificate_issue(user=alice, cluster=second, node="node1", public_key=bastion.public_line)


@pytest.mark.django_db(transaction=True)
def test_an_issuance_and_a_cluster_change_of_the_same_owner_never_deadlock(alice, cluster, gateway):
    """A change of the cluster (its row locked) writes rows naming its owner (the audit entry's user), whose
    foreign-key check PostgreSQL defers to the commit: a share lock on the owner's row. An issuance locks the
    holder's row, then the cluster's. With the holder locked FOR UPDATE the two waited for each other — a
    deadlock, a 500 on one side; FOR NO KEY UPDATE (what serializes issuance and revocation) lets the key
    check through."""
    from django.db import connection

    from clusters import services as cluster_services
    from portal.audit import audit_actor
    from portal.tests.helpers import held_in_another_connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")

    def extend():  # the row locked, an audit entry naming alice written: its key check waits for the commit
        with audit_actor("alice", user=alice):
            cluster_services.cluster_extend(cluster=cluster, by=dt.timedelta(hours=1))

    with held_in_another_connection(extend):  # the issuance locks alice's row and waits for the cluster's
        services.vpn_profile_issue(user=alice, clusters=[cluster.pk])
    assert Credential.objects.filter(user=alice, revoked_at=None).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_gateway_state_never_cuts_a_session_its_crl_still_admits(alice, cluster, gateway, monkeypatch):
    """Each read of the state sees the commits before it: a revocation committed between the CRL's read and the
    sessions' read made the gateway cut a session whose certificate its CRL still admitted (the client was back
    at once). The sessions are read first: every certificate they list is in the CRL read after."""
    import threading

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")
    lost = services.vpn_profile_issue(user=alice, clusters=[cluster.pk]).credential
    real = services.crl_current

    def crl_then_revoked_meanwhile():
        crl = real()

        def revoke():
            try:
                services.credential_revoke(credential=Credential.objects.get(pk=lost.pk), reason="key_compromise")
            finally:
                connection.close()

        other = threading.Thread(target=revoke)
        other.start()
        other.join(10)
        return crl

    monkeypatch.setattr(services, "crl_current", crl_then_revoked_meanwhile)
    doc = services.gateway_state(gateway=gateway)
    in_crl = {r.serial_number for r in x509.load_pem_x509_crl(doc["vpn"]["crl"].encode())}
    assert Credential.objects.get(pk=lost.pk).revoked_at is not None  # (it was revoked meanwhile)
    assert {s["serial"] for s in doc["vpn"]["revoked_sessions"]} <= in_crl


@pytest.mark.django_db(transaction=True)
def test_the_owner_leaving_while_a_members_credential_is_recorded_revokes_it(
    alice, bob, team, cluster, gateway, monkeypatch
):
    """The owner leaves the group after a member's issuance made its last check but before its commit: the
    removal locks every member's row (as a member's own leaving locks theirs), waits for the issuance's commit,
    then finds the new credential and revokes it — it found none, and bob kept a credential for a cluster no
    longer shared with him."""
    credential = removed_while_recorded(monkeypatch, lambda: alice.groups.remove(team), user=bob, cluster=cluster)
    assert credential.revocation_reason == RevocationReason.AFFILIATION_CHANGED
    assert credential.serial in crl_serials()

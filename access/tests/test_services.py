"""Access services: authorities at rest, authorization, VPN profiles, CRL, gateway state."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import datetime as dt
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from access import services
from access.errors import AccessError, ClusterNotReady, NoGateway, NotAllowed
from access.models import Authority, AuthorityKind, Credential, CredentialKind, Gateway, SerialNumber
from access.selectors import cluster_label, clusters_user_may_enter
from access.tests.fixtures import cluster, gateway, make_cluster, other_cluster
from access.tests.profile_check import parse_profile
from clusters.models import VirtualCluster
from portal.models import AuditEntry

pytestmark = pytest.mark.django_db


def aa_pem() -> str:
    return Authority.objects.get(kind=AuthorityKind.AA).certificate


# --- authorities -------------------------------------------------------------------------------------------------


def test_ca_ensure_creates_every_authority_once_with_keys_encrypted_twice():
    rows = services.ca_ensure()
    assert set(rows) == set(AuthorityKind.values)
    again = services.ca_ensure()
    assert {k: r.pk for k, r in again.items()} == {k: r.pk for k, r in rows.items()}
    with connection.cursor() as cur:
        cur.execute("SELECT kind, private_key FROM access_authority")
        stored = dict(cur.fetchall())
    for kind, raw in stored.items():
        assert "PRIVATE KEY" not in raw, f"{kind}: the database holds a readable key"
        assert raw.startswith("gAAAA"), f"{kind}: not Fernet ciphertext"
    vpn = Authority.objects.get(kind=AuthorityKind.VPN)
    assert str(vpn.private_key).startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    # The AA is an end entity certified by the VPN CA (RFC 5755 §4.5).
    ca = x509.load_pem_x509_certificate(vpn.certificate.encode())
    aa = x509.load_pem_x509_certificate(aa_pem().encode())
    aa.verify_directly_issued_by(ca)
    assert aa.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_ca_key_does_not_open_with_another_passphrase(settings):
    services.ca_ensure()
    settings.ACCESS_CA_PASSPHRASE = "a-different-passphrase"
    with pytest.raises(services.pki.PKIError, match="cannot decrypt"):
        services._load(Authority.objects.get(kind=AuthorityKind.VPN))


@pytest.mark.django_db(transaction=True)
def test_ca_ensure_is_race_safe():
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker():
        try:
            barrier.wait()
            services.ca_ensure()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert Authority.objects.count() == len(AuthorityKind.values)


def test_serials_are_unique_and_never_reused():
    a = services.serial_allocate("x")
    b = services.serial_allocate("x")
    SerialNumber.objects.filter(pk=b).delete()
    c = services.serial_allocate("x")
    assert a < b < c


# --- authorization -----------------------------------------------------------------------------------------------


def test_membership_rule(alice, bob, charlie, team, cluster, other_cluster):
    assert list(clusters_user_may_enter(alice)) == [cluster]
    assert list(clusters_user_may_enter(bob)) == [cluster]
    assert list(clusters_user_may_enter(charlie)) == [other_cluster]
    provisioning = make_cluster(alice, name="new", group=team, state="provisioning")
    public = make_cluster(alice, name="web", connectivity="public")
    updating = make_cluster(alice, name="upd", state="updating")
    assert set(clusters_user_may_enter(alice)) == {cluster, updating}
    with pytest.raises(ClusterNotReady, match="new"):
        services.clusters_authorize(user=alice, clusters=[provisioning.pk])
    with pytest.raises(ClusterNotReady, match="public"):
        services.clusters_authorize(user=alice, clusters=[public])
    with pytest.raises(NotAllowed):
        services.clusters_authorize(user=alice, clusters=[cluster.pk, other_cluster.pk])
    with pytest.raises(NotAllowed):
        services.clusters_authorize(user=alice, clusters=[999999])
    with pytest.raises(AccessError, match="at least one"):
        services.clusters_authorize(user=alice, clusters=[])
    bob.is_active = False
    bob.save()
    assert not clusters_user_may_enter(bob).exists()


# --- VPN profiles ------------------------------------------------------------------------------------------------


def test_vpn_profile_is_complete_and_its_ac_admits_to_the_chosen_cluster(bob, cluster, gateway):
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + dt.timedelta(days=30))
    text, filename = services.vpn_profile_issue(user=bob, clusters=[cluster.pk])
    label = cluster_label(cluster)
    assert filename == f"virtcloud-{label}.ovpn"
    parsed = parse_profile(text, aa_pem=aa_pem())
    assert parsed.fqans == [f"/virtcloud/{label}/Role=member"]
    assert parsed.directives["remote"] == ["198.18.100.1 1194"]
    assert parsed.directives["setenv"] == [f"UV_VCLUSTER {label}"]
    assert parsed.directives["dev-type"] == ["tap"]
    assert "BEGIN OpenVPN Static key V1" in parsed.tls_crypt
    assert parsed.cert.subject.rfc4514_string() == "CN=bob,O=VirtCloud"
    lifetime = parsed.cert.not_valid_after_utc - parsed.cert.not_valid_before_utc
    assert dt.timedelta(days=2) < lifetime <= dt.timedelta(days=3, minutes=5)

    credential = Credential.objects.get(serial=parsed.cert.serial_number)
    assert credential.kind == CredentialKind.VPN and credential.user == bob
    assert credential.cluster_labels() == [label]
    assert credential.not_after == parsed.cert.not_valid_after_utc
    assert credential.key_id.startswith(f"vpn:bob:{label}:")
    # What the gateway's tls-verify hook sees of this certificate (OpenVPN's tls_digest_sha256_0).
    assert credential.fingerprint == parsed.cert.fingerprint(hashes.SHA256()).hex()
    entry = AuditEntry.objects.get(object_id=str(credential.pk), content_type__model="credential")
    assert entry.action == "create"


@pytest.mark.parametrize(
    ("email", "mailbox"),
    [
        ("Alice <alice@example.org>", []),  # a directory's `mail` with a display name
        ("al(ice)@example.org", []),  # a comment
        ("alice@example.org (Alice)", []),
        ('"al ice"@example.org', []),  # a quoted local part: not a plain addr-spec
        ("alice@@example.org", []),
        ("alice@bücher.de", ["alice@xn--bcher-kva.de"]),
        ("o'brien+vpn@example.org", ["o'brien+vpn@example.org"]),
    ],
)
def test_an_email_a_certificate_cannot_hold_is_left_out_not_a_500(alice, cluster, gateway, email, mailbox):
    """The e-mail comes from LDAP as it is: anything but a plain addr-spec is left out of the certificate (its
    CN and URI name the user), never a ValueError from the certificate builder on the download."""
    User.objects.filter(pk=alice.pk).update(email=email)
    alice.refresh_from_db()
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster.pk])
    san = parse_profile(text, aa_pem=aa_pem()).cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.RFC822Name) == mailbox
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:virtcloud:user:alice"]


def test_vpn_profile_for_two_clusters_covers_both(alice, team, cluster, gateway):
    second = make_cluster(alice, name="hpc")
    text, filename = services.vpn_profile_issue(user=alice, clusters=[second.pk, cluster.pk])
    parsed = parse_profile(text, aa_pem=aa_pem())
    labels = [cluster_label(second), cluster_label(cluster)]
    assert parsed.fqans == [f"/virtcloud/{lbl}/Role=member" for lbl in labels]
    assert parsed.directives["setenv"] == [f"UV_VCLUSTER {labels[0]}"]
    assert f"admits to: {', '.join(labels)}" in text
    assert filename == "virtcloud-alice.ovpn"


def test_publish_profile_is_long_lived(alice, cluster, gateway):
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + dt.timedelta(days=100))
    text, filename = services.vpn_profile_issue(user=alice, clusters=[cluster], publish=True)
    parsed = parse_profile(text, aa_pem=aa_pem())
    assert parsed.cert.not_valid_after_utc - timezone.now() > dt.timedelta(days=80)
    assert "persist-tun" in parsed.directives
    assert filename.endswith("-publish.ovpn")
    assert Credential.objects.get(serial=parsed.cert.serial_number).published


def test_publish_profiles_of_two_clusters_never_share_a_tap_device():
    from access import openvpn

    names = ["simulation-run-101", "simulation-run-102", "a-1", "x" * 40 + "-9999999999", "y" * 40 + "-9999999999"]
    devices = [openvpn.publish_device(name) for name in names]
    assert devices[:3] == ["vc-simulati-101", "vc-simulati-102", "vc-a-1"]
    assert len(set(devices)) == len(devices) and all(len(d) <= 15 for d in devices)
    long_id = openvpn.publish_device("c-" + "7" * 12)  # (no room for the id: a digest of the label)
    assert long_id.startswith("vc-") and len(long_id) == 15


def test_vpn_profile_refused_without_membership_or_gateway(charlie, alice, cluster, gateway):
    with pytest.raises(NotAllowed):
        services.vpn_profile_issue(user=charlie, clusters=[cluster.pk])
    gateway.enabled = False
    gateway.save()
    with pytest.raises(NoGateway):
        services.vpn_profile_issue(user=alice, clusters=[cluster.pk])
    assert not Credential.objects.exists()


def test_a_user_name_too_long_for_a_certificate_is_a_clear_refusal(alice, team, gateway):
    """X.509 names hold 64 characters; Django's user names 150: a clear 422, no credential, no 500."""
    from access.errors import NameTooLong
    from access.tests.fixtures import make_cluster

    long = User.objects.create_user("a" * 65)
    long.groups.add(team)
    cluster = make_cluster(alice, name="long", group=team)
    with pytest.raises(NameTooLong, match="65 bytes"):
        services.vpn_profile_issue(user=long, clusters=[cluster.pk])
    assert not Credential.objects.exists()


def test_a_user_name_of_64_characters_is_too_long_when_its_utf8_is(alice, team, gateway):
    """cryptography counts a name in bytes of UTF-8: 60 characters with accented letters are 72 bytes, refused
    as too long (it was cryptography's ValueError, a 500); 64 bytes of them are a certificate."""
    from access.errors import NameTooLong
    from access.tests.fixtures import make_cluster

    accented = User.objects.create_user("jiří.čtvrtníček.přemyslovec.žluťoučký-kůň@fakulta.example.cz")
    fits = User.objects.create_user("čtvrtníček-" + "x" * (64 - len("čtvrtníček-".encode())))
    for user in (accented, fits):
        user.groups.add(team)
    cluster = make_cluster(alice, name="accented", group=team)
    assert len(accented.username) == 60 and len(fits.username.encode()) == 64
    with pytest.raises(NameTooLong, match="72 bytes"):
        services.vpn_profile_issue(user=accented, clusters=[cluster.pk])
    assert not Credential.objects.exists()
    text, _ = services.vpn_profile_issue(user=fits, clusters=[cluster.pk])
    assert "BEGIN CERTIFICATE" in text and Credential.objects.get().user == fits


def test_no_private_key_in_the_database_after_issue(alice, cluster, gateway):
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster.pk])
    key_body = parse_profile(text, aa_pem=aa_pem()).key_pem.decode().splitlines()[1]
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - table names from introspection
            for row in cur.fetchall():
                assert key_body not in repr(row), f"the user's private key is in table {table}"


# --- CRL and revocation --------------------------------------------------------------------------------------------


def test_crl_lists_revoked_certificates_and_is_resigned_on_revocation(alice, cluster, gateway):
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster.pk])
    serial = parse_profile(text, aa_pem=aa_pem()).cert.serial_number
    first = x509.load_pem_x509_crl(services.crl_current().encode())
    assert first.get_revoked_certificate_by_serial_number(serial) is None
    assert services.crl_current() == services.crl_current()  # stable between revocations

    credential = Credential.objects.get(serial=serial)
    assert services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    assert not services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    crl = x509.load_pem_x509_crl(services.crl_current().encode())
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    number = lambda c: c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    assert number(crl) > number(first)
    ca = x509.load_pem_x509_certificate(Authority.objects.get(kind=AuthorityKind.VPN).certificate.encode())
    assert crl.is_signature_valid(ca.public_key())
    credential.refresh_from_db()
    assert credential.revoked_by == alice and credential.revocation_reason == "key_compromise"
    assert AuditEntry.objects.filter(object_id=str(credential.pk), action="update").exists()


def test_crl_is_resigned_before_it_expires(alice, gateway):
    services.crl_current()
    Authority.objects.filter(kind=AuthorityKind.VPN).update(
        revocation_next_update=timezone.now() + dt.timedelta(hours=1)
    )
    crl = x509.load_pem_x509_crl(services.crl_current().encode())
    assert crl.next_update_utc - timezone.now() > dt.timedelta(days=6)


# --- gateway state -------------------------------------------------------------------------------------------------


def test_gateway_state_maps_closed_ready_clusters_to_vlans(alice, bob, team, cluster, other_cluster, gateway, settings):
    make_cluster(alice, name="new", state="provisioning")
    make_cluster(alice, name="web", connectivity="public")
    pulled = gateway.last_pull_at
    state = services.gateway_state(gateway=gateway)
    assert state["vpn"]["vlans"] == {
        cluster_label(cluster): cluster.vlan_id,
        cluster_label(other_cluster): other_cluster.vlan_id,
    }
    assert "BEGIN X509 CRL" in state["vpn"]["crl"]
    assert state["vpn"]["aa"] == aa_pem()
    ssh = state["ssh"]["clusters"][cluster_label(cluster)]
    label = cluster_label(cluster)
    assert ssh["principals"] == [f"{label}.alice", f"{label}.bob"]
    assert ssh["targets"] == [[f"node1.{label}", 22]]
    assert state["ssh"]["clusters"][cluster_label(other_cluster)]["principals"] == [
        f"{cluster_label(other_cluster)}.charlie"
    ]
    assert state["max_age"] == settings.GATEWAY_STATE_MAX_AGE  # how long the gateway may trust it
    again = services.gateway_state(gateway=gateway)
    assert again["etag"] == state["etag"]
    gateway.refresh_from_db()
    assert gateway.last_pull_at == pulled  # making the document is not a pull (the API records those)


def _address(cluster, name, address):
    from clusters.models import Node

    Node.objects.filter(cluster=cluster, name=name).update(address=address)


def test_bastion_withholds_an_address_that_two_clusters_use(alice, charlie, cluster, other_cluster, gateway):
    """Closed clusters may share addresses; the bastion, which forwards by address, relays to neither's node
    with such an address (it could carry one cluster's user to the other's node) — nor to any other node in
    networks their legs share (``test_the_bastion_relays_nothing_in_a_network_two_legs_hold``)."""
    from access.selectors import WITHHELD_OVERLAP, WITHHELD_SHARED, bastion_shared_addresses, bastion_withheld_nodes
    from clusters.models import Node, NodeState

    extra = make_cluster(alice, name="solo", nodes=("node1", "node2"))
    VirtualCluster.objects.update(bastion_address="10.0.0.254/24")  # each with its leg in 10.0.0.0/24
    for c in (cluster, other_cluster, extra):
        c.refresh_from_db()
    _address(cluster, "node1", "10.0.0.5")
    _address(other_cluster, "node1", "10.0.0.5")
    _address(extra, "node1", "10.0.0.6")
    _address(extra, "node2", "10.0.0.5")
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"]
    assert state[cluster_label(cluster)]["targets"] == []
    assert state[cluster_label(other_cluster)]["targets"] == []
    assert state[cluster_label(extra)]["targets"] == []
    assert bastion_withheld_nodes([cluster, extra]) == {
        cluster.pk: [("node1", "10.0.0.5", WITHHELD_SHARED)],
        extra.pk: [("node1", "10.0.0.6", WITHHELD_OVERLAP), ("node2", "10.0.0.5", WITHHELD_SHARED)],
    }
    VirtualCluster.objects.filter(pk=extra.pk).update(bastion_address="10.0.1.254/24")  # a network of its own
    extra.refresh_from_db()
    _address(extra, "node1", "10.0.1.6")
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"]
    assert state[cluster_label(extra)]["targets"] == [["10.0.1.6", 22]]
    assert [n["name"] for n in state[cluster_label(extra)]["nodes"]] == ["node1"]

    # The issued ssh_config has no Host entry for such a node, and says why; the API lists it.
    issued = services.ssh_certificate_issue(user=alice, cluster=extra)
    label = cluster_label(extra)
    assert f"Host node1.{label}\n  HostName 10.0.1.6" in issued.ssh_config
    assert f"Host node2.{label}\n" not in issued.ssh_config
    assert f"#   node2.{label} (10.0.0.5): {WITHHELD_SHARED}" in issued.ssh_config
    assert issued.as_dict()["withheld_nodes"] == [{"name": "node2", "address": "10.0.0.5", "reason": WITHHELD_SHARED}]

    # Once only one cluster holds it, the address is relayed again: a removed node and a cluster that
    # ended do not count, nor does one not in the VLAN map yet.
    Node.objects.filter(cluster=extra, name="node2").update(state=NodeState.REMOVED)
    VirtualCluster.objects.filter(pk=other_cluster.pk).update(state="torn_down")
    make_cluster(charlie, name="later", state="provisioning")
    _address(VirtualCluster.objects.get(name="later"), "node1", "10.0.0.5")
    assert bastion_shared_addresses() == set()
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"]
    assert state[cluster_label(cluster)]["targets"] == [["10.0.0.5", 22]]


def test_the_bastion_relays_nothing_in_a_network_two_legs_hold(alice, bob, cluster, gateway):
    """One bastion forwards by address from one network stack: where two clusters' leg networks overlap, the
    kernel routes the overlap through one leg, so a node there may be the other cluster's machine (or a root
    user's VM in the other cluster taking its address). Such nodes are withheld, with no address in common
    needed; a node known by alias only is withheld when its cluster's network overlaps another's. Nodes
    outside the overlap are relayed; with a bastion per cluster (``ssh_port_base``) nothing is withheld."""
    from access.selectors import WITHHELD_OVERLAP, bastion_withheld_nodes
    from clusters.models import Node

    theirs = make_cluster(bob, name="west", nodes=("node1", "node2"))
    VirtualCluster.objects.filter(pk=cluster.pk).update(bastion_address="10.0.0.254/24")
    VirtualCluster.objects.filter(pk=theirs.pk).update(bastion_address="10.0.0.253/24")
    cluster.refresh_from_db()
    theirs.refresh_from_db()
    _address(cluster, "node1", "10.0.0.1")
    _address(theirs, "node1", "10.0.0.3")
    _address(theirs, "node2", "10.0.0.4")
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"]
    assert state[cluster_label(cluster)]["targets"] == [] and state[cluster_label(theirs)]["targets"] == []
    issued = services.ssh_certificate_issue(user=bob, cluster=theirs)
    assert f"Host node1.{cluster_label(theirs)}\n" not in issued.ssh_config
    assert issued.as_dict()["withheld_nodes"][0] == {"name": "node1", "address": "10.0.0.3", "reason": WITHHELD_OVERLAP}

    # Nested networks: their /16 holds this cluster's /24. Only what lies in the other's network is withheld.
    VirtualCluster.objects.filter(pk=theirs.pk).update(bastion_address="10.0.255.254/16")
    theirs.refresh_from_db()
    _address(theirs, "node1", "10.0.5.5")
    Node.objects.create(cluster=cluster, name="node2", host=cluster.nodes.get().host, mac="52:54:00:99:00:02")
    assert bastion_withheld_nodes([cluster, theirs]) == {
        cluster.pk: [
            ("node1", "10.0.0.1", WITHHELD_OVERLAP),
            ("node2", f"node2.{cluster_label(cluster)}", WITHHELD_OVERLAP),  # by alias: the network overlaps
        ],
        theirs.pk: [("node2", "10.0.0.4", WITHHELD_OVERLAP)],
    }
    assert services.gateway_state(gateway=gateway)["ssh"]["clusters"][cluster_label(theirs)]["targets"] == [
        ["10.0.5.5", 22]
    ]
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    alias = f"node2.{cluster_label(cluster)}"
    assert f"#   {alias} ({alias}): {WITHHELD_OVERLAP}" in issued.ssh_config
    # ... the other way round: a node known by alias in the /16 holding this /24 is withheld too
    Node.objects.filter(cluster=theirs, name="node1").update(address=None)
    assert ("node1", f"node1.{cluster_label(theirs)}", WITHHELD_OVERLAP) in bastion_withheld_nodes([theirs])[theirs.pk]

    # the other cluster ends: nothing overlaps any more
    VirtualCluster.objects.filter(pk=theirs.pk).update(state="torn_down")
    assert bastion_withheld_nodes([cluster]) == {}

    # a bastion per cluster, in the namespace of the cluster's leg, has one route per stack: nothing withheld
    VirtualCluster.objects.filter(pk=theirs.pk).update(state="ready")
    gateway.ssh_port_base = 30000
    gateway.save()
    assert bastion_withheld_nodes([cluster, theirs], gateway=gateway) == {}


def test_the_bastion_forwards_only_through_its_leg_into_the_cluster(alice, cluster, gateway):
    """The one bastion of a gateway forwards by address from the gateway's own network stack: an address the
    owner picked is a target only inside the network of the cluster's ``bastion_address`` (its leg). Without
    a leg, or outside its network (the gateway's loopback, the provider's network, another cluster's), the
    node is withheld, saying why; a node known by its alias only is relayed (the operator resolves it)."""
    from access.selectors import WITHHELD_NO_LEG, WITHHELD_OUTSIDE, bastion_withheld_nodes
    from clusters.models import Node

    label = cluster_label(cluster)
    assert services.gateway_state(gateway=gateway)["ssh"]["clusters"][label]["targets"] == [[f"node1.{label}", 22]]
    _address(cluster, "node1", "127.0.0.1")  # no leg: the gateway's own sshd, were it a target
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"][label]
    assert state["targets"] == [] and state["nodes"] == []
    assert bastion_withheld_nodes([cluster]) == {cluster.pk: [("node1", "127.0.0.1", WITHHELD_NO_LEG)]}
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    assert f"Host node1.{label}\n" not in issued.ssh_config
    assert f"#   node1.{label} (127.0.0.1): {WITHHELD_NO_LEG}" in issued.ssh_config
    assert issued.as_dict()["withheld_nodes"] == [{"name": "node1", "address": "127.0.0.1", "reason": WITHHELD_NO_LEG}]

    # with a leg: its network only (a node recorded before the API refused addresses outside it stays out)
    type(cluster).objects.filter(pk=cluster.pk).update(bastion_address="10.0.0.254/24")
    cluster.refresh_from_db()
    _address(cluster, "node1", "10.0.0.5")
    Node.objects.create(cluster=cluster, name="node2", host=cluster.nodes.get().host, mac="52:54:00:99:00:02")
    _address(cluster, "node2", "198.18.100.1")
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"][label]
    assert state["targets"] == [["10.0.0.5", 22]]
    assert bastion_withheld_nodes([cluster]) == {cluster.pk: [("node2", "198.18.100.1", WITHHELD_OUTSIDE)]}


def test_bastion_withholds_a_closed_clusters_address_that_a_public_cluster_routes(alice, cluster, gateway):
    """A public cluster's address is routed by the provider: the bastion would reach that node, not the closed
    cluster's, so the closed cluster's node with it is withheld. IPv6 spellings compare as addresses."""
    from access.selectors import bastion_shared_addresses

    public = make_cluster(alice, name="web", connectivity="public", nodes=("node1",))
    _address(public, "node1", "2001:db8::5")
    _address(cluster, "node1", "2001:0db8:0:0::5")
    assert bastion_shared_addresses() == {"2001:db8::5"}
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"]
    assert state[cluster_label(cluster)]["targets"] == []
    assert cluster_label(public) not in state  # public clusters are not relayed at all


def test_a_bastion_per_cluster_relays_to_shared_addresses_on_the_clusters_own_port(
    alice, charlie, cluster, other_cluster, gateway
):
    """With ``ssh_port_base`` the gateway runs a bastion per cluster in the namespace of the cluster's leg
    (access/gateway/bastion.py): two clusters may share an address, nothing is withheld, and the ssh_config
    jumps through the cluster's own port (base + VLAN id)."""
    gateway.ssh_port_base = 30000
    gateway.save()
    _address(cluster, "node1", "10.0.0.5")
    _address(other_cluster, "node1", "10.0.0.5")
    # Without a bastion address there is no leg, and that cluster's bastion never listens: refused, not an
    # ssh_config that points at a closed port.
    with pytest.raises(ClusterNotReady, match="no address for the SSH bastion"):
        services.ssh_certificate_issue(user=alice, cluster=cluster)
    assert not Credential.objects.exists()
    type(cluster).objects.filter(pk__in=[cluster.pk, other_cluster.pk]).update(bastion_address="10.0.0.254/24")
    cluster.refresh_from_db()
    state = services.gateway_state(gateway=gateway)["ssh"]["clusters"]
    assert state[cluster_label(cluster)]["targets"] == [["10.0.0.5", 22]]
    assert state[cluster_label(other_cluster)]["targets"] == [["10.0.0.5", 22]]
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    assert issued.withheld == ()
    assert f"Port {30000 + cluster.vlan_id}\n" in issued.ssh_config
    assert f"Host node1.{cluster_label(cluster)}\n  HostName 10.0.0.5" in issued.ssh_config


def test_gateway_state_lists_revoked_sessions_to_cut(alice, cluster, gateway):
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster.pk])
    before = services.gateway_state(gateway=gateway)
    assert before["vpn"]["revoked_sessions"] == []
    credential = Credential.objects.get()
    services.credential_revoke(credential=credential, reason="key_compromise", by=alice)
    after = services.gateway_state(gateway=gateway)
    assert after["etag"] != before["etag"]
    assert after["vpn"]["revoked_sessions"] == [
        {"serial": credential.serial, "common_name": "alice", "revoked_at": credential.revoked_at.isoformat()}
    ]
    assert after["ssh"]["revoked_sessions"] == []  # a VPN serial means nothing to the bastion (another CA)
    services.ssh_certificate_issue(user=alice, cluster=cluster)
    ssh_credential = Credential.objects.get(kind=CredentialKind.SSH)
    services.credential_revoke(credential=ssh_credential, reason="key_compromise", by=alice)
    later = services.gateway_state(gateway=gateway)
    assert [r["serial"] for r in later["ssh"]["revoked_sessions"]] == [ssh_credential.serial]
    assert [r["serial"] for r in later["vpn"]["revoked_sessions"]] == [credential.serial]


def test_a_revocation_reaches_a_gateway_cut_off_for_less_than_its_state_max_age_even_past_the_expiry(
    alice, cluster, gateway, settings
):
    """A bastion session outlives its certificate (sshd checks it at login only), so a credential revoked just
    before it expired stays listed: a gateway whose pull comes after the expiry still cuts the session. A
    gateway serves from its last pull for up to ``GATEWAY_STATE_MAX_AGE``: a revocation older than a day is
    still listed for one cut off that long; past that window it is not (such a gateway cut everyone)."""
    settings.GATEWAY_STATE_MAX_AGE = 2 * 24 * 3600
    services.ssh_certificate_issue(user=alice, cluster=cluster)
    credential = Credential.objects.get(kind=CredentialKind.SSH)
    services.credential_revoke(credential=credential, reason="privilege_withdrawn")
    now = timezone.now()

    def listed(*, revoked: dt.timedelta, expired: dt.timedelta) -> bool:
        Credential.objects.filter(pk=credential.pk).update(
            revoked_at=now - revoked, not_before=now - expired - dt.timedelta(hours=12), not_after=now - expired
        )
        state = services.gateway_state(gateway=gateway)
        return credential.serial in [r["serial"] for r in state["ssh"]["revoked_sessions"]]

    assert listed(revoked=dt.timedelta(minutes=2), expired=dt.timedelta(minutes=1))  # expired since: still cut
    assert listed(revoked=dt.timedelta(hours=30), expired=dt.timedelta(hours=29))  # a gateway cut off for 30 h
    assert not listed(revoked=dt.timedelta(hours=50), expired=dt.timedelta(hours=49))  # past max age + 1 h


def test_a_closed_cluster_that_becomes_ready_is_installed_at_once_at_a_gateway_on_this_host(
    alice, team, gateway, tmp_path, django_capture_on_commit_callbacks
):
    """The provisioning's last task makes the cluster READY: after that commit a gateway on the portal's host has a
    state with the cluster installed — no pull — and the portal knows it (access to the cluster is ready there). A
    remote gateway gets it at its next pull: until it says it has it, access is not ready. A public cluster that
    becomes ready changes no gateway's state: nothing is installed."""
    import json

    from access.gateway.state import SshState, VpnState
    from access.selectors import clusters_access_ready
    from access.tests.fixtures import make_gateway
    from clusters import tasks

    gateway.local_state_dir = str(tmp_path)
    gateway.save()
    public = make_cluster(alice, name="web", connectivity="public", state="provisioning")
    with django_capture_on_commit_callbacks(execute=True):
        tasks.provision_finish(public.pk, public.workflow_generation)
    assert VirtualCluster.objects.get(pk=public.pk).state == "ready"
    assert not VpnState.at(tmp_path).vlans.exists()
    assert services.gateways_install_ready_cluster(cluster_id=public.pk) == 0

    cluster = make_cluster(alice, name="new", group=team, state="provisioning")
    label = cluster_label(cluster)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        tasks.provision_finish(cluster.pk, cluster.workflow_generation)
    cluster.refresh_from_db()
    assert cluster.state == "ready" and cluster.ready_at is not None
    assert not VpnState.at(tmp_path).vlans.exists()  # nothing before the commit
    for callback in callbacks:
        callback()
    assert json.loads(VpnState.at(tmp_path).vlans.read_text())["clusters"] == {label: cluster.vlan_id}
    assert json.loads(SshState.at(tmp_path).clusters.read_text())["clusters"][label]["vlan"] == cluster.vlan_id
    gateway.refresh_from_db()
    assert gateway.state_as_of >= cluster.ready_at  # (made after it, though in the same second)
    assert clusters_access_ready([cluster]) == {cluster.pk: True}

    remote = make_gateway("gw2", address="198.18.100.2")  # set up, not pulled since
    assert clusters_access_ready([cluster]) == {cluster.pk: False}
    services.gateway_pulled(gateway=remote, installed=services.gateway_state(gateway=remote)["generated_at"])
    assert clusters_access_ready([cluster]) == {cluster.pk: True}


def test_gateway_token_issue_replaces_the_previous_token(root, gateway):
    from rest_framework.test import APIClient

    def pull(secret: str) -> int:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        return client.get("/api/access/gateway/state/").status_code

    first = services.gateway_token_issue(gateway=gateway, by=root)
    assert gateway.token.scopes == ["gateway:pull"] and first.startswith(f"vc_{gateway.token.prefix}_")
    assert pull(first) == 200
    second = services.gateway_token_issue(gateway=gateway, by=root)
    gateway.refresh_from_db()
    assert second.startswith(f"vc_{gateway.token.prefix}_")
    assert pull(second) == 200
    assert pull(first) in (401, 403)  # the old token stops working at once
    # The token is the gateway's, not the issuing admin's: the admin leaving (deactivated) stops no gateway.
    assert gateway.token.user.username == services.GATEWAY_ACCOUNT and "issued by root" in gateway.token.name
    root.is_active = False
    root.save()
    assert pull(second) == 200


@pytest.mark.django_db
def test_a_state_made_before_the_gateway_or_without_a_utc_date_is_not_recorded(gateway):
    """A gateway reports what it installed; a value with no UTC date (year 1 at +14:00) could be stored but never
    read back (every pull and page would fail), and no state of a gateway was made before it."""
    services.gateway_pulled(gateway=gateway, installed="0001-01-01T00:00:00+14:00")
    services.gateway_pulled(gateway=gateway, installed="2001-01-01T00:00:00+00:00")
    gateway.refresh_from_db()
    assert gateway.state_as_of is None and gateway.last_pull_at is not None
    now = timezone.now().replace(microsecond=0)
    services.gateway_pulled(gateway=gateway, installed=now.isoformat())
    gateway.refresh_from_db()
    assert gateway.state_as_of == now


# --- SSH certificates ------------------------------------------------------------------------------------------------


def _ssh_cert(line: str):
    from access import ssh

    return ssh.load_cert(line)


def test_ssh_certificate_for_a_pasted_key(bob, cluster, gateway):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from access import ssh

    user_key = ed25519.Ed25519PrivateKey.generate()
    line = ssh.public_key_line(user_key, "bob@laptop")
    issued = services.ssh_certificate_issue(user=bob, cluster=cluster.pk, public_key=line)
    label = cluster_label(cluster)
    assert issued.private_key is None
    cert = _ssh_cert(issued.certificate)
    assert cert.valid_principals == [f"{label}.bob".encode()]
    assert cert.type == serialization.SSHCertificateType.USER
    assert sorted(cert.extensions) == [b"permit-port-forwarding", b"permit-pty"]
    assert cert.critical_options == {}
    assert cert.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) == user_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    ca_line = Authority.objects.get(kind=AuthorityKind.SSH_USER).public_key
    cert.verify_cert_signature()
    assert cert.signature_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode() == " ".join(ca_line.split()[:2])
    hours = (cert.valid_before - cert.valid_after) / 3600
    assert 12 <= hours <= 12.1  # the default lifetime plus the clock-skew back-dating
    credential = issued.credential
    assert credential.serial == cert.serial and credential.kind == "ssh"
    assert cert.key_id.decode() == credential.key_id
    assert credential.key_id.startswith(f"virtcloud:user=bob:cluster={label}:serial={cert.serial}:issued=")
    assert credential.fingerprint == ssh.fingerprint(line)
    assert int(credential.not_after.timestamp()) == cert.valid_before
    assert "IdentityFile ~/.ssh/id_ed25519" in issued.ssh_config
    assert f"Host node1.{label}" in issued.ssh_config
    assert "HostName 198.18.100.1" in issued.ssh_config
    host_ca = Authority.objects.get(kind=AuthorityKind.SSH_HOST).public_key
    # the host CA vouches for the gateway and this cluster's node (no address: its alias) only, not for "*"
    assert issued.known_hosts == f"@cert-authority 198.18.100.1,node1.{label} {' '.join(host_ca.split()[:2])}\n"


def test_the_host_ca_is_trusted_for_the_profiles_hosts_only(alice, cluster, gateway):
    """The known_hosts line names the hosts the ssh_config connects to, as ssh looks them up — the gateway
    (``[host]:port`` off port 22: a bastion per cluster) and each node's alias (its ``HostKeyAlias``; never its
    address, which the owner picks) — so merged into a user's own known_hosts it vouches for nothing else; a
    node withheld from the bastion is not among them."""
    VirtualCluster.objects.update(bastion_address="10.0.0.254/24")
    cluster.refresh_from_db()
    cluster.nodes.update(address="10.0.0.1")
    other = make_cluster(alice, name="other", nodes=("n1",))
    VirtualCluster.objects.filter(pk=other.pk).update(bastion_address="10.0.1.254/24")  # a network of its own
    other.nodes.update(address="10.0.1.7")
    label = cluster_label(cluster)
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    patterns = issued.known_hosts.split()[1]
    assert patterns == f"198.18.100.1,node1.{label}"
    assert f"Host node1.{label}\n  HostName 10.0.0.1\n  HostKeyAlias node1.{label}\n" in issued.ssh_config
    assert issued.known_hosts.count("\n") == 1 and "*" not in issued.known_hosts
    other.nodes.update(address="10.0.0.1")  # one bastion for both: it withholds the address from both
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    assert issued.withheld and issued.known_hosts.split()[1] == "198.18.100.1"

    gateway.ssh_port_base = 30000  # a bastion per cluster, on the cluster's leg
    gateway.save()
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    assert issued.known_hosts.split()[1] == f"[198.18.100.1]:{30000 + cluster.vlan_id},node1.{label}"
    assert f"Port {30000 + cluster.vlan_id}\n" in issued.ssh_config


def test_ssh_certificate_with_a_generated_key_is_not_stored(alice, cluster, gateway, settings):
    settings.ACCESS_SSH_CERT_LIFETIME = 3600
    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    assert issued.private_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert "<redacted>" in repr(issued)
    cert = _ssh_cert(issued.certificate)
    assert (cert.valid_before - cert.valid_after) == 3600 + 300
    assert issued.credential.generated_key
    body = issued.private_key.splitlines()[1]
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608
            for row in cur.fetchall():
                assert body not in repr(row), f"the generated private key is in table {table}"
    import io
    import zipfile

    archive = zipfile.ZipFile(io.BytesIO(issued.zip_bytes()))
    folder = f"virtcloud-{cluster_label(cluster)}/"
    assert sorted(archive.namelist()) == sorted(
        folder + n
        for n in ("virtcloud.conf", "known_hosts", "id_virtcloud", "id_virtcloud.pub", "id_virtcloud-cert.pub")
    )
    assert (archive.getinfo(folder + "id_virtcloud").external_attr >> 16) & 0o777 == 0o600


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("not a key", "unsupported key type"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----", "PRIVATE key"),
        ("ssh-ed25519 AAAA!!!", "valid"),
    ],
)
def test_ssh_bad_public_key_is_a_400(alice, cluster, gateway, key, message):
    from access.errors import BadPublicKey

    with pytest.raises(BadPublicKey, match=message) as info:
        services.ssh_certificate_issue(user=alice, cluster=cluster, public_key=key)
    assert info.value.status == 400 and info.value.field == "public_key"
    assert not Credential.objects.exists()


def test_ssh_refused_for_other_clusters(charlie, cluster, gateway):
    with pytest.raises(NotAllowed):
        services.ssh_certificate_issue(user=charlie, cluster=cluster)


def test_krl_lists_revoked_ssh_certificates(alice, cluster, gateway, tmp_path):
    import shutil
    import subprocess

    issued = services.ssh_certificate_issue(user=alice, cluster=cluster)
    services.credential_revoke(credential=issued.credential, reason="key_compromise", by=alice)
    other = services.ssh_certificate_issue(user=alice, cluster=cluster)
    krl = services.krl_current()
    assert krl.startswith(b"SSHKRL\n\x00")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    (tmp_path / "krl").write_bytes(krl)
    (tmp_path / "revoked-cert.pub").write_text(issued.certificate + "\n")
    (tmp_path / "valid-cert.pub").write_text(other.certificate + "\n")
    revoked = subprocess.run(
        ["ssh-keygen", "-Q", "-f", tmp_path / "krl", tmp_path / "revoked-cert.pub"], capture_output=True, text=True
    )
    assert revoked.returncode != 0 and "REVOKED" in revoked.stdout
    valid = subprocess.run(
        ["ssh-keygen", "-Q", "-f", tmp_path / "krl", tmp_path / "valid-cert.pub"], capture_output=True, text=True
    )
    assert valid.returncode == 0, valid.stdout + valid.stderr


def _on_a_core(cluster, *sites):
    """Give ``cluster`` (made directly, without a workflow) the segment a workflow gives it: a VLAN of a pool
    whose core joins ``sites`` (its node's site first)."""
    from network import services as net
    from network.tests.factories import CoreTransportFactory, VlanPoolFactory

    host = cluster.nodes.get().host
    core = CoreTransportFactory(sites=[host.site, *sites])
    VlanPoolFactory(core=core, ranges=str(cluster.vlan_id))
    segment = net.segment_create(owner=cluster.ref, hosts=[host], gateway=True)
    VirtualCluster.objects.filter(pk=cluster.pk).update(segment=segment)


def test_a_gateway_at_the_clusters_site_is_preferred(alice, cluster, gateway):
    from access.tests.fixtures import make_gateway

    node_site = cluster.nodes.get().host.site
    _on_a_core(cluster)
    local = make_gateway("zz-local", site=node_site, address="198.18.100.9")
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    assert "remote 198.18.100.9 1194" in text
    local.enabled = False
    local.save()
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    assert "remote 198.18.100.1 1194" in text


def test_a_gateway_at_a_site_the_clusters_core_does_not_reach_is_never_its_way_in(alice, cluster):
    """A gateway at a site the cluster's core does not reach never carries its VLAN (the network keeps it off
    that trunk, and the same id may be another core's cluster there): its state leaves the cluster out, and a
    profile is refused rather than sent there; one at a site the core reaches serves it."""
    from access.tests.fixtures import make_gateway
    from network.tests.factories import SiteFactory

    reached, elsewhere = SiteFactory(name="pilsen"), SiteFactory(name="ostrava")
    _on_a_core(cluster, reached)
    far = make_gateway("far", site=elsewhere, address="198.18.100.9")
    label = cluster_label(cluster)
    assert label not in services.gateway_state(gateway=far)["vpn"]["vlans"]
    with pytest.raises(NoGateway, match="no OpenVPN access gateway is at a site your cluster's network reaches"):
        services.vpn_profile_issue(user=alice, clusters=[cluster])
    near = make_gateway("near", site=reached, address="198.18.100.8")
    assert services.gateway_state(gateway=near)["vpn"]["vlans"][label] == cluster.vlan_id
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster])
    assert "remote 198.18.100.8 1194" in text


def test_a_gateway_without_a_site_carries_no_vlan_id_two_cores_gave_out(alice, bob, cluster, gateway, tmp_path):
    """Cores that share no site may give out the same VLAN id. A gateway without a site has one trunk and one
    VLAN map for all: it cannot tell the two clusters apart (a user of one would be put on the other's network),
    so it carries neither — not in its state, not in a profile or certificate, not in ``gateways_carrying``. A
    gateway at one core's site carries that core's cluster; once the other ends, the site-less one carries
    the remaining one again."""
    import json

    from access.gateway.state import VpnState
    from access.selectors import gateways_carrying
    from access.tests.fixtures import make_gateway

    gateway.local_state_dir = str(tmp_path)  # on the portal's host: a cluster becoming ready is installed at once
    gateway.save()
    _on_a_core(cluster)
    assert services.gateways_install_ready_cluster(cluster_id=cluster.pk) == 1
    assert json.loads(VpnState.at(tmp_path).vlans.read_text())["clusters"] == {cluster_label(cluster): cluster.vlan_id}
    theirs = make_cluster(bob, name="west")
    VirtualCluster.objects.filter(pk=theirs.pk).update(vlan_id=cluster.vlan_id)
    theirs.refresh_from_db()
    _on_a_core(theirs)
    # the other core's cluster on the same id becomes ready: the site-less gateway drops both at once
    assert services.gateways_install_ready_cluster(cluster_id=theirs.pk) == 1
    assert json.loads(VpnState.at(tmp_path).vlans.read_text())["clusters"] == {}
    labels = {cluster_label(cluster), cluster_label(theirs)}

    state = services.gateway_state(gateway=gateway)
    assert not labels & set(state["vpn"]["vlans"])
    assert not labels & set(state["ssh"]["clusters"])
    with pytest.raises(NoGateway):
        services.vpn_profile_issue(user=alice, clusters=[cluster])
    with pytest.raises(NoGateway):
        services.vpn_profile_issue(user=bob, clusters=[theirs])
    assert gateways_carrying([cluster, theirs]) == {}

    east = make_gateway("east", site=cluster.nodes.get().host.site, address="198.18.100.9")
    assert services.gateway_state(gateway=east)["vpn"]["vlans"] == {cluster_label(cluster): cluster.vlan_id}
    assert "remote 198.18.100.9 1194" in services.vpn_profile_issue(user=alice, clusters=[cluster]).text
    assert gateways_carrying([cluster, theirs]) == {cluster.pk: [east]}

    VirtualCluster.objects.filter(pk=theirs.pk).update(state="tearing_down")
    assert services.gateway_state(gateway=gateway)["vpn"]["vlans"][cluster_label(cluster)] == cluster.vlan_id
    assert gateways_carrying([cluster]) == {cluster.pk: [east, gateway]}
    assert "remote 198.18.100.1 1194" in services.vpn_profile_issue(user=alice, clusters=[cluster]).text


def test_clusters_that_share_no_gateway_are_refused_together_as_a_conflict_not_as_an_outage(alice, cluster):
    """Each of two clusters has a gateway, but none reaches both: asking for one profile for the two never
    succeeds, so it is a 409 saying to ask per cluster — not the 503 of "no gateway yet" (retry later)."""
    from access.errors import NoCommonGateway
    from access.tests.fixtures import make_cluster, make_gateway
    from network.tests.factories import SiteFactory

    second = make_cluster(alice, name="hpc")
    pilsen, ostrava = SiteFactory(name="pilsen"), SiteFactory(name="ostrava")
    _on_a_core(cluster, pilsen)
    _on_a_core(second, ostrava)
    make_gateway("west", site=pilsen, address="198.18.100.8")
    make_gateway("east", site=ostrava, address="198.18.100.9")
    assert "remote 198.18.100.8 1194" in services.vpn_profile_issue(user=alice, clusters=[cluster]).text
    assert "remote 198.18.100.9 1194" in services.vpn_profile_issue(user=alice, clusters=[second]).text
    with pytest.raises(NoCommonGateway, match="reaches all of these clusters' networks") as refused:
        services.vpn_profile_issue(user=alice, clusters=[cluster, second])
    assert (refused.value.status, refused.value.field) == (409, "clusters")
    # the page says so under the clusters ticked, and keeps them and the label
    from django.test import Client

    page = Client()
    page.force_login(alice)
    form = {"clusters": [cluster.pk, second.pk], "label": "both at once"}
    response = page.post("/access/vpn-profile/", form)
    assert response.status_code == 400, response.status_code
    text = response.content.decode()
    assert "reaches all of these clusters" in text and 'value="both at once"' in text


def test_a_vpn_profile_names_every_gateway_that_carries_the_cluster_for_failover(alice, cluster, gateway, settings):
    """Each gateway its own <connection> block, with its own address, proto and tls-crypt key, best first; pinned
    by the start their names share. Left out: a gateway whose trunk does not carry the cluster, and one whose
    certificate name shares too little with the others' to be pinned together."""
    from access.tests.fixtures import make_gateway
    from network.tests.factories import SiteFactory

    reached, elsewhere = SiteFactory(name="pilsen"), SiteFactory(name="ostrava")
    _on_a_core(cluster, reached)
    near = make_gateway("near", site=reached, address="198.18.100.8", vpn_port=1195, vpn_proto="tcp")
    make_gateway("far", site=elsewhere, address="198.18.100.9")
    make_gateway("zz-alias", address="198.18.100.7", server_name="vpn.example.org")

    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    keys = {g.name: g.tls_crypt_key for g in Gateway.objects.all()}
    assert parsed.connections == [
        ("198.18.100.1 1194 udp", keys["gw1"].strip()),
        ("198.18.100.8 1195 tcp-client", keys["near"].strip()),
    ]
    assert keys["gw1"] != keys["near"]
    assert parsed.directives["verify-x509-name"] == ['"virtcloud-gateway-" name-prefix']
    assert parsed.pinned == {services.gateway_fingerprint(gateway), services.gateway_fingerprint(near)}
    assert len(parsed.pinned) == 2
    assert parsed.directives["server-poll-timeout"] == ["10"]
    assert "remote" not in parsed.directives and "proto" not in parsed.directives

    near.enabled = False
    near.save()
    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    assert parsed.connections == []  # gw1 alone (the alias cannot be pinned with it): the single-gateway form
    assert parsed.directives["remote"] == ["198.18.100.1 1194"]
    assert parsed.directives["verify-x509-name"] == ['"virtcloud-gateway-gw1" name']
    assert parsed.pinned == {services.gateway_fingerprint(gateway)}

    near.enabled = True
    near.save()
    settings.ACCESS_VPN_PROFILE_GATEWAYS = 1
    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    assert parsed.connections == [] and parsed.directives["remote"] == ["198.18.100.1 1194"]


def test_a_vpn_profile_pins_the_gateways_current_certificate(alice, cluster, gateway):
    """The profile accepts the certificate the gateway was last enrolled with, and no other: after a re-enrolment
    (a new key: the old one lost, or the machine rebuilt) new profiles pin the new certificate, so the old key
    cannot answer for the gateway (OpenVPN's ``peer-fingerprint``, beside the CA and name checks; proven against
    real OpenVPN in test_vpn_failover)."""
    from access import pki

    services.gateway_enrol(gateway=gateway)
    gateway.refresh_from_db()
    first = pki.pem_fingerprint(gateway.server_certificate)
    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    assert parsed.pinned == {first}

    services.gateway_enrol(gateway=gateway)
    gateway.refresh_from_db()
    renewed = pki.pem_fingerprint(gateway.server_certificate)
    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    assert renewed != first and parsed.pinned == {renewed}


def test_a_re_enrolled_bastions_old_host_key_is_revoked_in_every_ssh_bundle(alice, cluster, gateway):
    """Re-enrolment retires the bastion's host key: until a day after its certificate ends, every SSH bundle's
    known_hosts says ``@revoked`` for it, for the gateway as the bundle names it (ssh refuses whoever still holds it:
    real ssh in test_ssh_gateway); the new key is not listed, nor a key certified for another address, and one whose
    certificate ended more than a day ago is dropped."""
    from access import ssh
    from access.models import RetiredHostKey

    def revoked() -> list[str]:
        known_hosts = services.ssh_certificate_issue(user=alice, cluster=cluster).known_hosts
        return [line.split()[-1] for line in known_hosts.splitlines() if line.startswith("@revoked 198.18.100.1 ")]

    services.gateway_enrol(gateway=gateway)
    gateway.refresh_from_db()
    first, names, first_end = ssh.certified_key(gateway.ssh_host_certificate)
    assert revoked() == [] and names == ["198.18.100.1", "virtcloud-gateway-gw1"]

    services.gateway_enrol(gateway=gateway)
    gateway.refresh_from_db()
    second, _, _ = ssh.certified_key(gateway.ssh_host_certificate)
    retired = RetiredHostKey.objects.get()
    assert (retired.key, retired.names, retired.until, retired.gateway) == (first, names, first_end, "gw1")
    assert revoked() == [first.split()[1]] and second.split()[1] not in revoked()

    RetiredHostKey.objects.create(key=second, names=["198.18.100.99"], until=first_end, gateway="elsewhere")
    assert revoked() == [first.split()[1]]  # certified for another address: not this gateway's business
    RetiredHostKey.objects.filter(pk=retired.pk).update(until=timezone.now() - dt.timedelta(hours=20))
    assert revoked() == [first.split()[1]]  # a client whose clock is behind still takes its certificate
    RetiredHostKey.objects.filter(pk=retired.pk).update(until=timezone.now() - dt.timedelta(days=2))
    assert revoked() == []
    services.gateway_enrol(gateway=gateway)
    assert not RetiredHostKey.objects.filter(pk=retired.pk).exists()  # dropped at the next retirement


def test_a_deleted_gateways_host_key_stays_revoked_for_its_address(alice, cluster, gateway):
    """A gateway deleted and set up again at its address (a new entry, new keys): the old entry's host key, whose
    certificate names that address, is refused in every bundle of the new one."""
    from access import ssh
    from access.models import RetiredHostKey
    from access.tests.fixtures import make_gateway

    services.gateway_enrol(gateway=gateway)
    gateway.refresh_from_db()
    old, _, _ = ssh.certified_key(gateway.ssh_host_certificate)
    gateway.delete()
    assert RetiredHostKey.objects.get().key == old
    rebuilt = make_gateway("gw1-new", address="198.18.100.1")
    services.gateway_enrol(gateway=rebuilt)
    known_hosts = services.ssh_certificate_issue(user=alice, cluster=cluster).known_hosts
    assert f"@revoked 198.18.100.1 {' '.join(old.split()[:2])}\n" in known_hosts


def test_a_gateway_whose_certificate_cannot_be_read_gets_no_profile_and_nothing_is_recorded(alice, cluster, gateway):
    from access.errors import GatewayMisconfigured

    Gateway.objects.filter(pk=gateway.pk).update(server_certificate="-----BEGIN CERTIFICATE-----\nbroken\n")
    before = Credential.objects.count()
    with pytest.raises(GatewayMisconfigured, match="Tell your administrator"):
        services.vpn_profile_issue(user=alice, clusters=[cluster])
    assert Credential.objects.count() == before


def test_a_failover_gateway_whose_certificate_cannot_be_read_is_left_out(alice, cluster, gateway):
    """Only the first gateway's unreadable certificate stops a download; a further one is left out (and logged)."""
    from access.tests.fixtures import make_gateway

    other = make_gateway("gw2", address="198.18.100.2")
    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    assert len(parsed.connections) == 2 and len(parsed.pinned) == 2
    Gateway.objects.filter(pk=other.pk).update(server_certificate="-----BEGIN CERTIFICATE-----\nbroken\n")
    parsed = parse_profile(services.vpn_profile_issue(user=alice, clusters=[cluster]).text, aa_pem=aa_pem())
    assert parsed.connections == [] and parsed.directives["remote"] == ["198.18.100.1 1194"]
    assert parsed.pinned == {services.gateway_fingerprint(gateway)}


# --- validity bounds, names ------------------------------------------------------------------------------------


def test_no_credential_outlives_its_clusters(alice, team, cluster, gateway):
    """A VPN certificate (and its AC) or an SSH certificate ends by the earliest expiry of the clusters it
    admits to; a cluster whose lifetime is over (its teardown not started yet) gets none."""
    soon = make_cluster(alice, name="short", group=team)
    VirtualCluster.objects.filter(pk=soon.pk).update(expires_at=timezone.now() + dt.timedelta(hours=1))
    soon.refresh_from_db()
    text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster, soon], publish=True)
    parsed = parse_profile(text, aa_pem=aa_pem())
    assert parsed.cert.not_valid_after_utc == soon.expires_at.replace(microsecond=0)
    assert Credential.objects.get(serial=parsed.cert.serial_number).not_after == parsed.cert.not_valid_after_utc
    access = services.ssh_certificate_issue(user=alice, cluster=soon)
    assert access.credential.not_after == soon.expires_at.replace(microsecond=0)
    assert _ssh_cert(access.certificate).valid_before == int(soon.expires_at.timestamp())
    VirtualCluster.objects.filter(pk=soon.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with pytest.raises(ClusterNotReady, match=r"lifetime of cluster short ended at"):
        services.vpn_profile_issue(user=alice, clusters=[cluster, soon])
    with pytest.raises(ClusterNotReady):
        services.ssh_certificate_issue(user=alice, cluster=soon)


def test_the_attribute_authority_lives_as_long_as_the_ca_and_bounds_every_profile(alice, cluster, gateway):
    from access import pki
    from access.errors import AuthorityExpired

    services.ca_ensure()
    ca = x509.load_pem_x509_certificate(Authority.objects.get(kind=AuthorityKind.VPN).certificate.encode())
    aa_row = Authority.objects.get(kind=AuthorityKind.AA)
    aa = x509.load_pem_x509_certificate(aa_row.certificate.encode())
    assert ca.not_valid_after_utc - aa.not_valid_after_utc < dt.timedelta(minutes=2)
    # an AA certificate from before (five years, shorter than the CA): no profile may outlive it
    signer = services._load(Authority.objects.get(kind=AuthorityKind.VPN))
    key = services._load(aa_row).key
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + dt.timedelta(days=80))
    for lifetime, expired in ((dt.timedelta(days=10), False), (dt.timedelta(seconds=30), True)):
        short = pki.issue_aa_cert(
            signer, public_key=key.public_key(), serial=services.serial_allocate("aa"), lifetime=lifetime
        )
        Authority.objects.filter(pk=aa_row.pk).update(certificate=pki.cert_to_pem(short).decode())
        services._SIGNERS.clear()  # this process decrypted the AA before
        if expired:
            with pytest.raises(AuthorityExpired, match="the certificate of the Attribute Authority is valid until"):
                services.vpn_profile_issue(user=alice, clusters=[cluster], publish=True)
        else:
            text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster], publish=True)
            parsed = parse_profile(text, aa_pem=pki.cert_to_pem(short).decode())
            assert parsed.cert.not_valid_after_utc <= short.not_valid_after_utc


def test_a_re_enrolled_gateway_gets_a_new_tls_crypt_key(alice, cluster, gateway):
    """A gateway is re-enrolled after its state directory was stolen: the old tls-crypt key stays with the thief
    and, with the old server key, passed for the gateway to a client that does not check the pinned fingerprint
    (OpenVPN 2.5 ignores ``peer-fingerprint``). Re-enrolment makes a new one; profiles carry the new one."""
    first = services.gateway_enrol(gateway=gateway).tls_crypt_key
    gateway.refresh_from_db()
    assert gateway.tls_crypt_key == first
    second = services.gateway_enrol(gateway=gateway).tls_crypt_key
    gateway.refresh_from_db()
    assert second != first and gateway.tls_crypt_key == second
    text = services.vpn_profile_issue(user=alice, clusters=[cluster]).text
    assert second.strip().splitlines()[2] in text and first.strip().splitlines()[2] not in text


def test_a_profile_never_outlives_the_gateway_certificate_it_pins(alice, cluster, gateway):
    """A 90-day publish profile issued 20 days before the gateway's certificate ends stopped connecting after 20
    days, while its dates (and the expiry mail) said 90. It ends with the certificate; one that has ended is an
    error that says what to do."""
    from access import pki
    from access.errors import AuthorityExpired

    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + dt.timedelta(days=80))
    cluster.refresh_from_db()
    for days, expired in ((20, False), (0, True)):
        ca = pki.create_ca("virtcloud-gateway-gw1", lifetime=dt.timedelta(days=days, seconds=30))
        Gateway.objects.filter(pk=gateway.pk).update(server_certificate=ca.cert_pem().decode())
        if expired:
            with pytest.raises(AuthorityExpired, match="gateway gw1 .its TLS server certificate; re-enrol it."):
                services.vpn_profile_issue(user=alice, clusters=[cluster], publish=True)
        else:
            text, _ = services.vpn_profile_issue(user=alice, clusters=[cluster], publish=True)
            assert parse_profile(text, aa_pem=aa_pem()).cert.not_valid_after_utc <= ca.cert.not_valid_after_utc

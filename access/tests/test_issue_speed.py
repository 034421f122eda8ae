"""What keeps profile issuance fast (issue 6: p95 ≤ 50 ms, ≥ 150 profiles/s on 2 cores; ``bench/profiles.py``)
without giving up correctness: pooled serials stay unique (also across a fork), the CA and AA keys are
decrypted once per process and a replaced key is noticed, and one profile costs a fixed, small number of
queries."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import pytest
from cryptography import x509
from django.db import transaction
from rest_framework.test import APIClient

from access import services
from access.models import Authority, AuthorityKind, Credential, SerialNumber
from access.tests.fixtures import cluster, gateway


@pytest.fixture
def fresh_pool():
    services._SERIAL_POOL.clear()
    yield
    services._SERIAL_POOL.clear()


@pytest.mark.django_db(transaction=True)
def test_pooled_serials_are_reserved_rows_unique_and_per_process(fresh_pool, monkeypatch):
    plain = services.serial_allocate("x")
    pooled = [services.serial_allocate("vpn-client", pooled=True) for _ in range(services.SERIAL_BLOCK + 3)]
    assert len(set(pooled)) == len(pooled) and plain not in pooled
    assert pooled == sorted(pooled)  # handed out in order within a block
    reserved = set(SerialNumber.objects.filter(purpose="vpn-client").values_list("pk", flat=True))
    assert set(pooled) <= reserved and len(reserved) == 2 * services.SERIAL_BLOCK  # two blocks, committed

    # A forked process (another pid) never takes its parent's block.
    left = list(services._SERIAL_POOL["vpn-client"][1])
    monkeypatch.setattr(services.os, "getpid", lambda: -1)
    child = services.serial_allocate("vpn-client", pooled=True)
    assert child not in left and child > max(reserved)

    # Inside a transaction (which may roll back) serials come one at a time.
    with transaction.atomic():
        inside = services.serial_allocate("vpn-client", pooled=True)
    assert inside > child and inside not in services._SERIAL_POOL["vpn-client"][1]


@pytest.mark.django_db(transaction=True)
def test_profiles_outside_a_transaction_use_the_pool_and_stay_unique(fresh_pool, alice, cluster, gateway):
    profiles = [services.vpn_profile_issue(user=alice, clusters=[cluster]) for _ in range(5)]
    serials = [p.credential.serial for p in profiles]
    assert len(set(serials)) == 5
    assert SerialNumber.objects.filter(purpose="vpn-client").count() == services.SERIAL_BLOCK
    for p in profiles:
        cert = x509.load_pem_x509_certificate(p.text.split("<cert>\n", 1)[1].split("</cert>", 1)[0].encode())
        assert cert.serial_number == p.credential.serial


@pytest.mark.django_db
def test_a_replaced_ca_key_is_noticed(alice, cluster, gateway):
    first = services.vpn_profile_issue(user=alice, clusters=[cluster]).text
    Authority.objects.all().delete()  # e.g. a restore or a re-initialised CA: new keys, maybe the same ids
    services.ca_ensure()
    second = services.vpn_profile_issue(user=alice, clusters=[cluster]).text
    ca = Authority.objects.get(kind=AuthorityKind.VPN).certificate.strip()
    assert ca in second and ca not in first


@pytest.mark.django_db
def test_one_profile_costs_a_fixed_number_of_queries(alice, cluster, gateway, django_assert_max_num_queries):
    api = APIClient()
    api.force_authenticate(alice)
    assert api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json").status_code == 200
    # cluster (authorization), gateway, which gateways carry it (the sites its core joins, whether another
    # cluster holds its VLAN id), authorities (light), serial, savepoint + holder locked + cluster locked and
    # authorized again + credential + its audit entry + its clusters + release.
    with django_assert_max_num_queries(12):
        response = api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json")
    assert response.status_code == 200
    assert Credential.objects.count() == 2

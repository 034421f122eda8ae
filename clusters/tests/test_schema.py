"""Property-based tests of the whole REST API against its own OpenAPI schema (schemathesis, in-process WSGI).

Every operation of ``/api/schema/`` is called with generated input (valid and invalid) as an admin session, a
user's token with every scope, and a middleware token (``clusters:manage``), on a database that holds the
fake fabric, images, a READY cluster, device changes, allocations and drift, so that operations with ids
reach real objects. Checks: never a 5xx, and responses (status codes, content types, bodies) conform to
the schema.
"""

from __future__ import annotations

import json
import os

import hypothesis
import pytest
import schemathesis
from django.conf import settings
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.specs.openapi import checks as oa_checks
from werkzeug.test import Client as WsgiClient

from access.models import GatewayKind
from access.tests.fixtures import make_gateway
from clusters.models import Image, Node, PublicPrefix, VirtualCluster
from network.models import DeviceChange, Drift, Host, Site, Switch, VlanAllocation, VlanPool
from network.tests.fakefabric import build_fabric
from portal.models import TokenScope
from portal.tokens import token_create
from portal.wsgi import application

pytestmark = pytest.mark.django_db

CSRF = "schemathesisschemathesisschemat1"  # a well-formed CSRF secret (32 characters) sent as cookie and header
# Examples per operation, kind of input and id source; the file runs in well under a minute with 6. A deeper
# sweep: SCHEMATHESIS_MAX_EXAMPLES=50.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "6"))

# Which stored object an ``{id}`` (or ``{node_id}``) in a path stands for, by path prefix.
ID_MODELS = {
    "/api/clusters/": VirtualCluster,
    "/api/access/clusters/": VirtualCluster,
    "/api/network/sites/": Site,
    "/api/network/switches/": Switch,
    "/api/network/hosts/": Host,
    "/api/network/pools/": VlanPool,
    "/api/network/allocations/": VlanAllocation,
    "/api/network/changes/": DeviceChange,
    "/api/network/drift/": Drift,
}


def load_schema() -> schemathesis.BaseSchema:
    """The schema as the application serves it, plus the test-only ``fake`` driver the fake fabric uses."""
    raw = json.loads(WsgiClient(application).get("/api/schema/?format=json").get_data())
    for name in ("DriverEnum", "PlatformEnum"):
        raw["components"]["schemas"][name]["enum"].append("fake")
    schema = schemathesis.openapi.from_dict(raw)
    schema.app = application
    return schema


@pytest.fixture
def wsgi_in_test_transaction(db):
    """Django's test client does the same: the WSGI handler must not close the test's connection (it would
    end the transaction that holds the fixtures)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def world(db, tmp_path, django_capture_on_commit_callbacks, alice, root):
    """The fake fabric, images, a public prefix, a READY cluster (provisioned eagerly on the fake devices),
    drift and the objects whose ids the generated paths get."""
    from clusters import services

    fabric = build_fabric(tmp_path / "devices")
    image = Image.objects.create(name="my-own", approved=False)
    Image.objects.create(name="debian-12", approved=True)
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    from datetime import timedelta

    from django.utils import timezone

    with django_capture_on_commit_callbacks(execute=True):
        cluster, _ = services.cluster_create(
            owner=alice,
            name="seed",
            image=image,
            admin_rights=False,
            nodes=[
                services.NodeRequest("n1", fabric.hosts["brno1"], "52:54:00:00:00:01"),
                services.NodeRequest("n2", fabric.hosts["pilsen1"], "52:54:00:00:00:02"),
            ],
            expires_at=timezone.now() + timedelta(hours=1),
        )
    cluster.refresh_from_db()
    assert cluster.state == "ready", cluster.state_reason
    Drift.objects.create(
        device_kind="switch", switch=fabric.switches["brno"], device="sw-brno", port="h1", kind="missing", vlans="150"
    )
    # an access gateway: a generated request for a real cluster id gets a profile or a 4xx, never
    # "no gateway configured" (503)
    make_gateway("gw1", kind=GatewayKind.BOTH, address="198.18.100.1", vpn_port=1194)  # set up: users are sent to it
    return {"cluster": cluster, "fabric": fabric}


def _token(user, scopes) -> str:
    _, secret = token_create(user=user, name="schemathesis", scopes=scopes)
    return secret


@pytest.fixture
def auth(caller, world, alice, root, client) -> dict:
    """Headers and cookies that authenticate one kind of caller."""
    if caller == "admin-session":
        client.force_login(root)
        return {
            "headers": {"X-CSRFToken": CSRF},
            "cookies": {"sessionid": client.cookies["sessionid"].value, "csrftoken": CSRF},
        }
    if caller == "user-token":
        secret = _token(alice, list(TokenScope.values))
    else:
        from django.contrib.auth.models import User

        pbs = User.objects.create_user("pbs")
        secret = _token(pbs, [TokenScope.CLUSTERS_MANAGE, TokenScope.NETWORK_READ])
    return {"headers": {"Authorization": f"Bearer {secret}"}, "cookies": {}}


def _real_ids(path: str) -> dict[str, int]:
    """Ids of stored objects for the path's ``{id}`` (and ``{node_id}``), so detail operations reach them."""
    if path.startswith("/api/images/{name}"):
        name = Image.objects.order_by("pk").values_list("name", flat=True).first()
        return {"name": name} if name else {}
    model = next((m for prefix, m in ID_MODELS.items() if path.startswith(prefix)), None)
    if model is None or "{id}" not in path:
        return {}
    objects = model.objects.exclude(state="free") if model is VlanAllocation else model.objects
    ids = {"id": objects.order_by("pk").values_list("pk", flat=True).first()}
    if "{node_id}" in path:
        ids["node_id"] = Node.objects.filter(cluster_id=ids["id"]).order_by("pk").values_list("pk", flat=True).first()
    return ids if None not in ids.values() else {}


def _short_waits(case) -> None:
    """A valid ``timeout`` of a long poll (``…/wait/``, ``…/events/``; up to ``CLUSTER_WAIT_MAX`` s) is cut to
    0.2 s: the generated ``until`` states are mostly not the seed cluster's (and the feed has no new event), so
    each example would wait it out. Invalid values are left as generated; a missing one (``wait``'s default is
    the maximum) becomes 0.2 s."""
    if not case.operation.path.endswith(("/wait/", "/events/")):
        return
    if case.query is None:
        case.query = {}
    if not isinstance(case.query, dict):
        return
    if "timeout" not in case.query:  # the default is the maximum
        case.query["timeout"] = 0.2
        return
    try:
        timeout = float(case.query["timeout"])
    except (TypeError, ValueError):
        return
    if 0.2 < timeout <= settings.CLUSTER_WAIT_MAX:
        case.query["timeout"] = 0.2


def _no_accept(case) -> None:
    """Negative generation adds headers no operation declares, among them an ``Accept`` no renderer satisfies
    (``Accept: 1``): DRF's 406 for it is right, and no operation's own answer, which this test checks."""
    for name in [n for n in (case.headers or {}) if n.lower() == "accept"]:
        del case.headers[name]


@pytest.mark.parametrize("caller", ["admin-session", "user-token", "middleware-token"])
def test_api_conforms_to_its_schema(caller, auth, wsgi_in_test_transaction, django_capture_on_commit_callbacks):
    """Every operation, generated valid and invalid input, with generated ids and with stored ones."""
    schema = load_schema()
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            variants = [{}]
            ids = _real_ids(operation.path)
            if ids:
                variants.append(ids)
            for fixed in variants:
                strategy = operation.as_strategy(mode, path_parameters=fixed or None)

                @hypothesis.settings(
                    max_examples=MAX_EXAMPLES,
                    deadline=None,
                    suppress_health_check=list(hypothesis.HealthCheck),
                    derandomize=True,
                    database=None,
                    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                )
                @hypothesis.given(case=strategy)
                def call(case):
                    _short_waits(case)
                    _no_accept(case)
                    # The workflow an accepted write starts runs too (eager Celery on the fake fabric), so the
                    # seed cluster goes back to READY and later operations still find it usable.
                    with django_capture_on_commit_callbacks(execute=True):
                        case.call_and_validate(
                            headers=auth["headers"],
                            cookies=auth["cookies"],
                            checks=[st_checks.not_a_server_error],
                            additional_checks=[
                                oa_checks.status_code_conformance,
                                oa_checks.content_type_conformance,
                                oa_checks.response_schema_conformance,
                            ],
                        )

                try:
                    call()
                except hypothesis.errors.Unsatisfiable:
                    continue  # nothing to negate (e.g. an operation without parameters or body)
                except (
                    Exception,
                    BaseExceptionGroup,
                ) as exc:  # collect every operation's failure, then report them all
                    failures.append(f"{operation.label} ({mode.value}, ids {fixed or 'generated'}):\n{exc}")
    assert not failures, "\n\n".join(failures)


def test_what_schemathesis_found_stays_fixed(world, alice, root):
    """Regressions of the 500s the property-based test found, as plain requests."""
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(alice)
    admin = APIClient()  # the network inventory is an administrator's
    admin.force_authenticate(root)
    cid = world["cluster"].pk
    node = world["cluster"].nodes.first()
    for url in ("/api/clusters/abc/", "/api/clusters/1.5/", "/api/network/sites/x.y/", f"/api/clusters/{cid}x/"):
        r = api.get(url)
        assert (r.status_code, r["Content-Type"], r.json()["detail"]) == (404, "application/json", "Not found."), url
    for url in ("/api/clusters/null/teardown/", f"/api/clusters/{cid}/nodes/{node.pk}x/migrated/"):
        assert api.post(url, {}, format="json").status_code == 404, url
    nul = {"name": "c2", "image": "my-own", "nodes": [{"name": "n", "host": "brno1\x00", "mac": "52:54:00:00:09:01"}]}
    r = api.post("/api/clusters/", nul, format="json")
    assert r.status_code == 400 and "host" in str(r.data["nodes"])
    # a host name with a lone surrogate (a "\ud800" escape in the JSON) is no text: the parser refuses it (a 500)
    surrogate = json.dumps({**nul, "nodes": [{"name": "n", "host": "brno\ud800", "mac": "52:54:00:00:09:01"}]})
    for url in ("/api/clusters/", f"/api/clusters/{cid}/nodes/"):
        r = api.post(url, surrogate, content_type="application/json")
        assert r.status_code == 400 and "lone UTF-16 surrogate" in r.json()["detail"], url
    assert api.get("/api/clusters/?name=a\x00b").status_code == 400
    assert admin.get("/api/network/changes/?device=a\x00b").status_code == 400
    assert (
        api.post(f"/api/clusters/{cid}/nodes/{node.pk}/migrate/", {"target_host": "\x00"}, format="json").status_code
        == 400
    )
    assert admin.get("/api/network/changes/?limit=100000000000000000000").status_code == 200
    r = admin.get("/api/network/allocations/", HTTP_HOST="*m|")  # Django refuses it before any view: JSON too
    assert (r.status_code, r["Content-Type"], r.json()["code"]) == (400, "application/json", "bad_request")
    assert api.get(f"/api/clusters/?limit={10**20}&offset={10**20}").status_code == 200


def test_every_operation_taking_an_idempotency_key_documents_its_400(world, alice):
    """A key that is too long (or holds a NUL character) is a 400 on every write that takes the header: a
    client generated from the schema must be told so (removing a node and ending a migration did not say)."""
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(alice)
    raw = json.loads(api.get("/api/schema/?format=json").content)
    taking = {
        (method, path): operation["responses"]
        for path, operations in raw["paths"].items()
        for method, operation in operations.items()
        if any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    }
    assert len(taking) >= 8, sorted(taking)
    assert [op for op, responses in taking.items() if "400" not in responses] == []
    cluster = world["cluster"]
    node = cluster.nodes.first()
    for url in (f"nodes/{node.pk}/migrated/", f"nodes/{node.pk}/migrate/cancel/"):
        r = api.post(f"/api/clusters/{cluster.pk}/{url}", {}, format="json", HTTP_IDEMPOTENCY_KEY="k" * 201)
        assert r.status_code == 400 and "Idempotency-Key" in r.data, url
    r = api.delete(f"/api/clusters/{cluster.pk}/nodes/{node.pk}/", HTTP_IDEMPOTENCY_KEY="k" * 201)
    assert r.status_code == 400 and "Idempotency-Key" in r.data
    assert cluster.nodes.filter(pk=node.pk, state="ready").exists()


def test_the_create_request_documents_connectivity_and_its_refusals(alice):
    """A client generated from the schema knows it may ask for a closed cluster, that the field is optional,
    and which answers a public one the policy does not allow gets (400; 422 without a public prefix)."""
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(alice)
    raw = json.loads(api.get("/api/schema/?format=json").content)
    schemas = raw["components"]["schemas"]
    create = schemas["ClusterCreate"]
    field = create["properties"]["connectivity"]
    assert "connectivity" not in create["required"]
    assert schemas[field["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"] == ["public", "closed"]
    assert "`closed` is always granted" in field["description"] and "a 400 naming this field" in field["description"]
    responses = raw["paths"]["/api/clusters/"]["post"]["responses"]
    assert (
        "`connectivity`: public asked for where the policy makes the cluster closed" in responses["400"]["description"]
    )
    assert "public `connectivity` asked for with no public prefix configured" in responses["422"]["description"]

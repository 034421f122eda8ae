"""What a scheduler relies on beyond "it works": the API refuses what it would otherwise ignore, its schema says
what the server accepts, idempotent retries are recognized as the same request, errors tell a retry from a
refusal, and the recorded times and progress mean what they say. On the fake fabric with eager Celery."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from clusters.api import serializers as s
from clusters.models import ClusterState, IdempotencyKey, Image, Node, PublicPrefix, VirtualCluster
from network.models import Segment, VlanAllocation
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import TokenScope
from portal.tokens import token_create, token_revoke

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def images(db):
    Image.objects.create(name="debian-12", approved=True)
    Image.objects.create(name="my-own", approved=False)


@pytest.fixture
def pbs(db):
    """The middleware's user (its tokens: ``token_for``)."""
    from django.contrib.auth.models import User

    return User.objects.create_user("pbs")


def token_for(user, scopes=(TokenScope.CLUSTERS_MANAGE,)) -> APIClient:
    _, secret = token_create(user=user, name="token", scopes=list(scopes))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def as_user(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def body(name="c1", nodes=(("n1", "brno1", "52:54:00:00:00:01"), ("n2", "pilsen1", "52:54:00:00:00:02")), **extra):
    return {
        "name": name,
        "image": "my-own",
        "nodes": [{"name": n, "host": h, "mac": m} for n, h, m in nodes],
        "lifetime": 3600,
        **extra,
    }


def nothing_allocated() -> bool:
    return (
        not VirtualCluster.objects.exists()
        and not Segment.objects.exists()
        and not VlanAllocation.objects.filter(state="allocated").exists()
    )


def schema(api) -> dict:
    return json.loads(api.get("/api/schema/?format=json").content)


def component(raw: dict, ref: dict) -> dict:
    return raw["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]


def request_schema(raw: dict, path: str, method: str) -> dict:
    return component(raw, raw["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"])


# --- unknown fields ---------------------------------------------------------------------------------------------


def test_a_field_the_api_does_not_know_is_refused_not_ignored(fabric, images, alice, root):
    """``expires_at`` for ``lifetime``, a node's ``ip`` for ``address``, a PATCH of ``name``: each was a
    success that used the defaults or changed nothing; now a 400 naming the field, and nothing happens."""
    api = as_user(alice)
    r = api.post("/api/clusters/", {**body(), "expires_at": "2030-01-01T00:00:00Z"}, format="json")
    assert (r.status_code, r.data) == (400, {"expires_at": ["unknown field"]}), r.content
    wrong_node = body()
    wrong_node["nodes"][1]["ip"] = "10.0.0.2"
    r = api.post("/api/clusters/", wrong_node, format="json")
    assert (r.status_code, r.json()) == (400, {"nodes": {"1": {"ip": ["unknown field"]}}}), r.content
    assert nothing_allocated()

    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    base = f"/api/clusters/{cid}"
    expiry = (timezone.now() + timedelta(hours=5)).isoformat()
    r = api.patch(f"{base}/", {"expires_at": expiry, "name": "renamed"}, format="json")
    assert (r.status_code, r.data) == (400, {"name": ["unknown field"]}), r.content
    n3 = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}
    r = api.post(f"{base}/nodes/", {"nodes": [{**n3, "ip": "10.0.0.3"}]}, format="json")
    assert (r.status_code, r.json()) == (400, {"nodes": {"0": {"ip": ["unknown field"]}}}), r.content
    r = api.post(f"{base}/nodes/", {"nodes": [n3], "force": True}, format="json")
    assert (r.status_code, r.data) == (400, {"force": ["unknown field"]}), r.content
    n1 = Node.objects.get(cluster_id=cid, name="n1")
    r = api.post(f"{base}/nodes/{n1.pk}/migrate/", {"target_host": "prague2", "live": True}, format="json")
    assert (r.status_code, r.data) == (400, {"live": ["unknown field"]}), r.content
    r = api.post(f"{base}/teardown/", {"reason": "done", "force": True}, format="json")
    assert (r.status_code, r.data) == (400, {"force": ["unknown field"]}), r.content
    r = as_user(root).post(f"{base}/connectivity/", {"connectivity": "closed", "reason": "x", "y": 1}, format="json")
    assert (r.status_code, r.data) == (400, {"y": ["unknown field"]}), r.content
    cluster = VirtualCluster.objects.get(pk=cid)
    assert (cluster.name, cluster.state, cluster.nodes.count()) == ("c1", ClusterState.READY, 2)
    assert cluster.expires_at < timezone.now() + timedelta(hours=2)
    assert Node.objects.get(pk=n1.pk).target_host is None


def test_a_form_encoded_body_is_read_by_its_fields_and_not_refused_for_its_csrf_token(fabric, images, alice):
    """The browsable API's forms post form data: their CSRF token is not a field, and a list's items
    (``nodes[0]name``) belong to their field; an unknown field is still refused."""
    api = as_user(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    r = api.post(f"/api/clusters/{cid}/teardown/", {"reason": "done", "force": "1"}, format="multipart")
    assert (r.status_code, r.data) == (400, {"force": ["unknown field"]}), r.content
    n3 = {"nodes[0]name": "n3", "nodes[0]host": "prague1", "nodes[0]mac": "52:54:00:00:00:03"}
    r = api.post(f"/api/clusters/{cid}/nodes/", {**n3, "csrfmiddlewaretoken": "x"}, format="multipart")
    assert r.status_code == 202, r.content
    r = api.post(f"/api/clusters/{cid}/teardown/", {"reason": "done", "csrfmiddlewaretoken": "x"}, format="multipart")
    assert r.status_code == 202, r.content


def test_too_many_nodes_are_refused_before_their_hosts_are_looked_up(fabric, images, alice):
    """40,000 nodes: a 400 naming the limit, without a query binding every host name (SQLite refuses more
    than 32,766 variables: that was a 500 there, and a needless huge query on PostgreSQL)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    nodes = [{"name": f"n{i}", "host": f"h{i}", "mac": "52:54:00:00:00:01"} for i in range(40_000)]
    with CaptureQueriesContext(connection) as queries:
        r = as_user(alice).post("/api/clusters/", {**body(), "nodes": nodes}, format="json")
    assert r.status_code == 400 and "1000" in str(r.data["nodes"]), r.content
    assert not any("h39999" in str(q["sql"]) for q in queries.captured_queries)
    assert nothing_allocated()


def test_the_schema_says_the_request_bodies_take_no_other_field(alice):
    """A client generated from the schema is told (``additionalProperties: false``) what the server enforces."""
    raw = schema(as_user(alice))
    writes = [
        ("/api/clusters/", "post"),
        ("/api/clusters/{id}/", "patch"),
        ("/api/clusters/{id}/nodes/", "post"),
        ("/api/clusters/{id}/nodes/{node_id}/migrate/", "post"),
        ("/api/clusters/{id}/teardown/", "post"),
        ("/api/clusters/{id}/connectivity/", "post"),
    ]
    for path, method in writes:
        assert request_schema(raw, path, method)["additionalProperties"] is False, (path, method)
    assert raw["components"]["schemas"]["NodeInput"]["additionalProperties"] is False


# --- the schema says what the server accepts --------------------------------------------------------------------


def test_the_schema_states_the_lifetime_bounds_the_server_applies(fabric, images, alice):
    api = as_user(alice)
    lifetime = request_schema(schema(api), "/api/clusters/", "post")["properties"]["lifetime"]
    low, high = settings.CLUSTER_MIN_LIFETIME, settings.CLUSTER_MAX_LIFETIME
    assert (lifetime["minimum"], lifetime["maximum"]) == (low, high)
    message = [f"must be between {low} and {high} seconds"]
    for seconds in (0, low - 1, high + 1):  # one message, whichever way the bound is missed
        r = api.post("/api/clusters/", body(lifetime=seconds), format="json")
        assert (r.status_code, r.data) == (400, {"lifetime": message}), (seconds, r.content)
    for seconds in (low, high):
        r = api.post("/api/clusters/", body(name=f"c{seconds}", lifetime=seconds), format="json")
        assert r.status_code == 201, r.content
        VirtualCluster.objects.filter(pk=r.data["id"]).update(state=ClusterState.TORN_DOWN)  # (its MACs free)
        Node.objects.filter(cluster_id=r.data["id"]).update(state="removed")


def test_the_lifetime_patch_requires_the_expiry_as_the_schema_says(fabric, images, alice):
    api = as_user(alice)
    extend = request_schema(schema(api), "/api/clusters/{id}/", "patch")
    assert extend["required"] == ["expires_at"]
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    r = api.patch(f"/api/clusters/{cid}/", {}, format="json")
    assert r.status_code == 400 and "expires_at" in r.data, r.content


def test_a_node_name_is_as_long_as_the_schema_says(alice):
    name = schema(as_user(alice))["components"]["schemas"]["NodeInput"]["properties"]["name"]
    assert name["maxLength"] == 40
    field = s.NodeInputSerializer().fields["name"]
    assert field.run_validation("n" * 40) == "n" * 40
    with pytest.raises(Exception, match="at most 40 characters"):
        field.run_validation("n" * 41)


# --- what the record says ---------------------------------------------------------------------------------------


def test_the_allocate_step_says_which_vlan_from_which_pool(fabric, images, alice):
    r = as_user(alice).post("/api/clusters/", body(), format="json")
    allocate = r.data["steps"][0]
    assert allocate["name"] == "allocate" and allocate["status"] == "ok"
    assert allocate["detail"] == f"VLAN {r.data['vlan_id']} from pool {fabric.pool.name}"


def test_ready_at_is_when_the_cluster_first_became_ready(fabric, images, alice):
    """Schedulers and bench/provision.py measure the provisioning latency from it: a node change later (the
    cluster is READY again after it) must not move it."""
    api = as_user(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    first = VirtualCluster.objects.get(pk=cid).ready_at
    assert first is not None
    n3 = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [n3]}, format="json").status_code == 202
    n1 = Node.objects.get(cluster_id=cid, name="n1")
    assert api.delete(f"/api/clusters/{cid}/nodes/{n1.pk}/").status_code == 202
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY and cluster.steps.filter(name="nodes.remove", status="ok").exists()
    assert cluster.ready_at == first


# --- idempotency ------------------------------------------------------------------------------------------------


def test_a_retry_after_the_token_was_rotated_gets_the_same_cluster(fabric, images, pbs, alice):
    """The key belongs to the caller (the user), not to one of its credentials: the scheduler's new token, or
    its user in the browser, retries as the same caller; another user's same key is another request."""
    old = token_for(pbs)
    payload = body(owner="alice", job_id="4711.pbs")
    first = old.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4711")
    assert first.status_code == 201, first.content
    from portal.models import ApiToken

    for token in ApiToken.objects.filter(user=pbs):
        token_revoke(token=token)
    again = token_for(pbs).post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4711")
    assert (again.status_code, again.data.get("id")) == (200, first.data["id"]), again.content
    # a user's script (its token) and the same user in the browser (its session) are one caller too
    mine = body(name="c3", nodes=[("k1", "prague1", "52:54:00:00:02:01")])
    made = token_for(alice, [TokenScope.CLUSTERS_WRITE]).post(
        "/api/clusters/", mine, format="json", HTTP_IDEMPOTENCY_KEY="mine"
    )
    again = as_user(alice).post("/api/clusters/", mine, format="json", HTTP_IDEMPOTENCY_KEY="mine")
    assert (made.status_code, again.status_code, again.data.get("id")) == (201, 200, made.data["id"]), again.content
    from django.contrib.auth.models import User

    other = token_for(User.objects.create_user("slurm"))
    theirs = other.post(
        "/api/clusters/",
        body(name="c2", owner="alice", nodes=[("m1", "brno2", "52:54:00:00:01:01")]),
        format="json",
        HTTP_IDEMPOTENCY_KEY="job-4711",
    )
    assert theirs.status_code == 201 and theirs.data["id"] != first.data["id"], theirs.content
    assert VirtualCluster.objects.count() == 3


def test_a_retry_is_recognized_by_what_it_asks_not_how_it_is_written(fabric, images, pbs, alice):
    """The key stands for the request as validated, with its defaults: a retry that spells out a default
    (teardown's reason "requested", ``admin_rights`` false, the caller as owner) or writes the same value
    differently (a MAC in capitals, the same instant in another time zone) is the same request."""
    client = token_for(pbs)
    payload = body(owner="alice")
    first = client.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="up")
    assert first.status_code == 201, first.content
    spelled_out = {**payload, "admin_rights": False, "job_id": "", "bastion_address": ""}
    spelled_out["nodes"] = [{**n, "mac": n["mac"].upper(), "address": None} for n in payload["nodes"]]
    again = client.post("/api/clusters/", spelled_out, format="json", HTTP_IDEMPOTENCY_KEY="up")
    assert (again.status_code, again.data["id"]) == (200, first.data["id"]), again.content
    alice_api = as_user(alice)  # the caller as owner, named or not
    mine = body(name="c2", nodes=[("m1", "brno2", "52:54:00:00:01:01")])
    made = alice_api.post("/api/clusters/", mine, format="json", HTTP_IDEMPOTENCY_KEY="mine")
    named = alice_api.post("/api/clusters/", {**mine, "owner": "alice"}, format="json", HTTP_IDEMPOTENCY_KEY="mine")
    assert (made.status_code, named.status_code, named.data["id"]) == (201, 200, made.data["id"]), named.content

    cid = first.data["id"]
    expiry = (timezone.now() + timedelta(hours=5)).replace(microsecond=0)
    utc = client.patch(
        f"/api/clusters/{cid}/", {"expires_at": expiry.isoformat()}, format="json", HTTP_IDEMPOTENCY_KEY="extend"
    )
    elsewhere = expiry.astimezone(timezone.get_fixed_timezone(120)).isoformat()
    assert expiry.tzinfo == UTC and elsewhere.endswith("+02:00")
    again = client.patch(
        f"/api/clusters/{cid}/", {"expires_at": elsewhere}, format="json", HTTP_IDEMPOTENCY_KEY="extend"
    )
    assert (utc.status_code, again.status_code) == (200, 200), again.content
    later = (expiry + timedelta(hours=1)).isoformat()  # another request under the same key: not a retry
    other = client.patch(f"/api/clusters/{cid}/", {"expires_at": later}, format="json", HTTP_IDEMPOTENCY_KEY="extend")
    assert other.status_code == 409, other.content

    down = client.post(f"/api/clusters/{cid}/teardown/", {}, format="json", HTTP_IDEMPOTENCY_KEY="down")
    again = client.post(
        f"/api/clusters/{cid}/teardown/", {"reason": "requested"}, format="json", HTTP_IDEMPOTENCY_KEY="down"
    )
    assert (down.status_code, again.status_code) == (202, 202), again.content
    other = client.post(
        f"/api/clusters/{cid}/teardown/", {"reason": "job ended"}, format="json", HTTP_IDEMPOTENCY_KEY="down"
    )
    assert other.status_code == 409 and "Idempotency-Key" in other.data  # another request after all
    assert IdempotencyKey.objects.filter(key="down").count() == 1


# --- acting for others ------------------------------------------------------------------------------------------


def test_a_caller_who_acts_only_for_itself_cannot_tell_which_users_exist(fabric, images, alice, bob):
    """Naming any other owner is the same 403 whether the user exists or not (it was a 400 "does not exist"
    for a name of no one); the caller's own name is fine; middleware still learns that a name is wrong."""
    for caller in (as_user(alice), token_for(alice, [TokenScope.CLUSTERS_WRITE])):
        answers = []
        for owner in ("bob", "ghost", "Alice", 7):
            r = caller.post("/api/clusters/", body(owner=owner), format="json")
            q = caller.get("/api/clusters/quota/", {"owner": owner})
            answers.append((r.status_code, r.data, q.status_code, q.data))
        assert len({json.dumps(a) for a in answers}) == 1, answers
        assert answers[0][0] == 403 and answers[0][1]["code"] == "permission_denied", answers[0]
        assert caller.get("/api/clusters/quota/", {"owner": "alice"}).status_code == 200
    assert nothing_allocated()
    r = as_user(alice).post("/api/clusters/", body(owner="alice"), format="json")
    assert r.status_code == 201 and r.data["owner"] == "alice", r.content
    middleware = token_for(bob, [TokenScope.CLUSTERS_MANAGE])
    r = middleware.post("/api/clusters/", body(name="c2", owner="ghost"), format="json")
    assert r.status_code == 400 and "owner" in r.data
    assert middleware.get("/api/clusters/quota/", {"owner": "ghost"}).status_code == 400


# --- progress ---------------------------------------------------------------------------------------------------


def test_progress_is_the_running_workflows(fabric, images, alice, monkeypatch):
    """Provisioning: the share of its steps done. A node change and a teardown: their step, 0 % until done.
    Settled (ready, failed, torn down): 100 %, no step — nothing is running."""
    from celery.canvas import _chain

    api = as_user(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    base = f"/api/clusters/{cid}"
    assert api.get(f"{base}/").data["progress"] == {"percent": 100, "current": None}
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)  # sent, not run yet
        n3 = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}
        r = api.post(f"{base}/nodes/", {"nodes": [n3]}, format="json")
        assert (r.data["state"], r.data["progress"]) == ("updating", {"percent": 0, "current": "nodes.add"})
        from clusters import tasks

        cluster = VirtualCluster.objects.get(pk=cid)
        tasks.update_done(cid, cluster.workflow_generation, cluster.steps.get(name="nodes.add").pk)
        r = api.post(f"{base}/teardown/", {}, format="json")
        assert (r.data["state"], r.data["progress"]) == ("tearing_down", {"percent": 0, "current": None})
        tasks.teardown_begin(cid, VirtualCluster.objects.get(pk=cid).workflow_generation)
        r = api.get(f"{base}/")
        assert (r.data["state"], r.data["progress"]) == ("tearing_down", {"percent": 0, "current": "teardown"})
        tasks.teardown_done(cid, VirtualCluster.objects.get(pk=cid).workflow_generation)
    r = api.get(f"{base}/")
    assert (r.data["state"], r.data["progress"]) == ("torn_down", {"percent": 100, "current": None})


def test_the_schema_says_what_progress_means(alice):
    raw = schema(as_user(alice))
    progress = raw["components"]["schemas"]["Cluster"]["properties"]["progress"]
    shape = component(raw, progress["allOf"][0]) if "allOf" in progress else component(raw, progress)
    assert set(shape["properties"]) == {"percent", "current"}
    text = progress.get("description", "") + shape.get("description", "")
    assert "tearing_down" in text and "settled" in text, text


# --- retry later or never ---------------------------------------------------------------------------------------


def test_a_change_while_the_cluster_is_busy_says_retry_later(fabric, images, pbs, alice, monkeypatch):
    """Updating (or still provisioning): 409 ``busy`` with ``Retry-After`` — the same request succeeds once it
    is ready, also with the same Idempotency-Key (nothing was recorded). Torn down: 409 ``conflict``, no
    Retry-After: it never will."""
    from celery.canvas import _chain

    from clusters import tasks

    client = token_for(pbs)
    cid = client.post("/api/clusters/", body(owner="alice"), format="json").data["id"]
    base = f"/api/clusters/{cid}"
    n3 = {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]}
    n4 = {"nodes": [{"name": "n4", "host": "prague2", "mac": "52:54:00:00:00:04"}]}
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)
        assert client.post(f"{base}/nodes/", n3, format="json").status_code == 202
        busy = client.post(f"{base}/nodes/", n4, format="json", HTTP_IDEMPOTENCY_KEY="add-n4")
    assert busy.status_code == 409, busy.content
    assert busy.data == {"detail": "cluster c1 is updating network; this needs it to be ready", "code": "busy"}
    assert 1 <= int(busy["Retry-After"]) <= 5
    cluster = VirtualCluster.objects.get(pk=cid)
    tasks.update_done(cid, cluster.workflow_generation, cluster.steps.get(name="nodes.add").pk)
    later = client.post(f"{base}/nodes/", n4, format="json", HTTP_IDEMPOTENCY_KEY="add-n4")
    assert later.status_code == 202, later.content

    assert client.post(f"{base}/teardown/", {}, format="json").status_code == 202
    never = client.post(f"{base}/nodes/", n4, format="json")
    assert never.status_code == 409 and never.data["code"] == "conflict", never.content
    assert "is torn down; this needs it to be ready" in never.data["detail"]
    assert "Retry-After" not in never


def test_a_change_while_a_failed_provisioning_is_rolled_back_says_never(fabric, images, pbs, alice, monkeypatch):
    """The provisioning failed and its rollback runs: the cluster is still provisioning, but ends FAILED, so a
    change is a 409 ``conflict`` without Retry-After, not ``busy`` for a scheduler to retry until the deadline."""
    from celery.canvas import _chain

    from clusters import services, workflows

    client = token_for(pbs)
    with monkeypatch.context() as m:  # sent, and no worker has taken it yet
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)
        cid = client.post("/api/clusters/", body(owner="alice"), format="json").data["id"]
    n3 = {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]}
    still = client.post(f"/api/clusters/{cid}/nodes/", n3, format="json")
    assert still.status_code == 409 and still.data["code"] == "busy" and "Retry-After" in still
    cluster = VirtualCluster.objects.get(pk=cid)
    with monkeypatch.context() as m:  # the rollback is sent, and waits for a worker
        m.setattr(workflows, "start_compensation", lambda *args: None)
        assert services.cluster_provisioning_failed(
            cluster_id=cid, generation=cluster.workflow_generation, reason="switch sw-brno: timeout"
        )
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.PROVISIONING
    never = client.post(f"/api/clusters/{cid}/nodes/", n3, format="json")
    assert never.status_code == 409 and never.data["code"] == "conflict", never.content
    assert "provisioning failed and is being rolled back" in never.data["detail"]
    assert "Retry-After" not in never

    # a failure reported while the cluster was still requested: its rollback makes it provisioning, so neither a
    # change (busy) nor the sweep that starts requested ones (a provisioning beside the rollback) takes it
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)
        two = body(name="c2", nodes=(("m1", "brno2", "52:54:00:00:00:21"),), owner="alice")
        other = client.post("/api/clusters/", two, format="json").data["id"]
    VirtualCluster.objects.filter(pk=other).update(state=ClusterState.REQUESTED)
    generation = VirtualCluster.objects.get(pk=other).workflow_generation
    with monkeypatch.context() as m:
        m.setattr(workflows, "start_compensation", lambda *args: None)
        assert services.cluster_provisioning_failed(cluster_id=other, generation=generation, reason="x: timeout")
    assert VirtualCluster.objects.get(pk=other).state == ClusterState.PROVISIONING
    assert services.clusters_resume_requested(older_than=timedelta(0)) == []
    again = client.post(f"/api/clusters/{other}/nodes/", n3, format="json")
    assert again.status_code == 409 and again.data["code"] == "conflict", again.content


def test_the_schema_tells_busy_from_conflict(alice):
    raw = schema(as_user(alice))
    for path, method in (
        ("/api/clusters/{id}/nodes/", "post"),
        ("/api/clusters/{id}/nodes/{node_id}/", "delete"),
        ("/api/clusters/{id}/nodes/{node_id}/migrate/", "post"),
        ("/api/clusters/{id}/nodes/{node_id}/migrated/", "post"),
        ("/api/clusters/{id}/nodes/{node_id}/migrate/cancel/", "post"),
        ("/api/clusters/{id}/connectivity/", "post"),
    ):
        text = raw["paths"][path][method]["responses"]["409"]["description"]
        assert "`busy`" in text and "`Retry-After`" in text and "`conflict`" in text, (path, text)


# --- the bastion is a closed cluster's --------------------------------------------------------------------------


def test_a_bastion_address_for_a_public_cluster_is_refused(fabric, images, alice):
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=29)
    api = as_user(alice)
    token, _ = token_create(user=alice, name="scheduler", scopes=[TokenScope.CLUSTERS_MANAGE])
    api.force_authenticate(alice, token=token)  # as the scheduler, who gives a bastion_address
    public = body(image="debian-12", bastion_address="10.0.0.254/24")
    r = api.post("/api/clusters/", public, format="json")
    assert r.status_code == 400, r.content
    assert "only a closed cluster has an SSH bastion" in r.data["bastion_address"][0], r.data
    assert nothing_allocated()
    r = api.post("/api/clusters/", {**public, "connectivity": "closed"}, format="json")
    assert r.status_code == 201 and r.data["bastion_address"] == "10.0.0.254/24", r.content

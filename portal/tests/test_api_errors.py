"""Every API error is JSON with a machine-readable ``code``, whichever layer refuses the request (a route, DRF,
Django's request parsing): what a scheduler's client can branch on."""

from __future__ import annotations

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def scheduler(alice):
    _, secret = token_create(user=alice, name="PBS", scopes=[TokenScope.CLUSTERS_MANAGE, TokenScope.NETWORK_READ])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/clusters.json"),
        ("get", "/api/clusters/events.json"),
        ("post", "/api/clusters/1/teardown.json"),
        ("patch", "/api/clusters/1.json"),
        ("get", "/api/network/sites.json"),
    ],
)
def test_format_suffix_paths_are_404_not_500(scheduler, method, path):
    response = getattr(scheduler, method)(path, {}, format="json")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found.", "code": "not_found"}


def test_drf_errors_carry_a_code_and_do_not_name_models(scheduler):
    anonymous = APIClient().get("/api/clusters/")
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == "not_authenticated"
    missing = scheduler.get("/api/clusters/999999/")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not found.", "code": "not_found"})
    put = scheduler.put("/api/clusters/999999/", {}, format="json")
    assert put.status_code == 405 and put.json()["code"] == "method_not_allowed"
    text = scheduler.post("/api/clusters/", "x", content_type="text/plain")
    assert text.status_code == 415 and text.json()["code"] == "unsupported_media_type"
    invalid = scheduler.post("/api/clusters/", {"name": ""}, format="json")
    assert invalid.status_code == 400 and "name" in invalid.json()  # field-level messages, as before


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
def test_a_body_over_the_limit_is_413(scheduler):
    response = scheduler.post("/api/clusters/", {"name": "c1", "job_id": "x" * 2000}, format="json")
    assert response.status_code == 413
    assert response.json() == {"detail": "the request body is larger than 1000 bytes", "code": "too_large"}

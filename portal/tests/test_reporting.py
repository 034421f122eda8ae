"""Error reports never show a private key (portal.reporting.SecretsFilter), not even DEBUG's error page."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import sys

import pytest
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from access.tests.fixtures import cluster, gateway


def _report_of_a_failed_profile(alice, cluster, monkeypatch, rf, reporter_filter=None) -> tuple[str, str]:
    """The DEBUG error page (HTML and text) of a profile whose rendering failed after its key was made."""
    from access import openvpn, services

    def broken(**kwargs):
        rendered = f"<key>\n{kwargs['key_pem'].decode()}</key>"  # (what a half-rendered profile holds)
        raise RuntimeError(f"the template broke after {len(rendered)} characters")

    monkeypatch.setattr(openvpn, "render_client_profile", broken)
    with pytest.raises(RuntimeError) as info:
        services.vpn_profile_issue(user=alice, clusters=[cluster])
    request = rf.get("/access/vpn-profile/")
    if reporter_filter is not None:
        request.exception_reporter_filter = reporter_filter  # (Django asks the request first)
    reporter = ExceptionReporter(request, info.type, info.value, info.tb)
    return reporter.get_traceback_html(), reporter.get_traceback_text()


@pytest.mark.django_db
def test_the_debug_page_of_a_failed_profile_shows_no_private_key(alice, cluster, gateway, monkeypatch, rf, settings):
    settings.DEBUG = True
    html, text = _report_of_a_failed_profile(alice, cluster, monkeypatch, rf)
    assert "the template broke after" in html and "the template broke after" in text
    assert "PRIVATE KEY" not in html and "PRIVATE KEY" not in text
    assert "username" in html  # the other variables are still there to debug with
    assert "********" in html


@pytest.mark.django_db
def test_without_the_filter_it_would(alice, cluster, gateway, monkeypatch, rf, settings):
    """(What the test above guards against: Django's own filter hides nothing when DEBUG is on.)"""
    settings.DEBUG = True
    html, _text = _report_of_a_failed_profile(alice, cluster, monkeypatch, rf, SafeExceptionReporterFilter())
    assert "PRIVATE KEY" in html


def test_urls_in_settings_and_the_environment_are_hidden_in_error_reports():
    """EMAIL_URL, DATABASE_URL, a broker's URL may hold a password: hidden, as Django hides its own secrets (the
    development server copies the environment into a request's META, which the DEBUG page shows)."""
    from portal.reporting import SecretsFilter

    report = SecretsFilter()
    for name in ("EMAIL_URL", "DATABASE_URL", "CELERY_BROKER_URL", "LDAP_SERVER_URI", "CELERY_RESULT_BACKEND"):
        assert (
            report.cleanse_setting(name, "smtp+starttls://user:hunter2@mail.example.org") == report.cleansed_substitute
        )
    assert report.cleanse_setting("DEBUG", True) is True
    caches = report.cleanse_setting("CACHES", {"default": {"BACKEND": "redis", "LOCATION": "redis://:pw@cache/1"}})
    assert caches["default"]["LOCATION"] == report.cleansed_substitute


def test_the_authorization_header_is_hidden_in_error_reports(rf):
    """A request's bearer token (``Authorization: Bearer vc_…``) is in its META: hidden, as Django's own filter
    hides it (its ``AUTH``)."""
    from portal.reporting import SecretsFilter

    request = rf.get("/api/clusters/", HTTP_AUTHORIZATION="Bearer vc_secret-token-value")
    meta = SecretsFilter().get_safe_request_meta(request)
    assert meta["HTTP_AUTHORIZATION"] == SecretsFilter.cleansed_substitute

"""``manage.py check --deploy``: settings that work on one machine and nowhere else."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def one_machine_only(app_configs=None, **kwargs) -> list[Warning]:
    """The embedded defaults — SQLite, the filesystem broker — hold only while web, workers and beat run on one
    machine: a worker elsewhere would have a database and a broker of its own (and device locks that are file
    locks on its own disk). An environment file that misses ``DATABASE_URL`` or ``CELERY_BROKER_URL`` on one
    machine of several starts without complaint; the deploy check says so."""
    return (
        single_machine_settings(
            settings.DATABASES["default"]["ENGINE"],
            str(settings.CELERY_BROKER_URL),
            settings.CACHES["default"]["BACKEND"],
        )
        + site_url_problems(str(settings.SITE_URL), list(settings.ALLOWED_HOSTS))
        + mail_problems(str(settings.EMAIL_BACKEND), bool(settings.EMAIL_ENABLED))
    )


def mail_problems(backend: str, enabled: bool) -> list[Warning]:
    """``EMAIL_URL=console://`` (the demo's) in production: the users' mail goes to the log."""
    if enabled and backend.endswith("console.EmailBackend"):
        return [
            Warning(
                "EMAIL_URL is console://: the mail to users (expiring clusters, VPN profiles, failing webhooks) is "
                "printed to the log, never sent",
                hint="set EMAIL_URL=smtp+starttls://user:password@relay.example.org (or empty: no mail)",
                id="portal.W007",
            )
        ]
    return []


def site_url_problems(site_url: str, allowed_hosts: list[str] | None = None) -> list[Warning]:
    """``SITE_URL`` is where the access gateways pull from (``gateway config --dir`` writes it into their units)
    and what the e-mail links to: left at its loopback default, a gateway elsewhere pulls from itself — failing,
    or handing its pull token to whatever listens on its own port 8000 — and a mail's link points nowhere."""
    from urllib.parse import urlsplit

    host = urlsplit(site_url).hostname or ""
    if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
        return [
            Warning(
                f"SITE_URL is {site_url}: the access gateways' pulls (gateway config --dir) and the e-mail's links "
                "would point at the machine they run on",
                hint="set SITE_URL=https://portal.example.org, the address users and gateways reach the portal at",
                id="portal.W004",
            )
        ]
    from django.http.request import validate_host

    from access.gateway.outgoing import token_url_problem

    problems = []
    why = token_url_problem(site_url)
    if why:
        problems.append(
            Warning(
                f"SITE_URL is {site_url}: the access gateways refuse to pull from it ({why}), and after "
                "GATEWAY_STATE_MAX_AGE they refuse every user",
                hint="set SITE_URL=https://portal.example.org, behind a TLS-terminating proxy",
                id="portal.W005",
            )
        )
    parts = urlsplit(site_url)
    name = (parts.hostname or "").rstrip(".")  # (Django strips a trailing dot from the request's host too)
    host = f"[{name}]" if ":" in name else name  # (an IPv6 literal as Django has it)
    if allowed_hosts is not None and host and not validate_host(host, allowed_hosts):
        problems.append(
            Warning(
                f"SITE_URL's host {host} is not in ALLOWED_HOSTS: the gateways' pulls and the e-mail's links "
                "would be answered 400",
                hint=f"add {parts.hostname} to ALLOWED_HOSTS",
                id="portal.W006",
            )
        )
    return problems


def single_machine_settings(engine: str, broker: str, cache: str = "") -> list[Warning]:
    problems = []
    if engine.endswith("sqlite3"):
        problems.append(
            Warning(
                "DATABASE_URL is not set: the portal runs on SQLite, for one machine only (web, workers and beat on "
                "it; device locks are file locks there)",
                hint="set DATABASE_URL=postgres://… on every machine of the portal",
                id="portal.W001",
            )
        )
    if broker.startswith("filesystem://"):
        problems.append(
            Warning(
                "CELERY_BROKER_URL is not set: the broker is a folder under DATA_DIR, for one machine only (a worker "
                "elsewhere never gets a task), and a worker killed mid-task (out of memory, SIGKILL, a reboot) loses "
                "the tasks it had taken: that transport deletes a message as it hands it out, so acks_late cannot "
                "give it back (the sweeps fail or retry the work after CLUSTER_PROVISION_TIMEOUT)",
                hint="set CELERY_BROKER_URL=redis://… (or amqp://…) on every machine of the portal",
                id="portal.W002",
            )
        )
    elif cache.endswith("LocMemCache"):  # (a broker other than Redis: the cache does not default to it)
        problems.append(
            Warning(
                "the cache is each process's own memory (CACHE_URL not set, or locmem://): the API's rate limits and "
                "the status page's counters are each web process's "
                "own (several processes, or machines, multiply every limit)",
                hint="set CACHE_URL=redis://… on every machine of the portal",
                id="portal.W003",
            )
        )
    return problems

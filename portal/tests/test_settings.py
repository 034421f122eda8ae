"""Settings are read strictly from the environment: each case imports portal.settings in a fresh Python with
exactly the given environment, as a real start-up would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRETS_KEY = "1b8NqwoUqaIVz7W6XI-MVmQ5IT9b4u1ZlG5x8c3mvX0="
PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "k7Hq2vX9pLm4Rt8Wz3Nc6Bf1Jd5Gs0Ya-test-only-EuTiOpAsDf",
    "SECRETS_KEY": SECRETS_KEY,
    "ACCESS_CA_PASSPHRASE": "a-long-random-ca-passphrase",
    "ALLOWED_HOSTS": "portal.example.org",
}
PROBE = """
import json
from django.conf import settings
import django
django.setup()
print(json.dumps({
    "DEBUG": settings.DEBUG,
    "ALLOWED_HOSTS": settings.ALLOWED_HOSTS,
    "DB_ENGINE": settings.DATABASES["default"]["ENGINE"],
    "DB_NAME": str(settings.DATABASES["default"]["NAME"]),
    "BROKER": settings.CELERY_BROKER_URL,
    "BROKER_TRANSPORT": (lambda cls: f"{cls.__module__}:{cls.__qualname__}")(
        __import__("kombu").Connection(settings.CELERY_BROKER_URL).get_transport_cls()
    ),
    "BACKENDS": settings.AUTHENTICATION_BACKENDS,
    "LDAP_URI": getattr(settings, "AUTH_LDAP_SERVER_URI", None),
    "LDAP_FLAGS": getattr(settings, "AUTH_LDAP_USER_FLAGS_BY_GROUP", None),
    "DEVICE_RETRY_MAX": settings.DEVICE_RETRY_MAX,
    "THROTTLE": settings.API_THROTTLE_RATES,
    "LOG_LEVEL": settings.LOG_LEVEL,
    "BEAT": {name: [entry["task"], entry["schedule"]] for name, entry in settings.CELERY_BEAT_SCHEDULE.items()
             if isinstance(entry["schedule"], (int, float))},
    "BEAT_QUEUES": sorted({str(e.get("options", {}).get("queue")) for e in settings.CELERY_BEAT_SCHEDULE.values()}),
}))
"""


def load_settings(tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    clean.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DATA_DIR": str(tmp_path), **env})
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


def loaded(tmp_path, **env) -> dict:
    import json

    result = load_settings(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def refused(tmp_path, **env) -> str:
    result = load_settings(tmp_path, **env)
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr
    return result.stderr[result.stderr.index("ImproperlyConfigured") :]


def test_api_throttle_rates_set_empty_turns_the_limits_off(tmp_path):
    """The README says ``API_THROTTLE_RATES=""`` means no limits: it gave the defaults (empty read as unset)."""
    assert loaded(tmp_path, DEBUG="true", API_THROTTLE_RATES="")["THROTTLE"] == {}
    assert loaded(tmp_path, DEBUG="true")["THROTTLE"]["credentials"] == "60/min"


def test_defaults_run_with_nothing_installed(tmp_path):
    values = loaded(tmp_path, DEBUG="true")
    assert values["DB_ENGINE"] == "django.db.backends.sqlite3"
    assert values["DB_NAME"] == str(tmp_path / "portal.sqlite3")
    assert values["BROKER"].startswith("filesystem://")
    assert values["BROKER_TRANSPORT"] == "portal.broker:Transport"  # whole message files (portal/broker.py)
    assert values["BACKENDS"] == ["portal.backends.LocalAccountBackend"]
    assert values["LDAP_URI"] is None
    assert values["BEAT"]["access-sweep-credentials"] == ["access.sweep_credentials", 300]
    assert "portal-ldap-sync" not in values["BEAT"]  # no directory, nothing to follow


def test_the_sweeps_go_to_a_queue_of_their_own_when_one_is_named(tmp_path):
    """Beat's sweeps share the central worker's queue by default; ``PERIODIC_QUEUE`` sends every one of them to a
    queue a worker of its own consumes (a burst of device tasks never makes their messages expire)."""
    assert loaded(tmp_path, DEBUG="true")["BEAT_QUEUES"] == ["None"]  # (the default queue)
    assert loaded(tmp_path, DEBUG="true", PERIODIC_QUEUE="periodic")["BEAT_QUEUES"] == ["periodic"]
    assert "PERIODIC_QUEUE='no way' must be a queue name" in refused(tmp_path, DEBUG="true", PERIODIC_QUEUE="no way")


def test_secret_key_is_required_when_debug_is_off(tmp_path):
    message = refused(tmp_path, **{**PRODUCTION, "SECRET_KEY": ""})
    assert "SECRET_KEY must be set when DEBUG is off" in message
    message = refused(tmp_path, DEBUG="false", SECRETS_KEY=SECRETS_KEY)
    assert "SECRET_KEY" in message


def test_secrets_key_is_required_when_debug_is_off(tmp_path):
    assert "SECRETS_KEY must be set" in refused(tmp_path, **{**PRODUCTION, "SECRETS_KEY": ""})


def test_production_values(tmp_path):
    values = loaded(
        tmp_path,
        **PRODUCTION,
        DATABASE_URL="postgres://portal@db.example.org:5432/portal",
        CELERY_BROKER_URL="redis://redis.example.org:6379/0",
    )
    assert values["DEBUG"] is False and values["ALLOWED_HOSTS"] == ["portal.example.org"]
    assert values["DB_ENGINE"] == "django.db.backends.postgresql" and values["DB_NAME"] == "portal"
    assert values["BROKER"] == "redis://redis.example.org:6379/0"


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean"),
        ("SECURE_SSL_REDIRECT", "yes please", "SECURE_SSL_REDIRECT='yes please' is not a boolean"),
        ("DEVICE_RETRY_MAX", "three", "DEVICE_RETRY_MAX='three' is not an integer"),
        ("DEVICE_RETRY_MAX", "-1", "DEVICE_RETRY_MAX=-1 is below the minimum 0"),
        ("DEVICE_TIMEOUT", "soon", "DEVICE_TIMEOUT='soon' is not a number"),
        ("DATABASE_URL", "mongo://db/x", "DATABASE_URL (mongo://…) names an unsupported database scheme"),
        ("DATABASE_URL", "nonsense", "DATABASE_URL (no scheme://…)"),
        ("LDAP_SERVER_URI", "http://ldap.example.org", "LDAP_SERVER_URI='http://ldap.example.org' must start with"),
        ("LDAP_TIMEOUT", "fast", "LDAP_TIMEOUT='fast' is not a number"),
        ("CLUSTER_WAIT_MAX", "nan", "CLUSTER_WAIT_MAX='nan' is not a finite number"),  # nan passes every bound
        ("DEVICE_TIMEOUT", "inf", "DEVICE_TIMEOUT='inf' is not a finite number"),
        ("WEBHOOK_TIMEOUT", "1e999", "WEBHOOK_TIMEOUT='1e999' is not a finite number"),
        ("LDAP_SYNC_DEACTIVATE_MAX", "2", "LDAP_SYNC_DEACTIVATE_MAX=2.0 is above the maximum 1.0"),
        ("CELERY_TASK_SOFT_TIME_LIMIT", "180", "CELERY_TASK_SOFT_TIME_LIMIT=180 must be below CELERY_TASK_TIME_LIMIT"),
        ("GATEWAY_STATE_MAX_AGE", "60", "GATEWAY_STATE_MAX_AGE=60 is below the minimum 180"),  # 3 pulls at least
        # a default the bounds refuse: every create without a lifetime was refused
        ("CLUSTER_MIN_LIFETIME", "100000", "CLUSTER_DEFAULT_LIFETIME (86400 s) must lie between CLUSTER_MIN_LIFETIME"),
        ("CLUSTER_MAX_LIFETIME", "3600", "CLUSTER_DEFAULT_LIFETIME (86400 s) must lie between"),
        ("DEVICE_TIMEOUT", "120", "DEVICE_TIMEOUT=120 must be below CELERY_TASK_SOFT_TIME_LIMIT=120"),
        ("LDAP_USER_UUID_ATTR", "entry UUID", "LDAP_USER_UUID_ATTR='entry UUID' must be an attribute name"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' must be one of: DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("SECRETS_KEY", "not-a-fernet-key", "SECRETS_KEY is not a valid Fernet key"),  # not at the first secret
        ("CELERY_BROKER_URL", "nonsense", "CELERY_BROKER_URL is not a URL (scheme://…)"),  # kombu: a host name
        ("CELERY_BROKER_URL", "mqtt://broker", "CELERY_BROKER_URL names the unknown transport 'mqtt'"),
        ("CELERY_BROKER_URL", "redis://redis:port/0", "CELERY_BROKER_URL (redis://…) is not a valid URL"),
    ],
)
def test_malformed_value_names_the_variable(tmp_path, name, value, expected):
    env = {**PRODUCTION, name: value}
    if name.startswith("LDAP_"):
        env.update(LDAP_USER_BASE="ou=people,dc=x", LDAP_GROUP_BASE="ou=groups,dc=x")
        env.setdefault("LDAP_SERVER_URI", "ldap://127.0.0.1:389")
    assert expected in refused(tmp_path, **env)


def test_a_malformed_key_or_broker_url_is_not_repeated_in_the_error(tmp_path):
    """Start-up errors go to logs and terminals: a key, or a broker URL's password, is named, never shown."""
    key = SECRETS_KEY[:-2]  # a real key cut short
    assert key not in refused(tmp_path, **{**PRODUCTION, "SECRETS_KEY": key})
    url = "amqp://portal:s3cret-pw@rabbit:amqp//"
    assert "s3cret-pw" not in refused(tmp_path, **{**PRODUCTION, "CELERY_BROKER_URL": url})
    # kombu's own message quotes what it took for the port: the password up to a "/" in it
    for url in ("redis://:Xy7/Secret+Pw@redis:6379/0", "amqp://portal:s3cr#et@rabbit//"):
        message = refused(tmp_path, **{**PRODUCTION, "CELERY_BROKER_URL": url})
        assert "Xy7" not in message and "s3cr" not in message and "%-encoded" in message, message


def test_a_url_printed_shows_no_password():
    from portal.env import without_password

    assert without_password("redis://:Xy7/Secret@host:6379/0") == "redis://:***@host:6379/0"
    assert (
        without_password("amqp://u:p@a//;amqp://guest@b//;filesystem://")
        == "amqp://u:***@a//;amqp://guest@b//;filesystem://"
    )
    assert without_password("redis://127.0.0.1:6379/15") == "redis://127.0.0.1:6379/15"


def test_log_level_in_any_case(tmp_path):
    assert loaded(tmp_path, **PRODUCTION, LOG_LEVEL="debug")["LOG_LEVEL"] == "DEBUG"  # logging knows only DEBUG


def test_ldap_needs_its_bases_and_a_known_group_type(tmp_path):
    base = {**PRODUCTION, "LDAP_SERVER_URI": "ldap://127.0.0.1:389"}
    assert "LDAP_USER_BASE must be set" in refused(tmp_path, **base)
    base.update(LDAP_USER_BASE="ou=people,dc=x", LDAP_GROUP_BASE="ou=groups,dc=x")
    assert "LDAP_GROUP_TYPE='ad' must be one of: posix, groupofnames" in refused(tmp_path, **base, LDAP_GROUP_TYPE="ad")
    # a filter that does not name the user finds everyone: every login and every sync took the first entry
    for bad in ("(uid=%s)", "(objectClass=person)", "uid=%(user)s", "(uid=%(user)s", "(uid=%(nobody)s)"):
        assert "must be an LDAP filter that names the user as %(user)s" in refused(
            tmp_path, **base, LDAP_USER_FILTER=bad
        ), bad


def test_ldap_from_the_environment(tmp_path):
    values = loaded(
        tmp_path,
        **PRODUCTION,
        LDAP_SERVER_URI="ldaps://ldap.example.org",
        LDAP_USER_BASE="ou=people,dc=x",
        LDAP_GROUP_BASE="ou=groups,dc=x",
        LDAP_SUPERUSER_GROUP="cn=admins,ou=groups,dc=x",
        LDAP_SYNC_INTERVAL="120",
    )
    assert values["LDAP_URI"] == "ldaps://ldap.example.org"
    assert values["BEAT"]["portal-ldap-sync"] == ["portal.ldap_sync", 120]  # accounts follow it without a login
    assert values["BACKENDS"][0] == "portal.auth.ActiveLDAPBackend"
    assert values["BACKENDS"][-1] == "portal.backends.LocalAccountBackend"  # break-glass local accounts
    assert values["LDAP_FLAGS"] == {
        "is_superuser": "cn=admins,ou=groups,dc=x",
        "is_staff": "cn=admins,ou=groups,dc=x",
    }


def test_build_commands_run_without_production_keys(tmp_path):
    """makemigrations (CI, the pre-stop check) needs no secrets; serving commands still refuse to start."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="portal.settings")
    manage = [sys.executable, "manage.py"]
    built = subprocess.run(
        [*manage, "makemigrations", "--check", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    served = subprocess.run([*manage, "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert served.returncode != 0 and "SECRET_KEY must be set" in served.stderr


def test_tests_use_the_redis_database_of_redis_url(tmp_path):
    """Each pytest-xdist worker counts down from the database REDIS_URL names (a worker test flushes it), not
    from 15 whatever REDIS_URL said: another user of the same Redis may own 15."""
    env = {"DJANGO_SETTINGS_MODULE": "portal.settings_test", "REDIS_URL": "redis://127.0.0.1:6379/13"}
    values = loaded(tmp_path, **env)
    assert values["BROKER"] == "redis://127.0.0.1:6379/13"
    assert values["BROKER_TRANSPORT"] == "kombu.transport.redis:Transport"  # the embedded broker's is by scheme
    assert loaded(tmp_path, **env, PYTEST_XDIST_WORKER="gw2")["BROKER"] == "redis://127.0.0.1:6379/11"


def test_a_webhook_network_that_is_no_network_is_refused_at_start(tmp_path):
    """Read only when a webhook was checked, a bad entry made the check fail open (any address registered) and
    every delivery fail."""
    env = {**PRODUCTION, "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,10.0.0.0/33"}
    assert "WEBHOOK_ALLOWED_NETWORKS: '10.0.0.0/33' is not an IP address or network" in refused(tmp_path, **env)
    assert loaded(tmp_path, **{**PRODUCTION, "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8, fd00::/8"})


def test_an_ldap_sync_budget_beyond_the_tasks_soft_limit_is_refused(tmp_path):
    """A sync's deactivations come after its budget: a budget past the task's soft limit cut every long run
    before them."""
    directory = {
        "LDAP_SERVER_URI": "ldaps://ldap.example.org",
        "LDAP_USER_BASE": "ou=people,dc=x",
        "LDAP_GROUP_BASE": "ou=groups,dc=x",
    }
    env = {**PRODUCTION, **directory, "LDAP_SYNC_TIME_BUDGET": "150"}
    assert "LDAP_SYNC_TIME_BUDGET=150 must be below CELERY_TASK_SOFT_TIME_LIMIT=120" in refused(tmp_path, **env)
    assert loaded(tmp_path, **{**PRODUCTION, "LDAP_SYNC_TIME_BUDGET": "150"})  # no directory: no sync to cut


def test_a_visibility_timeout_below_the_task_time_limit_is_refused(tmp_path):
    """Redis hands a task that runs longer than the visibility timeout to another worker: it runs twice."""
    env = {**PRODUCTION, "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "CELERY_VISIBILITY_TIMEOUT": "60"}
    assert "CELERY_VISIBILITY_TIMEOUT=60 must be above CELERY_TASK_TIME_LIMIT=180" in refused(tmp_path, **env)


def test_a_provisioning_deadline_within_the_visibility_timeout_is_refused(tmp_path):
    """A worker killed mid-provisioning (OOM, a reboot, a deploy's SIGKILL): its device task comes back to another
    worker only after the visibility timeout. With the deadline at or below it (both were 600 s by default), the
    provisioning was given up — rolled back, FAILED — just as the task came back: acks_late never saved a job."""
    env = {**PRODUCTION, "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    assert loaded(tmp_path, **env)["DEBUG"] is False  # the defaults: 300 s visibility, a 600 s deadline
    problem = refused(tmp_path, **env, CLUSTER_PROVISION_TIMEOUT="300")
    assert "CLUSTER_PROVISION_TIMEOUT=300 must be above CELERY_VISIBILITY_TIMEOUT=300" in problem


def test_a_directory_reached_in_clear_is_refused_in_production(tmp_path):
    """The portal binds to LDAP as the user: over plain ldap:// every password crosses the network in clear.
    Without DEBUG that needs StartTLS, ldaps://, a directory on this machine, or an explicit opt-in."""
    ldap_env = {"LDAP_USER_BASE": "ou=people,dc=x", "LDAP_GROUP_BASE": "ou=groups,dc=x"}
    env = {**PRODUCTION, **ldap_env, "LDAP_SERVER_URI": "ldap://ldap.example.org"}
    assert "sends the users' passwords in clear" in refused(tmp_path, **env)
    for listed in (
        "ldap://127.0.0.1 ldap://ldap.example.org",
        "ldaps://ldap1.example.org ldap://ldap2.example.org",
        "ldaps://ldap1.example.org,ldap://ldap2.example.org",  # (libldap takes commas too)
        "ldaps://ldap1.example.org LDAP://ldap2.example.org",  # (and the scheme in any case)
    ):
        mixed = {**env, "LDAP_SERVER_URI": listed}  # a failover list: one of them plain and remote
        assert "sends the users' passwords in clear" in refused(tmp_path, **mixed), listed
    for fine in (
        {"LDAP_START_TLS": "true"},
        {"LDAP_SERVER_URI": "ldaps://ldap.example.org"},
        {"LDAP_SERVER_URI": "ldap://127.0.0.1:3389"},
        {"LDAP_ALLOW_PLAINTEXT": "true"},
    ):
        assert loaded(tmp_path, **{**env, **fine})["DEBUG"] is False, fine
    assert loaded(tmp_path, **{**env, "DEBUG": "true"})["DEBUG"] is True  # (the demo's throwaway directory)


def test_every_periodic_run_that_waited_a_whole_interval_is_dropped(settings):
    """A run still queued after its interval expires (the next is due anyway): a central worker down for an hour
    found some 800 stale runs of the webhooks, the expiry and the sweeps ahead of the workflows."""
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert float(entry["schedule"]) <= entry["options"]["expires"] <= max(float(entry["schedule"]), 60), name


def _environment_variables() -> set[str]:
    """The names the settings read from the environment: the first argument of every ``env_*`` call in
    portal/settings.py and portal/auth.py (the LDAP settings)."""
    import ast

    trees = [ast.parse((ROOT / "portal" / name).read_text()) for name in ("settings.py", "auth.py")]
    return {
        node.args[0].value
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id.startswith("env_")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def _readme_configuration() -> tuple[str, set[str]]:
    """The README's Configuration section, and the variables its table's first column names."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return section, {name for cell in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}


def test_readme_documents_every_setting_an_operator_can_set():
    section, _table = _readme_configuration()
    variables = _environment_variables()
    assert len(variables) > 50  # the parse found the settings
    assert sorted(v for v in variables if f"`{v}`" not in section) == []


def test_readme_configuration_table_names_only_real_settings():
    _section, table = _readme_configuration()
    lab = {"VIRTCLOUD_LAB_DIR"}  # read by the lab itself (network/lab/fabric.py), not a portal setting
    assert sorted(table - _environment_variables() - lab) == []


def test_the_deploy_check_says_when_a_machine_would_run_on_its_own(settings):
    """An environment file that misses DATABASE_URL or CELERY_BROKER_URL on one machine of several started without
    complaint, on a private SQLite file and a private broker folder: ``check --deploy`` says so."""
    from portal import checks

    found = checks.single_machine_settings("django.db.backends.sqlite3", "filesystem://localhost/")
    assert [w.id for w in found] == ["portal.W001", "portal.W002"]
    assert checks.single_machine_settings("django.db.backends.postgresql", "redis://redis.example.org:6379/0") == []
    # a RabbitMQ broker: the cache does not default to Redis, and each web process's memory multiplies the limits
    locmem, redis = "django.core.cache.backends.locmem.LocMemCache", "django.core.cache.backends.redis.RedisCache"
    postgres, amqp = "django.db.backends.postgresql", "amqp://portal:secret@mq.example.org//"
    assert [w.id for w in checks.single_machine_settings(postgres, amqp, locmem)] == ["portal.W003"]
    assert checks.single_machine_settings(postgres, amqp, redis) == []
    assert settings.CELERY_BROKER_URL.startswith("redis://")  # (the tests': PostgreSQL and Redis, a locmem cache)
    assert [w.id for w in checks.one_machine_only()] == ["portal.W003", "portal.W004"]  # (SITE_URL: the default)
    # SITE_URL at its loopback default: the gateways' pulls and the mails' links would point at their own machine
    assert [w.id for w in checks.site_url_problems("http://127.0.0.1:8000")] == ["portal.W004"]
    assert [w.id for w in checks.site_url_problems("http://localhost")] == ["portal.W004"]
    assert checks.site_url_problems("https://portal.example.org") == []
    # not https: the gateways refuse to send their pull token to it; a host ALLOWED_HOSTS does not take: 400s
    assert [w.id for w in checks.site_url_problems("http://portal.example.org")] == ["portal.W005"]
    assert [w.id for w in checks.site_url_problems("portal.example.org")] == ["portal.W005"]
    hosts = ["portal.example.org"]
    assert checks.site_url_problems("https://portal.example.org", hosts) == []
    assert checks.site_url_problems("https://Portal.example.org:8443/", [".example.org"]) == []
    assert [w.id for w in checks.site_url_problems("https://vc.example.net", hosts)] == ["portal.W006"]
    assert checks.site_url_problems("https://[2001:db8::5]/", ["[2001:db8::5]"]) == []
    assert checks.site_url_problems("https://portal.example.org./", hosts) == []
    # the demo's console mailer in production: the users' mail goes to the log
    console = "django.core.mail.backends.console.EmailBackend"
    assert [w.id for w in checks.mail_problems(console, True)] == ["portal.W007"]
    assert checks.mail_problems(console, False) == []  # (no mail at all: nothing printed either)
    assert checks.mail_problems("django.core.mail.backends.smtp.EmailBackend", True) == []


def test_only_databases_the_portal_runs_on_are_accepted(tmp_path):
    """Claims use UPDATE … RETURNING and device locks PostgreSQL's advisory locks (SQLite: file locks): a MySQL
    URL, which django-environ would take, is refused at start-up instead of failing at the first cluster."""
    problem = refused(tmp_path, **PRODUCTION, DATABASE_URL="mysql://portal:S3cret@db/portal")
    assert "names an unsupported database scheme (use one of: postgres, postgresql, sqlite)" in problem
    assert "S3cret" not in problem  # (a start-up error lands in logs: the URL's password never in it)


def test_a_host_agent_holds_none_of_the_portals_keys(tmp_path):
    """PORTAL_ROLE=agent (a worker on a hypervisor): starts without SECRET_KEY, SECRETS_KEY and the CA passphrase,
    and refuses to start with any of them — a VM escaping onto the hypervisor must not find the keys to the CA's
    private keys and the switch passwords. (Its convergence through a real agent: test_workflows.)"""
    agent = {
        "DEBUG": "false",
        "ALLOWED_HOSTS": "portal.example.org",
        "PORTAL_ROLE": "agent",
        "DATABASE_URL": "postgres://agent@db.example.org/portal",
        "CELERY_BROKER_URL": "redis://redis.example.org:6379/0",
    }
    assert loaded(tmp_path, **agent)["DEBUG"] is False
    for key in ("SECRET_KEY", "SECRETS_KEY", "ACCESS_CA_PASSPHRASE"):
        problem = refused(tmp_path, **agent, **{key: PRODUCTION.get(key) or SECRETS_KEY})
        assert f"PORTAL_ROLE=agent: {key} must not be set on a host agent" in problem

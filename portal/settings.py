"""Settings for the VirtCloud portal, read from the environment (see README "Configuration").

Defaults run with nothing installed: SQLite under DATA_DIR and an embedded filesystem Celery broker.
Production values (PostgreSQL, Redis/RabbitMQ, LDAP, keys) come only from the environment. A variable that
is present but malformed raises ImproperlyConfigured naming it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import secrets
import sys
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from network.schedules import beat_schedule
from portal import auth as ldap_auth
from portal import mail
from portal.env import (
    env_bool,
    env_broker_url,
    env_choice,
    env_db,
    env_fernet_key,
    env_float,
    env_int,
    env_list,
    env_networks,
    env_str,
    env_str_or_empty,
)
from portal.schedules import every

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
# Build-time commands never serve requests nor touch secrets: they run without production keys.
BUILD_ONLY = (
    len(sys.argv) > 1 and sys.argv[0].endswith("manage.py") and sys.argv[1] in ("makemigrations", "collectstatic")
)
# What this process is: "portal" (web, the central and site workers, beat) or "agent" (a worker on a hypervisor
# that converges its own host from its agent_queue). A hypervisor runs users' VMs: an agent holds none of the
# portal's keys — no SECRET_KEY (a random one of its own: it signs nothing), no SECRETS_KEY (switch passwords,
# the CA's keys), no CA passphrase — so that a VM escaping onto it does not take the CA or the switches.
PORTAL_ROLE = env_choice("PORTAL_ROLE", "portal", ["portal", "agent"])
AGENT = PORTAL_ROLE == "agent"
if AGENT:
    held = [name for name in ("SECRET_KEY", "SECRETS_KEY", "ACCESS_CA_PASSPHRASE") if env_str(name, "")]
    if held:
        raise ImproperlyConfigured(
            f"PORTAL_ROLE=agent: {', '.join(held)} must not be set on a host agent (it needs none of the portal's "
            "keys, and a hypervisor that holds them gives them to any VM that escapes onto it)"
        )
SECRET_KEY = env_str("SECRET_KEY") or (secrets.token_urlsafe(48) if AGENT else "")
if not SECRET_KEY:
    if not DEBUG and not BUILD_ONLY:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (e.g. SECRET_KEY=$(openssl rand -hex 32))")
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG-on"

# Fernet key for secrets at rest (switch credentials, CA keys). Derived from SECRET_KEY only in DEBUG.
SECRETS_KEY = env_fernet_key("SECRETS_KEY")
if not SECRETS_KEY and not AGENT:  # (an agent: "", and portal.secrets refuses to decrypt)
    if not DEBUG and not BUILD_ONLY:
        raise ImproperlyConfigured(
            "SECRETS_KEY must be set when DEBUG is off (a Fernet key: "
            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        )
    SECRETS_KEY = base64.urlsafe_b64encode(hashlib.sha256(("secrets:" + SECRET_KEY).encode()).digest()).decode()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000")
# e-mail to users (a cluster about to expire): see portal/mail.py; empty: none is sent
_email = mail.settings_from_url(env_str("EMAIL_URL", ""), debug=DEBUG)
globals().update(_email)
DEFAULT_FROM_EMAIL = SERVER_EMAIL = env_str("EMAIL_FROM", "VirtCloud portal <virtcloud@localhost>")
if _email["EMAIL_ENABLED"] and not DEBUG and not env_str("SITE_URL", ""):
    raise ImproperlyConfigured("EMAIL_URL needs SITE_URL: the e-mail links to the portal (https://portal.example.org)")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "portal",
    "network",
    "clusters",
    "access",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.security.security_headers_middleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "portal.audit.RequestIdMiddleware",
    "portal.requests.request_text_middleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "portal.api.api_slash_middleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "portal.audit.AuditActorMiddleware",
    "portal.logins.known_browser_middleware",
    "portal.sessions.recording_middleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.sso.context",
            ]
        },
    }
]

DATABASES = {"default": env_db("DATABASE_URL", f"sqlite:///{DATA_DIR / 'portal.sqlite3'}")}
# Keep connections between requests (a third of the profile throughput is connection set-up otherwise);
# health checks drop a connection the server closed.
DATABASES["default"].setdefault("CONN_MAX_AGE", env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0))
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The demo runs web, worker and beat on one file: wait for the lock instead of failing at once.
    # BEGIN IMMEDIATE: a writer waits for the lock instead of failing at once with "database is locked"
    # when it upgrades a read transaction; WAL lets readers go on while one process writes.
    options = DATABASES["default"].setdefault("OPTIONS", {})
    options.setdefault("timeout", 20)
    options.setdefault("transaction_mode", "IMMEDIATE")
    options.setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# --- Identity: LDAP first, local accounts (break-glass superuser) second -----------------------------------
LDAP = ldap_auth.ldap_settings(debug=DEBUG)
globals().update(LDAP)
# the share of the accounts checked that one LDAP sync may deactivate (at least 5); more: none, and it says so
LDAP_SYNC_DEACTIVATE_MAX = env_float("LDAP_SYNC_DEACTIVATE_MAX", 0.1, minimum=0.0, maximum=1.0)
# seconds one LDAP sync may spend (within the task's soft limit); the accounts it did not reach come first next time
LDAP_SYNC_TIME_BUDGET = env_float("LDAP_SYNC_TIME_BUDGET", 60.0, minimum=1.0)
# failed logins of one account from one client address within the window (seconds) that refuse its logins from
# that address until the oldest leaves it (portal.logins); from all addresses together, the ceiling that refuses
# them from everywhere (guessing from many addresses). 0: no limit.
LOGIN_FAILURES_MAX = env_int("LOGIN_FAILURES_MAX", 5, minimum=0)
LOGIN_FAILURES_ACCOUNT_MAX = env_int("LOGIN_FAILURES_ACCOUNT_MAX", 10 * LOGIN_FAILURES_MAX, minimum=0)
LOGIN_FAILURE_WINDOW = env_int("LOGIN_FAILURE_WINDOW", 900, minimum=1)
# failed logins from one client, whatever the names, that refuse its logins (password spraying; a NAT many users
# share counts as one client: raise it there); 0: no limit
LOGIN_FAILURES_CLIENT_MAX = env_int("LOGIN_FAILURES_CLIENT_MAX", 10 * LOGIN_FAILURES_MAX, minimum=0)
# days a browser stays known to the accounts that signed in with it (a signed cookie, renewed at each password
# login): neither the ceiling across addresses nor the client's limit refuse it. 0: no browser is known
LOGIN_KNOWN_BROWSER_DAYS = env_int("LOGIN_KNOWN_BROWSER_DAYS", 180, minimum=0)
# The local backend never logs a directory account in with a password kept here (portal/backends.py).
AUTHENTICATION_BACKENDS = (["portal.auth.ActiveLDAPBackend"] if LDAP else []) + ["portal.backends.LocalAccountBackend"]
# Single sign-on through an authenticating proxy that protects /sso/login/ (portal/sso.py): the header it names
# the user in, the addresses it connects from, the realm its names end in, where "Log out" ends up
SSO_HEADER = env_str("SSO_HEADER", "")
SSO_PROXY_NETWORKS = env_networks("SSO_PROXIES")
SSO_USERNAME_SUFFIX = env_str("SSO_USERNAME_SUFFIX", "")
SSO_LOGOUT_URL = env_str("SSO_LOGOUT_URL", "")
if SSO_HEADER:
    _missing = [
        text
        for text, absent in (
            ("SSO_PROXIES (the proxy's addresses: anyone else could name any user)", not SSO_PROXY_NETWORKS),
            ("SSO_USERNAME_SUFFIX (the realm the identity provider vouches for)", not SSO_USERNAME_SUFFIX),
            ("LDAP_SERVER_URI (the accounts and their groups come from the directory)", not LDAP),
        )
        if absent
    ]
    if _missing:
        raise ImproperlyConfigured(f"SSO_HEADER needs {'; '.join(_missing)}")
    if not re.fullmatch(r"[A-Za-z0-9-]+", SSO_HEADER):
        raise ImproperlyConfigured(f"SSO_HEADER: {SSO_HEADER!r} is not a header name of letters, digits and dashes")
    AUTHENTICATION_BACKENDS.append("portal.sso.DirectoryRemoteUserBackend")
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
# Messages carry one-time secrets (a new API token, a gateway's pull token): keep them in the server-side
# session (the database session engine), never in a cookie, which browsers, proxies and logs keep.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# Dates as the portal's pages show them, "2026-12-06 21:49 UTC", in admin too: the locale's formats win over
# DATETIME_FORMAT and the like in settings (always localized since Django 5), so they are a format module.
FORMAT_MODULE_PATH = ["portal.formats"]

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(DATA_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]
if STATIC_ROOT.is_relative_to(DATA_DIR):
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns on every start when it is missing

# --- Security (clean `check --deploy` when DEBUG is off) -----------------------------------------------------
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
# seconds a browser stays signed in (Django's default is two weeks: a session left on a shared or lost machine
# could download VPN profiles and SSH access for that long)
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 12 * 3600, minimum=300)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
# Behind the TLS proxy, which sets them: X-Forwarded-Proto says https, X-Request-ID names the request (portal.audit).
BEHIND_TLS_PROXY = env_bool("BEHIND_TLS_PROXY", False)
# the addresses the TLS proxy connects from: only a request from one of them has its X-Forwarded-For believed (a
# client that reaches the portal directly would name any address: the login limits count by it); default this host
TRUSTED_PROXY_NETWORKS = env_networks("TRUSTED_PROXIES") or [
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
]
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if BEHIND_TLS_PROXY else None
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
X_FRAME_OPTIONS = "DENY"

# --- REST API --------------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.tokens.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated", "portal.tokens.HasScope"],
    "EXCEPTION_HANDLER": "portal.api.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "portal.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "portal.api.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": ["portal.throttle.ScopedThrottle"],
}


THROTTLE_SCOPES = ("credentials", "host-certificates", "cluster-writes")  # (portal.throttle says which is which)
_PERIODS = {"s", "sec", "second", "m", "min", "minute", "h", "hour", "d", "day"}


def _rates(text: str) -> dict[str, str]:
    """``scope=N/period,…`` → {scope: "N/period"} (DRF's rates); "" for none. A scope the portal does not have or
    a period it cannot read is refused at start, never a limit that silently limits nothing or something else."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        scope, eq, rate = (part.strip() for part in item.partition("="))
        number, slash, period = rate.partition("/")
        if not eq or not slash or not number.isdigit() or period not in _PERIODS:
            raise ImproperlyConfigured(f"API_THROTTLE_RATES: {item!r} is not scope=N/second|minute|hour|day")
        if scope not in THROTTLE_SCOPES:
            raise ImproperlyConfigured(f"API_THROTTLE_RATES: no scope {scope!r} (one of {', '.join(THROTTLE_SCOPES)})")
        rates[scope] = rate
    return rates


# Per user, unsafe requests only (portal.throttle): a runaway script gets 429 with Retry-After.
API_THROTTLE_RATES = _rates(  # set and empty: no limits
    env_str_or_empty("API_THROTTLE_RATES", "credentials=60/min,host-certificates=6000/min,cluster-writes=1200/min")
)
SPECTACULAR_SETTINGS = {
    "TITLE": "VirtCloud portal API",
    "DESCRIPTION": "Virtual cluster networks: VLANs across sites, switch and host convergence, access.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the portal's own static files (drf-spectacular-sidecar), not a CDN's "latest"
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "DeviceKindEnum": "network.choices.DeviceKind.choices",
        "DriftKindEnum": "network.choices.DriftKind.choices",
        "CoreKindEnum": "network.choices.CoreKind.choices",
        "ClusterStateEnum": "clusters.models.ClusterState.choices",
        "EventKindEnum": "clusters.models.EventKind.choices",
    },
}

# --- Celery --------------------------------------------------------------------------------------------------
BROKER_DIR = DATA_DIR / "broker"
CELERY_BROKER_URL = env_broker_url("CELERY_BROKER_URL", "filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    # Embedded broker: kombu's filesystem transport needs no server (one machine only); through portal.broker
    # (portal.celery makes it the one "filesystem://" names), which writes each message file whole.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
    for _folder in ("queue", "processed", "control"):
        (BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # A task a killed worker had taken (acks_late) goes back to the queue after this many seconds; it must
    # exceed the longest device operation (tasks are idempotent, so a duplicate is harmless, only wasteful).
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 300, minimum=1),
        "unacked_restore_interval": 5,  # look for a dead worker's messages every 5 s, not every 100 s
        "unacked_restore_throttle": 1,
    }
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", "django-db")

# --- cache (the API's rate-limit counters) ----------------------------------------------------------------------
# Shared by every web worker: Redis (the broker's, by default, keys prefixed), or this process's memory for the
# embedded default (one web process).
_redis_broker = CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else ""
CACHE_URL = env_str("CACHE_URL", _redis_broker or "locmem://")
if CACHE_URL.startswith(("redis://", "rediss://")):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            "KEY_PREFIX": "virtcloud",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
elif CACHE_URL == "locmem://":
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
else:
    raise ImproperlyConfigured(f"CACHE_URL: redis://… or locmem://, not {CACHE_URL.split('://', 1)[0]}://…")
CELERY_RESULT_EXTENDED = False
CELERY_TASK_DEFAULT_QUEUE = "celery"  # the central worker's queue (devices without a worker queue)
# a worker killed mid-task leaves the message for the next one — on Redis and RabbitMQ; the embedded filesystem
# broker deletes a message as it hands it out (the deploy check says so: portal.W002)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fix-up closes every database connection before and after every task (it ignores
# CONN_MAX_AGE), so each task paid a new PostgreSQL connection (a backend forked, ~3 ms of CPU). With this
# it closes them only every 2 × this many tasks; portal.celery closes the obsolete or broken ones around
# every task the way Django does around a request (CONN_MAX_AGE, CONN_HEALTH_CHECKS). 0: close every time.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1_000_000, minimum=0)
CELERY_TASK_ALWAYS_EAGER = False  # never in production (the tests turn it on: portal/settings_test.py)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 120, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 180, minimum=1)
if LDAP and LDAP_SYNC_TIME_BUDGET >= CELERY_TASK_SOFT_TIME_LIMIT:  # the sync's deactivations come after its budget
    raise ImproperlyConfigured(
        f"LDAP_SYNC_TIME_BUDGET={LDAP_SYNC_TIME_BUDGET:g} must be below CELERY_TASK_SOFT_TIME_LIMIT="
        f"{CELERY_TASK_SOFT_TIME_LIMIT} (a sync cut by the limit deactivates nobody)"
    )
if CELERY_TASK_SOFT_TIME_LIMIT >= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured(
        f"CELERY_TASK_SOFT_TIME_LIMIT={CELERY_TASK_SOFT_TIME_LIMIT} must be below CELERY_TASK_TIME_LIMIT="
        f"{CELERY_TASK_TIME_LIMIT} (the soft limit lets a task settle its device changes before the hard one)"
    )
_visibility = globals().get("CELERY_BROKER_TRANSPORT_OPTIONS", {}).get("visibility_timeout")  # Redis (above)
if _visibility is not None and _visibility <= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured(
        f"CELERY_VISIBILITY_TIMEOUT={_visibility} must be above CELERY_TASK_TIME_LIMIT={CELERY_TASK_TIME_LIMIT}: "
        "Redis hands a task that runs longer to another worker, and it runs twice"
    )
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE: dict = {}

# --- Network life cycle ---------------------------------------------------------------------------------------
DEVICE_RETRY_MAX = env_int("DEVICE_RETRY_MAX", 3, minimum=0)
DEVICE_RETRY_BACKOFF = env_float("DEVICE_RETRY_BACKOFF", 1.0, minimum=0)
DEVICE_TIMEOUT = env_float("DEVICE_TIMEOUT", 30.0, minimum=1)
if DEVICE_TIMEOUT >= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperlyConfigured(
        f"DEVICE_TIMEOUT={DEVICE_TIMEOUT:g} must be below CELERY_TASK_SOFT_TIME_LIMIT={CELERY_TASK_SOFT_TIME_LIMIT} "
        "(the task's limit would cut a device session that is still waiting for its device)"
    )
# devices per convergence task: a workflow layer is one task per this many devices (each converges its
# devices side by side, one thread per device)
DEVICE_BATCH_SIZE = env_int("DEVICE_BATCH_SIZE", 32, minimum=1)
# device sessions a worker process runs at once (threads, started on demand and kept between layers)
DEVICE_SESSION_THREADS = env_int("DEVICE_SESSION_THREADS", 64, minimum=1)
RECONCILE_INTERVAL = env_int("RECONCILE_INTERVAL", 300, minimum=5)
RECONCILE_REPAIR = env_bool("RECONCILE_REPAIR", True)

# --- Clusters --------------------------------------------------------------------------------------------------
CLUSTER_MIN_LIFETIME = env_int("CLUSTER_MIN_LIFETIME", 60, minimum=1)  # seconds
CLUSTER_MAX_LIFETIME = env_int("CLUSTER_MAX_LIFETIME", 90 * 24 * 3600, minimum=60)  # seconds (paper: hours to months)
CLUSTER_DEFAULT_LIFETIME = env_int("CLUSTER_DEFAULT_LIFETIME", 24 * 3600, minimum=60)
if not CLUSTER_MIN_LIFETIME <= CLUSTER_DEFAULT_LIFETIME <= CLUSTER_MAX_LIFETIME:
    # (every create without a lifetime was refused: the default is not checked against the bounds per request)
    raise ImproperlyConfigured(
        f"CLUSTER_DEFAULT_LIFETIME ({CLUSTER_DEFAULT_LIFETIME} s) must lie between CLUSTER_MIN_LIFETIME "
        f"({CLUSTER_MIN_LIFETIME} s) and CLUSTER_MAX_LIFETIME ({CLUSTER_MAX_LIFETIME} s)"
    )
CLUSTER_EXPIRY_INTERVAL = env_int("CLUSTER_EXPIRY_INTERVAL", 60, minimum=5)
# an "expiring" event (feed, webhooks) this long before a cluster's expiry tears it down; 0: none
CLUSTER_EXPIRY_WARNING = env_int("CLUSTER_EXPIRY_WARNING", 24 * 3600, minimum=0)
# seconds a public subnet given back (its cluster ended, or was made closed) waits before another cluster gets it
PUBLIC_SUBNET_HOLD_DOWN = env_int("PUBLIC_SUBNET_HOLD_DOWN", 600, minimum=0)
# A provisioning or update that has not finished after this long (a worker that never consumes its queue, a
# lost message) ends with the devices still waiting as the reason; checked by clusters.expire.
CLUSTER_PROVISION_TIMEOUT = env_int("CLUSTER_PROVISION_TIMEOUT", 600, minimum=10)  # seconds
if _visibility is not None and CLUSTER_PROVISION_TIMEOUT <= _visibility:
    raise ImproperlyConfigured(
        f"CLUSTER_PROVISION_TIMEOUT={CLUSTER_PROVISION_TIMEOUT} must be above CELERY_VISIBILITY_TIMEOUT={_visibility}: "
        "a device task of a worker that died is handed to another one only after the visibility timeout, and a "
        "provisioning given up before then never gets it"
    )
# live clusters and nodes per user unless the user has a Quota of their own (admin); 0: no limit
CLUSTER_QUOTA_CLUSTERS = env_int("CLUSTER_QUOTA_CLUSTERS", 25, minimum=0)
CLUSTER_QUOTA_NODES = env_int("CLUSTER_QUOTA_NODES", 500, minimum=0)
# user-provided images a user may register (POST /api/images/); retired ones do not count; 0: no limit; staff are
# not limited
IMAGE_QUOTA = env_int("IMAGE_QUOTA", 50, minimum=0)
# API tokens users make for themselves (the "API tokens" page): their longest lifetime in days; 0: admins only
USER_TOKEN_MAX_DAYS = env_int("USER_TOKEN_MAX_DAYS", 365, minimum=0)
# longest wait of GET /api/clusters/{id}/wait/ (seconds); keep it below the web server's worker timeout
# (gunicorn: 30 s by default)
CLUSTER_WAIT_MAX = env_float("CLUSTER_WAIT_MAX", 25.0, minimum=0)
# long polls one web process holds at once (each a thread and a database connection); more answer at once
LONG_POLL_SLOTS = env_int("LONG_POLL_SLOTS", 4, minimum=1)
CELERY_BEAT_SCHEDULE.update(beat_schedule(RECONCILE_INTERVAL))


CELERY_BEAT_SCHEDULE["clusters-expire"] = every("clusters.expire", CLUSTER_EXPIRY_INTERVAL)
CELERY_BEAT_SCHEDULE["clusters-mail-expiring"] = every("clusters.mail_expiring", CLUSTER_EXPIRY_INTERVAL)
# days the event feed (GET /api/clusters/events/) keeps; pruned hourly
CLUSTER_EVENT_RETENTION = env_int("CLUSTER_EVENT_RETENTION", 30, minimum=1)
CELERY_BEAT_SCHEDULE["clusters-prune-events"] = every("clusters.prune_events", 3600)
# days the device history (settled device changes of ended networks, repaired drift) and the steps of ended
# clusters are kept; pruned hourly
HISTORY_RETENTION = env_int("HISTORY_RETENTION", 180, minimum=1)
CELERY_BEAT_SCHEDULE["network-prune-history"] = every("network.prune_history", 3600)
# days the audit log keeps its entries (changes, actions, logins); pruned hourly; 0 (default): kept for good
AUDIT_RETENTION = env_int("AUDIT_RETENTION", 0, minimum=0)
CELERY_BEAT_SCHEDULE["portal-prune-audit"] = every("portal.prune_audit", 3600)
# expired browser sessions, and the records of signed-in browsers whose session is gone; hourly
CELERY_BEAT_SCHEDULE["portal-prune-sessions"] = every("portal.prune_sessions", 3600)
# webhooks (admin: Clusters › Webhooks) get the event feed pushed every WEBHOOK_INTERVAL seconds
WEBHOOK_INTERVAL = env_int("WEBHOOK_INTERVAL", 5, minimum=1)
WEBHOOK_TIMEOUT = env_float("WEBHOOK_TIMEOUT", 5.0, minimum=0.1)
WEBHOOK_MAX_BACKOFF = env_int("WEBHOOK_MAX_BACKOFF", 300, minimum=1)
# networks a webhook may reach although loopback, link-local, multicast or reserved (e.g. 127.0.0.0/8)
# (read at start: a bad entry let users register any address, then failed every delivery, the administrators' too)
WEBHOOK_ALLOWED_NETWORKS = env_networks("WEBHOOK_ALLOWED_NETWORKS")
# ... for the administrators' and the middleware's webhooks only; a user's own webhook may reach public addresses and
# these (empty: none other)
WEBHOOK_USER_ALLOWED_NETWORKS = env_networks("WEBHOOK_USER_ALLOWED_NETWORKS")
CELERY_BEAT_SCHEDULE["clusters-webhooks"] = every("clusters.deliver_webhooks", WEBHOOK_INTERVAL)
# a webhook failing this many seconds in a row has its owner mailed (once per run of failures; needs EMAIL_URL)
WEBHOOK_ALERT_AFTER = env_int("WEBHOOK_ALERT_AFTER", 3600, minimum=60)
CELERY_BEAT_SCHEDULE["clusters-mail-failing-webhooks"] = every("clusters.mail_failing_webhooks", 300)

# --- Access (VPN and SSH) -------------------------------------------------------------------------------------
# Passphrase of the CA/AA private keys (PKCS#8, then Fernet with SECRETS_KEY). Derived from SECRETS_KEY in DEBUG.
ACCESS_CA_PASSPHRASE = env_str("ACCESS_CA_PASSPHRASE", "")
if not ACCESS_CA_PASSPHRASE and not DEBUG and not BUILD_ONLY and not AGENT:
    raise ImproperlyConfigured("ACCESS_CA_PASSPHRASE must be set when DEBUG is off (a long random string)")
ACCESS_VPN_CERT_LIFETIME = env_int("ACCESS_VPN_CERT_LIFETIME", 3 * 24 * 3600, minimum=300)
ACCESS_PUBLISH_CERT_LIFETIME = env_int("ACCESS_PUBLISH_CERT_LIFETIME", 90 * 24 * 3600, minimum=3600)
# gateways a VPN profile names (the first, then the others that carry its clusters, tried in turn when one does not
# answer); 1: no failover
ACCESS_VPN_PROFILE_GATEWAYS = env_int("ACCESS_VPN_PROFILE_GATEWAYS", 3, minimum=1, maximum=16)
ACCESS_SSH_CERT_LIFETIME = env_int("ACCESS_SSH_CERT_LIFETIME", 12 * 3600, minimum=900, maximum=24 * 3600)
# The account users log in as on the nodes of a cluster without admin rights on the provider's images (an
# unprivileged account of those images and of approved user images, whose public clusters use it; with admin rights,
# or on a closed cluster booting a user's image, they log in as root).
# Its principals file is what the nodes fetch.
ACCESS_SSH_NODE_USER = env_str("ACCESS_SSH_NODE_USER", "virtcloud")
if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", ACCESS_SSH_NODE_USER) or ACCESS_SSH_NODE_USER == "root":
    raise ImproperlyConfigured("ACCESS_SSH_NODE_USER must be an account name (a-z, 0-9, _ and -) other than root")
ACCESS_CRL_VALIDITY = env_int("ACCESS_CRL_VALIDITY", 7 * 24 * 3600, minimum=3600)
# How long a gateway trusts the state it last pulled (seconds). Past it the gateway fails closed: OpenVPN's
# client-connect and tls-verify (also at each renegotiation, every GATEWAY_STATE_MAX_AGE) and the bastion's
# principals command refuse everyone until a pull succeeds. A released VLAN is handed out again only once every
# gateway has installed a state without its old mapping, or 2 × this (+ 5 min of clock skew) after the release.
# At least three of the gateways' pulls (access.gateway.systemd.PULL_EVERY, 60 s): one as long as a pull would
# expire the state just before each next pull ends, and a gateway would refuse everyone for a moment every minute.
GATEWAY_STATE_MAX_AGE = env_int("GATEWAY_STATE_MAX_AGE", 600, minimum=180, maximum=7 * 24 * 3600)
# Where the VLAN allocator asks who may still map a released VLAN id (each returns a time: ids released
# before it are safe to hand out again; None: no constraint).
VLAN_REUSE_HORIZONS = ["access.selectors.vlan_reuse_horizon"]
# Seconds a process reuses the answer (each source only moves forward in time: an older answer holds ids back
# a little longer, never hands one out early); 0: ask at every allocation.
VLAN_REUSE_HORIZON_TTL = env_float("VLAN_REUSE_HORIZON_TTL", 1.0, minimum=0)
# how often beat revokes the credentials of clusters that ended without their revocation having run (a safety
# net: ending a cluster revokes at once)
ACCESS_SWEEP_INTERVAL = env_int("ACCESS_SWEEP_INTERVAL", 300, minimum=10)
CELERY_BEAT_SCHEDULE["access-sweep-credentials"] = every("access.sweep_credentials", ACCESS_SWEEP_INTERVAL)
CELERY_BEAT_SCHEDULE["access-mail-expiring"] = every("access.mail_expiring", 3600)
# how often directory accounts are brought up to date with LDAP (groups, flags; gone from it → deactivated):
# a login does it too, but an API token acts without one
LDAP_SYNC_INTERVAL = env_int("LDAP_SYNC_INTERVAL", 600, minimum=30)
if LDAP:
    CELERY_BEAT_SCHEDULE["portal-ldap-sync"] = every("portal.ldap_sync", LDAP_SYNC_INTERVAL)
# the queue beat sends the sweeps to (expiry and its deadlines, reconcile, the rollbacks' retries, webhooks, …):
# empty, the central worker's (CELERY_TASK_DEFAULT_QUEUE), where the devices without a worker queue of their own
# get their tasks too — a burst of provisionings can keep every slot busy longer than a sweep's message lives
# (its interval, a minute at least), and it is dropped. Set, a worker of its own consumes it (-Q periodic).
PERIODIC_QUEUE = env_str("PERIODIC_QUEUE", "")
if PERIODIC_QUEUE and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", PERIODIC_QUEUE):
    raise ImproperlyConfigured(f"PERIODIC_QUEUE={PERIODIC_QUEUE!r} must be a queue name (letters, digits, . _ -)")
if PERIODIC_QUEUE:
    for _entry in CELERY_BEAT_SCHEDULE.values():
        _entry.setdefault("options", {})["queue"] = PERIODIC_QUEUE

# Error reports (the DEBUG page, report e-mails) never show a frame variable that holds a private key.
DEFAULT_EXCEPTION_REPORTER_FILTER = "portal.reporting.SecretsFilter"

# --- Logging -------------------------------------------------------------------------------------------------
LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "portal.audit.RequestIdLogFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django_auth_ldap": {"level": LOG_LEVEL}},
}

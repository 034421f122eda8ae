"""Portal-wide records: the audit log, API tokens, accounts that come from the directory."""

from __future__ import annotations

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.utils import timezone


class AuditEntry(models.Model):
    """One change to an audited object (inventory, clusters, credentials): who, when, from which request,
    and the values before and after (secrets masked). Written by ``portal.audit``; never edited."""

    class Action(models.TextChoices):
        CREATE = "create", "create"
        UPDATE = "update", "update"
        DELETE = "delete", "delete"
        ACTION = "action", "action"

    timestamp = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor = models.CharField(max_length=200, help_text="user name, API token or system process")
    request_id = models.CharField(max_length=64, blank=True)
    action = models.CharField(max_length=10, choices=Action.choices)
    # looked up together: the (content_type, object_id) index serves both, and each index costs every write
    content_type = models.ForeignKey(ContentType, on_delete=models.PROTECT, db_index=False)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=200)
    changes = models.JSONField(default=dict, help_text="{field: [before, after]}")
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["-timestamp", "-id"]
        verbose_name_plural = "audit entries"
        # an entry is written with every audited change (one per VLAN allocation): no index beyond the lookups
        # (a plain one on request_id: no LIKE twin, searches are icontains)
        indexes = [
            models.Index(fields=["content_type", "object_id"]),
            models.Index(fields=["request_id"], name="auditentry_request_id"),
        ]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_repr}"


class TokenScope(models.TextChoices):
    CLUSTERS_READ = "clusters:read", "read clusters"
    CLUSTERS_WRITE = "clusters:write", "create and change own clusters"
    CLUSTERS_MANAGE = "clusters:manage", "middleware: act on behalf of any user"
    NETWORK_READ = "network:read", "read the network inventory"
    GATEWAY = "gateway:pull", "access gateway: pull configuration, CRL, KRL and VLAN map"
    ROUTER = "router:pull", "provider's router: read the public clusters' VLANs, subnets and router addresses"
    METRICS = "metrics:read", "monitoring: scrape /metrics (Prometheus)"
    CLUSTER_NODE = "cluster:node", "one cluster's nodes: certify their host keys, fetch who may log in"


class ApiToken(models.Model):
    """A credential for scripts and middleware (a batch scheduler) or an access gateway. Only a hash of the
    secret is stored; the secret is shown once when the token is made. Scoped, revocable, expiring, and
    its last use is recorded."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="what uses it, e.g. 'PBS at brno'")
    prefix = models.CharField(max_length=12, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.GenericIPAddressField("last used from (IP)", null=True, blank=True)
    cluster = models.ForeignKey(
        "clusters.VirtualCluster",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="node_tokens",
        help_text="a node token's cluster (scope cluster:node): it admits to that cluster's node endpoints only, and "
        "is revoked when the cluster ends",
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


class DirectoryAccount(models.Model):
    """A Django user that comes from the LDAP directory (recorded whenever django-auth-ldap populates it: at
    login, or by the periodic sync). Only these accounts are checked against the directory by
    ``portal.auth.ldap_sync``; local accounts (a break-glass superuser, a scheduler's API account) never are."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="directory_account")
    dn = models.CharField("DN", max_length=500, help_text="the account's entry in the directory")
    entry_uuid = models.CharField(
        "entry UUID",
        max_length=100,
        blank=True,
        help_text="the entry's lasting identity (LDAP_USER_UUID_ATTR): a new entry given this account's name later "
        "gets an account of its own",
    )
    synced_at = models.DateTimeField(null=True, blank=True, help_text="last brought up to date from the directory")

    def __str__(self) -> str:
        return self.dn


class LoginFailure(models.Model):
    """A failed login of ``username`` (as typed, lower-cased) from ``address``: ``LOGIN_FAILURES_MAX`` of them
    from one address within ``LOGIN_FAILURE_WINDOW`` refuse that account's logins from that address, and
    ``LOGIN_FAILURES_ACCOUNT_MAX`` from all addresses refuse them from everywhere but the owner's known browsers,
    and ``LOGIN_FAILURES_CLIENT_MAX`` from one address, whatever the names, refuse that address (password
    spraying), until the oldest leave the window (``portal.logins``, asked by ``portal.forms.LoginForm``).
    Guessing a password gets that many tries, a stranger's wrong passwords do not lock the owner out, and the
    directory's own lockout (an LDAP password policy) is never set off against its owner from here. Rows older
    than the window are deleted as new failures come."""

    username = models.CharField(max_length=150)
    address = models.GenericIPAddressField(null=True, blank=True, help_text="the client's (empty: unknown)")
    client = models.CharField(
        max_length=64,
        blank=True,
        help_text="what counts as one client (portal.logins.client_key): the IPv4 address, or the IPv6 address's /64",
    )
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["username", "at"]), models.Index(fields=["client", "at"])]

    def __str__(self) -> str:
        return f"{self.username} at {self.at:%Y-%m-%d %H:%M:%S}"


class BrowserSession(models.Model):
    """A browser signed in to ``user``'s account (``portal.sessions``): the session store's key, and where and when
    it signed in. Its holder sees where they are signed in and can sign every other browser out — a lost or
    borrowed device, a sign-in that was not theirs — whatever kind of account it is (a directory account has no
    password here to change). A row whose session has ended (logged out, expired) goes when next listed."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="browser_sessions")
    session_key = models.CharField(max_length=40, unique=True)
    signed_in_at = models.DateTimeField(default=timezone.now)
    address = models.GenericIPAddressField(null=True, blank=True)
    browser = models.CharField(max_length=200, blank=True, help_text="its User-Agent, shortened")

    def __str__(self) -> str:
        return f"{self.user} since {self.signed_in_at:%Y-%m-%d %H:%M}"


class PeriodicRun(models.Model):
    """When each periodic task (celery beat: ``CELERY_BEAT_SCHEDULE``) last ended, well or not — recorded by the
    worker that ran it (``portal.celery``). ``/metrics`` exports the age of the last success per task with the
    task's interval: beat or the worker of the default queue down shows as a growing age (clusters then stop
    expiring, the provisioning deadline, webhooks and the sweeps stop), not as quiet."""

    task = models.CharField(max_length=200, unique=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    def __str__(self) -> str:
        return self.task

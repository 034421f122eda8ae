"""Secrets at rest: a model field that stores Fernet ciphertext, keyed by ``settings.SECRETS_KEY``.

The plaintext exists only in memory of the process that needs it (a driver opening a session); admin and
API never render it back, and the audit log records only that it changed.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

MASK = "********"


def _fernet() -> Fernet:
    if not settings.SECRETS_KEY:
        raise ImproperlyConfigured(
            "this process holds no SECRETS_KEY (PORTAL_ROLE=agent: a host agent decrypts nothing); "
            "the portal's own workers do this"
        )
    try:
        return Fernet(settings.SECRETS_KEY.encode())
    except ValueError:
        raise ImproperlyConfigured("SECRETS_KEY is not a valid Fernet key (32 url-safe base64-encoded bytes)") from None


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ImproperlyConfigured(
            "a stored secret cannot be decrypted with SECRETS_KEY (was the key changed?)"
        ) from None


class Secret(str):
    """Plaintext that does not show itself in repr(), logs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('" + MASK + "')"


class EncryptedTextField(models.TextField):
    """A TextField whose database value is Fernet ciphertext; the Python value is a ``Secret`` (or '')."""

    def from_db_value(self, value, expression, connection):
        if value in (None, ""):
            return value
        return Secret(decrypt(value))

    def to_python(self, value):
        if value in (None, "") or isinstance(value, Secret):
            return value
        return Secret(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value in (None, ""):
            return value
        return encrypt(str(value))

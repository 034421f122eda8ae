"""What an error report may show of a frame's variables: never a private key, in DEBUG too.

Django's ``SafeExceptionReporterFilter`` hides ``@sensitive_variables`` only when DEBUG is off, and a key
passes through many frames (generated in ``access.pki``, rendered into a profile by ``access.openvpn``,
returned by ``access.services``): any of them may be on the traceback of a DEBUG error page (the demo) or of
a report. This filter hides, always and in every frame, a variable whose name says secret (key, secret,
password, passphrase, token, pem, profile) or whose value holds a private key."""

from __future__ import annotations

import re

from django.views.debug import SafeExceptionReporterFilter

SECRET_NAMES = re.compile(r"key|secret|passw|passphrase|token|pem|profile|enrolment|signer", re.IGNORECASE)
PRIVATE_KEY = re.compile(
    r"PRIVATE KEY|PuTTY-User-Key-File|Private-Lines|BEGIN OPENSSH PRIVATE|PrivateKey|private_pem|private_openssh"
)


def holds_secret(name: str, value: object) -> bool:
    """Whether a variable called ``name`` holding ``value`` must not be shown."""
    if SECRET_NAMES.search(name):
        return True
    try:
        text = value.decode("latin-1") if isinstance(value, bytes) else value if isinstance(value, str) else repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails: show nothing of it
        return True
    return bool(PRIVATE_KEY.search(text[:100_000]))


class SecretsFilter(SafeExceptionReporterFilter):
    # Django's names (AUTH: also the Authorization header in a request's META, a bearer token), and URLs and URIs
    # (EMAIL_URL, DATABASE_URL, a broker's: they may hold a password): settings, and the environment a
    # development server copies into a request's META
    # (CELERY_RESULT_BACKEND and CACHES' LOCATION are URLs too: redis://:password@…)
    hidden_settings = re.compile(
        r"API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|URI|DSN|BACKEND|LOCATION", re.IGNORECASE
    )

    def get_traceback_frame_variables(self, request, tb_frame):
        return [
            (name, self.cleansed_substitute if holds_secret(name, value) else value)
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]

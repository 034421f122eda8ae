"""`manage.py smoke`: a task goes through the configured broker to a running worker and back."""

import time
import uuid

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal.env import without_password
from portal.tasks import ping


class Command(BaseCommand):
    help = "Send a task through the configured broker to a running worker and wait for its answer."

    def add_arguments(self, parser):
        parser.add_argument("--timeout", type=float, default=60.0)

    def handle(self, *args, timeout, **options):
        nonce = uuid.uuid4().hex
        started = time.monotonic()
        try:
            answer = ping.delay(nonce).get(timeout=timeout)  # (sending fails too when the broker is down)
        except Exception as exc:
            raise CommandError(
                f"no answer from a worker within {timeout:.0f}s over {without_password(settings.CELERY_BROKER_URL)}: "
                f"{exc}"
            ) from exc
        if answer != f"pong:{nonce}":
            raise CommandError(f"wrong answer {answer!r}")
        db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        self.stdout.write(
            f"smoke: ok — broker {without_password(settings.CELERY_BROKER_URL)}, "
            f"results {without_password(settings.CELERY_RESULT_BACKEND)}, "
            f"database {db}, round trip {1000 * (time.monotonic() - started):.0f} ms"
        )

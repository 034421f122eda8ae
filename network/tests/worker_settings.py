"""Settings for a real test worker that must get a killed worker's messages back quickly: the Redis
transport hands an unacknowledged message to another worker only after ``visibility_timeout`` (default one
hour). Production should set it above the longest task time limit (see the report in the issue)."""

import os

from portal.settings_test import *  # noqa: F403

CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": float(os.environ.get("TEST_VISIBILITY_TIMEOUT", "3")),
    # kombu sweeps for expired unacknowledged messages every interval × throttle seconds (default 100 s)
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}

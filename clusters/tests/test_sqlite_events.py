"""The embedded default (SQLite) keeps its event triggers through every migration: a table rebuild drops
them silently, and the event feed and webhooks then never hear of a cluster again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json
from datetime import timedelta
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone
from clusters.models import ClusterEvent, Image, VirtualCluster
with connection.cursor() as cursor:
    cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    triggers = sorted(name for (name,) in cursor.fetchall())
cluster = VirtualCluster.objects.create(
    name="c1", owner=User.objects.create(username="u"), image=Image.objects.create(name="img", approved=True),
    connectivity="public", connectivity_reason="test", expires_at=timezone.now() + timedelta(hours=1),
)
VirtualCluster.objects.filter(pk=cluster.pk).update(state="provisioning")
VirtualCluster.objects.filter(pk=cluster.pk).update(state="provisioning")  # no change: no event
VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=cluster.expires_at + timedelta(hours=1))
VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=cluster.expires_at + timedelta(hours=1))  # no change
print(json.dumps({"vendor": connection.vendor, "triggers": triggers,
                  "events": [f"{k}:{s}" for k, s in ClusterEvent.objects.values_list("kind", "state")]}))
"""


def test_a_fresh_sqlite_database_writes_an_event_per_creation_and_state_change(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env |= {"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "true", "DATA_DIR": str(tmp_path)}

    def manage(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    manage("migrate", "--noinput", "-v", "0")
    found = json.loads(manage("shell", "-c", SCRIPT).strip().splitlines()[-1])
    assert found["vendor"] == "sqlite"
    assert {"clusters_event_created", "clusters_event_changed", "clusters_event_lifetime"} <= set(found["triggers"])
    assert found["events"] == ["state:requested", "state:provisioning", "lifetime:provisioning"]

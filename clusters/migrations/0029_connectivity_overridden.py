"""Whether an administrator overrode the policy's connectivity (``VirtualCluster.connectivity_overridden``): kept when
the admin's account is deleted (``connectivity_overridden_by`` is emptied then). The overrides made before are
marked from that column, or from their reason. SQLite may rebuild the table to add the column: its event triggers
go first and are made again at the end (see 0013 and 0022)."""

import importlib

from django.db import migrations, models
from django.db.models import Q

_TRIGGERS = importlib.import_module("clusters.migrations.0013_sqlite_event_triggers_again")
_EXPIRING = importlib.import_module("clusters.migrations.0014_expiring_events")
_LIFETIME = importlib.import_module("clusters.migrations.0022_lifetime_events")


def mark_overrides(apps, schema_editor):
    VirtualCluster = apps.get_model("clusters", "VirtualCluster")
    overridden = Q(connectivity_overridden_by__isnull=False) | Q(connectivity_reason__startswith="overridden by ")
    VirtualCluster.objects.filter(overridden).update(connectivity_overridden=True)


def drop_sqlite_triggers(apps, schema_editor):
    _EXPIRING.drop_sqlite_triggers(apps, schema_editor)
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(_LIFETIME.SQLITE_DROP)


def recreate_sqlite_triggers(apps, schema_editor):
    _TRIGGERS.recreate_sqlite_triggers(apps, schema_editor)
    _LIFETIME.recreate_sqlite_lifetime_trigger(apps, schema_editor)


class Migration(migrations.Migration):

    dependencies = [
        ('clusters', '0028_provision_sent_teardown'),
    ]

    operations = [
        migrations.RunPython(drop_sqlite_triggers, recreate_sqlite_triggers),
        migrations.AddField(
            model_name='virtualcluster',
            name='connectivity_overridden',
            field=models.BooleanField(db_default=False, default=False, help_text="an administrator overrode the policy's connectivity"),
        ),
        migrations.RunPython(mark_overrides, migrations.RunPython.noop),
        migrations.RunPython(recreate_sqlite_triggers, drop_sqlite_triggers),
    ]

"""Expiring events (``ClusterEvent.kind``) and the expiry each cluster was warned about. SQLite rebuilds a
table to add a column with a default: its event triggers go first (they name ``clusters_clusterevent``, which
does not exist for a moment during the rebuild) and are made again at the end (see 0013)."""

import importlib

from django.db import migrations, models

_TRIGGERS = importlib.import_module("clusters.migrations.0013_sqlite_event_triggers_again")
_EVENTS = importlib.import_module("clusters.migrations.0008_cluster_event")


def drop_sqlite_triggers(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        for sql in _EVENTS.SQLITE_DROP:
            schema_editor.execute(sql)


class Migration(migrations.Migration):

    dependencies = [
        ('clusters', '0013_sqlite_event_triggers_again'),
    ]

    operations = [
        migrations.RunPython(drop_sqlite_triggers, _TRIGGERS.recreate_sqlite_triggers),
        migrations.AddField(
            model_name='clusterevent',
            name='kind',
            field=models.CharField(choices=[('state', 'created, or its state changed'), ('expiring', 'expires soon')], db_default='state', default='state', max_length=10),
        ),
        migrations.AddField(
            model_name='virtualcluster',
            name='expiry_warned_for',
            field=models.DateTimeField(blank=True, editable=False, help_text="the expiry an 'expiring' event was written for", null=True),
        ),
        migrations.RunPython(_TRIGGERS.recreate_sqlite_triggers, drop_sqlite_triggers),
    ]

"""Which workflow generation's provisioning reached the broker (``VirtualCluster.provision_sent``). SQLite may
rebuild the table to add the column: its event triggers go first and are made again at the end (see 0013)."""

import importlib

from django.db import migrations, models

_TRIGGERS = importlib.import_module("clusters.migrations.0013_sqlite_event_triggers_again")
_EXPIRING = importlib.import_module("clusters.migrations.0014_expiring_events")


class Migration(migrations.Migration):

    dependencies = [
        ('clusters', '0017_idempotency_raw_hash'),
    ]

    operations = [
        migrations.RunPython(_EXPIRING.drop_sqlite_triggers, _TRIGGERS.recreate_sqlite_triggers),
        migrations.AddField(
            model_name='virtualcluster',
            name='provision_sent',
            field=models.PositiveIntegerField(blank=True, editable=False, help_text='the workflow generation whose provisioning went to the broker (a crash in between: sent again)', null=True),
        ),
        migrations.RunPython(_TRIGGERS.recreate_sqlite_triggers, _EXPIRING.drop_sqlite_triggers),
    ]

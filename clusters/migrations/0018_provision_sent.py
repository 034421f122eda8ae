"""Which workflow generation's provisioning reached the broker (``VirtualCluster.provision_sent``). Every cluster
there is already counts as sent (the release before sent or failed every provisioning it started): none is sent
again at the upgrade. SQLite may rebuild the table to add the column: its event triggers go first and are made
again at the end (see 0013)."""

import importlib

from django.db import migrations, models
from django.db.models import F

_TRIGGERS = importlib.import_module("clusters.migrations.0013_sqlite_event_triggers_again")
_EXPIRING = importlib.import_module("clusters.migrations.0014_expiring_events")


def all_sent(apps, schema_editor):
    apps.get_model("clusters", "VirtualCluster").objects.update(provision_sent=F("workflow_generation"))


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
        migrations.RunPython(all_sent, migrations.RunPython.noop),
        migrations.RunPython(_TRIGGERS.recreate_sqlite_triggers, _EXPIRING.drop_sqlite_triggers),
    ]

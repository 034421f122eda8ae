"""SQLite: the event triggers of 0008, again. SQLite cannot alter a column in place, so Django rebuilds the
table for many field changes (0010's new column with a default did) and the rebuilt table has no triggers:
since then the embedded default wrote no ``ClusterEvent`` (the event feed and the webhooks were silent).
A later migration that rebuilds ``clusters_virtualcluster`` on SQLite must end with ``recreate_sqlite_triggers``
too; ``clusters/tests/test_sqlite_events.py`` checks the migrated schema. PostgreSQL alters tables in place:
nothing to do there."""

import importlib

from django.db import migrations

_EVENTS = importlib.import_module("clusters.migrations.0008_cluster_event")


def recreate_sqlite_triggers(apps, schema_editor):
    if schema_editor.connection.vendor != "sqlite":
        return
    for sql in [*_EVENTS.SQLITE_DROP, *_EVENTS.SQLITE_CREATE]:
        schema_editor.execute(sql)


class Migration(migrations.Migration):
    dependencies = [
        ("clusters", "0012_verbose_names"),
    ]

    operations = [migrations.RunPython(recreate_sqlite_triggers, migrations.RunPython.noop)]

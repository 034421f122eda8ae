"""Cluster events (``ClusterEvent``), written by triggers in the transaction of each change.

PostgreSQL: constraint triggers deferred to commit time take a short advisory lock (held until the commit
ends) before the row gets its id, so event ids follow the order of commits and a reader that continues after
the last id it saw cannot skip an event that committed later with a smaller id. SQLite has one writer at a
time: plain triggers are enough."""

import django.db.models.deletion
from django.db import migrations, models


PG_CREATE = """
CREATE OR REPLACE FUNCTION clusters_state_event() RETURNS trigger AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM clusters_virtualcluster WHERE id = NEW.id) THEN
        RETURN NULL;  -- created and deleted in one transaction
    END IF;
    PERFORM pg_advisory_xact_lock(1447231507);  -- 0x56430013: ids in commit order (held until commit ends)
    INSERT INTO clusters_clusterevent (cluster_id, state, at) VALUES (NEW.id, NEW.state, clock_timestamp());
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS clusters_created_notify ON clusters_virtualcluster;
CREATE TRIGGER clusters_created_notify AFTER INSERT ON clusters_virtualcluster
    FOR EACH ROW EXECUTE FUNCTION clusters_state_notify();  -- (migration 0006) wakes the event feed's readers
CREATE CONSTRAINT TRIGGER clusters_event_created AFTER INSERT ON clusters_virtualcluster
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION clusters_state_event();
CREATE CONSTRAINT TRIGGER clusters_event_changed AFTER UPDATE OF state ON clusters_virtualcluster
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION clusters_state_event();
"""
PG_DROP = """
DROP TRIGGER IF EXISTS clusters_created_notify ON clusters_virtualcluster;
DROP TRIGGER IF EXISTS clusters_event_created ON clusters_virtualcluster;
DROP TRIGGER IF EXISTS clusters_event_changed ON clusters_virtualcluster;
DROP FUNCTION IF EXISTS clusters_state_event();
"""
SQLITE_CREATE = [
    """CREATE TRIGGER clusters_event_created AFTER INSERT ON clusters_virtualcluster BEGIN
        INSERT INTO clusters_clusterevent (cluster_id, state, at)
        VALUES (NEW.id, NEW.state, strftime('%Y-%m-%d %H:%M:%f', 'now'));
    END""",
    """CREATE TRIGGER clusters_event_changed AFTER UPDATE OF state ON clusters_virtualcluster
    WHEN OLD.state IS NOT NEW.state BEGIN
        INSERT INTO clusters_clusterevent (cluster_id, state, at)
        VALUES (NEW.id, NEW.state, strftime('%Y-%m-%d %H:%M:%f', 'now'));
    END""",
]
SQLITE_DROP = ["DROP TRIGGER IF EXISTS clusters_event_created", "DROP TRIGGER IF EXISTS clusters_event_changed"]


def _run(by_vendor: dict[str, list[str]]):
    def run(apps, schema_editor):
        for sql in by_vendor.get(schema_editor.connection.vendor, []):
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):

    dependencies = [
        ('clusters', '0007_quota'),
    ]

    operations = [
        migrations.CreateModel(
            name='ClusterEvent',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('state', models.CharField(choices=[('requested', 'requested'), ('provisioning', 'provisioning'), ('ready', 'ready'), ('updating', 'updating network'), ('tearing_down', 'tearing down'), ('torn_down', 'torn down'), ('failed', 'failed')], max_length=20)),
                ('at', models.DateTimeField()),
                ('cluster', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='events', to='clusters.virtualcluster')),
            ],
            options={
                'ordering': ['id'],
                'indexes': [models.Index(fields=['at'], name='clusterevent_at')],
            },
        ),
        migrations.RunPython(
            _run({"postgresql": [PG_CREATE], "sqlite": SQLITE_CREATE}),
            _run({"postgresql": [PG_DROP], "sqlite": SQLITE_DROP}),
        ),
    ]

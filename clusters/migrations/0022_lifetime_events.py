"""``lifetime`` events: a cluster's expiry changed (extended through the API, the browser or the admin), written by
triggers in the transaction of the change, as ``state`` events are (0008): a scheduler that follows the feed or a
webhook learns the new expiry without polling every cluster. SQLite: a later migration that rebuilds
``clusters_virtualcluster`` must make these triggers again too (``recreate_sqlite_lifetime_trigger``), as 0013 says
of the state triggers; ``clusters/tests/test_sqlite_events.py`` checks the migrated schema."""

from django.db import migrations, models

PG_CREATE = """
CREATE OR REPLACE FUNCTION clusters_lifetime_event() RETURNS trigger AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM clusters_virtualcluster WHERE id = NEW.id) THEN
        RETURN NULL;  -- deleted in the same transaction
    END IF;
    PERFORM pg_advisory_xact_lock(1447231507);  -- 0x56430013: ids in commit order, as the state events' (0008)
    INSERT INTO clusters_clusterevent (cluster_id, kind, state, at)
        SELECT id, 'lifetime', state, clock_timestamp() FROM clusters_virtualcluster WHERE id = NEW.id;
    PERFORM pg_notify('virtcloud_cluster_state', NEW.id::text);  -- wakes the feed's long polls (as 0003's does)
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS clusters_event_lifetime ON clusters_virtualcluster;
CREATE CONSTRAINT TRIGGER clusters_event_lifetime AFTER UPDATE OF expires_at ON clusters_virtualcluster
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.expires_at IS DISTINCT FROM NEW.expires_at)
    EXECUTE FUNCTION clusters_lifetime_event();
"""
PG_DROP = """
DROP TRIGGER IF EXISTS clusters_event_lifetime ON clusters_virtualcluster;
DROP FUNCTION IF EXISTS clusters_lifetime_event();
"""
SQLITE_CREATE = """CREATE TRIGGER clusters_event_lifetime AFTER UPDATE OF expires_at ON clusters_virtualcluster
    WHEN OLD.expires_at IS NOT NEW.expires_at BEGIN
        INSERT INTO clusters_clusterevent (cluster_id, kind, state, at)
        VALUES (NEW.id, 'lifetime', NEW.state, strftime('%Y-%m-%d %H:%M:%f', 'now'));
    END"""
SQLITE_DROP = "DROP TRIGGER IF EXISTS clusters_event_lifetime"


def recreate_sqlite_lifetime_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_DROP)
        schema_editor.execute(SQLITE_CREATE)


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(PG_CREATE)
    recreate_sqlite_lifetime_trigger(apps, schema_editor)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(PG_DROP)
    elif schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("clusters", "0021_webhook_owner"),
    ]

    operations = [
        migrations.AlterField(
            model_name="clusterevent",
            name="kind",
            field=models.CharField(
                choices=[
                    ("state", "created, or its state changed"),
                    ("expiring", "expires soon"),
                    ("lifetime", "its expiry changed"),
                ],
                db_default="state",
                default="state",
                max_length=10,
            ),
        ),
        migrations.RunPython(create, drop),
    ]

"""PostgreSQL: a deleted cluster is announced too (``NOTIFY virtcloud_cluster_state, '<id>'``), so a long poll
on it answers 404 at once instead of at its timeout."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION clusters_state_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('virtcloud_cluster_state', OLD.id::text);
    ELSE
        PERFORM pg_notify('virtcloud_cluster_state', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS clusters_deleted_notify ON clusters_virtualcluster;
CREATE TRIGGER clusters_deleted_notify AFTER DELETE ON clusters_virtualcluster
    FOR EACH ROW EXECUTE FUNCTION clusters_state_notify();
"""
DROP = """
DROP TRIGGER IF EXISTS clusters_deleted_notify ON clusters_virtualcluster;
"""


def _on_postgresql(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [("clusters", "0005_idempotency_status_code")]

    operations = [migrations.RunPython(_on_postgresql(CREATE), _on_postgresql(DROP))]

"""PostgreSQL: a cluster's state change sends ``NOTIFY virtcloud_cluster_state, '<id>'`` (at commit), so
``GET /api/clusters/{id}/wait/`` wakes when it happens instead of polling (``portal.notify``). Nothing on
other databases."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION clusters_state_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('virtcloud_cluster_state', NEW.id::text);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS clusters_state_notify ON clusters_virtualcluster;
CREATE TRIGGER clusters_state_notify AFTER UPDATE OF state ON clusters_virtualcluster
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION clusters_state_notify();
"""
DROP = """
DROP TRIGGER IF EXISTS clusters_state_notify ON clusters_virtualcluster;
DROP FUNCTION IF EXISTS clusters_state_notify();
"""


def _on_postgresql(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [("clusters", "0002_node_address")]

    operations = [migrations.RunPython(_on_postgresql(CREATE), _on_postgresql(DROP))]

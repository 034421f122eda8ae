"""When a node left its cluster (``Node.removed_at``), for usage reports. Nodes of clusters that ended are
backfilled with the cluster's end; a node removed from a live cluster before this release has no time: a usage
report counts it until its cluster ends."""

from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def backfill(apps, schema_editor):
    Node = apps.get_model("clusters", "Node")
    VirtualCluster = apps.get_model("clusters", "VirtualCluster")
    ended = VirtualCluster.objects.filter(pk=OuterRef("cluster_id")).values("ended_at")[:1]
    Node.objects.filter(state="removed", removed_at=None, cluster__ended_at__isnull=False).update(
        removed_at=Subquery(ended)
    )


class Migration(migrations.Migration):
    dependencies = [
        ("clusters", "0022_lifetime_events"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="removed_at",
            field=models.DateTimeField(blank=True, help_text="when it left the cluster (usage reports)", null=True),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]

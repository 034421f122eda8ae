"""The body of a create as sent, with its Idempotency-Key (a database default too: a web or worker process of the
release before, still running during a rolling upgrade, inserts keys without the column)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('clusters', '0016_closed_since'),
    ]

    operations = [
        migrations.AddField(
            model_name='idempotencykey',
            name='raw_hash',
            field=models.CharField(blank=True, db_default='', default='', max_length=64),
        ),
    ]

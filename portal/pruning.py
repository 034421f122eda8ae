"""Deleting old history in batches: each batch its own short transaction, however much is due (the first run
after an upgrade may find years of it)."""

from __future__ import annotations

from django.db import transaction
from django.db.models import QuerySet

BATCH = 5000  # rows per DELETE


def delete_in_batches(rows: QuerySet) -> int:
    """Delete ``rows`` ``BATCH`` at a time; how many went (of ``rows``' model; cascades not counted)."""
    deleted = 0
    while True:
        with transaction.atomic():
            batch = list(rows.order_by().values_list("pk", flat=True)[:BATCH])
            if not batch:
                return deleted
            deleted += rows.model.objects.filter(pk__in=batch).delete()[1].get(rows.model._meta.label, 0)

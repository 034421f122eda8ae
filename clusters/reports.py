"""Usage reports as CSV (``clusters.selectors.usage``): ``manage.py clusters usage`` and the admin's "Export usage"."""

from __future__ import annotations

import csv

from clusters import selectors


def write_usage(stream, *, since, until, by: str = "owner", only=None) -> None:
    """The usage of ``[since, until)`` per ``by`` (owner, group, cluster) as CSV on ``stream``, a header first."""
    columns = [by, "clusters", "cluster_hours", "node_hours"]
    if by == "cluster":
        columns = ["cluster", "name", "owner", "group", "job_id", "created_at", "ended_at", *columns[1:]]
    writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in selectors.usage(since, until, by=by, only=only):
        for key in ("created_at", "ended_at"):
            if row.get(key) is not None:
                row[key] = row[key].isoformat()
        writer.writerow(row)

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
        writer.writerow({key: _cell(value) for key, value in row.items()})


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value):
    """A text a user chose (a job id, a name) that a spreadsheet would run as a formula (``=HYPERLINK(…)``)
    gets a leading ``'``, which makes it text there (OWASP's advice for CSV files); other values as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value

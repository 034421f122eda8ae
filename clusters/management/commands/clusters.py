"""``manage.py clusters whois ADDRESS [--at TIME]``: which clusters held the public subnet of ADDRESS (at TIME:
an ISO 8601 time, UTC unless it says otherwise), newest first — the answer to an abuse report. Exit 1 when none
did.

``manage.py clusters usage --since T [--until T] [--by owner|group|cluster]``: accounting as CSV on stdout — per
owner, group or cluster, the clusters that lived in the window, their hours (VLAN-hours) and their nodes' hours
(``clusters.selectors.usage``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from clusters import selectors
from clusters.reports import write_usage


def _time(text: str):
    at = selectors.moment(text)
    if at is None:
        raise CommandError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-01T10:00Z)")
    return at


class Command(BaseCommand):
    help = "Clusters: who held a public address (whois); usage for accounting (usage)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        whois = sub.add_parser("whois", help="which clusters held the public subnet of an address (at a time)")
        whois.add_argument("address", help="an IP address, e.g. 198.51.100.7")
        whois.add_argument("--at", help="when, ISO 8601 (UTC unless it says otherwise): 2026-12-01T10:00Z")
        usage = sub.add_parser("usage", help="clusters, cluster-hours and node-hours in a window, as CSV")
        usage.add_argument("--since", required=True, help="start of the window, ISO 8601 (2026-11-01T00:00Z)")
        usage.add_argument("--until", help="end of the window, ISO 8601 (default: now)")
        usage.add_argument("--by", choices=selectors.USAGE_KEYS, default="owner")

    def handle(self, *args, **options):
        if options["action"] == "usage":
            return self._usage(options)
        at = _time(options["at"]) if options["at"] else None
        try:
            leases = list(selectors.public_address_holders(options["address"], at=at))
        except ValueError:
            raise CommandError(f"not an IP address: {options['address']!r}") from None
        if not leases:
            when = f" at {at.isoformat()}" if at else ""
            raise CommandError(f"no public cluster held {options['address']}{when} (kept HISTORY_RETENTION days)")
        for lease in leases:
            until = lease.ended_at.isoformat() if lease.ended_at else "now"
            group = f", group {lease.group}" if lease.group else ""
            job = f", job {lease.job_id}" if lease.job_id else ""
            self.stdout.write(
                f"{lease.subnet}: cluster {lease.cluster_name} (owner {lease.owner}{group}{job}) "
                f"from {lease.started_at.isoformat()} until {until}"
            )

    def _usage(self, options) -> None:
        since = _time(options["since"])
        until = _time(options["until"]) if options["until"] else timezone.now()
        if until <= since:
            raise CommandError("--until must come after --since")
        write_usage(self.stdout, since=since, until=until, by=options["by"])

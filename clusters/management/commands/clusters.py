"""``manage.py clusters whois ADDRESS [--at TIME]``: which clusters held the public subnet of ADDRESS (at TIME:
an ISO 8601 time, UTC unless it says otherwise), newest first — the answer to an abuse report. Exit 1 when none
did."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from clusters import selectors


def _time(text: str):
    at = selectors.moment(text)
    if at is None:
        raise CommandError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-01T10:00Z)")
    return at


class Command(BaseCommand):
    help = "Clusters: who held a public address (whois)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        whois = sub.add_parser("whois", help="which clusters held the public subnet of an address (at a time)")
        whois.add_argument("address", help="an IP address, e.g. 198.51.100.7")
        whois.add_argument("--at", help="when, ISO 8601 (UTC unless it says otherwise): 2026-12-01T10:00Z")

    def handle(self, *args, **options):
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

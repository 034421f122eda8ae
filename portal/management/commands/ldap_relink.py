"""``manage.py ldap_relink [NAME ...]``: record, for directory accounts, the identity of the entry that holds their
name now (``LDAP_USER_UUID_ATTR``), as if they were linked afresh (``portal.auth.ldap_relink``).

For a directory rebuilt so that its entries got new identities (restored with ``ldapadd``, moved to a new server):
the sync would otherwise take every account for a name given to someone else — it deactivates none of them past
``LDAP_SYNC_DEACTIVATE_MAX`` and says so, pointing here. Without names: every active directory account the user
search finds. Only for entries that are the same people: an account whose name really went to someone else must
not be relinked (the newcomer would inherit it) — ``--dry-run`` lists each account with its identity before and now,
to check first; an error half-way relinks nobody."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from portal.auth import RelinkError, ldap_relink


class Command(BaseCommand):
    help = __doc__.splitlines()[0]

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", help="account names (default: every active directory account)")
        parser.add_argument("--dry-run", action="store_true", help="say which accounts would be relinked, change none")

    def handle(self, *args, names: list[str], dry_run: bool, **options):
        try:
            report = ldap_relink(names, dry_run=dry_run)
        except RelinkError as exc:
            raise CommandError(f"{exc}; nobody was relinked") from None
        for name in report.not_found:
            self.stdout.write(f"{name}: not found in the directory, left as it is")
        for name, before, now in report.changes:  # check each is the same person before relinking for real
            self.stdout.write(f"{name}: {before or '(none)'} -> {now}{' (dry run)' if dry_run else ''}")
        verb = "would relink" if dry_run else "relinked"
        self.stdout.write(
            f"{verb} {report.relinked} account(s); {report.unchanged} already linked to the entry of their name"
        )

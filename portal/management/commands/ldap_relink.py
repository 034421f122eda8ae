"""``manage.py ldap_relink [NAME ...]``: record, for directory accounts, the identity of the entry that holds their
name now (``LDAP_USER_UUID_ATTR``), as if they were linked afresh.

For a directory rebuilt so that its entries got new identities (restored with ``ldapadd``, moved to a new server):
the sync would otherwise take every account for a name given to someone else — it deactivates none of them past
``LDAP_SYNC_DEACTIVATE_MAX`` and says so, pointing here. Without names: every active directory account the user
search finds. Only for entries that are the same people: an account whose name really went to someone else must
not be relinked (the newcomer would inherit it)."""

from __future__ import annotations

import ldap
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal import audit
from portal.auth import _connect, _in_directory
from portal.models import DirectoryAccount


class Command(BaseCommand):
    help = __doc__.splitlines()[0]

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", help="account names (default: every active directory account)")

    def handle(self, *args, names: list[str], **options):
        if not getattr(settings, "AUTH_LDAP_SERVER_URI", ""):
            raise CommandError("LDAP is not configured (LDAP_SERVER_URI)")
        if not getattr(settings, "LDAP_USER_UUID_ATTR", ""):
            raise CommandError("LDAP_USER_UUID_ATTR is empty: accounts follow their names alone, nothing to relink")
        accounts = DirectoryAccount.objects.filter(user__is_active=True).select_related("user").order_by("pk")
        if names:
            accounts = accounts.filter(user__username__in=names)
            missing = sorted(set(names) - {a.user.get_username() for a in accounts})
            if missing:
                raise CommandError(f"no active directory account named {', '.join(missing)}")
        try:
            conn = _connect(settings)
        except ldap.LDAPError as exc:
            raise CommandError(f"the directory cannot be reached: {type(exc).__name__}") from None
        relinked = unchanged = 0
        try:
            for account in accounts:
                present, identity = _in_directory(conn, settings.AUTH_LDAP_USER_SEARCH, account.user.get_username())
                if not present or not identity:
                    self.stdout.write(f"{account.user.get_username()}: not found in the directory, left as it is")
                    continue
                if identity == account.entry_uuid:
                    unchanged += 1
                    continue
                before, account.entry_uuid = account.entry_uuid, identity
                account.save(update_fields=["entry_uuid"])
                audit.record(account, "update", {"entry_uuid": [before, identity]}, message="relinked (ldap_relink)")
                relinked += 1
        except ldap.LDAPError as exc:
            raise CommandError(f"the directory cannot be searched: {type(exc).__name__}") from None
        finally:
            conn.unbind_s()
        self.stdout.write(f"relinked {relinked} account(s); {unchanged} already linked to the entry of their name")

"""The local accounts' login (Django's ``ModelBackend``), for accounts that are not the directory's.

A separate module from ``portal.auth``: settings import that one, and Django's backends import the auth models.
"""

from __future__ import annotations

import logging

from django.contrib.auth.backends import ModelBackend

logger = logging.getLogger(__name__)


def is_directory_account(user) -> bool:
    """Whether ``user`` comes from the LDAP directory (``portal.models.DirectoryAccount``)."""
    from portal.models import DirectoryAccount

    return user is not None and user.pk is not None and DirectoryAccount.objects.filter(user_id=user.pk).exists()


class LocalAccountBackend(ModelBackend):
    """Password logins of local accounts only (a break-glass superuser, a scheduler's API account). A directory
    account is the directory's: its password is checked there and nowhere else, so a local password an
    administrator gave it (it would keep working after the directory disabled the account) never logs it in."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is not None and is_directory_account(user):
            logger.warning("login: refused the local password of directory account %s", user.get_username())
            return None
        return user

"""Shared by the test modules of every app: a browser session."""

from __future__ import annotations

from django.test import Client


def logged_in(user) -> Client:
    """A browser (Django's test client) with ``user``'s session, as after a login."""
    client = Client()
    client.force_login(user)
    return client

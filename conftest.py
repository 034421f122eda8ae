"""Fixtures shared by every app: the named users of the test suite.

alice owns clusters, bob is a member of alice's group, charlie is an outsider, root is an admin.
"""

import pytest
from django.contrib.auth.models import Group, User


@pytest.fixture
def team(db):
    return Group.objects.create(name="physics")


@pytest.fixture
def alice(db, team):
    user = User.objects.create_user("alice", "alice@example.org", "alice-password")
    user.groups.add(team)
    return user


@pytest.fixture
def bob(db, team):
    user = User.objects.create_user("bob", "bob@example.org", "bob-password")
    user.groups.add(team)
    return user


@pytest.fixture
def charlie(db):
    return User.objects.create_user("charlie", "charlie@example.org", "charlie-password")


@pytest.fixture
def root(db):
    return User.objects.create_superuser("root", "root@example.org", "root-password")

"""LDAP login against a real, throwaway slapd (portal.ldapserver): users and groups come from the directory,
staff/superuser flags follow directory groups, failures give the user a clear message and never a 500, and
a local superuser still gets in while the directory is down."""

import logging
import os
import shutil
from unittest import mock

import pytest
from django.contrib.auth.models import Group, User
from django.test import override_settings
from django.urls import reverse
from django_auth_ldap.config import LDAPGroupQuery

from portal.auth import LDAP_UNAVAILABLE_MESSAGE, ldap_settings
from portal.ldapserver import DEMO_GROUPS, DEMO_USERS, DirectoryGroup, DirectoryUser, LdapServer

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not shutil.which("slapd") and not os.path.exists("/usr/sbin/slapd"), reason="needs slapd"),
]

INVALID_LOGIN = "Please enter a correct username and password. Note that both fields may be case-sensitive."
BACKENDS = ["portal.auth.ActiveLDAPBackend", "portal.backends.LocalAccountBackend"]
# erin is staff without being an administrator; frank is an administrator without being in the staff group.
USERS = (*DEMO_USERS, DirectoryUser("erin", "Erin", "Helpdesk", 10005), DirectoryUser("frank", "Frank", "Ops", 10006))
EXTRA = {"virtcloud-staff": ("erin",), "virtcloud-admins": ("frank",)}
GROUPS = tuple(DirectoryGroup(g.cn, g.gid_number, (*g.members, *EXTRA.get(g.cn, ()))) for g in DEMO_GROUPS)


def settings_for(server: LdapServer):
    """AUTH_LDAP_* exactly as portal/settings.py builds them at start-up from the environment."""
    with mock.patch.dict(os.environ, server.env()):
        values = ldap_settings()
    return override_settings(AUTHENTICATION_BACKENDS=BACKENDS, **values)


@pytest.fixture(scope="module")
def directory():
    with LdapServer(users=USERS, groups=GROUPS) as server:
        yield server


@pytest.fixture
def ldap_up(directory):
    with settings_for(directory):
        yield directory


@pytest.fixture
def ldap_down():
    """Settings that point at a directory that has just been stopped."""
    server = LdapServer(users=DEMO_USERS[:1], groups=())
    server.start()
    override = settings_for(server)
    server.stop()
    with override:
        yield server


def log_in(client, username, password, url="login"):
    return client.post(reverse(url), {"username": username, "password": password})


def test_ldap_user_logs_in_through_the_login_page_with_groups_mirrored(client, ldap_up):
    Group.objects.create(name="chemistry")
    stale = User.objects.create_user("alice")  # e.g. created earlier: her Django groups follow LDAP
    stale.groups.add(Group.objects.get(name="chemistry"))
    response = log_in(client, "alice", ldap_up.passwords["alice"])
    assert response.status_code == 302 and response["Location"] == reverse("home")
    alice = User.objects.get(username="alice")
    assert (alice.first_name, alice.last_name, alice.email) == ("Alice", "Physicist", "alice@virtcloud.test")
    assert set(alice.groups.values_list("name", flat=True)) == {"physics"}
    assert not alice.is_staff and not alice.is_superuser
    assert not alice.has_usable_password()  # the password stays in the directory
    home = client.get(reverse("home"))
    assert home.status_code == 200 and "physics" in home.content.decode()
    assert client.get(reverse("admin:index")).status_code == 302  # not staff: sent to the admin login


def test_staff_and_superuser_flags_follow_directory_groups(client, ldap_up):
    log_in(client, "dave", ldap_up.passwords["dave"])
    dave = User.objects.get(username="dave")
    assert dave.is_staff and dave.is_superuser
    assert set(dave.groups.values_list("name", flat=True)) == {"virtcloud-staff", "virtcloud-admins"}
    assert client.get(reverse("admin:index")).status_code == 200
    client.logout()
    log_in(client, "erin", ldap_up.passwords["erin"])
    erin = User.objects.get(username="erin")
    assert erin.is_staff and not erin.is_superuser
    client.logout()
    log_in(client, "frank", ldap_up.passwords["frank"])
    frank = User.objects.get(username="frank")
    assert frank.is_staff and frank.is_superuser  # a superuser must be able to open the admin
    assert client.get(reverse("admin:index")).status_code == 200


def test_flags_are_taken_away_when_the_group_membership_is(client, ldap_up):
    from portal.models import DirectoryAccount

    bob = User.objects.create_user("bob", is_staff=True, is_superuser=True)  # the directory's, with stale flags
    DirectoryAccount.objects.create(user=bob, dn=f"uid=bob,{ldap_up.people_base}")
    log_in(client, "bob", ldap_up.passwords["bob"])
    bob = User.objects.get(username="bob")
    assert not bob.is_staff and not bob.is_superuser


@pytest.mark.parametrize("username,password", [("alice", "wrong-password"), ("mallory", "any-password")])
def test_wrong_password_and_unknown_user_get_the_standard_message(client, ldap_up, username, password):
    response = log_in(client, username, password)
    assert response.status_code == 200
    page = response.content.decode()
    assert INVALID_LOGIN in page.replace("&#x27;", "'")
    assert LDAP_UNAVAILABLE_MESSAGE not in page
    assert not User.objects.filter(username=username).exists() or username == "alice"
    assert "_auth_user_id" not in client.session


def test_directory_down_says_so_and_is_not_a_500(client, ldap_down):
    response = log_in(client, "alice", ldap_down.passwords["alice"])
    assert response.status_code == 200
    page = response.content.decode().replace("&#x27;", "'")
    assert LDAP_UNAVAILABLE_MESSAGE in page
    assert INVALID_LOGIN not in page
    admin_login = log_in(client, "alice", ldap_down.passwords["alice"], url="admin:login")
    assert admin_login.status_code == 200
    assert LDAP_UNAVAILABLE_MESSAGE in admin_login.content.decode().replace("&#x27;", "'")


def test_a_service_bind_the_directory_refuses_is_an_outage_not_a_wrong_password(client, directory, settings):
    """The portal's own service account is refused (its password expired, or was rotated without
    ``LDAP_BIND_PASSWORD``): no user can be looked up. That is the directory being unusable — every user was
    told their password was wrong, and locked out after a few tries — not a failed login."""
    from portal.models import LoginFailure

    env = {**directory.env(), "LDAP_BIND_DN": directory.root_dn, "LDAP_BIND_PASSWORD": "expired"}
    with mock.patch.dict(os.environ, env):
        values = ldap_settings()
    with override_settings(AUTHENTICATION_BACKENDS=BACKENDS, **values):
        for _ in range(settings.LOGIN_FAILURES_MAX + 1):
            response = log_in(client, "alice", directory.passwords["alice"])
            page = response.content.decode().replace("&#x27;", "'")
            assert LDAP_UNAVAILABLE_MESSAGE in page and INVALID_LOGIN not in page
            assert "Too many failed logins" not in page
    assert not LoginFailure.objects.exists()


def test_local_superuser_still_logs_in_while_the_directory_is_down(client, ldap_down, root):
    response = log_in(client, "root", "root-password", url="admin:login")
    assert response.status_code == 302
    assert client.get(reverse("admin:index")).status_code == 200


def test_a_local_account_guessed_while_the_directory_is_down_is_throttled(client, ldap_down, root, settings):
    """The local accounts' backend checks the password while the directory is down: a wrong one counts
    towards the limit, which then refuses the right one too. A directory account's password is not checked
    then: its tries do not count."""
    from portal.models import DirectoryAccount, LoginFailure

    settings.LOGIN_FAILURES_MAX = 3
    for _ in range(3):
        response = log_in(client, "root", "guess", url="admin:login")
        assert LDAP_UNAVAILABLE_MESSAGE in response.content.decode().replace("&#x27;", "'")
    response = log_in(client, "root", "root-password", url="admin:login")
    assert response.status_code == 200 and "_auth_user_id" not in client.session
    assert "Too many failed logins for this account" in response.content.decode()
    alice = User.objects.create_user("alice")
    DirectoryAccount.objects.create(user=alice, dn=f"uid=alice,{ldap_down.people_base}")
    for _ in range(4):
        log_in(client, "Alice", ldap_down.passwords["alice"])
    assert not LoginFailure.objects.filter(username__iexact="alice").exists()


def test_known_ldap_user_cannot_fall_back_to_a_local_password_while_down(client, ldap_down, caplog):
    """A directory account with a local password (an administrator set one; here the directory's own) would
    log in without the directory, even after it disabled the account: refused while the directory is down.
    The same account and password log in once the account is no longer the directory's, so it is the
    directory check that refuses, not a wrong password."""
    from portal.models import DirectoryAccount

    password = ldap_down.passwords["alice"]
    alice = User.objects.create_user("alice", password=password)
    DirectoryAccount.objects.create(user=alice, dn=f"uid=alice,{ldap_down.people_base}")
    response = log_in(client, "alice", password)
    assert response.status_code == 200 and "_auth_user_id" not in client.session
    assert LDAP_UNAVAILABLE_MESSAGE in response.content.decode().replace("&#x27;", "'")
    assert "refused the local password of directory account alice" in caplog.text
    DirectoryAccount.objects.filter(user=alice).delete()
    assert log_in(client, "alice", password).status_code == 302


def test_ldap_settings_from_the_environment(directory):
    values = settings_for(directory)
    assert values.options["AUTH_LDAP_SERVER_URI"] == directory.uri
    flags = values.options["AUTH_LDAP_USER_FLAGS_BY_GROUP"]
    assert flags["is_superuser"] == "cn=virtcloud-admins,ou=groups,dc=virtcloud,dc=test"
    assert isinstance(flags["is_staff"], LDAPGroupQuery)  # staff group OR superuser group
    with mock.patch.dict(os.environ, {"LDAP_SERVER_URI": ""}, clear=False):
        assert ldap_settings() == {}
    # entries are told apart by entryUUID, asked for by name (an operational attribute); set empty: by uid alone
    assert values.options["LDAP_USER_UUID_ATTR"] == "entryUUID"
    assert values.options["AUTH_LDAP_USER_SEARCH"].attrlist == ["*", "entryUUID"]
    with mock.patch.dict(os.environ, {**directory.env(), "LDAP_USER_UUID_ATTR": ""}):
        off = ldap_settings()
    assert off["LDAP_USER_UUID_ATTR"] == "" and off["AUTH_LDAP_USER_SEARCH"].attrlist is None


def test_passwords_never_reach_the_logs(client, ldap_up, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django_auth_ldap")
    log_in(client, "alice", "wrong-password-in-logs")
    log_in(client, "bob", ldap_up.passwords["bob"])
    assert "django_auth_ldap" in {r.name for r in caplog.records}  # the backend's own lines are captured
    assert "wrong-password-in-logs" not in caplog.text and ldap_up.passwords["bob"] not in caplog.text


def test_throwaway_server_stops_and_leaves_nothing():
    server = LdapServer(users=DEMO_USERS[:1], groups=())
    with server:
        directory, process = server.directory, server.process
        assert directory.is_dir() and server.running
    assert process.poll() is not None and not directory.exists()
    server.stop()  # twice is fine


# --- the periodic sync: an API token acts without a login, so the directory's changes must reach the portal
# without one ----------------------------------------------------------------------------------------------


@pytest.fixture
def own_directory():
    """A directory of this test's own (the test changes it)."""
    with LdapServer(users=USERS, groups=GROUPS) as server, settings_for(server):
        yield server


CLEAN = {"deactivated": [], "failed": [], "error": "", "left": 0, "no_identity": 0, "no_identity_names": []}


def run_sync():
    """The periodic task's report; one that failed (the error said) is the task's failure, with its report."""
    from portal import tasks
    from portal.celery import app

    try:
        return app.tasks["portal.ldap_sync"].apply().get()
    except tasks.LdapSyncFailed as exc:
        assert exc.report["error"]
        return exc.report


def closed_cluster_of(owner, group):
    from access.models import Gateway
    from access.tests.fixtures import make_cluster, make_gateway

    if not Gateway.objects.filter(name="gw1").exists():
        make_gateway("gw1")
    return make_cluster(owner, name=f"c-{owner.username}", group=group)


def test_sync_takes_a_group_the_directory_took_away_and_its_credentials(client, own_directory):
    from access import services
    from access.models import Credential, RevocationReason

    for uid in ("alice", "bob"):
        client.logout()  # (a logged-in user at the login page is only sent on)
        assert log_in(client, uid, own_directory.passwords[uid]).status_code == 302
    alice, bob = User.objects.get(username="alice"), User.objects.get(username="bob")
    assert alice.directory_account.dn == f"uid=alice,{own_directory.people_base}"
    physics = Group.objects.get(name="physics")
    cluster = closed_cluster_of(bob, physics)
    services.vpn_profile_issue(user=alice, clusters=[cluster])
    services.ssh_certificate_issue(user=bob, cluster=cluster)
    local = User.objects.create_user("pbs")  # a scheduler's API account: not in the directory, never touched

    own_directory.modify(
        f"dn: {own_directory.group_dn('physics')}\nchangetype: modify\ndelete: memberUid\nmemberUid: alice\n"
    )
    report = run_sync()

    assert report == {**CLEAN, "checked": 2}
    assert not alice.groups.filter(name="physics").exists() and bob.groups.filter(name="physics").exists()
    lost = Credential.objects.get(user=alice)
    assert lost.revoked_at and lost.revocation_reason == RevocationReason.AFFILIATION_CHANGED
    assert Credential.objects.get(user=bob).revoked_at is None
    local.refresh_from_db()
    assert local.is_active


def _give_the_name_to_someone_else(directory, uid: str, given: str, password: str) -> None:
    """The operator deletes ``uid``'s entry and later makes a new one, for another person, with the same uid."""
    from portal.ldapserver import USERS_GID, ssha

    dn = f"uid={uid},{directory.people_base}"
    directory.modify(f"dn: {dn}\nchangetype: delete\n")
    directory.modify(
        f"dn: {dn}\nchangetype: add\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\nuid: {uid}\n"
        f"cn: {given} Newcomer\ngivenName: {given}\nsn: Newcomer\nuidNumber: 20001\ngidNumber: {USERS_GID}\n"
        f"homeDirectory: /home/{uid}\nuserPassword: {ssha(password)}\n"
    )


def test_a_name_the_directory_gives_to_another_entry_is_a_new_account_not_the_former_holders(client, own_directory):
    """A uid given to someone else later (the entry deleted, a new one made with that uid): the newcomer does not
    inherit the former holder's account — clusters, credentials, admin rights. The former holder's account is
    kept, renamed and deactivated (its credentials revoked); the newcomer gets a new one. At a login and at a
    sync alike; the entries are told apart by their entryUUID, recorded when an account is linked."""
    from access import services
    from access.models import Credential, RevocationReason

    assert log_in(client, "charlie", own_directory.passwords["charlie"]).status_code == 302
    former = User.objects.get(username="charlie")
    linked = former.directory_account.entry_uuid
    assert linked.startswith("entryuuid:") and len(linked) == len("entryuuid:") + 36  # (slapd's entryUUID)
    cluster = closed_cluster_of(former, None)
    services.vpn_profile_issue(user=former, clusters=[cluster])
    client.logout()

    _give_the_name_to_someone_else(own_directory, "charlie", "Charlotte", "charlotte-secret-1")
    local = User.objects.create_user("Charlie", password="a-local-one-1")  # (in use: never the directory's)
    assert log_in(client, "charlie", "charlotte-secret-1").status_code == 302
    newcomer = User.objects.get(username="charlie")
    local.refresh_from_db()
    assert not hasattr(local, "directory_account") and local.check_password("a-local-one-1")
    assert newcomer.pk != former.pk and newcomer.first_name == "Charlotte" and newcomer.is_active
    assert not newcomer.clusters.exists() and not Credential.objects.filter(user=newcomer).exists()
    former.refresh_from_db()
    assert (former.username, former.is_active) == (f"charlie+former{former.pk}", False)
    assert Credential.objects.get(user=former).revocation_reason == RevocationReason.PRIVILEGE_WITHDRAWN
    assert newcomer.directory_account.entry_uuid not in ("", former.directory_account.entry_uuid)
    from clusters.models import VirtualCluster

    assert VirtualCluster.objects.get(pk=cluster.pk).owner_id == former.pk
    client.logout()

    # the same at a sync: bob's name goes to someone else; bob's account is retired (one deactivation, within the
    # sync's bounds), the newcomer's is made at their login
    assert log_in(client, "bob", own_directory.passwords["bob"]).status_code == 302
    bob = User.objects.get(username="bob")
    _give_the_name_to_someone_else(own_directory, "bob", "Bobbie", "bobbie-secret-1")
    assert run_sync()["deactivated"] == ["bob"]
    bob.refresh_from_db()
    assert (bob.username, bob.is_active) == (f"bob+former{bob.pk}", False)
    assert not User.objects.filter(username="bob").exists()
    client.logout()
    assert log_in(client, "bob", "bobbie-secret-1").status_code == 302
    assert User.objects.get(username="bob").first_name == "Bobbie"
    # a login of the same entry again is the same account (nothing retired)
    client.logout()
    assert log_in(client, "charlie", "charlotte-secret-1").status_code == 302
    assert User.objects.get(username="charlie").pk == newcomer.pk


def test_a_directory_whose_entries_all_changed_identity_retires_nobody_and_ldap_relink_links_them_again(
    client, own_directory
):
    """Every account's entry with another identity at once (the directory rebuilt with ``ldapadd``, moved to a new
    server) is not every name given to someone else: the sync retires none past LDAP_SYNC_DEACTIVATE_MAX and says
    what to do; ``manage.py ldap_relink`` records the entries as they are now, and the next sync is clean."""
    from io import StringIO

    from django.core.management import call_command

    from portal.models import DirectoryAccount

    for user in USERS:
        client.logout()
        assert log_in(client, user.uid, own_directory.passwords[user.uid]).status_code == 302
    DirectoryAccount.objects.update(entry_uuid="entryuuid:00000000-0000-0000-0000-000000000000")  # (rebuilt)
    report = run_sync()
    assert report["deactivated"] == [] and "ldap_relink" in report["error"], report
    assert User.objects.filter(is_active=True, username__in=[u.uid for u in USERS]).count() == len(USERS)
    out = StringIO()
    call_command("ldap_relink", "--dry-run", stdout=out)  # each account with its identity before and now, first
    assert f"would relink {len(USERS)} account(s)" in out.getvalue()
    assert "alice: entryuuid:00000000-0000-0000-0000-000000000000 -> entryuuid:" in out.getvalue()
    assert DirectoryAccount.objects.filter(entry_uuid__startswith="entryuuid:00000000").count() == len(USERS)
    out = StringIO()
    call_command("ldap_relink", stdout=out)
    assert f"relinked {len(USERS)} account(s)" in out.getvalue()
    assert not DirectoryAccount.objects.filter(entry_uuid__startswith="entryuuid:00000000").exists()
    assert run_sync() == {**CLEAN, "checked": len(USERS)}
    # an attribute changed in the settings is no verdict either: the accounts are linked again as they sync
    DirectoryAccount.objects.update(entry_uuid="nsuniqueid:1")
    assert run_sync()["deactivated"] == []
    assert not DirectoryAccount.objects.filter(entry_uuid="nsuniqueid:1").exists()


def test_sync_deactivates_an_account_gone_from_the_directory(client, own_directory):
    from access import services
    from access.models import Credential, RevocationReason
    from portal.models import AuditEntry
    from portal.tokens import token_create

    assert log_in(client, "charlie", own_directory.passwords["charlie"]).status_code == 302
    charlie = User.objects.get(username="charlie")
    services.vpn_profile_issue(user=charlie, clusters=[closed_cluster_of(charlie, None)])
    _, secret = token_create(user=charlie, name="script", scopes=["clusters:read"])

    own_directory.modify(f"dn: uid=charlie,{own_directory.people_base}\nchangetype: delete\n")
    assert run_sync()["deactivated"] == ["charlie"]

    charlie.refresh_from_db()
    assert not charlie.is_active
    assert Credential.objects.get(user=charlie).revocation_reason == RevocationReason.PRIVILEGE_WITHDRAWN
    assert client.get("/api/clusters/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 401
    # his browser session ends too (django-auth-ldap's backend kept it: the pages still showed him his clusters)
    assert client.get("/access/").status_code == 302 and not client.get("/api/clusters/").wsgi_request.user.is_active
    assert AuditEntry.objects.filter(
        object_id=str(charlie.pk), message__contains="no longer in the directory", actor="ldap-sync"
    )
    assert run_sync()["checked"] == 0  # an inactive account is left alone (an admin may reactivate it)


def test_a_name_two_entries_answer_to_is_not_decided_by_the_one_returned_first(client, own_directory, monkeypatch):
    """A copy of bob's entry in another branch of the user base (a guests OU, a test copy): the sync cannot tell
    which is the person — the login admits neither — and the first entry the server returned decided. The order
    is the server's (slapd answers in creation order, bob's own first; here its answers come reversed, the copy
    first, as another server may): the copy's identity was taken for bob's entry, and his account retired as the
    name's former holder (renamed, deactivated, its credentials revoked). Now bob counts as not synced, and
    nobody is deactivated."""
    from portal import auth

    assert log_in(client, "bob", own_directory.passwords["bob"]).status_code == 302
    guests = f"ou=guests,{own_directory.people_base}"
    own_directory.modify(
        f"dn: {guests}\nchangetype: add\nobjectClass: organizationalUnit\nou: guests\n\n"
        f"dn: uid=bob,{guests}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: bob\ncn: Bob Copy\nsn: Copy\n"
    )
    connect = auth._connect

    def copy_first(config):
        conn = connect(config)
        search = conn.search_s
        conn.search_s = lambda *args, **kwargs: list(reversed(search(*args, **kwargs)))
        return conn

    monkeypatch.setattr(auth, "_connect", copy_first)
    report = run_sync()
    assert ("bob" in report["failed"], report["deactivated"]) == (True, []), report
    assert User.objects.get(username="bob").is_active


def test_a_group_name_longer_than_a_portal_groups_is_left_out_not_a_failed_login(client, own_directory):
    """A directory group whose cn is longer than a portal group's name (150): mirrored, the database refused it
    and every login of its members was a 500. It is left out; the member's other groups are theirs as ever."""
    long = "g" * 151
    own_directory.modify(
        f"dn: {own_directory.group_dn(long)}\nchangetype: add\nobjectClass: posixGroup\ncn: {long}\n"
        "gidNumber: 29999\nmemberUid: bob\n"
    )
    assert log_in(client, "bob", own_directory.passwords["bob"]).status_code == 302
    bob = User.objects.get(username="bob")
    names = set(bob.groups.values_list("name", flat=True))
    assert names and long not in names and all(len(name) <= 150 for name in names)


def test_one_account_the_sync_cannot_update_fails_alone_and_the_run_still_deactivates(client, own_directory):
    """An account of the directory that cannot be brought up to date (here: a local account named "Bob" beside
    the directory's "bob", which django-auth-ldap looked up in any case — MultipleObjectsReturned; a name longer
    than the account's column did the same on PostgreSQL) stopped the whole run, and every run after it (it
    stayed first in line): nobody who left the directory was deactivated, and bob's logins were 500s. Now it
    takes the directory's own account; a name too long is cut; the others are synced, the departed deactivated."""
    for name in ("bob", "charlie"):
        assert log_in(client, name, own_directory.passwords[name]).status_code == 302
        client.logout()
    User.objects.create_user("Bob", password="break-glass")  # a local account: differs only in case
    long_name = "Ž" * 300
    own_directory.modify(
        f"dn: uid=bob,{own_directory.people_base}\nchangetype: modify\nreplace: givenName\ngivenName: {long_name}\n"
    )
    own_directory.modify(f"dn: uid=charlie,{own_directory.people_base}\nchangetype: delete\n")
    report = run_sync()
    assert (report["failed"], report["deactivated"]) == ([], ["charlie"])
    bob = User.objects.get(username="bob")
    assert bob.first_name == "Ž" * 150 and bob.is_active and not User.objects.get(username="charlie").is_active
    assert User.objects.get(username="Bob").first_name == ""  # the local one is left alone
    assert log_in(client, "bob", own_directory.passwords["bob"]).status_code == 302
    assert client.get(reverse("home")).wsgi_request.user == bob


def test_admin_rights_a_directory_group_gives_or_takes_are_in_the_audit_log(client, own_directory):
    """The user model is not audited: the staff/superuser flags directory groups set (at a login, by the sync)
    are, with the user, the flags before and after, and the sync as the actor."""
    from portal.models import AuditEntry

    def flag_entries(user):
        entries = AuditEntry.objects.filter(content_type__model="user", object_id=str(user.pk)).order_by("id")
        return entries.exclude(message__startswith="logged in")  # (the login's own entry)

    assert log_in(client, "dave", own_directory.passwords["dave"]).status_code == 302
    dave = User.objects.get(username="dave")
    (given,) = flag_entries(dave)
    assert given.changes == {"is_staff": [False, True], "is_superuser": [False, True]}
    assert (given.actor, given.object_repr) == ("ldap-login", "dave")
    assert f"uid=dave,{own_directory.people_base}" in given.message

    own_directory.modify(
        f"dn: {own_directory.group_dn('virtcloud-admins')}\nchangetype: modify\ndelete: memberUid\nmemberUid: dave\n"
    )
    assert run_sync()["failed"] == []
    taken = flag_entries(dave).last()
    assert (taken.actor, taken.action, taken.object_repr) == ("ldap-sync", "update", "dave")
    assert taken.changes == {"is_superuser": [True, False]}  # still staff (virtcloud-staff)
    run_sync()
    assert flag_entries(dave).count() == 2  # nothing changed: nothing recorded


def test_sync_with_the_directory_down_changes_nothing(client, own_directory):
    from portal.auth import ldap_sync

    assert log_in(client, "alice", own_directory.passwords["alice"]).status_code == 302
    own_directory.stop()
    report = ldap_sync()
    assert report.error.startswith("the directory cannot be searched") and report.checked == 0
    alice = User.objects.get(username="alice")
    assert alice.is_active and alice.groups.filter(name="physics").exists()


def test_a_directory_entry_never_takes_over_a_local_account_of_its_name(client, own_directory):
    """A directory entry named like a local account in use (the break-glass superuser, a scheduler's API
    account with tokens) does not log in as it: django-auth-ldap would fill the local account in from the
    directory (its flags and groups, and from then on the sync's). The local account keeps its password."""
    from portal.tokens import token_create

    User.objects.create_superuser("alice", "alice@example.org", "break-glass-password")
    assert log_in(client, "alice", own_directory.passwords["alice"]).status_code == 200  # refused
    alice = User.objects.get(username="alice")
    assert alice.is_superuser and not hasattr(alice, "directory_account")
    assert log_in(client, "alice", "break-glass-password").status_code == 302
    client.logout()
    token_create(user=User.objects.create_user("bob"), name="pbs", scopes=["clusters:read"])  # an API account
    assert log_in(client, "bob", own_directory.passwords["bob"]).status_code == 200
    assert not hasattr(User.objects.get(username="bob"), "directory_account")


def test_sync_deactivates_nobody_when_the_directory_shows_no_account(client, own_directory):
    """A directory that answers every search without an entry (a replica being rebuilt, an ACL hiding the
    users from the bind account) says nothing about who left: nobody is deactivated, and the run says why —
    as a failed run (it was recorded as a success: alerts on the sync's age never fired)."""
    from portal import tasks
    from portal.celery import app

    for uid in ("alice", "bob"):
        client.logout()
        assert log_in(client, uid, own_directory.passwords[uid]).status_code == 302
    for user in USERS:
        own_directory.modify(f"dn: uid={user.uid},{own_directory.people_base}\nchangetype: delete\n")
    with pytest.raises(tasks.LdapSyncFailed, match="the directory shows no account under"):
        app.tasks["portal.ldap_sync"].apply().get()  # a failure for the periodic tasks' records, not a success
    report = run_sync()
    assert report["deactivated"] == [] and report["error"].startswith("the directory shows no account under")
    assert User.objects.filter(username__in=["alice", "bob"], is_active=True).count() == 2


def test_sync_deactivates_nobody_when_more_go_than_it_may(client, own_directory, settings):
    settings.LDAP_SYNC_DEACTIVATE_MAX = 0.0  # at least 5 may go whatever the share: make 6 accounts go
    from portal.models import DirectoryAccount

    for n in range(6):
        user = User.objects.create_user(f"gone{n}")
        DirectoryAccount.objects.create(user=user, dn=f"uid=gone{n},{own_directory.people_base}")
    report = run_sync()
    assert report["deactivated"] == [] and "6 of 6 accounts were not found" in report["error"]
    assert User.objects.filter(username__startswith="gone", is_active=True).count() == 6
    User.objects.filter(username="gone5").delete()  # five: within bounds
    assert sorted(run_sync()["deactivated"]) == [f"gone{n}" for n in range(5)]


def test_a_run_the_directory_stops_leaves_the_accounts_it_found_gone_first_in_line(client, own_directory, monkeypatch):
    """charlie is found gone, then the directory times out on the next account: nobody is deactivated (the run
    could not tell the whole story) and charlie stays first in line — he was sent to the back, a whole rotation
    of a large directory before he was looked at again."""
    import ldap as python_ldap

    from portal import auth
    from portal.models import DirectoryAccount

    for name in ("charlie", "dave"):
        assert log_in(client, name, own_directory.passwords[name]).status_code == 302
        client.logout()
    before = DirectoryAccount.objects.get(user__username="charlie").synced_at
    own_directory.modify(f"dn: uid=charlie,{own_directory.people_base}\nchangetype: delete\n")
    real = auth._in_directory

    def times_out_on_dave(conn, search, username):
        if username == "dave":
            raise python_ldap.TIMEOUT({"desc": "Timed out"})
        return real(conn, search, username)

    monkeypatch.setattr(auth, "_in_directory", times_out_on_dave)
    report = run_sync()
    assert report["deactivated"] == [] and "cannot be searched: TIMEOUT" in report["error"]
    assert DirectoryAccount.objects.get(user__username="charlie").synced_at == before
    monkeypatch.undo()
    assert run_sync()["deactivated"] == ["charlie"]


def test_a_referral_is_not_taken_for_an_account_that_left(client, own_directory):
    """An entry moved into a subtree delegated to another server comes back as a referral: the account is
    reported as not checked, not deactivated."""
    import ldap as python_ldap

    assert log_in(client, "alice", own_directory.passwords["alice"]).status_code == 302
    own_directory.modify(
        f"dn: uid=alice,{own_directory.people_base}\nchangetype: delete\n\n"
        f"dn: ou=partner,{own_directory.people_base}\nchangetype: add\nobjectClass: referral\n"
        f"objectClass: extensibleObject\nou: partner\nref: ldap://ldap.partner.example/ou=partner,"
        f"{own_directory.people_base}\n"
    )
    connection = python_ldap.initialize(own_directory.uri)
    connection.set_option(python_ldap.OPT_REFERRALS, 0)
    answer = connection.search_s(own_directory.people_base, python_ldap.SCOPE_SUBTREE, "(uid=alice)", ["1.1"])
    assert answer and all(dn is None for dn, _ in answer)  # only the referral
    report = run_sync()
    assert report["deactivated"] == [] and report["failed"] == ["alice"]
    assert User.objects.get(username="alice").is_active


def test_a_sync_out_of_time_leaves_the_rest_for_the_next_run_which_starts_with_them(client, own_directory, settings):
    """A run stops at LDAP_SYNC_TIME_BUDGET (a big directory over a slow link): the accounts it did not reach
    come first in the next run, so no tail of accounts is left out run after run."""
    import time

    for uid in ("alice", "bob", "charlie"):
        client.logout()
        assert log_in(client, uid, own_directory.passwords[uid]).status_code == 302
        time.sleep(0.01)  # distinct sync times: alice the oldest
    settings.LDAP_SYNC_TIME_BUDGET = 0  # one account per run
    seen = []
    for _ in range(3):
        report = run_sync()
        assert report["checked"] == 1 and report["error"] == ""
        seen.append(
            User.objects.filter(directory_account__isnull=False).order_by("-directory_account__synced_at")[0].username
        )
    assert seen == ["alice", "bob", "charlie"]
    assert run_sync()["left"] == 2


def test_sync_without_ldap_says_so():  # (beat schedules it only with LDAP: test_settings)
    assert run_sync()["error"] == "LDAP is not configured (LDAP_SERVER_URI)"


def test_admin_lists_the_directory_accounts(client, own_directory, admin_client):
    assert log_in(client, "alice", own_directory.passwords["alice"]).status_code == 302
    page = admin_client.get(reverse("admin:portal_directoryaccount_changelist"))
    assert page.status_code == 200 and f"uid=alice,{own_directory.people_base}" in page.content.decode()
    account = User.objects.get(username="alice").directory_account
    assert admin_client.get(reverse("admin:portal_directoryaccount_change", args=[account.pk])).status_code == 200
    # never deleted there: the account would leave the sync, which deactivates it when it leaves the directory
    assert admin_client.post(reverse("admin:portal_directoryaccount_delete", args=[account.pk])).status_code == 403
    r = admin_client.post(
        reverse("admin:portal_directoryaccount_changelist"),
        {"action": "delete_selected", "_selected_action": [account.pk], "post": "yes"},
    )
    assert r.status_code in (200, 302) and User.objects.get(username="alice").directory_account.pk == account.pk


def test_logging_out_says_so_and_a_typed_logout_address_asks_first(client, alice):
    client.force_login(alice)
    page = client.get(reverse("logout"))  # typed or bookmarked: a page with a button, not a blank 405
    assert page.status_code == 200 and "You are logged in as alice" in page.content.decode()
    assert client.get(reverse("home")).status_code == 200  # a GET logs nobody out
    response = client.post(reverse("logout"), follow=True)
    assert response.redirect_chain[-1][0] == reverse("login")
    assert "You are logged out." in response.content.decode()
    assert client.get(reverse("logout")).url == reverse("login")  # logged out already
    assert client.post(reverse("logout"), follow=True).content.decode().count("You are logged out.") == 0


def test_a_sync_never_writes_back_a_deactivation_or_a_sign_out_made_while_it_read_the_directory(
    client, own_directory, monkeypatch
):
    """django-auth-ldap loads the account, asks the directory (round trips), then saves the whole row: a
    deactivation, or "lost my laptop"'s new unusable password (which ends the lost browser's session) committed
    meanwhile, was written back as loaded — the account active again, the lost session valid again."""
    from django_auth_ldap.backend import _LDAPUser

    from portal import sessions

    assert log_in(client, "alice", own_directory.passwords["alice"]).status_code == 302
    alice = User.objects.get(username="alice")
    password_before = alice.password
    real = _LDAPUser._populate_user_from_attributes

    def meanwhile(self):
        real(self)
        if self._user.username == "alice":  # (the row is loaded: the portal changes it now)
            sessions.sign_out_elsewhere(user=User.objects.get(username="alice"), keep=None, why="test")
            User.objects.filter(username="alice").update(is_active=False)

    monkeypatch.setattr(_LDAPUser, "_populate_user_from_attributes", meanwhile)
    run_sync()
    alice = User.objects.get(username="alice")
    assert not alice.is_active and alice.password != password_before and not alice.has_usable_password()


def test_a_sync_says_which_entries_lack_the_identity_attribute(client, own_directory, settings, caplog):
    """``LDAP_USER_UUID_ATTR`` names an attribute the directory does not have (a directory server that calls it
    nsUniqueId): the protection against a reused name is off without a word. The sync's report counts and names
    such entries, and its log says what to set."""
    for user in USERS:
        client.logout()
        assert log_in(client, user.uid, own_directory.passwords[user.uid]).status_code == 302
    assert run_sync() == {**CLEAN, "checked": len(USERS)}  # (slapd has entryUUID)
    settings.LDAP_USER_UUID_ATTR = "nsUniqueId"
    with caplog.at_level("WARNING", logger="portal.auth"):
        report = run_sync()
    assert report == {
        **CLEAN,
        "checked": len(USERS),
        "no_identity": len(USERS),
        "no_identity_names": sorted(u.uid for u in USERS),
    }
    assert f"{len(USERS)} entr(ies) carry no nsUniqueId (LDAP_USER_UUID_ATTR)" in caplog.text
    settings.LDAP_USER_UUID_ATTR = ""  # (off on purpose: nothing to say)
    assert run_sync() == {**CLEAN, "checked": len(USERS)}

"""The images page: the images a user may boot, registering one of their own (refusals at their field, what was
typed kept), deleting it; the rules are the API's (clusters/tests/test_images.py)."""

from __future__ import annotations

import pytest

from clusters.models import Image, VirtualCluster
from portal.tests.helpers import logged_in

pytestmark = pytest.mark.django_db

URL = "/clusters/images/"


@pytest.fixture
def catalogue(db):
    return Image.objects.create(name="debian-12", approved=True, description="Debian 12, maintained")


def rows(page) -> list[str]:
    import re

    return re.findall(r'<tr data-image="([^"]+)"', page.content.decode())


def test_the_page_lists_what_one_may_boot_and_offers_delete_on_ones_own_only(alice, bob, charlie, catalogue, team):
    Image.objects.create(name="alice-img", owner=alice, group=team)
    Image.objects.create(name="charlie-img", owner=charlie)
    Image.objects.create(name="retired-img", owner=alice, retired_at="2026-01-01T00:00Z")
    page = logged_in(bob).get(URL)
    assert page.status_code == 200 and rows(page) == ["alice-img", "debian-12"]
    text = page.content.decode()
    assert "alice (shared with physics)" in text and "the provider" in text
    assert 'aria-label="Delete alice-img"' not in text  # bob sees it, only alice deletes it
    assert 'aria-label="Delete alice-img"' in logged_in(alice).get(URL).content.decode()
    assert 'aria-label="Delete debian-12"' not in logged_in(alice).get(URL).content.decode()
    assert '<a href="/clusters/images/" aria-current="page">Images</a>' in text


def test_registering_an_image_then_a_refusal_at_its_field_keeps_what_was_typed(alice, catalogue, team):
    client = logged_in(alice)
    done = client.post(URL, {"name": "my-stack", "source": "https://example.org/s.qcow2", "group": team.pk})
    assert done.status_code == 302 and done["Location"] == URL
    image = Image.objects.get(name="my-stack")
    assert (image.owner, image.group, image.approved) == (alice, team, False)
    page = client.get(URL).content.decode()
    assert "Registered my-stack, shared with physics: clusters booting it are closed." in page

    taken = client.post(URL, {"name": "debian-12", "description": "mine too"})
    assert taken.status_code == 400
    text = taken.content.decode()
    assert "an image named debian-12 already exists" in text.lower() and 'value="mine too"' in text
    assert 'name="name" value="debian-12"' in text and "autofocus" in text
    bad = client.post(URL, {"name": "not a slug"})
    assert bad.status_code == 400 and Image.objects.count() == 2


def test_the_quota_is_said_above_the_form(settings, alice):
    settings.IMAGE_QUOTA = 1
    client = logged_in(alice)
    assert client.post(URL, {"name": "one"}).status_code == 302
    refused = client.post(URL, {"name": "two"})
    assert refused.status_code == 400 and "already has 1 images of 1 allowed" in refused.content.decode()


def test_delete_removes_retires_or_refuses_with_a_message(alice, bob, team):
    from access.tests.fixtures import make_cluster

    client = logged_in(alice)
    Image.objects.create(name="unused", owner=alice)
    assert client.post(f"{URL}unused/delete/").status_code == 302
    assert not Image.objects.filter(name="unused").exists()

    cluster = make_cluster(alice, name="mpi")  # boots user-image, made alice's here
    Image.objects.filter(name="user-image").update(owner=alice)
    client.post(f"{URL}user-image/delete/")
    assert "1 live cluster(s) boot image user-image: they must end first" in client.get(URL).content.decode()
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="torn_down")
    client.post(f"{URL}user-image/delete/")
    assert Image.objects.get(name="user-image").retired_at is not None

    Image.objects.create(name="shared", owner=alice, group=team)
    assert logged_in(bob).post(f"{URL}shared/delete/").status_code == 302
    assert Image.objects.filter(name="shared").exists()  # not bob's
    assert logged_in(bob).get(f"{URL}shared/delete/").status_code == 302  # (to the list, saying so)


def test_delete_asks_first_and_says_what_it_does(alice):
    """One click deleted an image, or retired it for good (its name then stays taken): the page asks first, as
    tearing a cluster down does, and says which it will be; the list links to it."""
    from access.tests.fixtures import make_cluster

    client = logged_in(alice)
    Image.objects.create(name="unused", owner=alice)
    listed = client.get(URL).content.decode()
    assert f'href="{URL}unused/delete/" aria-label="Delete unused"' in listed
    page = client.get(f"{URL}unused/delete/")
    text = page.content.decode()
    assert page.status_code == 200 and "no-store" in page["Cache-Control"]
    assert "<h1>Delete image unused?</h1>" in text and "its name is free again" in text
    assert '<button type="submit" class="danger">Delete unused</button>' in text
    assert Image.objects.filter(name="unused").exists()  # looking deletes nothing

    cluster = make_cluster(alice, name="mpi")  # boots user-image, made alice's here
    Image.objects.filter(name="user-image").update(owner=alice)
    text = client.get(f"{URL}user-image/delete/").content.decode()
    assert "cannot be deleted now" in text and "1 live cluster boots it: it" in text
    assert 'class="danger"' not in text.split("</header>")[1]
    VirtualCluster.objects.filter(pk=cluster.pk).update(state="torn_down")
    text = client.get(f"{URL}user-image/delete/").content.decode()
    assert "it is <strong>retired</strong>" in text and "Its name stays taken" in text
    assert '<button type="submit" class="danger">Retire user-image</button>' in text


def test_the_page_costs_the_same_queries_for_many_images(alice, team, django_assert_max_num_queries):
    for i in range(12):
        Image.objects.create(name=f"img{i}", owner=alice, group=team)
    client = logged_in(alice)
    with django_assert_max_num_queries(5):  # session, user, images (owner and group joined), the user's groups
        assert len(rows(client.get(URL))) == 12


def test_an_administrator_sees_what_they_may_boot_here_and_everyone_elses_images_in_the_admin(
    alice, bob, root, catalogue, team
):
    """An administrator who sees every user's images was shown all of them on this page, unbounded (thousands of
    rows): the page lists what they may boot, and counts the others with a link to the admin's list."""
    from django.test import Client

    from clusters.models import Image

    for n in range(3):
        Image.objects.create(owner=bob, name=f"bobs-{n}", source="https://images.example.org/b.qcow2")
    client = Client()
    client.force_login(root)
    page = client.get(URL).content.decode()
    assert "bobs-0" not in page
    assert 'id="other-images">3 more images of other users' in page and "/admin/clusters/image/" in page
    client.force_login(alice)  # (a user sees no such line)
    assert 'id="other-images"' not in client.get(URL).content.decode()

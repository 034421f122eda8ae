"""The embedded broker (kombu's filesystem transport, the default): a message file appears whole or not at all."""

from __future__ import annotations

from queue import Empty

import pytest
from kombu import Connection
from kombu.transport import filesystem

from portal import broker


@pytest.fixture
def channel(tmp_path):
    folders = {name: tmp_path / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir()
    options = {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "store_processed": False,
    }
    with Connection("filesystem://localhost/", transport_options=options) as conn:  # portal.celery: the scheme
        assert isinstance(conn.default_channel, broker.Channel)
        yield conn.default_channel


def test_a_consumer_looking_while_a_message_is_written_does_not_take_it(channel, monkeypatch):
    """kombu creates the file, then writes it: a worker that listed the folder in between read an empty
    message and died on the JSON error (the demo's worker did, with beat sending its periodic tasks)."""
    seen = []
    real_dumps = broker.dumps

    def dumps_while_a_consumer_looks(payload):
        try:
            seen.append(channel._get("celery"))
        except Empty:
            seen.append(None)
        return real_dumps(payload)

    monkeypatch.setattr(broker, "dumps", dumps_while_a_consumer_looks)
    monkeypatch.setattr(filesystem, "dumps", dumps_while_a_consumer_looks)  # kombu's own writer, if it ran
    channel._put("celery", {"body": "reconcile"})
    assert seen == [None]
    assert channel._get("celery") == {"body": "reconcile"}
    with pytest.raises(Empty):
        channel._get("celery")


def test_messages_reach_their_own_queue(channel):
    for i in range(3):
        channel._put("celery", {"n": i})
    channel._put("host.brno-h1", {"n": "h"})
    assert channel._size("celery") == 3
    assert sorted(channel._get("celery")["n"] for _ in range(3)) == [0, 1, 2]  # kombu orders by the millisecond
    assert channel._get("host.brno-h1") == {"n": "h"}


def test_messages_are_taken_oldest_first_across_a_digit_and_a_reboot(channel, monkeypatch):
    """The name began with a millisecond counter since boot, not padded: when it gained a digit (2.8 hours of
    uptime, 27.8 hours, …) or started again at a reboot, new messages sorted before the ones waiting, which then
    waited for the queue to drain."""
    import itertools

    clock = itertools.chain([9_999_999_999_999_999, 10_000_000_000_000_001])  # (ns: a digit gained between)
    monkeypatch.setattr(broker, "time_ns", lambda: next(clock))
    channel._put("celery", {"n": "first"})
    channel._put("celery", {"n": "second"})
    assert [channel._get("celery")["n"] for _ in range(2)] == ["first", "second"]

"""The embedded broker: kombu's filesystem transport (one machine, no server), with whole message files.

kombu's own writer creates a message file in the queue folder, then writes it; a consumer that lists the
folder in between takes the empty file and its worker dies on the JSON error (kombu issue 1551) — the demo's
worker did, a quarter of an hour in, as beat sent its periodic tasks. Here a message is written under a name
no consumer takes (``….msg.part``) and renamed into place: a rename within a folder is atomic.

``reachable(app)``: whether the broker (this one, or Redis/RabbitMQ) answers now.
"""

from __future__ import annotations

import os
import uuid
from time import time_ns

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # kombu's name: consumers take files in name order, "<queue>.msg" after the first dot. The time comes first,
        # of fixed width and from the wall clock: a counter that gains a digit (or starts again at a reboot) put new
        # messages before the ones waiting, which then waited for the queue to drain
        name = f"{message_stamp()}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        try:
            with open(path + ".part", "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(path + ".part", path)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {path!r} to directory") from exc


def message_stamp() -> str:
    """Nanoseconds of the wall clock, zero-padded: names in string order are names in time order."""
    return f"{time_ns():020d}"


class Transport(filesystem.Transport):
    Channel = Channel


def reachable(app) -> bool:
    """Whether ``app``'s broker answers now (``/metrics``, ``/api/status/``): one connection, a second at most for
    each step (a broker that drops packets or never answers must not hold a scrape, and with it a web server
    thread); the embedded broker: its folder takes a file."""
    import tempfile

    if str(app.conf.broker_url).startswith("filesystem://"):  # connecting touches nothing there
        folder = (app.conf.get("broker_transport_options") or {}).get("data_folder_out", "")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
                return os.path.isdir(folder)
        except OSError:
            return False
    timeouts = {"socket_connect_timeout": 1, "socket_timeout": 1}
    try:
        with app.connection_for_write(connect_timeout=1, transport_options=timeouts) as connection:
            connection.ensure_connection(max_retries=0, timeout=1)
    except Exception:  # noqa: BLE001 - unreachable, whatever the transport says
        return False
    return True

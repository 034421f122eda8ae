"""pyroute2 (netlink) inside a network namespace: what the Linux-bridge switch and host drivers share.

No NAPALM here, so a host agent that only needs the host driver does not import it.
"""

from __future__ import annotations

import errno
import os

from pyroute2 import IPRoute

from network.drivers.base import TemporaryDeviceError

NETNS_RUN_DIR = "/run/netns"
# Kernel answers that mean "try again later" rather than "this will never work".
TEMPORARY_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ENOBUFS, errno.EINTR}


def netns_exists(netns: str | None) -> bool:
    """Whether ``netns`` is there (``None`` or "": this machine's own namespace, always there)."""
    return not netns or os.path.exists(os.path.join(NETNS_RUN_DIR, netns))


def open_iproute(
    device: str, netns: str | None, unreachable: type[TemporaryDeviceError] = TemporaryDeviceError
) -> IPRoute:
    """A netlink socket in ``netns`` (``None``: this namespace); a missing namespace is ``unreachable``."""
    if not netns_exists(netns):
        raise unreachable(device, f"network namespace {netns!r} does not exist")
    try:
        # flags=0: pyroute2 would otherwise create a missing namespace (O_CREAT) and we would configure an
        # empty device.
        return IPRoute(netns=netns, flags=0) if netns else IPRoute()
    except OSError as exc:
        raise unreachable(device, f"cannot enter network namespace {netns!r}: {exc}") from exc

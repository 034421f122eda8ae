"""The only code that talks to devices (NAPALM, OVSDB, netlink). No ORM here: callers pass plain specs.

Entry points for the rest of the portal (see ``base`` for the types):

- ``switch_session(spec)``: a context manager yielding a ``SwitchSession`` for one switch.
- ``host_session(spec)``: a context manager yielding a ``HostSession`` for one hypervisor.
- ``host_attachment(spec, vid)``: where the VM manager plugs a VM of VLAN ``vid`` (no device contacted).
- ``preload()``: import every driver module now (a worker at start), not at its first session.
"""

from network.drivers.base import (  # noqa: F401
    Attachment,
    ConvergeResult,
    DeviceError,
    HostSession,
    HostSpec,
    PermanentDeviceError,
    SwitchSession,
    SwitchSpec,
    TemporaryDeviceError,
    VlansRefused,
    host_attachment,
    host_session,
    preload,
    switch_session,
)

"""VLAN id range lists as operators write them: ``"100-199,250,300-310"``."""

from __future__ import annotations

from collections.abc import Iterable

from django.core.exceptions import ValidationError

from network.choices import VLAN_MAX, VLAN_MIN
from network.drivers.ranges import compact


def parse(text: str, *, what: str = "VLAN list", minimum: int = VLAN_MIN) -> list[int]:
    """Sorted distinct ids, ``minimum``-``VLAN_MAX``; raises ValidationError naming the bad item."""
    ids: set[int] = set()
    for raw in str(text or "").replace(" ", "").split(","):
        if not raw:
            continue
        lo_s, sep, hi_s = raw.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValidationError(f"{what}: {raw!r} is not a VLAN id or a range like 100-199") from None
        if lo > hi:
            raise ValidationError(f"{what}: range {raw!r} runs backwards")
        for vid in (lo, hi):
            if not minimum <= vid <= VLAN_MAX:
                raise ValidationError(f"{what}: VLAN id {vid} is outside {minimum}-{VLAN_MAX}")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def parse_static(text: str, *, what: str = "static VLANs") -> list[int]:
    """A port's static VLANs (``SwitchPort.static_vlans``): as ``parse``, and VLAN 1 too — the default native
    VLAN of an IOS/EOS/NX-OS trunk, which a trunk's allowed list must name to carry untagged frames (no pool
    hands it out)."""
    return parse(text, what=what, minimum=1)


def holds(text: str, vid: int) -> bool:
    """Whether the range list ``text`` holds ``vid`` — leniently: a device may report ids ``parse`` refuses (VLAN
    1, a reserved one), and an item that is not a number or a range is skipped."""
    for raw in str(text or "").replace(" ", "").split(","):
        lo_s, sep, hi_s = raw.partition("-")
        if lo_s.isascii() and lo_s.isdigit() and (not sep or (hi_s.isascii() and hi_s.isdigit())):
            if int(lo_s) <= vid <= int(hi_s if sep else lo_s):
                return True
    return False


def format_ranges(ids: Iterable[int]) -> str:
    """The compact text form of a set of ids (inverse of ``parse``)."""
    return compact(ids)

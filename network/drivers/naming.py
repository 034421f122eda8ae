"""VLAN names the vendor templates write into a switch's configuration (no Django, no NAPALM: the inventory
models check a switch's ``vlan_name_format`` with the same function the driver uses)."""

from __future__ import annotations

import re
import string

# A VLAN name every platform takes as one word (IOS and NX-OS allow 32 characters): it goes into the switch's
# configuration, so nothing in it may end the line or the statement
VLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def vlan_name(name_format: str, vid: int) -> str:
    """The name of VLAN ``vid`` from ``vlan_name_format`` (driver args; ``{vid}`` is the id, e.g. ``vc-{vid}``
    or ``grid{vid:04d}``). A format that names anything but ``vid`` (``{vid.__class__}``…) or gives a name that is
    not one plain word of at most 32 characters is refused: the name is written into the switch's configuration,
    where a space, a quote or a newline would start another statement."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(name_format) if field is not None]
    except ValueError as exc:
        raise ValueError(f"vlan_name_format {name_format!r}: {exc}") from None
    if any(field != "vid" for field in fields):
        raise ValueError(f"vlan_name_format {name_format!r}: only {{vid}} may be used (e.g. vc-{{vid}})")
    specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(name_format)]
    if len(name_format) > 64 or any(int(n) > 32 for spec in specs for n in re.findall(r"\d+", spec)):
        # a width formats before the name is checked: {vid:>2000000000} would take gigabytes
        raise ValueError(f"vlan_name_format {name_format[:64]!r}: at most 64 characters, widths of at most 32")
    try:
        name = name_format.format(vid=int(vid))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"vlan_name_format {name_format!r}: {exc}") from None
    if not VLAN_NAME.fullmatch(name):
        raise ValueError(
            f"vlan_name_format {name_format!r} gives {name!r}: a VLAN name is 1-32 letters, digits, _ . - "
            "(starting with a letter or digit)"
        )
    return name


def check_vlan_name_format(name_format: str, vids: range = range(1, 4095)) -> None:
    """Refuse ``name_format`` (ValueError, saying why) unless it gives every VLAN id in ``vids`` a name of its own
    (``vlan_name``'s rules): a format without ``{vid}`` ("grid") named every VLAN alike — Junos then renumbered one
    VLAN over and over, IOS and NX-OS got duplicate names."""
    seen: dict[str, int] = {}
    for vid in vids:
        name = vlan_name(name_format, vid)
        if name in seen:
            raise ValueError(
                f"vlan_name_format {name_format!r} names VLANs {seen[name]} and {vid} alike ({name!r}): put {{vid}} "
                "in it (e.g. vc-{vid})"
            )
        seen[name] = vid

"""VLAN id lists in the compact form every vendor CLI and operator writes: ``100-103,200`` (no Django)."""

from __future__ import annotations

from collections.abc import Iterable

# VLAN ids a switch platform keeps for itself: never on a trunk (IOS: the FDDI/Token Ring defaults; NX-OS:
# the internal range of its default reserved-vlan block)
PLATFORM_RESERVED: dict[str, frozenset[int]] = {
    "ios": frozenset(range(1002, 1006)),
    "nxos": frozenset(range(3968, 4095)),
    "nxos_ssh": frozenset(range(3968, 4095)),
}


def compact(vids: Iterable[int]) -> str:
    """``[100, 101, 102, 103, 200]`` → ``"100-103,200"``."""
    out: list[str] = []
    run: list[int] = []
    for vid in sorted(set(vids)):
        if run and vid == run[-1] + 1:
            run.append(vid)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [vid]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)

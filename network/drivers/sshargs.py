"""What an administrator may put on the ``ssh`` command line a driver runs on a worker (no Django).

The OVSDB-over-SSH transport (``ssh_host``, ``ssh_user``, ``ssh_options``) and the Linux-bridge switch over
SSH (the switch's address and user name, ``ssh_options``) build an ``ssh`` command line from inventory
values. Inventory is edited by network administrators, not by whoever runs the workers, so those values must
not reach further than choosing the box: a destination such as ``-oProxyCommand=…`` is an option to ssh, and
``ProxyCommand``, ``LocalCommand``, ``KnownHostsCommand`` (and their like) run a command on the worker.
Only the options below are accepted; they change how ssh connects and authenticates, never what it runs
locally. The drivers (at session time) and the inventory models (when a switch or host is saved or
imported) apply the same ``ssh_problems``.
"""

from __future__ import annotations

import re

# ssh_config(5) keywords that cannot make ssh run a command (ssh compares them case-insensitively)
SAFE_SSH_OPTIONS: tuple[str, ...] = (
    "BatchMode",
    "Ciphers",
    "ConnectionAttempts",
    "ConnectTimeout",
    "HostKeyAlgorithms",
    "HostKeyAlias",
    "IdentitiesOnly",
    "IdentityFile",
    "KexAlgorithms",
    "LogLevel",
    "Port",
    "PubkeyAcceptedAlgorithms",
    "ServerAliveCountMax",
    "ServerAliveInterval",
    "StrictHostKeyChecking",
    "User",
    "UserKnownHostsFile",
)
_SAFE = frozenset(name.lower() for name in SAFE_SSH_OPTIONS)

# whitespace would split the word on the remote side or in ssh's own config parser; control characters
# (a newline above all) would start another configuration line
_UNSAFE_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# ssh reads an option as ``Keyword=value``, ``Keyword value`` or ``Keyword = value``
_KEYWORD = re.compile(r"^\s*([^\s=]*)")


def ssh_problems(*, host: str, user: str = "", options: object = ()) -> list[str]:
    """Why ``ssh [-o OPTION ...] -- [USER@]HOST`` may not be run with these values (empty: it may).
    Each message names the value in question, so that a driver error and a form error read the same."""
    problems = []
    for what, value in (("ssh host", str(host)), ("ssh user", str(user))):
        if value.startswith("-"):
            problems.append(f"{what} {value!r} starts with '-' (ssh would read it as an option)")
        elif _UNSAFE_CHARS.search(value):
            problems.append(f"{what} {value!r} contains whitespace or control characters")
    if not isinstance(options, (list, tuple)):
        problems.append(f"ssh_options must be a list of 'Keyword=value' strings, not {type(options).__name__}")
        return problems
    for option in options:
        if not isinstance(option, str):
            problems.append(f"ssh option {option!r} is not text")
            continue
        if _CONTROL_CHARS.search(option):
            problems.append(f"ssh option {option!r} contains control characters")
            continue
        found = _KEYWORD.match(option)
        keyword, value = found.group(1), option[found.end() :].strip().removeprefix("=").strip().strip('"')
        if keyword.lower() not in _SAFE:
            problems.append(f"ssh option {keyword or option!r} is not allowed (allowed: {', '.join(SAFE_SSH_OPTIONS)})")
        elif keyword.lower() == "stricthostkeychecking" and value.lower() not in ("yes", "true"):
            # any other value lets ssh append a line naming the host (HostKeyAlias: any text) to the
            # UserKnownHostsFile it is given, which could be a file the worker's user later runs
            problems.append(f"ssh option {option!r}: StrictHostKeyChecking may only be yes")
    return problems

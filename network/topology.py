"""The network described as one YAML file: import (idempotent, atomic, every problem at once) and export.

An administrator describes the whole inventory once::

    sites:    [brno, pilsen, {name: prague, description: ..., queue: ...}]
    cores:    [{name, kind, sites: [...], vlans: "100-3999" (or vid_min/vid_max), service_tag, description}]
    switches: [{name, site, platform, address, username, password | password_env: VAR, driver_args,
                enabled, description, queue, ports: [{name, role, core, description}]}]
    hosts:    [{name, site, switch, port, trunk, driver, driver_args, queue, enabled}]
    pools:    [{name, core, ranges, reserved, quarantine, description}]

``queue`` is the Celery queue of the worker that reaches the devices: a site's worker (for its switches, and
its hosts without an agent), a switch's own, a host's agent (see ``Switch.queue``, ``Host.queue``).

A key that is left out means the model's default, except ``password``: the file never has to carry a
secret (export leaves it out), so a switch without ``password``/``password_env`` keeps the stored one.

Import checks the shape of the whole file first (unknown keys are errors, names must be unique, references
must resolve), then writes inside one transaction, validating every object with ``full_clean``. An object
is saved only when a value differs, so a second run changes nothing and writes no audit entries. If any
problem was found, nothing is kept and ``TopologyError`` lists all of them, each with its place in the file
(``switches[2].ports[0].role (line 31): port brno-sw:p1: ...``). ``prune`` deletes inventory objects the file
does not name, refusing (as a problem) when something still uses them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import transaction
from django.db.models import ProtectedError, RestrictedError

from network import selectors
from network.choices import CoreKind, HostDriver, Platform, PortRole
from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool, json_problem
from network.services import vlan_pool_sync
from network.vlanranges import format_ranges
from portal.audit import audit_actor

TOP_KEYS = ("sites", "cores", "switches", "hosts", "pools")
SITE_KEYS = {"name", "description", "queue"}
CORE_KEYS = {"name", "kind", "sites", "vlans", "vid_min", "vid_max", "service_tag", "mtu", "description"}
SWITCH_KEYS = {
    "name",
    "site",
    "platform",
    "address",
    "username",
    "password",
    "password_env",
    "driver_args",
    "enabled",
    "description",
    "queue",
    "ports",
}
PORT_KEYS = {"name", "role", "core", "static_vlans", "description"}
HOST_KEYS = {"name", "site", "switch", "port", "trunk", "driver", "driver_args", "queue", "enabled"}
POOL_KEYS = {"name", "core", "ranges", "reserved", "quarantine", "description"}

# Model field -> key in the file, where they differ (for error paths).
_KEYS = {
    Site: {"worker_queue": "queue"},
    Switch: {"worker_queue": "queue"},
    CoreTransport: {"vid_min": "vlans", "vid_max": "vlans"},
    Host: {"switch_port": "port", "trunk_interface": "trunk", "agent_queue": "queue"},
    VlanPool: {"quarantine_seconds": "quarantine"},
}


class TopologyError(ValueError):
    """The file cannot be imported as it is (a permanent error: fix the file). ``problems`` lists every
    problem found, each prefixed by its place in the file."""

    def __init__(self, problems: list[str], report: ImportReport | None = None):
        self.problems = problems
        self.report = report
        super().__init__(f"{len(problems)} problem(s) in the topology:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass
class ImportReport:
    """What an import did (or, with ``dry_run``, would do)."""

    source: str
    dry_run: bool = False
    created: Counter = field(default_factory=Counter)
    updated: Counter = field(default_factory=Counter)
    deleted: Counter = field(default_factory=Counter)
    unchanged: Counter = field(default_factory=Counter)
    changes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def total_created(self) -> int:
        return sum(self.created.values())

    @property
    def total_updated(self) -> int:
        return sum(self.updated.values())

    @property
    def total_deleted(self) -> int:
        return sum(self.deleted.values())

    def summary(self) -> str:
        counts = ", ".join(
            f"{sum(counter.values())} {what}"
            for what, counter in (
                ("created", self.created),
                ("updated", self.updated),
                ("deleted", self.deleted),
                ("unchanged", self.unchanged),
            )
        )
        return f"topology {self.source}: {counts}" + (" (dry run: nothing was saved)" if self.dry_run else "")


class _Rollback(Exception):
    pass


# --- reading the file ---------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without timestamps: a topology holds no dates, and ``description: 2024-02-30`` is text
    (PyYAML made it a date, or a ValueError for a day out of range)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_topology(text: str, *, source: str = "<topology>") -> tuple[dict, dict[str, int]]:
    """Parse YAML text; returns the data and a map from path (``switches[0].ports[1].role``) to line number.
    Syntax errors and duplicate keys raise ``TopologyError``."""
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):  # a topology names things; a recursive alias never ends
                line = event.start_mark.line + 1
                raise TopologyError([f"{source} (line {line}): YAML aliases (*name) are not allowed here"])
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except TopologyError:
        raise
    except ValueError as exc:  # a value YAML reads but Python cannot hold (an integer of 5000 digits)
        raise TopologyError([f"{source}: not a usable value: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise TopologyError([f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except RecursionError:
        raise TopologyError([f"{source}: nested too deeply to be a topology"]) from None
    lines: dict[str, int] = {}
    duplicates: list[str] = []
    if node is not None:
        if _depth(node) > MAX_DEPTH:
            raise TopologyError([f"{source}: nested more than {MAX_DEPTH} levels deep, which no topology is"])
        _walk(node, "", lines, duplicates)
    if duplicates:
        raise TopologyError(duplicates)
    return (data if data is not None else {}), lines


#: a topology nests six levels (switches → ports → driver args …); deeper is hostile input, refused before any walk
MAX_DEPTH = 32


def _depth(root) -> int:
    """How deep the YAML node tree ``root`` nests (iterative: a hostile file cannot exhaust the stack here)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(node, yaml.MappingNode):
            stack += [(n, depth + 1) for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(n, depth + 1) for n in node.value]
    return deepest


def _walk(node, path: str, lines: dict[str, int], duplicates: list[str]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                duplicates.append(f"{child} (line {key_node.start_mark.line + 1}): key given twice")
            seen.add(key)
            _walk(value_node, child, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}[{index}]", lines, duplicates)


# --- import -------------------------------------------------------------------------------------------------

#: driver args that hold a secret (NAPALM's EOS ``enable_password``, netmiko's key ``passphrase``, a token): an export
#: never writes them, and an import that leaves them out keeps the stored ones (as for the switch's password)
_SECRET_ARG = re.compile(r"pass|secret|token", re.IGNORECASE)


def _without_secrets(args) -> dict:
    return {k: v for k, v in (args or {}).items() if not _SECRET_ARG.search(str(k))}


def _with_stored_secrets(args, model, name):
    """The file's driver args, with the stored secret ones it leaves out (an export's re-import changes nothing)."""
    if not isinstance(args, dict):
        return args  # (BAD: reported)
    stored = model.objects.filter(name=name).values_list("driver_args", flat=True).first() or {}
    kept = {k: v for k, v in stored.items() if _SECRET_ARG.search(str(k)) and k not in args}
    return {**args, **kept}


def topology_import(
    *, data: dict, source: str, prune: bool = False, dry_run: bool = False, lines: dict[str, int] | None = None
) -> ImportReport:
    """Make the inventory look like ``data``. Raises ``TopologyError`` (and keeps nothing) on any problem."""
    importer = _Importer(source=source, lines=lines or {}, prune=prune, dry_run=dry_run)
    with audit_actor(f"topology-import:{source}"):
        try:
            with transaction.atomic():
                importer.run(data)
                if importer.failed and not importer.report.problems:  # (never a skipped object in silence)
                    names = ", ".join(f"{kind} {name}" for kind, name in sorted(importer.failed, key=str))
                    importer.report.problems.append(f"not imported, for a reason not told: {names}")
                if importer.report.problems or dry_run:
                    raise _Rollback
        except _Rollback:
            pass
    if importer.report.problems:
        raise TopologyError(importer.report.problems, importer.report)
    return importer.report


class _Bad:
    """A value of the file that has a problem (already reported); the field is left out of validation."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()


class _Importer:
    def __init__(self, *, source: str, lines: dict[str, int], prune: bool, dry_run: bool):
        self.lines = lines
        self.prune = prune
        self.report = ImportReport(source=source, dry_run=dry_run)
        # Saved objects of this file by name. Names whose entry had problems are kept in ``failed`` so that
        # a reference to them is not reported a second time.
        self.sites: dict[str, Site] = {}
        self.cores: dict[str, CoreTransport] = {}
        self.sites_before: dict[str, set[int]] = {}  # core name → its sites before the import (existing cores)
        self.switches: dict[str, Switch] = {}
        self.moved_switches: set[str] = set()  # existing switches the file puts at another site
        self.ports: dict[tuple[str, str], SwitchPort] = {}
        self.failed: set[tuple[str, Any]] = set()

    # --- problems -------------------------------------------------------------------------------------------

    def problem(self, path: str, message: str) -> None:
        line = None
        probe = path
        while probe and line is None:
            line = self.lines.get(probe)
            if line is None:
                probe = probe.rpartition(".")[0] if "." in probe else probe.rpartition("[")[0]
        where = f"{path} (line {line})" if line is not None else path
        if f"{where}: {message}" not in self.report.problems:  # (a required key checked twice: said once)
            self.report.problems.append(f"{where}: {message}")

    def _validation(self, path: str, model, exc: ValidationError, skip: set[str] = frozenset()) -> None:
        keys = _KEYS.get(model, {})
        for name, messages in exc.message_dict.items():
            if name in skip:
                continue  # a consequence of a problem already reported for that key
            key = None if name == NON_FIELD_ERRORS else keys.get(name, name)
            for message in messages:
                self.problem(f"{path}.{key}" if key else path, message)

    # --- shape ----------------------------------------------------------------------------------------------

    def _entries(self, data: dict, section: str, allowed: set[str], required: tuple[str, ...]) -> list:
        """(path, entry) for the entries of a section that are mappings with a name; problems for all else."""
        raw = data.get(section)
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problem(section, f"must be a list, not {type(raw).__name__}")
            return []
        out, names = [], {}
        for index, entry in enumerate(raw):
            path = f"{section}[{index}]"
            if section == "sites" and isinstance(entry, str):
                entry = {"name": entry}
            if not self._check_mapping(path, entry, allowed, required):
                continue
            name = entry["name"]
            if name in names:
                self.problem(f"{path}.name", f"{name!r} is already defined at {names[name]}")
                continue
            names[name] = path
            out.append((path, entry))
        return out

    def _check_mapping(self, path: str, entry, allowed: set[str], required: tuple[str, ...]) -> bool:
        """Reports unknown and missing keys; False only when the entry cannot be identified at all."""
        if not isinstance(entry, dict):
            self.problem(path, f"must be a mapping, not {type(entry).__name__}")
            return False
        for key in entry:
            if key not in allowed:
                self.problem(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for key in required:
            if entry.get(key) in (None, ""):
                self.problem(f"{path}.{key}", "is required")
        name = entry.get("name")
        if name in (None, ""):
            return False
        if not isinstance(name, str):
            self.problem(f"{path}.name", f"must be text, not {type(name).__name__}")
            return False
        if "\x00" in name:
            self.problem(f"{path}.name", "must not hold a NUL character")
            return False
        return True

    def _name(self, path: str, entry: dict, key: str):
        value = entry.get(key)
        if value in (None, ""):  # (every BAD comes with its problem: one without skipped objects in silence)
            self.problem(f"{path}.{key}", "is required")
            return BAD
        if not isinstance(value, str):
            self.problem(f"{path}.{key}", f"must be a name (text), not {type(value).__name__}")
            return BAD
        if "\x00" in value:
            self.problem(f"{path}.{key}", "must not hold a NUL character")
            return BAD
        return value

    def _text(self, path: str, entry: dict, key: str, default: str = ""):
        value = entry.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(f"{path}.{key}", f"must be text, not {type(value).__name__}")
            return BAD
        if "\x00" in str(value):
            self.problem(f"{path}.{key}", "must not hold a NUL character")
            return BAD
        return str(value)

    def _int(self, path: str, entry: dict, key: str, default: int | None):
        value = entry.get(key, default)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        self.problem(f"{path}.{key}", f"must be a whole number, not {value!r}")
        return BAD

    def _bool(self, path: str, entry: dict, key: str, default: bool):
        value = entry.get(key, default)
        if isinstance(value, bool):
            return value
        self.problem(f"{path}.{key}", f"must be true or false, not {value!r}")
        return BAD

    def _mapping(self, path: str, entry: dict, key: str):
        value = entry.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(f"{path}.{key}", f"must be a mapping, not {type(value).__name__}")
            return BAD
        problem = json_problem(value)
        if problem:
            self.problem(f"{path}.{key}", problem)
            return BAD
        return value

    def _choice(self, path: str, entry: dict, key: str, choices, default=None):
        value = entry.get(key)
        if value in (None, "") and default is not None:
            value = default  # (an optional key left empty: its default, as when it is not there)
        if value in (None, ""):
            self.problem(f"{path}.{key}", "is required")
            return BAD
        if value not in choices.values:
            self.problem(f"{path}.{key}", f"{value!r} is not one of: {', '.join(choices.values)}")
            return BAD
        return value

    def _ranges(self, path: str, entry: dict, key: str):
        value = entry.get(key, "")
        if value is None:
            return ""
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            value = ",".join(str(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(f"{path}.{key}", f"must be a VLAN list like 100-199,250, not {value!r}")
            return BAD
        return str(value)

    # --- references -----------------------------------------------------------------------------------------

    def _ref(self, path: str, kind: str, name, known: dict, model):
        """Resolve a name: an object of this file, or (when not pruning) one already in the inventory."""
        if name is BAD:
            return BAD
        if name in known:
            return known[name]
        if (kind, name) in self.failed:
            return BAD  # its own problem is already reported
        obj = None if self.prune else model.objects.filter(name=name).first()
        if obj is None:
            where = "in this file" if self.prune else "in this file or the inventory"
            self.problem(path, f"unknown {kind} {name!r} (not defined {where})")
            return BAD
        return obj

    # --- writing --------------------------------------------------------------------------------------------

    def _apply(self, path: str, model, lookup: dict, values: dict, *, m2m=None, before_clean=None, blocked=False):
        """Create or update one object; saved only when a value differs (``m2m``: relation name -> wanted
        primary keys). Returns the object, or None if it has problems: then it is validated as far as its
        good values go and not saved (``blocked``: a reference of it has a problem)."""
        kind = model.kind_label
        bad = {name for name, value in (lookup | values).items() if value is BAD}
        good_lookup = {name: value for name, value in lookup.items() if value is not BAD}
        # Only a complete lookup finds the stored object; otherwise a new one is checked (and never saved).
        obj = None if len(good_lookup) < len(lookup) else model._default_manager.filter(**lookup).first()
        created = obj is None
        if created:
            obj = model(**good_lookup)
        changed = [
            name for name, value in values.items() if name not in bad and (created or _differs(obj, name, value))
        ]
        for name in changed:
            setattr(obj, name, values[name])
        for name in bad - set(lookup):
            model_field = obj._meta.get_field(name)
            if model_field.is_relation:
                # Not the stored one either: checks against it (pool inside the core, ...) would mislead.
                setattr(obj, model_field.attname, None)
        if before_clean:
            before_clean(obj)
        try:
            obj.full_clean(exclude=bad or None)
        except ValidationError as exc:
            self._validation(path, model, exc, skip=bad)
            return None
        if bad or blocked:
            return None
        m2m = m2m or {}
        m2m_changed = [
            name
            for name, pks in m2m.items()
            if (pks if created else set(getattr(obj, name).values_list("pk", flat=True)) != pks)
        ]
        if created or changed:
            obj.save()
        for name in m2m_changed:
            getattr(obj, name).set(m2m[name])
        if created:
            self.report.created[kind] += 1
            self.report.changes.append(f"created {kind} {obj}")
        elif changed or m2m_changed:
            self.report.updated[kind] += 1
            self.report.changes.append(f"updated {kind} {obj} ({', '.join(changed + m2m_changed)})")
        else:
            self.report.unchanged[kind] += 1
        return obj

    def run(self, data) -> None:
        if not isinstance(data, dict):
            self.problem("(top)", f"the file must be a mapping with keys {', '.join(TOP_KEYS)}")
            return
        for key in data:
            if key not in TOP_KEYS:
                self.problem(str(key), f"unknown top-level key (allowed: {', '.join(TOP_KEYS)})")
        sites = self._entries(data, "sites", SITE_KEYS, ("name",))
        cores = self._entries(data, "cores", CORE_KEYS, ("name", "kind"))
        switches = self._entries(data, "switches", SWITCH_KEYS, ("name", "site", "platform", "address"))
        hosts = self._entries(data, "hosts", HOST_KEYS, ("name", "site", "switch", "port"))
        pools = self._entries(data, "pools", POOL_KEYS, ("name", "core", "ranges"))

        for path, entry in sites:
            self._site(path, entry)
        for path, entry in cores:
            self._core(path, entry)
        with_switch = [(path, entry, self._switch(path, entry)) for path, entry in switches]
        for path, entry, switch in with_switch:
            self._ports(path, entry, switch)
        for path, entry in hosts:
            self._host(path, entry)
        for path, entry in pools:
            self._pool(path, entry)
        # The file's pools are in place now: check that no core leaves ids of a pool outside its range.
        for path, entry in cores:
            core = self.cores.get(entry["name"])
            if core is not None:
                core.check_pools = True
                try:
                    core.full_clean()
                except ValidationError as exc:
                    self._validation(path, CoreTransport, exc)
        # The file's pools checked themselves against the file's switches; the pools only in the inventory
        # (which prune removes) are checked against the switches here.
        if not self.prune:
            file_pools = [entry["name"] for _, entry in pools]
            for path, entry in switches:
                switch = self.switches.get(entry["name"])
                if switch is not None:
                    for clash in switch.reserved_clashes(skip_pools=file_pools):
                        self.problem(f"{path}.platform", clash)
                    if switch.name in self.moved_switches:  # its ports' static VLANs meet the new site's pools
                        # (the ports the file lists checked themselves at the new site)
                        for clash in switch.static_clashes(skip_pools=file_pools, skip_ports=_port_names(entry)):
                            self.problem(f"{path}.site", f"switch {switch.name}: {clash}")
            # and a core that joins a site brings its inventory-only pools there: the checks the file's pools
            # made in their own validation (another core's pools at that site, ids its switches keep; the
            # file's switches checked themselves just above)
            file_switches = [entry["name"] for _, entry in switches]
            for path, entry in cores:
                core = self.cores.get(entry["name"])
                if core is None or core.name not in self.sites_before:
                    continue  # a new core has no pools but the file's
                added = set(core.sites.values_list("pk", flat=True)) - self.sites_before[core.name]
                if added:
                    for pool in core.pools.exclude(name__in=file_pools).select_related("core").order_by("name"):
                        for problem in (
                            pool.shared_site_overlaps(added)
                            + pool.platform_clashes(added, skip_switches=file_switches)
                            + pool.static_clashes(added)
                        ):
                            self.problem(f"{path}.sites", problem)
        if self.prune and not self.report.problems:
            self._prune(
                sites=[e["name"] for _, e in sites],
                cores=[e["name"] for _, e in cores],
                switches=[(e["name"], _port_names(e)) for _, e in switches],
                hosts=[e["name"] for _, e in hosts],
                pools=[e["name"] for _, e in pools],
            )
        if not self.report.problems:  # what live clusters need must still hold with the new inventory
            paths = {entry["name"]: path for path, entry in cores}
            for core in CoreTransport.objects.prefetch_related("sites"):  # a pool may have moved to another
                sites, vids = [site.pk for site in core.sites.all()], (core.vid_min, core.vid_max)
                users = selectors.core_site_users(core.pk, sites, vids)
                if users:
                    shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
                    self.problem(
                        paths.get(core.name, f"core {core.name}"),
                        f"core {core.name} must keep joining the sites and carrying the VLANs of {shown}",
                    )

    def _remember(self, kind: str, name: str, obj, table: dict) -> None:
        if obj is None:
            self.failed.add((kind, name))
        else:
            table[name] = obj

    def _site(self, path: str, entry: dict) -> None:
        name = entry["name"]
        values = {
            "description": self._text(path, entry, "description"),
            "worker_queue": self._text(path, entry, "queue"),
        }
        obj = self._apply(path, Site, {"name": name}, values)
        self._remember("site", name, obj, self.sites)

    def _vlans(self, path: str, entry: dict) -> tuple:
        if "vlans" in entry:
            if "vid_min" in entry or "vid_max" in entry:
                self.problem(f"{path}.vlans", "give either vlans or vid_min/vid_max, not both")
                return BAD, BAD
            text = str(entry["vlans"]).replace(" ", "")
            low, sep, high = text.partition("-")
            try:
                return int(low), int(high if sep else low)
            except ValueError:
                self.problem(f"{path}.vlans", f"{entry['vlans']!r} is not a range like 100-3999")
                return BAD, BAD
        vid_min = self._int(path, entry, "vid_min", None)
        vid_max = self._int(path, entry, "vid_max", None)
        if vid_min is None or vid_max is None:
            self.problem(f"{path}.vlans", "is required: the VLAN ids the core carries, like 100-3999")
            return BAD, BAD
        return vid_min, vid_max

    def _core(self, path: str, entry: dict) -> None:
        name = entry["name"]
        vid_min, vid_max = self._vlans(path, entry)
        values = {
            "kind": self._choice(path, entry, "kind", CoreKind),
            "vid_min": vid_min,
            "vid_max": vid_max,
            "service_tag": self._int(path, entry, "service_tag", None),
            "mtu": self._int(path, entry, "mtu", None),
            "description": self._text(path, entry, "description"),
        }
        site_names = entry.get("sites") or []
        if not isinstance(site_names, list):
            self.problem(f"{path}.sites", "must be a list of site names")
            site_names = []
        sites = []
        for index, site_name in enumerate(site_names):
            site_path = f"{path}.sites[{index}]"
            if site_name in (None, ""):
                self.problem(site_path, "must be a site name")
                sites.append(BAD)
                continue
            sites.append(
                self._ref(site_path, "site", self._name(site_path, {"site": site_name}, "site"), self.sites, Site)
            )

        def defer_pool_check(core):
            # The file's pools may move with the core; they are checked against the new range after them.
            core.check_pools = False

        known = CoreTransport.objects.filter(name=name).first()
        if known is not None:
            self.sites_before[name] = set(known.sites.values_list("pk", flat=True))
        obj = self._apply(
            path,
            CoreTransport,
            {"name": name},
            values,
            m2m={"sites": {site.pk for site in sites if site is not BAD}},
            before_clean=defer_pool_check,
            blocked=BAD in sites,
        )
        self._remember("core", name, obj, self.cores)

    def _switch(self, path: str, entry: dict) -> Switch | None:
        name = entry["name"]
        values: dict[str, Any] = {
            "site": self._ref(f"{path}.site", "site", self._name(path, entry, "site"), self.sites, Site),
            "platform": self._choice(path, entry, "platform", Platform),
            "address": self._text(path, entry, "address"),
            "username": self._text(path, entry, "username"),
            "description": self._text(path, entry, "description"),
            "driver_args": _with_stored_secrets(self._mapping(path, entry, "driver_args"), Switch, name),
            "enabled": self._bool(path, entry, "enabled", True),
            "worker_queue": self._text(path, entry, "queue"),
        }
        # Left out, the stored password stays: a file (and an export) need not carry secrets.
        if "password" in entry and "password_env" in entry:
            self.problem(f"{path}.password", "give either password or password_env, not both")
            values["password"] = BAD
        elif "password_env" in entry:
            var = entry["password_env"]
            if not isinstance(var, str) or not var:
                self.problem(f"{path}.password_env", "must name an environment variable")
                values["password"] = BAD
            elif var not in os.environ:
                self.problem(f"{path}.password_env", f"environment variable {var} is not set")
                values["password"] = BAD
            else:
                values["password"] = os.environ[var]
        elif "password" in entry:
            password = entry["password"]
            if password is not None and not isinstance(password, str):
                # Never echo the value: it is a secret even when mistyped.
                self.problem(f"{path}.password", "must be text (quote it)")
                values["password"] = BAD
            else:
                values["password"] = password or ""

        def defer_pool_check(switch):
            # The file's pools may reserve what the platform keeps for itself; checked after them.
            switch.check_pools = False

        site_before = Switch.objects.filter(name=name).values_list("site_id", flat=True).first()
        obj = self._apply(path, Switch, {"name": name}, values, before_clean=defer_pool_check)
        self._remember("switch", name, obj, self.switches)
        if obj is not None and site_before is not None and obj.site_id != site_before:
            self.moved_switches.add(name)
        return obj

    def _ports(self, path: str, entry: dict, switch: Switch | None) -> None:
        ports = entry.get("ports") or []
        if not isinstance(ports, list):
            self.problem(f"{path}.ports", f"must be a list, not {type(ports).__name__}")
            return
        switch_name = entry["name"]
        seen: dict[str, str] = {}
        for index, port in enumerate(ports):
            port_path = f"{path}.ports[{index}]"
            if not self._check_mapping(port_path, port, PORT_KEYS, ("name", "role")):
                continue
            port_name = port["name"]
            if port_name in seen:
                self.problem(f"{port_path}.name", f"{port_name!r} is already defined at {seen[port_name]}")
                continue
            seen[port_name] = port_path
            core = None
            if port.get("core") is not None:
                core = self._ref(
                    f"{port_path}.core", "core", self._name(port_path, port, "core"), self.cores, CoreTransport
                )
            values = {
                "role": self._choice(port_path, port, "role", PortRole),
                "core": core,
                "static_vlans": self._text(port_path, port, "static_vlans"),
                "description": self._text(port_path, port, "description"),
            }
            obj = None
            if switch is not None:
                obj = self._apply(port_path, SwitchPort, {"switch": switch, "name": port_name}, values)
            else:
                # The switch has problems: still check the port on its own (role, core), save nothing.
                self._apply(port_path, SwitchPort, {"switch": BAD, "name": port_name}, values)
            if obj is None:
                self.failed.add(("port", (switch_name, port_name)))
            else:
                self.ports[(switch_name, port_name)] = obj

    def _host_port(self, path: str, entry: dict):
        switch_name, port_name = self._name(path, entry, "switch"), self._text(path, entry, "port")
        if switch_name is BAD or port_name in (BAD, ""):
            return BAD  # reported (required, or not a name)
        if (switch_name, port_name) in self.ports:
            return self.ports[(switch_name, port_name)]
        if ("port", (switch_name, port_name)) in self.failed or ("switch", switch_name) in self.failed:
            return BAD  # reported with the switch
        if self.prune or switch_name in self.switches:
            self.problem(f"{path}.port", f"switch {switch_name!r} has no port {port_name!r} in this file")
            return BAD
        port = SwitchPort.objects.filter(switch__name=switch_name, name=port_name).first()
        if port is None:
            self.problem(f"{path}.port", f"unknown port {switch_name}:{port_name} (not in this file or the inventory)")
            return BAD
        return port

    def _host(self, path: str, entry: dict) -> None:
        values = {
            "site": self._ref(f"{path}.site", "site", self._name(path, entry, "site"), self.sites, Site),
            "switch_port": self._host_port(path, entry),
            "trunk_interface": self._text(path, entry, "trunk", "eth0"),
            "driver": self._choice(path, entry, "driver", HostDriver, HostDriver.OVS),
            "driver_args": _with_stored_secrets(self._mapping(path, entry, "driver_args"), Host, entry["name"]),
            "agent_queue": self._text(path, entry, "queue"),
            "enabled": self._bool(path, entry, "enabled", True),
        }
        self._apply(path, Host, {"name": entry["name"]}, values)

    def _pool(self, path: str, entry: dict) -> None:
        quarantine = self._int(path, entry, "quarantine", 300)
        if quarantine is not BAD and quarantine is not None and quarantine < 0:
            self.problem(f"{path}.quarantine", f"must not be negative, not {quarantine}")
            quarantine = BAD
        values = {
            "core": self._ref(f"{path}.core", "core", self._name(path, entry, "core"), self.cores, CoreTransport),
            "ranges": self._ranges(path, entry, "ranges"),
            "reserved": self._ranges(path, entry, "reserved"),
            "quarantine_seconds": quarantine,
            "description": self._text(path, entry, "description"),
        }
        pool = self._apply(path, VlanPool, {"name": entry["name"]}, values)
        if pool is not None and not self.report.dry_run:
            # the ids it no longer hands out leave it now, in this transaction: one another pool gets in this file
            # is never taken from this one by an allocation that read it before the change committed
            vlan_pool_sync(pool=pool)

    # --- prune ----------------------------------------------------------------------------------------------

    def _prune(self, *, sites, cores, switches, hosts, pools) -> None:
        """Delete what the file does not name, dependents first. PROTECT foreign keys (also those of other
        apps: allocations, cluster nodes) make a deletion a problem instead of a cascade."""
        switch_names = [name for name, _ in switches]
        keep_ports = dict(switches)
        doomed: list[tuple[str, Any]] = []
        doomed += [("pools", p) for p in VlanPool.objects.exclude(name__in=pools)]
        doomed += [("hosts", h) for h in Host.objects.exclude(name__in=hosts)]
        for port in SwitchPort.objects.filter(switch__name__in=switch_names).select_related("switch"):
            if port.name not in keep_ports[port.switch.name]:
                doomed.append(("ports", port))
        # A port forgotten while it carries live VLANs is never converged again: they would stay on it.
        gone_ports = [obj for section, obj in doomed if section == "ports"]
        gone_ports += SwitchPort.objects.exclude(switch__name__in=switch_names).select_related("switch")
        leaving = Switch.objects.exclude(name__in=switch_names).values_list("pk", flat=True)
        carrying = selectors.ports_carrying([port.pk for port in gone_ports], leaving_switches=list(leaving))
        for port in gone_ports:
            if port.pk in carrying:
                vids = format_ranges(carrying[port.pk])
                self.problem(
                    "prune ports",
                    f"cannot delete port {port}: it carries VLAN {vids} of live clusters (or of ended ones still "
                    "holding it)",
                )
        if carrying:
            return
        doomed += [("switches", s) for s in Switch.objects.exclude(name__in=switch_names)]
        doomed += [("cores", c) for c in CoreTransport.objects.exclude(name__in=cores)]
        doomed += [("sites", s) for s in Site.objects.exclude(name__in=sites)]
        for section, obj in doomed:
            label = obj.label
            try:
                obj.delete()
            except (ProtectedError, RestrictedError) as exc:
                users = sorted(f"{type(o)._meta.verbose_name} {o}" for o in list(exc.args[1])[:5])
                self.problem(f"prune {section}", f"cannot delete {label}: still used by {', '.join(users)}")
                continue
            self.report.deleted[obj.kind_label] += 1
            self.report.changes.append(f"deleted {label}")


def _port_names(entry: dict) -> list[str]:
    ports = entry.get("ports") or []
    return [str(p.get("name")) for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []


def _differs(obj, name: str, value) -> bool:
    model_field = obj._meta.get_field(name)
    if model_field.is_relation:
        return getattr(obj, model_field.attname) != (value.pk if value is not None else None)
    return getattr(obj, name) != value


# --- export -------------------------------------------------------------------------------------------------


def topology_export() -> dict:
    """The whole inventory in the import format. Secrets are never written (switch passwords are left
    out; importing the result keeps the stored ones)."""
    data: dict[str, list] = {key: [] for key in TOP_KEYS}
    for site in Site.objects.order_by("name"):
        data["sites"].append(_compact({"name": site.name, "description": site.description, "queue": site.worker_queue}))
    for core in CoreTransport.objects.order_by("name").prefetch_related("sites"):
        data["cores"].append(
            _compact(
                {
                    "name": core.name,
                    "kind": core.kind,
                    "sites": sorted(s.name for s in core.sites.all()),
                    "vlans": f"{core.vid_min}-{core.vid_max}",
                    "service_tag": core.service_tag,
                    "mtu": core.mtu,
                    "description": core.description,
                }
            )
        )
    switches = Switch.objects.order_by("name").select_related("site").prefetch_related("ports__core")
    for switch in switches.only(
        "name", "site__name", "platform", "address", "username", "driver_args", "enabled", "description", "worker_queue"
    ):
        entry = {
            "name": switch.name,
            "site": switch.site.name,
            "platform": switch.platform,
            "address": switch.address,
            "username": switch.username,
            "driver_args": _without_secrets(switch.driver_args),
            "description": switch.description,
            "queue": switch.worker_queue,
        }
        if not switch.enabled:
            entry["enabled"] = False
        entry["ports"] = [
            _compact(
                {
                    "name": port.name,
                    "role": port.role,
                    "core": port.core.name if port.core_id else None,
                    "static_vlans": port.static_vlans,
                    "description": port.description,
                }
            )
            for port in sorted(switch.ports.all(), key=lambda p: p.name)
        ]
        data["switches"].append(_compact(entry, keep=("driver_args",)))
    for host in Host.objects.order_by("name").select_related("site", "switch_port__switch"):
        entry = {
            "name": host.name,
            "site": host.site.name,
            "switch": host.switch_port.switch.name,
            "port": host.switch_port.name,
            "trunk": host.trunk_interface,
            "driver": host.driver,
            "driver_args": _without_secrets(host.driver_args),
            "queue": host.agent_queue,
        }
        if not host.enabled:
            entry["enabled"] = False
        data["hosts"].append(_compact(entry))
    for pool in VlanPool.objects.order_by("name").select_related("core"):
        data["pools"].append(
            _compact(
                {
                    "name": pool.name,
                    "core": pool.core.name,
                    "ranges": pool.ranges,
                    "reserved": pool.reserved,
                    "quarantine": pool.quarantine_seconds,
                    "description": pool.description,
                }
            )
        )
    return data


def _compact(entry: dict, keep: tuple[str, ...] = ()) -> dict:
    """Leave out empty values (they are the defaults on import)."""
    return {k: v for k, v in entry.items() if k in keep or v not in (None, "", {}, [])}


def dump_topology(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)

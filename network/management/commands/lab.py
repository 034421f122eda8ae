"""``manage.py lab up|down|status|check [--topology FILE] [--name NAME]``: the netns lab.

``up`` builds the lab from the inventory in the database (and points the inventory at it, see
``network.lab.inventory``) or from a topology file (JSON/YAML; the portal's ``network/topologies/*.yaml``
work too; the database is not touched). ``down`` removes it (and restores the inventory). ``status`` lists
labs. ``check`` runs a quick isolation self-test on the running lab through the drivers.
"""

from __future__ import annotations

import json
import time

from django.core.management.base import BaseCommand, CommandError

from network.lab import Lab, LabError, TopologyError, all_labs, requirements, topology
from network.lab.checks import self_test
from network.lab.fabric import PLANES


class Command(BaseCommand):
    help = "Build, remove, show or check the network-namespace lab (Open vSwitch userspace datapath)."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["up", "down", "status", "check"])
        parser.add_argument("--topology", help="a topology file (JSON or YAML) instead of the database")
        parser.add_argument("--name", default="default", help="the lab's name (one lab per name)")
        parser.add_argument(
            "--planes",
            choices=PLANES,
            default="shared",
            help="up: one OVSDB + ovs-vswitchd for the whole lab; a pair per site (its switch, hosts and "
            "provider edge), so that a commit costs the same whatever the lab's size; or a pair per switch and "
            "per host, as real devices have (a commit reconfigures that device only)",
        )

    def handle(self, *args, action, topology: str | None, name: str, planes: str = "shared", **options):
        self.planes = planes
        try:
            getattr(self, f"do_{action}")(name, topology)
        except (LabError, TopologyError) as exc:
            raise CommandError(str(exc)) from None

    def do_up(self, name: str, topology_file: str | None) -> None:
        reason = requirements()
        if reason:
            raise CommandError(f"cannot build the lab here: {reason}")
        from network.lab.inventory import point_inventory_at, restore_inventory

        # the topology first: a bad file or an empty inventory leaves a running lab of that name as it is,
        # the inventory pointing at it
        topo = topology.load(topology_file) if topology_file else topology.from_db()
        if not topo.switches:
            raise CommandError("nothing to build: the inventory has no enabled switch (import a topology first)")
        old = Lab.find(name)
        if old is not None:
            restore_inventory(old)
        started = time.monotonic()
        lab = Lab.up(topo, name=name, persistent=True, planes=self.planes)
        took = time.monotonic() - started
        if not topology_file:
            for warning in point_inventory_at(lab):
                self.stderr.write(self.style.WARNING(warning))
        planes = {
            "site": f" (core) and one per site ({len(topo.sites)})",
            "device": f" (core) and one per switch and host ({len(topo.switches) + len(topo.hosts)})",
        }.get(self.planes, "")
        self.stdout.write(
            f"lab {name} up in {took:.2f} s: prefix {lab.prefix}, {len(topo.switches)} switches, "
            f"{len(topo.hosts)} hosts, OVSDB {lab.db}{planes}" + ("" if topology_file else "; inventory points at it")
        )

    def do_down(self, name: str, topology_file: str | None) -> None:
        lab = Lab.find(name)
        if lab is None:
            self.stdout.write(f"no lab {name}")
            return
        if lab.state.get("inventory_backup"):
            from network.lab.inventory import restore_inventory

            restore_inventory(lab)
        took = lab.down()
        self.stdout.write(f"lab {name} down in {took:.2f} s")

    def do_status(self, name: str, topology_file: str | None) -> None:
        labs = all_labs()
        if not labs:
            self.stdout.write("no lab")
        for lab in labs:
            self.stdout.write(json.dumps(lab.status(), indent=1, sort_keys=True))

    def do_check(self, name: str, topology_file: str | None) -> None:
        lab = Lab.find(name)
        if lab is None:
            raise CommandError(f"no lab {name}: run `manage.py lab up` first")
        failed = 0
        for check, ok in self_test(lab):
            failed += not ok
            self.stdout.write(f"{'ok  ' if ok else 'FAIL'} {check}")
        if failed:
            raise CommandError(f"{failed} isolation check(s) failed")

"""``manage.py network plan [--switch X] [--host Y]``: per device, the diff convergence would apply now
(nothing is changed). ``manage.py network reconcile [--switch X] [--host Y] [--repair/--no-repair]``:
compare devices with the desired state, record drift and repair it (default: ``RECONCILE_REPAIR``). Both
ask each device of the worker that reaches it (its queue; a central worker's device here), all at once, and
wait up to ``--timeout`` s for the answers. ``manage.py network workers [--timeout S]``: for each worker
queue the devices need, the workers consuming it now; exit 1 when a queue has none (a device there would
never be converged). ``manage.py network agent-grants ROLE --host NAME … [--apply]``: the PostgreSQL
privileges of a host agent's own role (``network.agentdb``), printed, or run with ``--apply``."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from network import selectors, tasks
from network.models import DeviceKind, Host, Switch
from portal.audit import audit_actor


class Command(BaseCommand):
    help = (
        "VLAN life cycle: dry-run plan of every device, a reconcile pass (drift detection and repair), or which "
        "workers consume the devices' queues."
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        workers = sub.add_parser("workers", help="which worker consumes each device queue; exit 1 if one has none")
        workers.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the workers' answers")
        grants = sub.add_parser(
            "agent-grants", help="the PostgreSQL privileges of a host agent's role: print them, or --apply them"
        )
        grants.add_argument("role", help="the agent's PostgreSQL role (create it first: CREATE ROLE … LOGIN)")
        grants.add_argument("--host", action="append", required=True, help="a host the agent converges (repeatable)")
        grants.add_argument("--apply", action="store_true", help="run the statements (as the tables' owner)")
        for name, text in (("plan", "print the diff per device; change nothing"), ("reconcile", "find drift")):
            p = sub.add_parser(name, help=text)
            p.add_argument("--switch", action="append", default=[], help="only this switch (repeatable)")
            p.add_argument("--host", action="append", default=[], help="only this host (repeatable)")
            p.add_argument(
                "--timeout",
                type=float,
                default=None,
                help="seconds to wait for the devices' workers (default: DEVICE_TIMEOUT + 10 for a plan, the task "
                "time limit + 10 for a reconcile)",
            )
            if name == "reconcile":
                p.add_argument("--repair", action="store_true", default=None, help="repair drift")
                p.add_argument("--no-repair", dest="repair", action="store_false", help="only record drift")

    def _devices(self, options) -> list[tuple[str, Switch | Host]]:
        switches = Switch.objects.filter(enabled=True).select_related("site").order_by("name")
        hosts = Host.objects.filter(enabled=True).select_related("site").order_by("name")
        if options["switch"] or options["host"]:
            switches = switches.filter(name__in=options["switch"])
            hosts = hosts.filter(name__in=options["host"])
            found = {d.name for d in [*switches, *hosts]}
            missing = sorted(set(options["switch"] + options["host"]) - found)
            if missing:
                raise CommandError(f"no enabled device named {', '.join(missing)}")
        return [(DeviceKind.SWITCH, s) for s in switches] + [(DeviceKind.HOST, h) for h in hosts]

    def handle(self, *args, **options):
        if options["action"] == "workers":
            return self._workers(options["timeout"])
        if options["action"] == "agent-grants":
            return self._agent_grants(options["role"], options["host"], apply=options["apply"])
        devices = self._devices(options)
        failures = 0
        with audit_actor("manage.py network"):
            for kind in (DeviceKind.SWITCH, DeviceKind.HOST):
                of_kind = [device for k, device in devices if k == kind]
                if options["action"] == "plan":
                    for row in tasks.plan_devices(kind, of_kind, timeout=options["timeout"]):
                        failures += self._plan(kind, row)
                else:
                    rows = tasks.reconcile_devices(
                        kind, of_kind, options["repair"], actor="manage.py network", timeout=options["timeout"]
                    )
                    repair = settings.RECONCILE_REPAIR if options["repair"] is None else options["repair"]
                    for row in rows:
                        failures += self._reconcile(kind, row, repair=repair)
        if failures:
            raise CommandError(f"{failures} device(s) could not be reached or changed")

    def _workers(self, timeout: float) -> None:
        """Each queue the devices need, the workers consuming it (asked now) and its devices."""
        from portal.celery import queue_consumers

        try:
            consumers = queue_consumers(timeout)
        except Exception as exc:  # the broker is unreachable
            raise CommandError(f"cannot ask the workers, the broker did not answer: {exc}") from None
        missing = []
        for queue, devices in sorted(selectors.device_queues().items()):
            workers = consumers.get(queue, [])
            if not workers:
                missing.append(queue)
            shown = ", ".join(devices[:5]) + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")
            self.stdout.write(f"{queue}: {', '.join(workers) or 'NO WORKER'} — {shown}")
        if missing:
            raise CommandError(f"no worker answered for queue(s) {', '.join(missing)} within {timeout:g} s")

    def _agent_grants(self, role: str, hosts: list[str], *, apply: bool) -> None:
        from django.db import DatabaseError, connection

        from network import agentdb

        if connection.vendor != "postgresql":
            raise CommandError("agent roles need PostgreSQL (the portal runs on one database for every machine)")
        unknown = sorted(set(hosts) - set(Host.objects.filter(name__in=hosts).values_list("name", flat=True)))
        if unknown:
            raise CommandError(f"no host named {', '.join(unknown)}")
        try:
            sql = agentdb.apply(role, hosts) if apply else agentdb.statements(role, hosts)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        except DatabaseError as exc:  # e.g. not the tables' owner: nothing was changed (one transaction)
            raise CommandError(f"PostgreSQL refused, nothing was changed: {str(exc).strip()}") from None
        self.stdout.write("BEGIN;")  # printed for a DBA: all of it or nothing (row-level security without its policies)
        for statement in sql:
            self.stdout.write(statement + ";")
        self.stdout.write("COMMIT;")

    def _plan(self, kind, row: dict) -> int:
        if row["error"]:
            self.stderr.write(f"{kind} {row['device']}: ERROR {row['error']}")
            return 1
        if row["diff"].strip():
            self.stdout.write(f"{kind} {row['device']}:")
            for line in row["diff"].strip().splitlines():
                self.stdout.write(f"  {line}")
        else:
            self.stdout.write(f"{kind} {row['device']}: in sync")
        return 0

    def _reconcile(self, kind, row: dict, *, repair: bool) -> int:
        """One device's line(s); 1 when it failed — or, repair asked, its drift is still there (a repair that
        settled failed without an error of the pass: a script doing ``reconcile --repair && …`` must not go on)."""
        name = row["device"]
        if row["error"]:
            self.stderr.write(f"{kind} {name}: ERROR {row['error']}")
            return 1
        if row["busy"]:
            self.stdout.write(f"{kind} {name}: busy (a convergence is running), skipped")
        elif not row["drift"]:
            self.stdout.write(f"{kind} {name}: in sync")
        else:
            state = "repaired" if row["repaired"] else "not repaired"
            for drift in row["drift"]:
                self.stdout.write(f"{kind} {name}: drift {drift} ({state})")
            if repair and not row["repaired"]:
                self.stderr.write(f"{kind} {name}: drift left: the repair did not take (see its device change)")
                return 1
        return 0

"""`manage.py topology import FILE [--prune] [--dry-run]` and `manage.py topology export [-o FILE]`."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from network.topology import TopologyError, dump_topology, load_topology, topology_export, topology_import


class Command(BaseCommand):
    help = "Import the network inventory from a YAML file (idempotent, atomic) or export it."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True, metavar="{import,export}")
        imp = sub.add_parser("import", help="make the inventory match FILE; nothing is saved if FILE has problems")
        imp.add_argument("file", help="topology YAML file ('-' for standard input)")
        imp.add_argument("--prune", action="store_true", help="delete inventory objects FILE does not name")
        imp.add_argument("--dry-run", action="store_true", help="report what would change, save nothing")
        exp = sub.add_parser("export", help="write the inventory as YAML (passwords are never written)")
        exp.add_argument("-o", "--output", help="file to write (default: standard output)")

    def handle(self, *args, action, **options):
        self.verbosity = options["verbosity"]
        if action == "import":
            self._import(options["file"], prune=options["prune"], dry_run=options["dry_run"])
        else:
            self._export(options.get("output"))

    def _import(self, file: str, *, prune: bool, dry_run: bool) -> None:
        if file == "-":
            import sys

            source = "<stdin>"
            try:  # (bytes, as from a file: the locale's encoding is not the file's)
                text = sys.stdin.buffer.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CommandError(f"{source}: nothing imported, not UTF-8 text (byte {exc.start})") from None
        else:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"cannot read {file}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise CommandError(f"{file}: nothing imported, not UTF-8 text (byte {exc.start})") from None
            source = file
        try:
            data, lines = load_topology(text, source=source)
            report = topology_import(data=data, source=source, prune=prune, dry_run=dry_run, lines=lines)
        except TopologyError as exc:
            raise CommandError(f"{source}: nothing imported, {exc}") from None
        if self.verbosity >= 2 or dry_run:
            for change in report.changes:
                self.stdout.write(f"  {change}")
        self.stdout.write(report.summary())

    def _export(self, output: str | None) -> None:
        text = dump_topology(topology_export())
        if output:
            try:
                Path(output).write_text(text, encoding="utf-8")  # (what import reads, whatever the locale)
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc.strerror}") from None
            self.stderr.write(f"topology written to {output}")
        else:
            self.stdout.write(text, ending="")

"""The network inventory: sites, the wide-area core, site switches and their ports, hypervisor hosts and
the VLAN pools clusters draw from (paper §3: core L2 network, site network, host configuration)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from network import vlanranges
from network.choices import VLAN_MAX, VLAN_MIN, CoreKind, DeviceKind, DriftKind, HostDriver, Platform, PortRole
from network.drivers.naming import check_vlan_name_format
from network.drivers.ranges import PLATFORM_RESERVED
from network.drivers.sshargs import ssh_problems
from portal.secrets import EncryptedTextField
from portal.text import encodable

#: ``driver_args`` keys that say which device a switch or host is (an OVS bridge, its port names, a host's uplink
#: or OVSDB, a lab namespace): changed while live clusters use it, the old device keeps their VLANs for good.
DEVICE_KEYS = ("bridge", "port_map", "uplink", "db", "netns")


def json_problem(value) -> str | None:
    """What in a JSON value (``driver_args``) PostgreSQL's jsonb refuses, as "must not …" (a database error, a 500,
    not the form's message): a NUL character or a lone surrogate in a key or a string, NaN or an infinity (JSON
    has neither; Django's form field and YAML's ``.inf`` give them), nesting deeper than any driver's arguments;
    None when there is nothing."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            return f"must not nest more than {JSON_MAX_DEPTH} levels deep"
        if isinstance(item, str):
            if "\x00" in item:
                return "must not hold a NUL character"
            if not encodable(item):
                return "must not hold a lone surrogate (not a character)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "must not hold NaN or an infinity (JSON has neither)"
        elif isinstance(item, dict):
            stack += [(k, depth) for k in item] + [(v, depth + 1) for v in item.values()]
        elif isinstance(item, (list, tuple)):
            stack += [(v, depth + 1) for v in item]
    return None


JSON_MAX_DEPTH = 16


def pools_handing_out(vids: frozenset[int], site_id: int, *, skip_pools: Iterable[str] = ()) -> list[tuple]:
    """(pool, the ids of ``vids`` it hands out) for each pool of a core that reaches site ``site_id`` and hands
    out some of ``vids`` (a port's static VLANs there), by the pool's name; ``skip_pools``: names left out."""
    pools = VlanPool.objects.filter(core__sites=site_id).exclude(name__in=list(skip_pools)).distinct()
    among = Q(vid__in=sorted(vids))
    found = ((pool, vids & pool.claimed_ids(among)) for pool in pools.select_related("core").order_by("name"))
    return [(pool, clash) for pool, clash in found if clash]


vlan_id_validators = [MinValueValidator(VLAN_MIN), MaxValueValidator(VLAN_MAX)]
name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]*$", "Use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit."
)
interface_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9/._:-]*$", "An interface name: letters, digits and / . _ : -"
)
queue_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$", "A Celery queue name: letters, digits and . _ : @ -"
)
_VLAN_FIELDS = {"vid_min", "vid_max"}


class Reconciled(models.Model):
    """What the reconciler last made of a device: when it last compared it with the desired state, and why its
    last attempt failed. An unreachable device (a rotated password, an ACL, its site worker down) shows here and
    in ``/metrics``, not only when a cluster's provisioning fails on it."""

    last_reconciled_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="the reconciler's last complete comparison with the desired state",
    )
    reconcile_error = models.TextField(
        blank=True,
        default="",
        db_default="",
        editable=False,
        help_text="why its last attempt failed (empty: it did not)",
    )

    class Meta:
        abstract = True


class InventoryModel(models.Model):
    """Common behaviour of the inventory: every validation message names the object it is about
    (``core cesnet-qinq: ...``), also Django's own field and uniqueness messages, so that a list of
    problems from the admin, the API or a topology import can be read without context."""

    kind_label = "object"

    class Meta:
        abstract = True

    @property
    def label(self) -> str:
        return f"{self.kind_label} {self or '(unnamed)'}"

    def full_clean(self, exclude=None, validate_unique=True, validate_constraints=True) -> None:
        try:
            super().full_clean(
                exclude=exclude, validate_unique=validate_unique, validate_constraints=validate_constraints
            )
        except ValidationError as exc:
            raise self._named(exc) from None

    def _named(self, exc: ValidationError) -> ValidationError:
        prefix = f"{self.label}: "
        named: dict[str, list[str]] = {}
        for name, errors in exc.error_dict.items():
            for error in errors:
                if name in _VLAN_FIELDS and error.code in ("min_value", "max_value"):
                    message = f"VLAN id {getattr(self, name)} is outside {VLAN_MIN}-{VLAN_MAX}"
                else:
                    message = error.message % error.params if error.params else error.message
                message = str(message)
                named.setdefault(name, []).append(message if message.startswith(prefix) else prefix + message)
        return ValidationError(named)


class Site(InventoryModel):
    """A location with hypervisors and a site network (Brno, Pilsen, Prague); joined to other sites only
    through core transports."""

    kind_label = "site"

    name = models.SlugField(max_length=50, unique=True, validators=[name_validator])
    description = models.CharField(max_length=200, blank=True)
    worker_queue = models.CharField(
        max_length=100,
        blank=True,
        validators=[queue_validator],
        help_text="Celery queue of a worker at the site: it converges the site's switches, and its hosts that "
        "have no agent of their own (when only the site reaches their management addresses); empty: the "
        "central worker",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class CoreTransport(InventoryModel):
    """A wide-area layer-2 service between site switches: a QinQ S-VLAN, a VPLS instance, an Xponder
    circuit or a VXLAN/EVPN fabric. It carries a fixed range of customer VLAN ids between the sites it joins.
    Operators configure it once on the backbone; the portal only reads it (paper §2.3: nothing on the
    backbone changes at run time)."""

    kind_label = "core"
    # Cleared by the topology import while it has not yet written the file's pools (they may move too).
    check_pools = True

    name = models.SlugField(max_length=50, unique=True, validators=[name_validator])
    kind = models.CharField(max_length=10, choices=CoreKind.choices)
    sites = models.ManyToManyField(Site, related_name="core_transports")
    vid_min = models.PositiveSmallIntegerField("lowest VLAN id carried", validators=vlan_id_validators)
    vid_max = models.PositiveSmallIntegerField("highest VLAN id carried", validators=vlan_id_validators)
    service_tag = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="QinQ outer S-VLAN id, VPLS instance/VC id or VXLAN VNI base; informational for circuits.",
    )
    mtu = models.PositiveSmallIntegerField(
        "MTU",
        null=True,
        blank=True,
        validators=[MinValueValidator(576), MaxValueValidator(9216)],
        help_text="the largest IP packet a VM may send on this core's VLANs, when it is less than the hosts' "
        "1500 (e.g. 1450 on a VXLAN core over a 1500-byte underlay): the VM managers get it with each "
        "attachment (libvirt <mtu>); empty: the default",
    )
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        if self.vid_min and self.vid_max and self.vid_min > self.vid_max:
            errors["vid_max"] = [f"core {self.name}: highest VLAN id {self.vid_max} is below lowest {self.vid_min}"]
        if self.kind == CoreKind.QINQ and self.service_tag is not None and not VLAN_MIN <= self.service_tag <= VLAN_MAX:
            errors["service_tag"] = [f"core {self.name}: a QinQ S-VLAN must be in {VLAN_MIN}-{VLAN_MAX}"]
        if self.kind == CoreKind.QINQ and self.service_tag is None:
            errors["service_tag"] = [f"core {self.name}: a QinQ core needs its S-VLAN (service tag)"]
        if self.check_pools and self.pk and self.vid_min and self.vid_max and "vid_max" not in errors:
            # Shrinking what the core carries must not strand ids that pools already hand out.
            for pool in self.pools.all():  # (and ids a pool still holds that its ranges no longer cover)
                carried = Q(vid__gte=self.vid_min, vid__lte=self.vid_max)
                used = set(vlanranges.parse(pool.ranges)) | pool.held_ids(~carried)
                outside = sorted(v for v in used if not self.vid_min <= v <= self.vid_max)
                if outside:
                    errors.setdefault("vid_min", []).append(
                        f"core {self.name}: pool {pool.name} uses ids {vlanranges.format_ranges(outside)} "
                        f"outside {self.vid_min}-{self.vid_max}"
                    )
        if errors:
            raise ValidationError(errors)


class Switch(InventoryModel, Reconciled):
    """A site switch with 802.1Q trunks to hypervisors, an uplink into the core and possibly a trunk to an
    access gateway. Configured through NAPALM with the platform's driver; the portal changes only the ports
    listed here (the ports it owns)."""

    kind_label = "switch"
    # Cleared by the topology import while it has not yet written the file's pools (they may reserve the ids).
    check_pools = True

    name = models.SlugField(max_length=63, unique=True, validators=[name_validator])
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="switches")
    platform = models.CharField(max_length=20, choices=Platform.choices)
    address = models.CharField(
        "management address", max_length=255, help_text="host name or IP for SSH/API; for ovs an OVSDB socket"
    )
    username = models.CharField(max_length=100, blank=True)
    password = EncryptedTextField(blank=True, help_text="stored encrypted; never shown back")
    driver_args = models.JSONField(default=dict, blank=True, help_text="NAPALM optional_args (transport, port, …)")
    enabled = models.BooleanField(default=True, help_text="disabled switches are never touched")
    description = models.CharField(max_length=200, blank=True)
    worker_queue = models.CharField(
        max_length=100,
        blank=True,
        validators=[queue_validator],
        help_text="Celery queue of the worker that reaches this switch; empty: its site's worker queue",
    )

    class Meta:
        ordering = ["site__name", "name"]
        verbose_name_plural = "switches"

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        """The Celery queue its device tasks go to ("": the central worker's)."""
        return self.worker_queue or self.site.worker_queue

    def clean(self) -> None:
        if not isinstance(self.driver_args, dict):
            raise ValidationError({"driver_args": f"switch {self.name}: driver args must be a mapping"})
        problem = json_problem(self.driver_args)
        if problem:
            raise ValidationError({"driver_args": f"switch {self.name}: driver args {problem}"})
        for key in ("password", "secret"):
            if key in self.driver_args:
                raise ValidationError(
                    {"driver_args": f"switch {self.name}: put the {key} in the password field (stored encrypted)"}
                )
        host, user = self.driver_args.get("ssh_host", ""), self.driver_args.get("ssh_user", "")
        if self.platform == Platform.LINUXBRIDGE and self.driver_args.get("transport") == "ssh":
            host, user = self.address, self.username  # that driver's ssh destination
        problems = ssh_problems(host=host, user=user, options=self.driver_args.get("ssh_options", ()))
        if "vlan_name_format" in self.driver_args:
            try:  # written into the vendor switch's configuration: one plain word per VLAN, each its own
                check_vlan_name_format(str(self.driver_args["vlan_name_format"]), range(VLAN_MIN, VLAN_MAX + 1))
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValidationError({"driver_args": [f"switch {self.name}: {problem}" for problem in problems]})
        errors: dict[str, list[str]] = {}
        stored = Switch.objects.filter(pk=self.pk).values_list("site_id", flat=True).first() if self.pk else None
        if stored is not None and self.site_id != stored:
            # a host must stay at its switch's site, an uplink's core must join it: they move first; and a port
            # carrying live VLANs (a gateway's, a router's trunk: which VLANs depends on the site) keeps them
            on_ports = self._hanging_on_ports() + self._carrying_ports()
            if on_ports:
                errors["site"] = [
                    f"switch {self.name}: on its ports: {', '.join(on_ports)}; move or delete them before the "
                    "switch leaves its site"
                ]
        if stored is not None:
            was = Switch.objects.filter(pk=self.pk).values_list("driver_args", flat=True).first() or {}
            moved = [key for key in DEVICE_KEYS if was.get(key) != self.driver_args.get(key)]
            carrying = self._carrying_ports() if moved else []
            if carrying:  # the device those keys name would keep the VLANs, the new one get them from nothing
                errors["driver_args"] = [
                    f"switch {self.name}: {', '.join(moved)} name which device it is, and {', '.join(carrying)}: "
                    "change them once no live cluster uses its ports"
                ]
        reserved = PLATFORM_RESERVED.get(self.platform, frozenset())
        if self.pk and reserved:  # a port's static VLANs the (new) platform keeps for itself: never converged
            kept = [
                f"port {port.name}: static VLAN {vlanranges.format_ranges(port.static_vids & reserved)}"
                for port in self.ports.exclude(static_vlans="").order_by("name")
                if port.static_vids & reserved
            ]
            if kept:
                errors["platform"] = [f"switch {self.name}: {', '.join(kept)} reserved on {self.platform}"]
        if self.check_pools:
            clashes = self.reserved_clashes()
            if clashes:
                errors.setdefault("platform", []).extend(clashes)
            moved_clashes = self.static_clashes() if stored is not None and self.site_id != stored else []
            if moved_clashes:
                errors.setdefault("site", []).extend(moved_clashes)
        if errors:
            raise ValidationError(errors)

    def static_clashes(self, *, skip_pools: Iterable[str] = (), skip_ports: Iterable[str] = ()) -> list[str]:
        """Why this switch's ports may not be at its site: a pool of a core that reaches the site hands out an id
        one of them carries as a static VLAN (a cluster given it would share the host's own network there; the
        port's own check, for a switch that moves). ``skip_pools``, ``skip_ports``: names checked on their own."""
        stored = self.ports.exclude(static_vlans="").exclude(name__in=list(skip_ports)).order_by("name")
        ports = [port for port in stored if port.static_vids]
        if not ports or not self.site_id:
            return []
        return [
            f"port {port.name}: static VLAN {vlanranges.format_ranges(clash)} is handed out by pool "
            f"{pool.name} (core {pool.core.name}) at site {self.site.name}: reserve it in the "
            "pool, or pick another id, before the switch moves there"
            for port in ports
            for pool, clash in pools_handing_out(port.static_vids, self.site_id, skip_pools=skip_pools)
        ]

    def _carrying_ports(self) -> list[str]:
        from network import selectors  # it reads these models

        carrying = selectors.ports_carrying(self.ports.values_list("pk", flat=True))
        names = dict(self.ports.filter(pk__in=list(carrying)).values_list("pk", "name"))
        return [
            f"port {names[pk]} carries VLAN {vlanranges.format_ranges(vids)} of live clusters"
            for pk, vids in sorted(carrying.items(), key=lambda item: names[item[0]])
            if vids
        ]

    def _hanging_on_ports(self) -> list[str]:
        hosts = Host.objects.filter(switch_port__switch_id=self.pk).order_by("name").values_list("name", flat=True)
        uplinks = self.ports.filter(role=PortRole.CORE_UPLINK).select_related("core").order_by("name")
        return [f"host {name}" for name in hosts] + [
            f"core uplink {port.name} (core {port.core.name})" for port in uplinks
        ]

    def reserved_clashes(self, *, skip_pools: Iterable[str] = ()) -> list[str]:
        """Why this switch may not be at its site with its platform: pools of the cores that reach the site
        hand out ids the platform keeps for itself (the reverse of the check in ``VlanPool.clean``); a
        cluster given one would fail on this switch. ``skip_pools``: names of pools checked on their own."""
        reserved = PLATFORM_RESERVED.get(self.platform)
        if not reserved or not self.site_id:
            return []
        pools = VlanPool.objects.filter(core__sites=self.site_id).exclude(name__in=list(skip_pools)).distinct()
        clashes = []
        for pool in pools.order_by("name"):
            clash = reserved.intersection(pool.claimed_ids(Q(vid__in=sorted(reserved))))
            if clash:
                clashes.append(
                    f"switch {self.name}: pool {pool.name} hands out ids {vlanranges.format_ranges(clash)}, which "
                    f"are reserved on {self.platform}: add them to the pool's reserved ids first"
                )
        return clashes


class SwitchPort(InventoryModel):
    """A switch port the portal owns: a trunk toward a hypervisor, an uplink into a core transport, or a
    trunk toward an access gateway. Only these ports ever have their VLAN membership changed."""

    kind_label = "port"

    switch = models.ForeignKey(Switch, on_delete=models.CASCADE, related_name="ports")
    name = models.CharField(max_length=64, validators=[interface_validator])
    role = models.CharField(max_length=20, choices=PortRole.choices)
    core = models.ForeignKey(
        CoreTransport,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="uplinks",
        help_text="for a core uplink: the transport it enters",
    )
    static_vlans = models.CharField(
        "static VLANs",
        max_length=200,
        blank=True,
        help_text="VLAN ids the port always carries besides the clusters' — the hypervisor's management or "
        "storage VLAN, the native VLAN of an IOS/EOS/NX-OS trunk — e.g. 10,20-21. They must exist on the switch; "
        "the portal never creates, renames or removes them, and no pool at this site may hand them out",
    )
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["switch__name", "name"]
        constraints = [models.UniqueConstraint(fields=["switch", "name"], name="switchport_unique_name")]

    def __str__(self) -> str:
        return f"{self.switch.name}:{self.name}" if self.switch_id else self.name

    def clean(self) -> None:
        label = str(self)
        if self.role == PortRole.CORE_UPLINK:
            if self.core_id is None:
                raise ValidationError({"core": f"port {label}: a core uplink must name its core transport"})
            if self.switch_id:
                core_sites = set(self.core.sites.values_list("pk", flat=True))
                if core_sites and self.switch.site_id not in core_sites:
                    raise ValidationError(
                        {"core": f"port {label}: core {self.core.name} does not join site {self.switch.site.name}"}
                    )
        elif self.core_id is not None:
            raise ValidationError({"core": f"port {label}: only a core uplink names a core transport"})
        try:
            static = set(vlanranges.parse_static(self.static_vlans, what=f"port {label}: static VLANs"))
        except ValidationError as exc:
            raise ValidationError({"static_vlans": exc.messages}) from None
        # its switch: also one not saved yet (the admin's "add switch" page checks its ports before it saves it)
        switch = self.switch if self.switch_id or SwitchPort.switch.is_cached(self) else None
        if static and switch is not None:
            kept = static & PLATFORM_RESERVED.get(switch.platform, frozenset())
            if kept:  # every converge of the switch would refuse the port's list (the platform keeps these ids)
                raise ValidationError(
                    {
                        "static_vlans": f"port {label}: static VLAN {vlanranges.format_ranges(kept)} is reserved on "
                        f"{switch.platform}: a port cannot carry it"
                    }
                )
            # a cluster given one of these ids would share the VLAN with the host's own network on this port
            for pool, clash in pools_handing_out(static, switch.site_id)[:1] if switch.site_id else ():
                raise ValidationError(
                    {
                        "static_vlans": f"port {label}: static VLAN {vlanranges.format_ranges(clash)} is handed "
                        f"out by pool {pool.name} (core {pool.core.name}) at site {switch.site.name}: "
                        "reserve it in the pool, or pick another id"
                    }
                )
        if self.pk:
            self._check_carried_port_stays()
        if self.role != PortRole.HOST_TRUNK and self.pk:
            host = Host.objects.filter(switch_port_id=self.pk).values_list("name", flat=True).first()
            if host is not None:  # its VLANs would leave the host, and a gateway's or the core's would come
                raise ValidationError(
                    {"role": f"port {label}: host {host} hangs on it, so it stays a host trunk (move the host first)"}
                )
        if self.pk and self.switch_id:
            # a host hangs on the port: the port moved to a switch at another site would leave the host at its site
            # with its trunk elsewhere (its clusters' VLANs from a core picked for the wrong site), as a switch
            # moved to another site would (``Switch._hanging_on_ports``)
            stranded = (
                Host.objects.filter(switch_port_id=self.pk)
                .exclude(site_id=self.switch.site_id)
                .values_list("name", "site__name")
                .first()
            )
            if stranded is not None:
                raise ValidationError(
                    {
                        "switch": f"port {label}: host {stranded[0]} at site {stranded[1]} hangs on it; switch "
                        f"{self.switch.name} is at site {self.switch.site.name} (move the host first)"
                    }
                )

    @property
    def static_vids(self) -> frozenset[int]:
        """``static_vlans`` as ids (checked on save)."""
        return frozenset(vlanranges.parse_static(self.static_vlans)) if self.static_vlans else frozenset()

    def _check_carried_port_stays(self) -> None:
        """A port that carries live VLANs keeps its name and switch: under another one the device's old port
        would keep the VLANs for ever (nothing converges it again), as if the port had been deleted. And its role
        and core: they decide its VLANs (another core's, none of a gateway's), so the next converge, or the
        reconciler's repair, would take the live clusters' VLANs off it — the cluster cut in two."""
        from network import selectors  # it reads these models

        fields = ("switch_id", "name", "role", "core_id")
        stored = SwitchPort.objects.filter(pk=self.pk).values_list(*fields).first()
        if stored is None or stored == tuple(getattr(self, f) for f in fields):
            return
        carrying = selectors.ports_carrying([self.pk]).get(self.pk)
        if carrying:
            old = SwitchPort.objects.select_related("switch").get(pk=self.pk)
            # (its role and core decide which VLANs it carries: changed, the next converge takes theirs off it)
            field = next(f for f, was in zip(fields, stored, strict=True) if getattr(self, f) != was)
            field = field.removesuffix("_id")
            raise ValidationError(
                {
                    field: f"port {self}: {old} carries VLAN {vlanranges.format_ranges(carrying)} of live "
                    "clusters (or of ended ones still holding it): tear them down, or let their cleanup finish, "
                    f"before changing its {field}"
                }
            )


class Host(InventoryModel, Reconciled):
    """A hypervisor (KVM/libvirt today, Xen in the paper) at a site, hanging on a host trunk of a site
    switch through its trunk NIC. It carries one bridge per cluster VLAN it hosts; its agent (a Celery
    worker on the host) consumes ``agent_queue``."""

    kind_label = "host"

    name = models.SlugField(max_length=63, unique=True, validators=[name_validator])
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="hosts")
    switch_port = models.OneToOneField(
        SwitchPort, on_delete=models.PROTECT, related_name="host", help_text="the host trunk it hangs on"
    )
    trunk_interface = models.CharField(max_length=15, default="eth0", validators=[interface_validator])
    driver = models.CharField(max_length=20, choices=HostDriver.choices, default=HostDriver.OVS)
    driver_args = models.JSONField(default=dict, blank=True)
    agent_queue = models.CharField(
        max_length=100,
        blank=True,
        validators=[queue_validator],
        help_text="Celery queue of the host agent; empty: its site's worker queue, or the central worker",
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["site__name", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        """The Celery queue its device tasks go to ("": the central worker's)."""
        return self.agent_queue or self.site.worker_queue

    def _check_member_stays(self) -> None:
        """A host that live segments span keeps its site and its switch port: moved, its clusters' VLANs would
        reach it through another switch (one their core may not join: the cluster split in two) and stay on the
        port it left. And what says which device it is — its name (an agent's database role is granted by it),
        driver, trunk interface, the ``DEVICE_KEYS`` of its driver args: the old bridges and sub-interfaces would
        stay for good (a teardown took the old trunk's sub-interface for a VM port and never finished). Migrate
        its nodes away, or end their clusters, first."""
        if self.pk is None:
            return
        fields = ("site_id", "switch_port_id", "name", "driver", "trunk_interface")
        stored = Host.objects.filter(pk=self.pk).values_list(*fields, "driver_args").first()
        if stored is None:
            return
        was_args = stored[-1] if isinstance(stored[-1], dict) else {}
        args = self.driver_args if isinstance(self.driver_args, dict) else {}
        changed = [f.removesuffix("_id") for f, was in zip(fields, stored, strict=False) if getattr(self, f) != was]
        changed += ["driver_args"] if any(was_args.get(k) != args.get(k) for k in DEVICE_KEYS) else []
        if not changed:
            return
        from network.selectors import host_vlans_held

        vids = sorted(host_vlans_held(self.pk))
        if vids:
            raise ValidationError(
                {
                    changed[0]: f"host {self.name} is in the VLANs {vlanranges.format_ranges(vids)} of live "
                    "clusters, or of failed or closed ones whose clean-up has yet to reach it: migrate their "
                    f"nodes away or end them, and let the clean-up finish, before changing its {changed[0]}"
                }
            )

    def clean(self) -> None:
        if not isinstance(self.driver_args, dict):
            raise ValidationError({"driver_args": f"host {self.name}: driver args must be a mapping"})
        problem = json_problem(self.driver_args)
        if problem:
            raise ValidationError({"driver_args": f"host {self.name}: driver args {problem}"})
        args = self.driver_args  # the OVSDB transport's ssh keys (network.drivers.ovsdb)
        problems = ssh_problems(
            host=args.get("ssh_host", ""), user=args.get("ssh_user", ""), options=args.get("ssh_options", ())
        )
        if problems:
            raise ValidationError({"driver_args": [f"host {self.name}: {problem}" for problem in problems]})
        if self.driver == HostDriver.LINUXBRIDGE and not self.agent_queue and not args.get("netns"):
            # the driver works in the network stack of the process that runs it (netlink, no remote transport):
            # without an agent on the host, the worker would make the bridges on its own machine and say done
            raise ValidationError(
                {
                    "agent_queue": f"host {self.name}: a Linux-bridge host is configured by an agent running on "
                    "it: give the queue that agent consumes (or driver_args.netns for a lab host in a network "
                    "namespace of the worker's machine)"
                }
            )
        self._check_member_stays()
        if not self.switch_port_id:
            return
        port = self.switch_port
        if port.role != PortRole.HOST_TRUNK:
            raise ValidationError(
                {"switch_port": f"host {self.name}: port {port} is a {port.get_role_display()}, not a host trunk"}
            )
        if self.site_id and port.switch.site_id != self.site_id:
            raise ValidationError(
                {
                    "switch_port": f"host {self.name}: port {port} is on switch {port.switch.name} at site "
                    f"{port.switch.site.name}, but the host is at site {self.site.name}"
                }
            )


class VlanPool(InventoryModel):
    """VLAN ids over one core transport that clusters may use, minus reserved ids. A released id waits
    ``quarantine_seconds`` before reuse so late frames and stale MAC tables of one cluster never reach the
    next."""

    kind_label = "pool"

    name = models.SlugField(max_length=50, unique=True, validators=[name_validator])
    core = models.ForeignKey(CoreTransport, on_delete=models.PROTECT, related_name="pools")
    ranges = models.CharField(max_length=500, help_text="e.g. 100-199,300-349")
    reserved = models.CharField(max_length=500, blank=True, help_text="ids never handed out, e.g. 150,160-162")
    quarantine_seconds = models.PositiveIntegerField(default=300)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "VLAN pool"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        try:
            ids = set(vlanranges.parse(self.ranges, what=f"pool {self.name} ranges"))
        except ValidationError as exc:
            raise ValidationError({"ranges": exc.messages}) from None
        if not ids:
            errors.setdefault("ranges", []).append(f"pool {self.name}: no VLAN ids in ranges")
        try:
            reserved = set(vlanranges.parse(self.reserved, what=f"pool {self.name} reserved"))
        except ValidationError as exc:
            raise ValidationError({"reserved": exc.messages}) from None
        if reserved - ids:
            errors.setdefault("reserved", []).append(
                f"pool {self.name}: reserved ids {vlanranges.format_ranges(reserved - ids)} are not in its ranges"
            )
        if self.pk is not None and self.core_id is not None:
            stored = VlanPool.objects.filter(pk=self.pk).values_list("core_id", flat=True).first()
            held = self.held_ids(Q()) if stored is not None and stored != self.core_id else set()
            if held:
                # its clusters' VLANs would be carried by another core, one that may not join their sites (and an id
                # in quarantine would be handed out on a core where it may still be in use)
                errors.setdefault("core", []).append(
                    f"pool {self.name}: its ids {vlanranges.format_ranges(held)} are given to clusters or in "
                    "quarantine: it keeps its core until they are free"
                )
        if self.core_id and ids:
            core = self.core
            outside = {v for v in ids if not core.vid_min <= v <= core.vid_max}
            if outside:
                errors.setdefault("ranges", []).append(
                    f"pool {self.name}: ids {vlanranges.format_ranges(outside)} are outside what core "
                    f"{core.name} carries ({core.vid_min}-{core.vid_max})"
                )
            for other in VlanPool.objects.filter(core_id=self.core_id).exclude(pk=self.pk):
                overlap = ids & (set(vlanranges.parse(other.ranges)) | other.held_ids(Q(vid__in=sorted(ids))))
                if overlap:
                    errors.setdefault("ranges", []).append(
                        f"pool {self.name}: ids {vlanranges.format_ranges(overlap)} overlap pool {other.name} "
                        f"on core {core.name}"
                    )
            sites = core.sites.all()
            # what it hands out and what it still holds (``claimed_ids``, with the ranges and reserved ids as
            # given): an id a live cluster holds stays on the switches until it is released, reserved or not
            usable = (ids - reserved) | self.held_ids()
            problems = (
                self.shared_site_overlaps(sites, ids)
                + self.platform_clashes(sites, usable)
                + self.static_clashes(sites, usable)
            )
            if problems:
                errors.setdefault("ranges", []).extend(problems)
        if errors:
            raise ValidationError(errors)

    def shared_site_overlaps(self, sites, ids: set[int] | None = None) -> list[str]:
        """Why this pool's ids (``ids``: its ranges) clash with pools of other cores when its core joins
        ``sites``. Two cores meeting at one site share that site's switches: a VLAN id from both would join
        two clusters on one switch, so pools of cores with a common site must not overlap either. A core's
        form asks this with the sites it is about to get."""
        ids = set(vlanranges.parse(self.ranges)) | self.held_ids() if ids is None else ids
        shared = (
            VlanPool.objects.filter(core__sites__in=sites)
            .exclude(core_id=self.core_id)
            .exclude(pk=self.pk)
            .select_related("core")
            .distinct()
            .order_by("name")
        )
        problems = []
        for other in shared:
            overlap = ids & (set(vlanranges.parse(other.ranges)) | other.held_ids(Q(vid__in=sorted(ids))))
            if overlap:
                problems.append(
                    f"pool {self.name}: ids {vlanranges.format_ranges(overlap)} overlap pool {other.name} of "
                    f"core {other.core.name}, which meets core {self.core.name} at a common site"
                )
        return problems

    def platform_clashes(self, sites, usable: set[int] | None = None, *, skip_switches=()) -> list[str]:
        """Why this pool's ids (``usable``: ranges minus reserved) may not reach the switches at ``sites``
        (but those named in ``skip_switches``, checked another way): ids a switch keeps for itself (IOS
        1002-1005, NX-OS 3968-4094) are never handed out. A core's form asks this with the sites it is about
        to join."""
        usable = self.claimed_ids() if usable is None else usable
        on_sites = Switch.objects.filter(site__in=sites, platform__in=list(PLATFORM_RESERVED))
        on_sites = on_sites.exclude(name__in=skip_switches)
        problems = []
        for platform, names in _by_platform(on_sites.values_list("platform", "name")).items():
            clash = usable & PLATFORM_RESERVED[platform]
            if clash:
                problems.append(
                    f"pool {self.name}: ids {vlanranges.format_ranges(clash)} are reserved on {platform} "
                    f"({', '.join(names)}): add them to the pool's reserved ids"
                )
        return problems

    def static_clashes(self, sites, usable: set[int] | None = None) -> list[str]:
        """Why this pool's ids (``usable``: ranges minus reserved) may not reach the switches at ``sites``: a
        port there carries one of them as a static VLAN (a host's own network; a cluster given that id would
        share it). A core's form asks this with the sites it is about to join."""
        usable = self.claimed_ids() if usable is None else usable
        ports = SwitchPort.objects.filter(switch__site__in=sites).exclude(static_vlans="").select_related("switch")
        problems = []
        for port in ports.order_by("switch__name", "name"):
            clash = usable & port.static_vids
            if clash:
                problems.append(
                    f"pool {self.name}: ids {vlanranges.format_ranges(clash)} are static VLANs of port {port}: "
                    "add them to the pool's reserved ids"
                )
        return problems

    @property
    def vlan_ids(self) -> list[int]:
        """The ids clusters may get: ranges minus reserved."""
        reserved = set(vlanranges.parse(self.reserved))
        return [v for v in vlanranges.parse(self.ranges) if v not in reserved]

    def held_ids(self, among: Q | None = None) -> set[int]:
        """The ids this pool still holds, allocated or in quarantine and not free to go yet (the allocator's rule,
        ``network.services.free_now``) — also ones its ranges (or its reserved ids) no longer cover: a shrunk pool
        keeps them until they are released and their quarantine is over (``vlan_pool_sync``).

        ``among`` (a condition on ``vid``): only those ids, for a check about to let another pool, a port's static
        VLANs or a switch have them. Inside a transaction their rows are locked first, until it commits: an
        allocation taking one of them now (not committed yet, invisible to a plain read) is waited for and counted,
        and one after skips them (``SKIP LOCKED``) — never an id this check has just let someone else have."""
        if self.pk is None:
            return set()
        from django.db import connection
        from django.utils import timezone

        from network.services import free_now, reuse_horizon  # (it reads these models)

        rows = self.allocations.all() if among is None else self.allocations.filter(among)
        if among is not None and connection.in_atomic_block and connection.features.has_select_for_update:
            list(rows.select_for_update().order_by("pk").values_list("pk", flat=True))
        now = timezone.now()
        held = rows.exclude(state=VlanAllocation.State.FREE).exclude(free_now(now, reuse_horizon(now)))
        return set(held.values_list("vid", flat=True))

    def claimed_ids(self, among: Q | None = None) -> set[int]:
        """What no other pool that meets it, no port's static VLAN and no switch's own ids may share: the ids it
        hands out and those it still holds (``among``: see ``held_ids``)."""
        return set(self.vlan_ids) | self.held_ids(among)


def _by_platform(rows) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for platform, name in rows:
        grouped.setdefault(platform, []).append(name)
    return {platform: sorted(names) for platform, names in grouped.items()}


# --- The VLAN life-cycle service (the paper's "SBF"): allocations, segments, device work, drift ------------


class VlanAllocation(models.Model):
    """One VLAN id of one pool and who holds it: free, allocated to an owner (a segment's reference), or
    in quarantine after release until ``quarantine_until``. One row per (pool, id), as Neutron does it:
    an allocation is a conditional UPDATE of one row, so two requests can never get the same id."""

    class State(models.TextChoices):
        FREE = "free", "free"
        ALLOCATED = "allocated", "allocated"
        QUARANTINED = "quarantined", "in quarantine"

    # no index of its own: (pool, vid) and (pool, state, vid) lead with it; an allocation updates every index
    pool = models.ForeignKey(VlanPool, on_delete=models.CASCADE, related_name="allocations", db_index=False)
    vid = models.PositiveSmallIntegerField("VLAN id", validators=vlan_id_validators)
    state = models.CharField(max_length=12, choices=State.choices, default=State.FREE)
    owner = models.CharField(max_length=200, blank=True, help_text="opaque reference of the holder")
    allocated_at = models.DateTimeField(null=True, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    quarantine_until = models.DateTimeField(null=True, blank=True)
    gateway_mapped = models.BooleanField(
        default=False,
        help_text="the access gateways may have mapped it (a live closed cluster's): after its release it also "
        "waits until none can still map it to its old owner",
    )

    class Meta:
        ordering = ["pool__name", "vid"]
        verbose_name = "VLAN allocation"
        constraints = [
            models.UniqueConstraint(fields=["pool", "vid"], name="vlanallocation_unique_pool_vid"),
            models.CheckConstraint(
                condition=~models.Q(state="allocated") | ~models.Q(owner=""),
                name="vlanallocation_allocated_has_owner",
            ),
        ]
        indexes = [models.Index(fields=["pool", "state", "vid"], name="vlanallocation_pool_state")]

    def __str__(self) -> str:
        return f"{self.pool.name}:{self.vid}" if self.pool_id else str(self.vid)


class Segment(models.Model):
    """A layer-2 segment: one VLAN (from an allocation) carried to the hosts that need it, across the core
    when it spans sites, and onto the access-gateway trunks when ``gateway`` (a closed cluster). Owned by an
    opaque reference (``cluster:42``); the network app knows nothing else about the owner."""

    class State(models.TextChoices):
        PENDING = "pending", "being provisioned"
        ACTIVE = "active", "active"
        DELETING = "deleting", "being torn down"
        COMPENSATING = "compensating", "being rolled back"
        FAILED = "failed", "failed (rolled back)"
        CLOSED = "closed", "closed"

    # Segments in these states are part of the desired state of the devices.
    DESIRED_STATES = (State.PENDING, State.ACTIVE)
    # At most one segment per owner in these states.
    LIVE_STATES = (State.PENDING, State.ACTIVE, State.DELETING, State.COMPENSATING)

    owner_ref = models.CharField(max_length=200, help_text="opaque reference of the owner, e.g. cluster:42")
    allocation = models.ForeignKey(
        VlanAllocation, null=True, blank=True, on_delete=models.PROTECT, related_name="segments"
    )
    vid = models.PositiveSmallIntegerField("VLAN id", null=True, blank=True, help_text="kept after release")
    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING)
    gateway = models.BooleanField(default=False, help_text="carried on the access-gateway trunks (closed cluster)")
    revision = models.PositiveIntegerField(
        default=0,
        help_text="what the segment needs, counted: its hosts or gateway changed, it is one more (a provisioning "
        "of an earlier revision does not mark it active)",
    )
    error = models.TextField(blank=True, help_text="why provisioning failed: the device and its own message")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        # segments are kept for good: the periodic queries by state (rollbacks that kept their VLAN, who holds a
        # VLAN) and the reconciler's "did the portal ever give this id" go through indexes
        indexes = [
            models.Index(fields=["state"], name="segment_state"),
            models.Index(fields=["vid"], name="segment_vid"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner_ref"],
                condition=models.Q(state__in=["pending", "active", "deleting", "compensating"]),
                name="segment_unique_live_owner",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.owner_ref} (VLAN {self.vid})" if self.vid else self.owner_ref


class SegmentMember(models.Model):
    """A hypervisor that needs the segment's VLAN (a bridge on the host, the VLAN on its host trunk)."""

    # the unique (segment, host) constraint's index serves lookups by segment: no index of its own
    segment = models.ForeignKey(Segment, on_delete=models.CASCADE, related_name="members", db_index=False)
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="segment_memberships")

    class Meta:
        ordering = ["segment", "host__name"]
        constraints = [models.UniqueConstraint(fields=["segment", "host"], name="segmentmember_unique_host")]

    TEXT_RELATED = ("segment", "host")  # what ``__str__`` reads (select_related these for many)

    def __str__(self) -> str:
        return f"{self.segment.owner_ref} on {self.host.name}" if self.segment_id and self.host_id else "member"


class DeviceChange(models.Model):
    """One piece of device work: make a switch or host match the desired state, for a cause (provisioning
    of a segment, teardown, compensation, reconcile). Several pending changes of one device are applied in
    one session (one batch); each row keeps the device's diff, status, attempts, timings and its error."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        RUNNING = "running", "running"
        OK = "ok", "changed"
        NOOP = "noop", "nothing to change"
        FAILED = "failed", "failed"

    FINAL = (Status.OK, Status.NOOP, Status.FAILED)
    OPEN = (Status.PENDING, Status.RUNNING)
    NOT_TOUCHED = "device disabled: not touched"  # the error of a change a disabled device settled as a no-op

    # No single-column index on the foreign keys: the (key, status) indexes below serve every lookup by key
    # (and the ON DELETE SET NULL of a device or segment), and each index costs on every write of a change —
    # three per device per workflow (recorded, claimed, settled).
    kind = models.CharField(max_length=6, choices=DeviceKind.choices)
    switch = models.ForeignKey(
        Switch, null=True, blank=True, on_delete=models.SET_NULL, related_name="changes", db_index=False
    )
    host = models.ForeignKey(
        Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="changes", db_index=False
    )
    device = models.CharField(max_length=63, help_text="device name when the change was made")
    segment = models.ForeignKey(
        Segment,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="changes",
        help_text="empty: reconcile",
        db_index=False,
    )
    cause = models.CharField(max_length=200)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    diff = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    orphaned = models.PositiveSmallIntegerField(
        default=0,
        db_default=0,
        help_text="claims that found it still running: the worker of the session before died in it "
        "(network.convergence.ORPHANED_MAX)",
    )
    batch = models.UUIDField(null=True, blank=True, help_text="the device session that applied it")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, help_text="the device's own message")
    refused = models.BooleanField(
        default=False,
        help_text="failed because the device refused the change (a permanent error: it did not take it), not "
        "because it could not be reached or answered too late (it may have taken it)",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["switch", "status"], name="devicechange_switch_status"),
            models.Index(fields=["host", "status"], name="devicechange_host_status"),
            models.Index(fields=["segment", "status"], name="devicechange_segment_status"),
            # the newest first (admin, API lists, metrics of the last hour) without sorting the whole history
            models.Index(fields=["created_at", "id"], name="devicechange_created"),
            # unfinished work only: a small index however long the history grows (metrics, stuck-work checks)
            models.Index(
                fields=["created_at"], name="devicechange_open", condition=models.Q(status__in=["pending", "running"])
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.device}: {self.cause} [{self.status}]"

    @property
    def duration(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class Drift(models.Model):
    """A difference the reconciler found between a device and the desired state: a VLAN removed by hand
    (missing), one left behind by the portal (stale), or one on an owned port the portal never put there
    (foreign). ``repaired_at`` is set when a later converge or reconcile made it go away."""

    Kind = DriftKind

    device_kind = models.CharField(max_length=6, choices=DeviceKind.choices)
    switch = models.ForeignKey(Switch, null=True, blank=True, on_delete=models.CASCADE, related_name="drifts")
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.CASCADE, related_name="drifts")
    device = models.CharField(max_length=63)
    port = models.CharField(max_length=64, blank=True, help_text="empty for a host")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    vlans = models.TextField("VLANs", help_text="the VLAN ids in question")  # (a trunk: thousands of ids)
    expected = models.TextField(blank=True)
    actual = models.TextField(blank=True)
    found_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(auto_now=True)
    repaired_at = models.DateTimeField(null=True, blank=True)
    repair = models.ForeignKey(DeviceChange, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-found_at", "-id"]
        indexes = [models.Index(fields=["device_kind", "device", "repaired_at"], name="drift_open")]

    def __str__(self) -> str:
        where = f"{self.device}:{self.port}" if self.port else self.device
        return f"{where} {self.kind} VLAN {self.vlans}"

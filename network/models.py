"""The network inventory: sites, the wide-area core, site switches and their ports, hypervisor hosts and
the VLAN pools clusters draw from (paper §3: core L2 network, site network, host configuration)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from network import vlanranges
from network.choices import VLAN_MAX, VLAN_MIN, CoreKind, HostDriver, Platform, PortRole
from portal.secrets import EncryptedTextField

vlan_id_validators = [MinValueValidator(VLAN_MIN), MaxValueValidator(VLAN_MAX)]
name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]*$", "Use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit."
)
interface_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9/._:-]*$", "An interface name: letters, digits and / . _ : -"
)


class Site(models.Model):
    """A location with hypervisors and a site network (Brno, Pilsen, Prague); joined to other sites only
    through core transports."""

    name = models.SlugField(max_length=50, unique=True, validators=[name_validator])
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class CoreTransport(models.Model):
    """A wide-area layer-2 service between site switches: a QinQ S-VLAN, a VPLS instance, an Xponder
    circuit or a VXLAN/EVPN fabric. It carries a fixed range of customer VLAN ids between the sites it joins.
    Operators configure it once on the backbone; the portal only reads it (paper §2.3: nothing on the
    backbone changes at run time)."""

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
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        if self.vid_min and self.vid_max and self.vid_min > self.vid_max:
            errors["vid_max"] = f"core {self.name}: highest VLAN id {self.vid_max} is below lowest {self.vid_min}"
        if self.kind == CoreKind.QINQ and self.service_tag is not None and not VLAN_MIN <= self.service_tag <= VLAN_MAX:
            errors["service_tag"] = f"core {self.name}: a QinQ S-VLAN must be in {VLAN_MIN}-{VLAN_MAX}"
        if self.kind == CoreKind.QINQ and self.service_tag is None:
            errors["service_tag"] = f"core {self.name}: a QinQ core needs its S-VLAN (service tag)"
        if self.pk and self.vid_min and self.vid_max and "vid_max" not in errors:
            for pool in self.pools.all():
                outside = [v for v in vlanranges.parse(pool.ranges) if not self.vid_min <= v <= self.vid_max]
                if outside:
                    errors["vid_min"] = (
                        f"core {self.name}: pool {pool.name} uses ids {vlanranges.format_ranges(outside)} "
                        f"outside {self.vid_min}-{self.vid_max}"
                    )
        if errors:
            raise ValidationError(errors)

    @property
    def vlan_ids(self) -> range:
        return range(self.vid_min, self.vid_max + 1)


class Switch(models.Model):
    """A site switch with 802.1Q trunks to hypervisors, an uplink into the core and possibly a trunk to an
    access gateway. Configured through NAPALM with the platform's driver; the portal changes only the ports
    listed here (the ports it owns)."""

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

    class Meta:
        ordering = ["site__name", "name"]
        verbose_name_plural = "switches"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if not isinstance(self.driver_args, dict):
            raise ValidationError({"driver_args": f"switch {self.name}: driver args must be a mapping"})
        for key in ("password", "secret"):
            if key in self.driver_args:
                raise ValidationError(
                    {"driver_args": f"switch {self.name}: put the {key} in the password field (stored encrypted)"}
                )


class SwitchPort(models.Model):
    """A switch port the portal owns: a trunk toward a hypervisor, an uplink into a core transport, or a
    trunk toward an access gateway. Only these ports ever have their VLAN membership changed."""

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


class Host(models.Model):
    """A hypervisor (KVM/libvirt today, Xen in the paper) at a site, hanging on a host trunk of a site
    switch through its trunk NIC. It carries one bridge per cluster VLAN it hosts; its agent (a Celery
    worker on the host) consumes ``agent_queue``."""

    name = models.SlugField(max_length=63, unique=True, validators=[name_validator])
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="hosts")
    switch_port = models.OneToOneField(
        SwitchPort, on_delete=models.PROTECT, related_name="host", help_text="the host trunk it hangs on"
    )
    trunk_interface = models.CharField(max_length=15, default="eth0", validators=[interface_validator])
    driver = models.CharField(max_length=20, choices=HostDriver.choices, default=HostDriver.OVS)
    driver_args = models.JSONField(default=dict, blank=True)
    agent_queue = models.CharField(
        max_length=100, blank=True, help_text="Celery queue of the host agent; empty: the central worker"
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["site__name", "name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
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


class VlanPool(models.Model):
    """VLAN ids over one core transport that clusters may use, minus reserved ids. A released id waits
    ``quarantine_seconds`` before reuse so late frames and stale MAC tables of one cluster never reach the
    next."""

    name = models.SlugField(max_length=50, unique=True, validators=[name_validator])
    core = models.ForeignKey(CoreTransport, on_delete=models.PROTECT, related_name="pools")
    ranges = models.CharField(max_length=500, help_text="e.g. 100-199,300-349")
    reserved = models.CharField(max_length=500, blank=True, help_text="ids never handed out, e.g. 150,160-162")
    quarantine_seconds = models.PositiveIntegerField(default=300)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]

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
        if self.core_id and ids:
            core = self.core
            outside = {v for v in ids if not core.vid_min <= v <= core.vid_max}
            if outside:
                errors.setdefault("ranges", []).append(
                    f"pool {self.name}: ids {vlanranges.format_ranges(outside)} are outside what core "
                    f"{core.name} carries ({core.vid_min}-{core.vid_max})"
                )
            for other in VlanPool.objects.filter(core_id=self.core_id).exclude(pk=self.pk):
                overlap = ids & set(vlanranges.parse(other.ranges))
                if overlap:
                    errors.setdefault("ranges", []).append(
                        f"pool {self.name}: ids {vlanranges.format_ranges(overlap)} overlap pool {other.name} "
                        f"on core {core.name}"
                    )
        if errors:
            raise ValidationError(errors)

    @property
    def vlan_ids(self) -> list[int]:
        """The ids clusters may get: ranges minus reserved."""
        reserved = set(vlanranges.parse(self.reserved))
        return [v for v in vlanranges.parse(self.ranges) if v not in reserved]

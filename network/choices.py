"""Enumerations of the network inventory."""

from django.db import models

VLAN_MIN = 2  # 1 is the default VLAN on most switches; never handed to a cluster
VLAN_MAX = 4094  # 0 and 4095 are reserved by 802.1Q


class CoreKind(models.TextChoices):
    QINQ = "qinq", "IEEE 802.1ad (QinQ)"
    DOT1Q = "dot1q", "802.1Q trunk (plain)"
    VPLS = "vpls", "VPLS (MPLS)"
    XPONDER = "xponder", "Xponder / DWDM circuit"
    VXLAN = "vxlan", "VXLAN / EVPN"


class Platform(models.TextChoices):
    IOS = "ios", "Cisco IOS"
    EOS = "eos", "Arista EOS"
    JUNOS = "junos", "Juniper Junos"
    NXOS = "nxos", "Cisco NX-OS"
    NXOS_SSH = "nxos_ssh", "Cisco NX-OS (SSH, without NX-API)"
    OVS = "ovs", "Open vSwitch (OVSDB)"
    LINUXBRIDGE = "linuxbridge", "Linux bridge (vlan_filtering)"


class HostDriver(models.TextChoices):
    OVS = "ovs", "Open vSwitch bridge"
    LINUXBRIDGE = "linuxbridge", "Linux bridge per VLAN (br-v<vid>)"


class PortRole(models.TextChoices):
    HOST_TRUNK = "host_trunk", "trunk to a hypervisor host"
    CORE_UPLINK = "core_uplink", "uplink into a core transport"
    GATEWAY_TRUNK = "gateway_trunk", "trunk to an access gateway"
    ROUTER_TRUNK = "router_trunk", "trunk to the provider's router (public clusters)"


class DeviceKind(models.TextChoices):
    SWITCH = "switch", "switch"
    HOST = "host", "host"


class DriftKind(models.TextChoices):
    MISSING = "missing", "missing (removed by hand?)"
    STALE = "stale", "stale (left behind)"
    FOREIGN = "foreign", "foreign (not the portal's)"

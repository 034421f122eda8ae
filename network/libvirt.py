"""What a VM manager needs to plug a VM into a cluster's network, in libvirt's domain XML: the ``<interface>``
element for one VM NIC on one host (bridge, 802.1Q tag and ``virtualport`` from the host driver's
``Attachment``). Nothing here talks to a device."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from network.drivers import Attachment


def interface_xml(attachment: Attachment, mac: str, *, model: str = "virtio") -> str | None:
    """``<interface type='bridge'>`` for a NIC with ``mac``; None when only the host knows the bridge."""
    if not attachment.bridge:
        return None
    iface = ET.Element("interface", type="bridge")
    if mac:
        ET.SubElement(iface, "mac", address=mac.lower())
    ET.SubElement(iface, "source", bridge=attachment.bridge)
    if attachment.vlan is not None:
        ET.SubElement(ET.SubElement(iface, "vlan"), "tag", id=str(attachment.vlan))
    if attachment.virtualport:
        ET.SubElement(iface, "virtualport", type=attachment.virtualport)
    ET.SubElement(iface, "model", type=model)
    if attachment.mtu:
        ET.SubElement(iface, "mtu", size=str(attachment.mtu))
    return ET.tostring(iface, encoding="unicode")

"""Inventory models whose every change goes to the audit log."""

from network import models
from portal import audit

for model in (models.Site, models.CoreTransport, models.SwitchPort, models.Host, models.VlanPool):
    audit.register(model)
audit.register(models.Switch, secret_fields=["password"])

# The VLAN life cycle: who got which VLAN, and which hosts a segment covers. DeviceChange and Drift are
# themselves the record of device work and are not audited again.
for model in (models.VlanAllocation, models.Segment, models.SegmentMember):
    audit.register(model)

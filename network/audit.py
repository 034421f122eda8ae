"""Inventory models whose every change goes to the audit log."""

from network import models
from portal import audit

for model in (models.Site, models.CoreTransport, models.SwitchPort, models.Host, models.VlanPool):
    audit.register(model)
audit.register(models.Switch, secret_fields=["password"])

"""factory_boy factories for the network inventory, shared by every app's tests.

Defaults build a consistent little fabric: a port made by ``SwitchPortFactory`` is a host trunk, a host
gets its own host trunk on a switch at its own site, a pool sits inside its core's range, and a QinQ core
has its service tag.
"""

from __future__ import annotations

import factory
from factory.django import DjangoModelFactory

from network.choices import CoreKind, HostDriver, Platform, PortRole
from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool


class SiteFactory(DjangoModelFactory):
    class Meta:
        model = Site
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"site{n}")


class CoreTransportFactory(DjangoModelFactory):
    """A QinQ core (S-VLAN 1000, carrying 100-3999). ``sites=[a, b]`` joins sites."""

    class Meta:
        model = CoreTransport
        django_get_or_create = ("name",)
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"core{n}")
    kind = CoreKind.QINQ
    vid_min = 100
    vid_max = 3999
    service_tag = 1000

    @factory.post_generation
    def sites(self, create, extracted, **kwargs):
        if create and extracted:
            self.sites.set(extracted)


class SwitchFactory(DjangoModelFactory):
    class Meta:
        model = Switch
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"sw{n}")
    site = factory.SubFactory(SiteFactory)
    platform = Platform.OVS
    address = factory.Sequence(lambda n: f"198.18.0.{n % 250 + 1}")
    username = "admin"
    password = "switch-secret"  # noqa: S105 (test data)
    driver_args = factory.LazyFunction(dict)


class SwitchPortFactory(DjangoModelFactory):
    """A host trunk by default; ``role=PortRole.CORE_UPLINK, core=...`` for an uplink."""

    class Meta:
        model = SwitchPort

    switch = factory.SubFactory(SwitchFactory)
    name = factory.Sequence(lambda n: f"port{n}")
    role = PortRole.HOST_TRUNK
    core = None


class HostFactory(DjangoModelFactory):
    """A hypervisor on its own host trunk of a switch at its own site."""

    class Meta:
        model = Host

    name = factory.Sequence(lambda n: f"host{n}")
    site = factory.SubFactory(SiteFactory)
    switch_port = factory.SubFactory(
        SwitchPortFactory,
        switch=factory.SubFactory(SwitchFactory, site=factory.SelfAttribute("...site")),
    )
    trunk_interface = "eth0"
    driver = HostDriver.OVS
    agent_queue = factory.LazyAttribute(lambda o: f"host.{o.name}")


class VlanPoolFactory(DjangoModelFactory):
    class Meta:
        model = VlanPool

    name = factory.Sequence(lambda n: f"pool{n}")
    core = factory.SubFactory(CoreTransportFactory)
    ranges = "100-199"
    reserved = ""
    quarantine_seconds = 60

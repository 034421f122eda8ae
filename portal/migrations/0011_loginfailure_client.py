import ipaddress

from django.db import migrations, models


def fill_clients(apps, schema_editor):
    """The failures already counted get their client (``portal.logins.client_text`` as of this migration: the IPv4
    address, an IPv4-mapped address's IPv4 address, or the IPv6 address's /64)."""
    LoginFailure = apps.get_model("portal", "LoginFailure")
    for failure in LoginFailure.objects.exclude(address=None).only("pk", "address"):
        ip = ipaddress.ip_address(failure.address)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        key = ipaddress.ip_network((ip, 64), strict=False) if ip.version == 6 else ip
        LoginFailure.objects.filter(pk=failure.pk).update(client=str(key))


class Migration(migrations.Migration):
    dependencies = [
        ("portal", "0010_apitoken_cluster"),
    ]

    operations = [
        migrations.AddField(
            model_name="loginfailure",
            name="client",
            field=models.CharField(
                blank=True,
                help_text="what counts as one client (portal.logins.client_key): the IPv4 address, or the IPv6 "
                "address's /64",
                max_length=64,
            ),
        ),
        migrations.AddIndex(
            model_name="loginfailure",
            index=models.Index(fields=["client", "at"], name="portal_logi_client_568d12_idx"),
        ),
        migrations.RunPython(fill_clients, migrations.RunPython.noop),
    ]

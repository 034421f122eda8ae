"""The gateways' pull tokens belong to the gateways' own account (``access.services.GATEWAY_ACCOUNT``), not to
the admins who issued them: deactivating an admin stopped every gateway whose token they owned."""

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.db import migrations

GATEWAY_ACCOUNT = "virtcloud-gateways"  # access.services.GATEWAY_ACCOUNT when this was written


def forward(apps, schema_editor):
    Gateway = apps.get_model("access", "Gateway")
    ApiToken = apps.get_model("portal", "ApiToken")
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    tokens = list(Gateway.objects.exclude(token=None).values_list("token_id", flat=True))
    if not tokens:
        return
    account, _made = User.objects.get_or_create(
        username=GATEWAY_ACCOUNT, defaults={"is_active": True, "password": make_password(None)}
    )
    ApiToken.objects.filter(pk__in=tokens).update(user=account)


class Migration(migrations.Migration):
    dependencies = [
        ("access", "0004_gateway_ssh_port_base"),
        ("portal", "0004_directoryaccount"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(forward, migrations.RunPython.noop)]

from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal"

    def ready(self) -> None:
        from portal import auth, checks  # noqa: F401 - checks registers the deploy checks

        auth.connect_signals()

from django.apps import AppConfig


class NetworkConfig(AppConfig):
    name = "network"

    def ready(self) -> None:
        from network import audit  # noqa: F401  (registers the inventory with the audit log)

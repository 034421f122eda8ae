from django.apps import AppConfig


class ClustersConfig(AppConfig):
    name = "clusters"

    def ready(self) -> None:
        from clusters.models import Image, Node, PublicPrefix, VirtualCluster, Webhook
        from portal import audit

        for model in (Image, PublicPrefix, VirtualCluster, Node):
            audit.register(model)
        # delivery moves the cursor with update(): only an admin's changes are audited
        audit.register(Webhook, secret_fields=("secret",))

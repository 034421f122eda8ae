from django.apps import AppConfig


class ClustersConfig(AppConfig):
    name = "clusters"

    def ready(self) -> None:
        from clusters.models import Image, Node, PublicPrefix, VirtualCluster
        from portal import audit

        for model in (Image, PublicPrefix, VirtualCluster, Node):
            audit.register(model)

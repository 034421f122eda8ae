"""The access app: audit registration and the events that revoke credentials."""

from django.apps import AppConfig, apps
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete


class AccessConfig(AppConfig):
    name = "access"
    verbose_name = "Access (VPN, SSH, gateways)"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model

        from access import signals
        from access.models import Authority, Credential, Gateway
        from portal import audit

        audit.register(Authority, secret_fields=("private_key",), exclude=("revocation_list",))
        audit.register(Credential)
        audit.register(Gateway, secret_fields=("tls_crypt_key",), exclude=("server_certificate",))

        user_model = get_user_model()
        m2m_changed.connect(
            signals.user_groups_changed, sender=user_model.groups.through, dispatch_uid="access-user-groups"
        )
        group_model = user_model.groups.field.related_model
        pre_delete.connect(signals.group_deleting, sender=group_model, dispatch_uid="access-group-deleting")
        post_delete.connect(signals.group_deleted, sender=group_model, dispatch_uid="access-group-deleted")
        post_save.connect(signals.user_saved, sender=user_model, dispatch_uid="access-user-saved")
        pre_delete.connect(signals.gateway_deleted, sender=Gateway, dispatch_uid="access-gateway-deleted")
        # The clusters app may not be installed in every deployment of this code (or may land later):
        # connect to it only when it is there, by label, so importing access never imports clusters.
        if apps.is_installed("clusters"):
            try:
                from clusters.signals import cluster_ended, cluster_ready
            except ImportError:  # clusters not finished yet: nothing can end
                return
            cluster_ended.connect(signals.cluster_ended, dispatch_uid="access-cluster-ended")
            post_save.connect(signals.cluster_saved, sender="clusters.VirtualCluster", dispatch_uid="access-cluster")
            cluster_ready.connect(signals.cluster_ready, dispatch_uid="access-cluster-ready")
            post_delete.connect(
                signals.cluster_deleted, sender="clusters.VirtualCluster", dispatch_uid="access-cluster-deleted"
            )

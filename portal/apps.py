from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_in, user_logged_out

        from portal import auth, checks, sessions  # noqa: F401 - checks registers the deploy checks

        auth.connect_signals()
        user_logged_in.connect(sessions.session_started, dispatch_uid="portal.sessions.started")
        user_logged_out.connect(sessions.session_ended, dispatch_uid="portal.sessions.ended")

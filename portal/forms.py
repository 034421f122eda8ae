"""The login form."""

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.utils import timezone

from portal.auth import LDAP_UNAVAILABLE_MESSAGE
from portal.models import LoginFailure


class LoginForm(AuthenticationForm):
    """Says "directory unreachable" when that, not the password, is why a login failed; and refuses an account
    with ``LOGIN_FAILURES_MAX`` failed logins in the last ``LOGIN_FAILURE_WINDOW`` seconds without asking the
    directory (``portal.models.LoginFailure``)."""

    def clean(self):
        name = (self.cleaned_data.get("username") or "").strip().lower()[:150]
        now = timezone.now()
        window = timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)
        recent = LoginFailure.objects.filter(username=name, at__gt=now - window).order_by("at")
        if name and settings.LOGIN_FAILURES_MAX and recent.count() >= settings.LOGIN_FAILURES_MAX:
            oldest = recent.values_list("at", flat=True)[0]
            minutes = max(1, -(-int((oldest + window - now).total_seconds()) // 60))
            raise forms.ValidationError(
                f"Too many failed logins for this account: try again in {minutes} minute(s).", code="throttled"
            )
        try:
            cleaned = super().clean()
        except forms.ValidationError as exc:
            if name and exc.code == "invalid_login":
                LoginFailure.objects.filter(at__lte=now - window).delete()
                LoginFailure.objects.create(username=name, at=now)
            raise
        if name:
            LoginFailure.objects.filter(username=name).delete()
        return cleaned

    def get_invalid_login_error(self):
        if getattr(self.request, "ldap_unavailable", False):
            return forms.ValidationError(LDAP_UNAVAILABLE_MESSAGE, code="ldap_unavailable")
        return super().get_invalid_login_error()

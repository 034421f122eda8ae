"""The login form."""

from django import forms
from django.contrib.auth.forms import AuthenticationForm

from portal import logins
from portal.auth import LDAP_UNAVAILABLE_MESSAGE


class LoginForm(AuthenticationForm):
    """Says "directory unreachable" when that, not the password, is why a login failed; and refuses an account
    with too many recent failed logins from this client's address, or from all addresses together, without
    asking the directory (``portal.logins``)."""

    def clean(self):
        name = logins.account_key(self.cleaned_data.get("username"))
        address = logins.client_address(self.request)
        refused = logins.refused_for(name, address)
        if refused:
            raise forms.ValidationError(refused, code="throttled")
        try:
            cleaned = super().clean()
        except forms.ValidationError as exc:
            if exc.code == "invalid_login":  # (not an LDAP outage, not a disabled account)
                logins.login_failed(name, address)
            raise
        logins.login_succeeded(name, address)
        return cleaned

    def get_invalid_login_error(self):
        if getattr(self.request, "ldap_unavailable", False):
            return forms.ValidationError(LDAP_UNAVAILABLE_MESSAGE, code="ldap_unavailable")
        return super().get_invalid_login_error()

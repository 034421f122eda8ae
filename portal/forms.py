"""The login form."""

from django import forms
from django.contrib.auth.forms import AuthenticationForm

from portal.auth import LDAP_UNAVAILABLE_MESSAGE


class LoginForm(AuthenticationForm):
    """Says "directory unreachable" when that, not the password, is why a login failed."""

    def get_invalid_login_error(self):
        if getattr(self.request, "ldap_unavailable", False):
            return forms.ValidationError(LDAP_UNAVAILABLE_MESSAGE, code="ldap_unavailable")
        return super().get_invalid_login_error()

"""The login form, and the form of a token a user makes for themselves."""

from django import forms
from django.contrib.auth.forms import AuthenticationForm

from portal import logins
from portal.auth import LDAP_UNAVAILABLE_MESSAGE


class LoginForm(AuthenticationForm):
    """Says "directory unreachable" when that, not the password, is why a login failed; and refuses an account
    with too many recent failed logins from this client's address, or from all addresses together, without
    asking the directory, unless this browser signed in to it before (``portal.logins``)."""

    def clean(self):
        name = logins.account_key(self.cleaned_data.get("username"))
        address = logins.client_address(self.request)
        refused = logins.refused_for(name, address, known=logins.known_browser(self.request, name))
        if refused:
            raise forms.ValidationError(refused, code="throttled")
        try:
            cleaned = super().clean()
        except forms.ValidationError as exc:
            # A wrong password counts; so does one the local accounts' backend checked while the directory was
            # unusable (a break-glass account is guessed at just then). Any other name's password was not
            # checked (a directory account's, or one nobody has yet): not a failure.
            if exc.code == "invalid_login" or (exc.code == "ldap_unavailable" and logins.local_account_named(name)):
                logins.login_failed(name, address)
            raise
        if self.get_user() is not None:  # (None: a field is missing, and says so)
            logins.login_succeeded(name, address)
            logins.remember_browser(self.request, name)
            logins.login_audit(self.get_user(), self.request, "password")
        return cleaned

    def get_invalid_login_error(self):
        if getattr(self.request, "ldap_unavailable", False):
            return forms.ValidationError(LDAP_UNAVAILABLE_MESSAGE, code="ldap_unavailable")
        return super().get_invalid_login_error()


class TokenForm(forms.Form):
    """A token for the user's own scripts (``portal.tokens.token_create_own`` decides what is allowed)."""

    name = forms.CharField(max_length=100, help_text="what uses it, e.g. 'laptop: client.py'")
    scopes = forms.MultipleChoiceField(
        choices=[],
        widget=forms.CheckboxSelectMultiple,
        initial=["clusters:read"],
        help_text="read: list your clusters and their access; write: also create, change and tear them down, and "
        "download VPN profiles and SSH certificates",
    )
    days = forms.TypedChoiceField(coerce=int, choices=[], label="Valid for")

    def __init__(self, *args, max_days: int, **kwargs):
        from portal.models import TokenScope
        from portal.tokens import SELF_SERVICE_SCOPES

        super().__init__(*args, **kwargs)
        labels = dict(TokenScope.choices)
        self.fields["scopes"].choices = [
            (scope.value, f"{scope.value} — {labels[scope]}") for scope in SELF_SERVICE_SCOPES
        ]
        lengths = sorted({d for d in (7, 30, 90, 365) if d <= max_days} | {max_days})
        self.fields["days"].choices = [(d, f"{d} day{'s' if d != 1 else ''}") for d in lengths]
        self.fields["days"].initial = 30 if 30 in lengths else lengths[-1]

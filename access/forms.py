"""Forms of the "VPN and SSH access" page (/access/): which clusters a VPN profile covers, an SSH key, a revocation."""

from __future__ import annotations

from django import forms

from access.models import LABEL_MAX
from access.selectors import cluster_label

# A cluster offered when the page was loaded may have stopped being enterable since (being updated, torn
# down, or no longer yours): say so instead of Django's bare "not one of the available choices".
GONE = (
    "Select a valid choice: cluster %(value)s cannot be entered now (its network is not up, or it is not "
    "yours any more). Reload the page."
)


def cluster_choice(cluster) -> tuple[int, str]:
    """A cluster as the forms offer it: its access name (the name with the id: unique, as in the table and
    the downloads) with its owner and group, since group members see clusters of several owners by one name."""
    whose = ", ".join(filter(None, [cluster.owner.get_username(), cluster.group.name if cluster.group_id else ""]))
    return cluster.pk, f"{cluster_label(cluster)} ({whose})"


class PageForm(forms.Form):
    """A form of the page. Django marks a field in error aria-invalid and describes it by its error and help."""

    def focus_first_error(self) -> None:
        """The page shown again opens at the first field in error: focused, a screen reader reads its label and
        error, and the browser scrolls to it."""
        for name in self.errors:
            if name in self.fields:
                self.fields[name].widget.attrs["autofocus"] = True
                return


def label_field() -> forms.CharField:
    return forms.CharField(
        required=False,
        max_length=LABEL_MAX,
        label="Label (optional)",
        help_text="Where it goes, e.g. 'work laptop': the list below names it so, for the day that device is lost.",
        widget=forms.TextInput(attrs={"placeholder": "work laptop", "autocomplete": "off"}),
    )


class VpnProfileForm(PageForm):
    clusters = forms.TypedMultipleChoiceField(
        coerce=int,
        widget=forms.CheckboxSelectMultiple,
        label="Clusters this profile admits to",
        help_text="The profile enters the first cluster ticked; to enter another, change the profile's "
        "setenv UV_VCLUSTER line to that cluster's access name.",
        error_messages={"required": "Choose at least one cluster.", "invalid_choice": GONE},
    )
    publish = forms.BooleanField(
        required=False,
        label="Publish profile (long-lived, for a router that bridges the cluster into your own network)",
    )
    label = label_field()

    def __init__(self, *args, clusters=(), **kwargs):
        kwargs.setdefault("auto_id", "vpn-%s")  # (the page holds both forms: each field's id once)
        super().__init__(*args, **kwargs)
        self.fields["clusters"].choices = choices = [cluster_choice(c) for c in clusters]
        if len(choices) == 1:  # nothing to choose: the only cluster is ticked (an unticked one can still be sent)
            self.fields["clusters"].initial = [choices[0][0]]


class SshCertificateForm(PageForm):
    cluster = forms.TypedChoiceField(coerce=int, error_messages={"invalid_choice": GONE})
    public_key = forms.CharField(
        required=False,
        max_length=16384,
        widget=forms.Textarea(
            attrs={
                "rows": 3,
                "placeholder": "ssh-ed25519 AAAA... (leave empty to generate a key)",
                "spellcheck": "false",
                "autocapitalize": "off",
            }
        ),
        label="Your public key (optional)",
        help_text="With your own key, the ssh_config expects its private half where ssh keeps it by default "
        "(~/.ssh/id_ed25519, ~/.ssh/id_rsa or ~/.ssh/id_ecdsa, by the key's type): change its IdentityFile "
        "line if yours is elsewhere. Empty: a new key is made and put in the download.",
    )

    label = label_field()

    def __init__(self, *args, clusters=(), **kwargs):
        kwargs.setdefault("auto_id", "ssh-%s")  # (the page holds both forms: each field's id once)
        super().__init__(*args, **kwargs)
        self.fields["cluster"].choices = [cluster_choice(c) for c in clusters]

"""Forms of the "my clusters" page: which clusters a VPN profile covers, an SSH key, a revocation."""

from __future__ import annotations

from django import forms

from access.selectors import cluster_label

# A cluster offered when the page was loaded may have stopped being enterable since (being updated, torn
# down, or no longer yours): say so instead of Django's bare "not one of the available choices".
GONE = (
    "Select a valid choice: cluster %(value)s cannot be entered now (its network is not up, or it is not "
    "yours any more). Reload the page."
)


def cluster_choice(cluster) -> tuple[int, str]:
    """A cluster as the forms offer it: its name at the gateway (the name with the id: unique, as in the table and
    the downloads) with its owner and group, since group members see clusters of several owners by one name."""
    whose = ", ".join(filter(None, [cluster.owner.get_username(), cluster.group.name if cluster.group_id else ""]))
    return cluster.pk, f"{cluster_label(cluster)} ({whose})"


class VpnProfileForm(forms.Form):
    clusters = forms.TypedMultipleChoiceField(
        coerce=int,
        widget=forms.CheckboxSelectMultiple,
        error_messages={"required": "Choose at least one cluster.", "invalid_choice": GONE},
    )
    publish = forms.BooleanField(
        required=False,
        label="Publish profile (long-lived, for a router that bridges the cluster into your own network)",
    )

    def __init__(self, *args, clusters=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["clusters"].choices = [cluster_choice(c) for c in clusters]


class SshCertificateForm(forms.Form):
    cluster = forms.TypedChoiceField(coerce=int, error_messages={"invalid_choice": GONE})
    public_key = forms.CharField(
        required=False,
        max_length=16384,
        widget=forms.Textarea(
            attrs={
                "rows": 3,
                "placeholder": "ssh-ed25519 AAAA... (leave empty to generate a key)",
                "aria-describedby": "ssh-key-help",
            }
        ),
        label="Your public key (optional)",
        help_text="With your own key, the ssh_config expects its private half where ssh keeps it by default "
        "(~/.ssh/id_ed25519, ~/.ssh/id_rsa or ~/.ssh/id_ecdsa, by the key's type): change its IdentityFile "
        "line if yours is elsewhere. Empty: a new key is made and put in the download.",
    )

    def __init__(self, *args, clusters=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["cluster"].choices = [cluster_choice(c) for c in clusters]

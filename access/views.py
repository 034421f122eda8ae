"""The "VPN and SSH access" page: VPN profile and SSH downloads, and the user's credentials with "I lost my
laptop". Thin: a form, one service call, a file response, the page again with the form's errors, or a message."""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import pluralize
from django.utils.http import content_disposition_header
from django.utils.text import capfirst
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods, require_safe

from access import selectors, services
from access.errors import AccessError
from access.forms import SshCertificateForm, VpnProfileForm
from access.models import USER_KINDS
from access.ssh import looks_private
from portal import throttle
from portal.sessions import stay_signed_in
from portal.tokens import tokens_live

PAGE = "access:my-clusters"
#: credentials that ended (revoked or expired) the page lists, newest first; valid ones are always all listed
ENDED_CREDENTIALS_SHOWN = 20


def _form_action(view):
    """The action of one of the page's forms: POST only, but a GET (the address opened or bookmarked, a
    download's address reloaded) goes back to the page instead of Django's blank 405."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.method in ("GET", "HEAD"):
            return redirect(PAGE)
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        return view(request, *args, **kwargs)

    return wrapper


def _within_rate(form_class):
    """A download issues a credential (a fresh key, a signature): counted with the API's (``credentials``). Past
    the rate, the page again (429) with the form as it was sent: what was typed is kept for the retry."""

    def refused_page(request):
        form = form_class(request.POST, clusters=selectors.clusters_user_may_enter(request.user))
        return _page_with(request, form, status=429)

    return throttle.limited("credentials", "downloads", refused_page)


def _attachment(content: str | bytes, *, filename: str, content_type: str) -> HttpResponse:
    response = HttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = content_disposition_header(True, filename)
    response["Cache-Control"] = "no-store"  # it carries a private key
    return response


def _refused(request, form, exc: AccessError):
    """A refusal the user can fix in the form (a pasted key that is not one) goes under its field, the page shown
    again with what they entered; any other (no gateway, an administrator's setting) is a message above the page."""
    if exc.field in form.fields:
        form.add_error(exc.field, capfirst(exc.message))  # (the API's messages start lower-case)
        return _invalid(request, form)
    messages.error(request, exc.message)
    return redirect(PAGE)


def _without_private_key(form) -> None:
    """A private key pasted where the public one goes is never put back in the page."""
    if looks_private(str(form.data.get("public_key", ""))):
        form.data = form.data.copy()
        form.data["public_key"] = ""


def _page_with(request, form, *, status: int) -> HttpResponse:
    """The page again with ``form`` as it was sent (nothing typed is lost) — but a private key pasted where the
    public one goes, which is never sent back (the page says never to share it)."""
    _without_private_key(form)
    forms = {"vpn_form": form} if isinstance(form, VpnProfileForm) else {"ssh_form": form}
    return _page(request, **forms, status=status)


def _invalid(request, form) -> HttpResponse:
    """The page again, with ``form``'s errors under their fields (``_page_with``), opening at the first one."""
    form.focus_first_error()
    return _page_with(request, form, status=400)


@require_safe
@login_required
@never_cache
def my_clusters(request):
    return _page(request)


def _page(request, *, vpn_form=None, ssh_form=None, status: int = 200) -> HttpResponse:
    user = request.user
    enterable = list(selectors.clusters_user_may_enter(user))
    access_ready = selectors.clusters_access_ready(enterable)
    clusters = [
        {
            "cluster": c,
            "label": selectors.cluster_label(c),
            "enterable": c.enterable,
            "access_ready": access_ready.get(c.pk),  # None (nothing shown): no ready gateway carries it, or unknown
        }
        for c in selectors.clusters_user_may_see(user)
    ]
    credentials = selectors.credentials_of(user, ended=ENDED_CREDENTIALS_SHOWN)
    failed = selectors.gateways_failed_closed()
    stale = [{"name": g.name, "minutes": int(age.total_seconds() // 60)} for g, age in failed]
    withheld = selectors.bastion_withheld_nodes(enterable)
    unrelayed = [{"label": selectors.cluster_label(c), "nodes": withheld[c.pk]} for c in enterable if c.pk in withheld]
    vpn_gateway = bool(selectors.gateways_for(kind="vpn")) if enterable else False
    ssh_gateway = bool(selectors.gateways_for(kind="ssh")) if enterable else False
    for form, shown in ((vpn_form, vpn_gateway), (ssh_form, ssh_gateway)):
        if form is not None and not shown:  # (no cluster to enter any more, or no gateway): said above the page
            for error in form.errors.values():
                messages.error(request, " ".join(error))
    return render(
        request,
        "access/my_clusters.html",
        {
            "clusters": clusters,
            "gateways_updating": any(row["access_ready"] is False for row in clusters),
            "enterable": enterable,
            "vpn_form": vpn_form if vpn_form is not None else VpnProfileForm(clusters=enterable),
            "ssh_form": ssh_form if ssh_form is not None else SshCertificateForm(clusters=enterable),
            "has_errors": status == 400,
            "credentials": credentials,
            "ended_shown": ENDED_CREDENTIALS_SHOWN,
            "vpn_gateway": vpn_gateway,
            "ssh_gateway": ssh_gateway,
            "stale_gateways": stale if enterable else [],
            "unrelayed": unrelayed,
            "example_host": f"node1.{selectors.cluster_label(enterable[0])}" if enterable else "node1.<cluster>",
        },
        status=status,
    )


@_form_action
@login_required
@never_cache  # (the answer is a profile with its private key, or the page again with what was typed)
@_within_rate(VpnProfileForm)
def vpn_profile_download(request):
    form = VpnProfileForm(request.POST, clusters=selectors.clusters_user_may_enter(request.user))
    if not form.is_valid():
        return _invalid(request, form)
    try:
        profile = services.vpn_profile_issue(
            user=request.user,
            clusters=form.cleaned_data["clusters"],
            publish=form.cleaned_data["publish"],
            label=form.cleaned_data["label"],
        )
    except AccessError as exc:
        return _refused(request, form, exc)
    return _attachment(profile.text, filename=profile.filename, content_type="application/x-openvpn-profile")


@_form_action
@sensitive_post_parameters("public_key")  # (error reports: a private key pasted by mistake)
@login_required
@never_cache
@_within_rate(SshCertificateForm)
def ssh_download(request):
    form = SshCertificateForm(request.POST, clusters=selectors.clusters_user_may_enter(request.user))
    if not form.is_valid():
        return _invalid(request, form)
    try:
        issued = services.ssh_certificate_issue(
            user=request.user,
            cluster=form.cleaned_data["cluster"],
            public_key=form.cleaned_data["public_key"] or None,
            label=form.cleaned_data["label"],
        )
    except AccessError as exc:
        return _refused(request, form, exc)
    return _attachment(issued.zip_bytes(), filename=issued.zip_name, content_type="application/zip")


def _named(credential) -> str:
    """A credential as a message names it to its holder (the page revokes only one's own): "your OpenVPN
    profile 37", by the number the page's table shows."""
    named = f"your {credential.get_kind_display()} {credential.serial}"
    return f"{named} ({credential.label})" if credential.label else named


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
@never_cache
def credential_revoke(request, pk: int):
    """GET: what revoking this credential does, and a button that does it. POST: revoke it."""
    # a node's host certificate is not the holder's to "lose with a laptop" (it ends with its cluster)
    mine = selectors.credentials_visible(request.user).filter(user=request.user, kind__in=USER_KINDS)
    credential = get_object_or_404(mine, pk=pk)
    if request.method != "POST":
        return render(
            request,
            "access/credential_revoke.html",
            {
                "credential": credential,
                "sso": bool(settings.SSO_HEADER),
                # a token on the lost device issues new profiles as well as a browser session does
                "tokens": tokens_live(request.user).order_by("-last_used_at", "-created_at"),
            },
        )
    chosen = [int(v) for v in request.POST.getlist("tokens") if v.isascii() and v.isdigit() and len(v) < 19]
    done = services.credential_revoke_lost_device(
        credential=credential, user=request.user, token_ids=chosen, keep_session=request.session.session_key
    )
    named = _named(credential)
    if done.tokens:
        names = ", ".join(f"{t.name} ({t.prefix}…)" for t in done.tokens)
        messages.success(request, f"Revoked API token{pluralize(len(done.tokens))} {names}: refused from now on.")
    if not done.revoked:
        messages.info(request, f"{capfirst(named)} was already revoked.")
        return redirect(PAGE)
    messages.success(request, f"Revoked {named}: the gateways refuse it from their next pull (within minutes).")
    if done.account is not None:
        stay_signed_in(request, done.account)
    messages.info(request, "Every other browser session of yours is signed out.")
    return redirect(PAGE)

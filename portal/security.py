"""Response headers that limit what a page may do in the browser, beyond Django's own (HSTS, X-Frame-Options,
nosniff, Referrer-Policy): a Content-Security-Policy and a Permissions-Policy on every response.

The portal's pages load scripts and styles from the portal only (no inline script: data reaches scripts
through ``json_script`` and ``data-`` attributes), so a policy that allows nothing else costs nothing and
keeps an escaping slip from running anyone's script on a page that hands out VPN keys. Inline styles stay
allowed (the admin's change form has one). No ``form-action``: browsers check it against every redirect after a
form's POST, and logging out by POST leads through the single sign-on's logout (``SSO_LOGOUT_URL``), which may
hand on to the identity provider's — a hop the portal cannot list, and one blocked left the user signed in there."""

from __future__ import annotations


def content_security_policy() -> str:
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )


PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"


def security_headers_middleware(get_response):
    """Content-Security-Policy and Permissions-Policy on every response that has none of its own."""
    policy = content_security_policy()

    def middleware(request):
        response = get_response(request)
        response.headers.setdefault("Content-Security-Policy", policy)
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        return response

    return middleware

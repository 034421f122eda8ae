"""Errors of the access service a user can cause, each with the HTTP status the API answers with
(``portal.api.exception_handler`` renders ``as_dict()``)."""

from __future__ import annotations

from portal.errors import DomainError


class AccessError(DomainError):
    """A refused access request."""


class NotAllowed(AccessError):
    """The user may not enter this cluster (not the owner, not in its group), or it does not exist."""

    status = 403
    code = "forbidden"


class NotFound(AccessError):
    """No such cluster or node among those the caller may see (another's cluster looks the same)."""

    status = 404
    code = "not_found"


class ClusterNotReady(AccessError):
    """The cluster is the user's but its network is not up (provisioning, ending) or it is public."""

    status = 409
    code = "cluster_not_ready"


class BadPublicKey(AccessError):
    """The pasted SSH public key cannot be read or is of a refused type."""

    code = "bad_public_key"

    def __init__(self, message: str):
        super().__init__(message, field="public_key")


class BadLabel(AccessError):
    """A credential's label the page could not show as it was given (a control character)."""

    code = "bad_label"

    def __init__(self, message: str):
        super().__init__(message, field="label")


class NoGateway(AccessError):
    """No enabled access gateway serves this kind of access (temporary: an admin has to add one)."""

    status = 503
    code = "no_gateway"


class NoCommonGateway(AccessError):
    """Each of the clusters asked for together has a gateway, but no gateway reaches all of them: the same
    request never succeeds (ask for a profile per cluster)."""

    status = 409
    code = "no_common_gateway"


class AuthorityExpired(AccessError):
    """A certificate that vouches for every credential (the VPN CA, the Attribute Authority) has expired."""

    status = 503
    code = "authority_expired"


class NameTooLong(AccessError):
    """The user name does not fit in a certificate's common name (X.509: at most 64 characters)."""

    status = 422
    code = "user_name_too_long"


class GatewayMisconfigured(AccessError):
    """A gateway's settings (or a value of the user's) cannot go into a download: an administrator must fix them."""

    status = 503
    code = "gateway_misconfigured"


class CannotIssue(AccessError):
    """The certificate cannot be made for this user or these clusters (a name it cannot hold)."""

    status = 422
    code = "cannot_issue"

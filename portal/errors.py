"""The base of every error a user can cause: a message, the HTTP status the API answers with, a machine code
and optionally the input field at fault. ``portal.api.exception_handler`` renders ``as_dict()``."""

from __future__ import annotations


class DomainError(Exception):
    """A refused request (permanent: retrying the same request fails the same way)."""

    status = 400
    code = "invalid"
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict:
        if self.field:
            return {self.field: [self.message], "code": self.code}
        return {"detail": self.message, "code": self.code}

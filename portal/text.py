"""What text PostgreSQL stores and compares (no Django, no DRF: models, parsers and middleware ask it alike)."""

from __future__ import annotations


def encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 encoding: a lone surrogate (a ``\\ud800`` escape in JSON) has none — the
    database cannot store or compare it, and a response quoting it cannot be rendered."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def storable(text: str) -> bool:
    """Whether PostgreSQL can store and compare ``text``: no NUL character (its text types refuse one) and
    ``encodable``."""
    return "\x00" not in text and encodable(text)

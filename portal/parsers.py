"""The API's request parsers (a module of its own: DRF's views load ``DEFAULT_PARSER_CLASSES`` when they are
imported, which ``portal.api`` itself does)."""

from __future__ import annotations

from rest_framework import parsers
from rest_framework.exceptions import ParseError

from portal.text import encodable

#: deeper than this a body is refused (the API's own bodies are a few levels deep): code that walks a body
#: recursively (an Idempotency-Key's fingerprint) never meets one that exhausts Python's stack
MAX_DEPTH = 32


class JSONParser(parsers.JSONParser):
    """DRF's, except that these are a 400 like any other malformed JSON, never a 500: a body nested too deep
    (``[[[[…``: for the decoder, a ``RecursionError``; a few hundred levels: for the code that walks it), and a
    string or key holding a lone UTF-16 surrogate (``"\\ud800"``, which JSON allows and UTF-8 cannot encode: the
    400 that quoted it back failed to render)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
        _check(data)
        return data


def _check(data) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise ParseError(f"JSON parse error - nested too deeply (more than {MAX_DEPTH} levels)")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if key is not None:
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value)


def _check_text(text: str) -> None:
    if not encodable(text):
        raise ParseError("JSON parse error - a string holds a lone UTF-16 surrogate (not a character)")

"""The API's request parsers (a module of its own: DRF's views load ``DEFAULT_PARSER_CLASSES`` when they are
imported, which ``portal.api`` itself does)."""

from __future__ import annotations

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's, except that a body nested too deep for the decoder (``[[[[…``, 100 kB) is a 400 like any other
    malformed JSON, not a ``RecursionError`` (a 500 on every endpoint)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None

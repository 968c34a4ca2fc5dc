"""JSON text that always encodes as UTF-8.

JSON's ``\\uXXXX`` escapes can carry a lone surrogate (``"\\udc00"``) into a parsed
value; Python keeps it in the ``str``, and writing it raw would fail to encode as UTF-8
(a 500 for a response body, a crash for a log or an output line). :func:`json_text`
writes non-ASCII text as itself and a lone surrogate as its ``\\u`` escape: the text is
valid UTF-8, and reading it back gives the same value (RFC 8259, section 7).
"""

from __future__ import annotations

import json
from typing import Any


def json_text(
    obj: Any, *, sort_keys: bool = False, separators: tuple[str, str] | None = None, indent: int | None = None
) -> str:
    """``json.dumps(obj, ensure_ascii=False, allow_nan=False, ...)`` with every lone
    surrogate escaped (``\\udc00``), so that the text encodes as UTF-8.

    Raises:
        ValueError: NaN or an infinity in ``obj`` (they are not JSON).
        TypeError: a value JSON cannot represent.
    """
    text = json.dumps(
        obj, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys, separators=separators, indent=indent
    )
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Surrogates occur only inside strings, where "\\udXXX" is their JSON escape.
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_bytes(obj: Any, **options: Any) -> bytes:
    """:func:`json_text` as UTF-8 bytes."""
    return json_text(obj, **options).encode("utf-8")

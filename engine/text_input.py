"""Text as it enters lamina (a CLI argument, stdin, a chat message, an API prompt).

Bytes that are not UTF-8 reach Python as lone surrogates (argv and, in the C locale, stdin
use surrogateescape; JSON allows "\\ud800"), which no tokenizer can encode: they are refused
where they enter, with a message that names the place.
"""

from __future__ import annotations

import os
from typing import Any

from engine.errors import InvalidInputError


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode; the message names the bad byte when the text
    came from bytes."""
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError as exc:
        problem = f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"{exc.reason} at byte {exc.start}"
    except UnicodeEncodeError:
        pass  # a surrogate that did not come from undecodable bytes
    raise InvalidInputError(f"{what} is not valid UTF-8 text ({problem})")


def invalid_text(value: Any, where: str = "") -> tuple[str, int] | None:
    """In a parsed JSON value (a request body, a batch line), the path ("messages.0.content")
    of the first string or key that is not valid Unicode, and its first lone surrogate's
    code point; None when all are valid."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return where, ord(value[exc.start])
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        path = f"{where}.{key}" if where else str(key)
        bad = invalid_text(key, path) if isinstance(key, str) else None
        if bad is None:
            bad = invalid_text(item, path)
        if bad is not None:
            return bad
    return None

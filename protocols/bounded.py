"""Untrusted text read with bounds: size, encoding, nesting depth, finite numbers. Sans-I/O.

Every input devicectl reads from outside — an MQTT payload, a config, policy or scenario file, a
request body — goes through one of these before anything walks it, so that no input can make a
reader recurse, allocate or compute without bound:

- :func:`loads_json` refuses a document over ``max_bytes``, not UTF-8, nested deeper than
  ``max_depth`` (checked by a linear scan *before* parsing), ``NaN``/``Infinity``, a number that
  does not fit a finite float, and an integer of more than :data:`MAX_INT_DIGITS` digits;
- :func:`loads_toml` refuses the same for TOML (depth scanned before :mod:`tomllib` recurses);
- :func:`clip` makes any text one short printable line, for an error message that quotes input.

Each raises :class:`BoundedInputError` whose ``reason`` is one short line.
"""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any

from protocols.errors import DevicectlError

__all__ = [
    "MAX_INT_DIGITS",
    "BoundedInputError",
    "clip",
    "decode_utf8",
    "json_depth",
    "loads_json",
    "loads_toml",
    "printable",
    "toml_depth",
]

MAX_INT_DIGITS = 18  # below 2**63: sums of a few million such numbers stay exact and finite
_CLIP = 160


class BoundedInputError(DevicectlError, ValueError):
    """Input refused before or while parsing; ``reason`` is one short line."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def clip(value: object, limit: int = _CLIP) -> str:
    """``repr``-like text of ``value`` on one line of at most ``limit`` characters.

    Control characters, and every non-ASCII character, are escaped (``\\x1b``, ``\\u200b``): the
    text can go to a terminal or a log line and be read as what was sent.
    """
    text = value if isinstance(value, str) else repr(value)
    return _shortened(text, _ascii(text[:limit]), limit)


def printable(text: str, limit: int = _CLIP) -> str:
    """``text`` with every character that is not printable escaped (control characters such as
    ESC, invisible format characters such as U+200B, line breaks), at most ``limit`` characters.

    Unlike :func:`clip`, printable non-ASCII text (``°C``, accents) is kept as it is.
    """
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else _escape_char(c) for c in head)
    return _shortened(text, head, limit)


def _ascii(text: str) -> str:
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)


def _shortened(original: str, shown: str, limit: int) -> str:
    if len(original) <= limit and len(shown) <= limit:
        return shown
    suffix = f"... ({len(original):,} characters)"
    return shown[: max(limit - len(suffix), 0)] + suffix


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def decode_utf8(data: bytes) -> str:
    """``data`` as UTF-8 text; BoundedInputError naming the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BoundedInputError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def json_depth(text: str, limit: int) -> int:
    """The deepest ``[``/``{`` nesting of JSON ``text``, scanning past ``limit`` no further."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def toml_depth(text: str, limit: int) -> int:
    """The deepest ``[``/``{`` nesting of TOML ``text`` (strings and comments skipped)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if char in "\"'":
            quote = char * 3 if text.startswith(char * 3, i) else char
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                if char == '"' and text[j] == "\\":
                    j += 1
                elif len(quote) == 1 and text[j] == "\n":
                    break  # an unterminated string: tomllib names it
                j += 1
            i = j + len(quote)
            continue
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif char in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BoundedInputError(f"number {clip(text, 40)} is not a finite float")
    return number


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BoundedInputError(
            f"an integer of {len(text.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})"
        )
    return int(text)


def _no_constant(name: str) -> Any:
    raise BoundedInputError(f"{name} is not a JSON number")


def loads_json(data: bytes | str, *, max_bytes: int, max_depth: int) -> Any:
    """Parse untrusted JSON within the bounds; BoundedInputError on anything outside them."""
    size = len(data)
    if size > max_bytes:
        raise BoundedInputError(f"{size:,} bytes, over the {max_bytes:,} allowed")
    text = decode_utf8(data) if isinstance(data, bytes) else data
    if json_depth(text, max_depth) > max_depth:
        raise BoundedInputError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(
            text,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except json.JSONDecodeError as exc:
        raise BoundedInputError(f"not JSON ({exc.msg} at offset {exc.pos})") from None


def loads_toml(data: bytes, *, max_bytes: int = 1 << 20, max_depth: int = 16) -> dict[str, Any]:
    """Parse an untrusted TOML document within the bounds (its values are the reader's to check:
    TOML's ``inf`` and ``nan`` are refused by the models that read these files)."""
    if len(data) > max_bytes:
        raise BoundedInputError(f"{len(data):,} bytes, over the {max_bytes:,} allowed")
    text = decode_utf8(data)
    if toml_depth(text, max_depth) > max_depth:
        raise BoundedInputError(f"nested deeper than {max_depth} levels")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BoundedInputError(f"not valid TOML ({clip(str(exc), 120)})") from None
    except RecursionError:  # the scan above should make this unreachable; never a traceback
        raise BoundedInputError(f"nested deeper than {max_depth} levels") from None

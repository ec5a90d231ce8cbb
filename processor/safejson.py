"""JSON from the bucket, parsed with limits: one readable error instead of whatever breaks first.

``json.loads`` accepts documents that later crash a worker far from where they were read: nesting
deep enough to overflow the stack (``RecursionError``), an integer literal too long to convert
(``ValueError``), ``NaN`` and ``1e400`` (which become floats no status can carry), and lone
surrogates such as ``"\\ud83d"`` (which no UTF-8 writer can encode). Everything read from outside
goes through :func:`load_json`, so each of those becomes a :class:`JsonLimitError` that names the
place in the document, at the moment it is read.
"""

from __future__ import annotations

import json
import math
from typing import Any

from processor.errors import JsonLimitError

MAX_DEPTH = 64
MAX_INT_DIGITS = 64


def _bad_constant(name: str) -> float:
    raise JsonLimitError(f"holds {name}, which is not a number JSON allows")


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JsonLimitError(f"holds an integer of {digits} digits; the limit is {MAX_INT_DIGITS}")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"holds the number {text[:40]}, which is too large")
    return value


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonLimitError(
            f"is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None


def load_json(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` or raise :class:`JsonLimitError` with a message for a person."""
    text = _decode(data)
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_bad_constant)
    except JsonLimitError:
        raise
    except json.JSONDecodeError as error:
        raise JsonLimitError(
            f"is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise JsonLimitError(f"is nested too deeply (the limit is {max_depth} levels)") from None
    except ValueError as error:  # a number Python refuses to convert
        raise JsonLimitError(f"holds a value JSON cannot carry: {error}") from None
    check_value(value, max_depth=max_depth)
    return value


def check_value(value: Any, *, max_depth: int = MAX_DEPTH, path: str = "") -> None:
    """Walk a parsed value (iteratively: no recursion for the stack to run out of) and refuse
    nesting past ``max_depth``, non-finite floats and strings no UTF-8 writer can encode."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                raise JsonLimitError(_at(where, f"is nested more than {max_depth} levels deep"))
            for key, child in item.items():
                if not isinstance(key, str):
                    raise JsonLimitError(_at(where, "has a key that is not a string"))
                _check_text(key, where)
                stack.append((child, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(item, list | tuple):
            if depth >= max_depth:
                raise JsonLimitError(_at(where, f"is nested more than {max_depth} levels deep"))
            for index, child in enumerate(item):
                stack.append((child, f"{where}[{index}]", depth + 1))
        elif isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonLimitError(_at(where, "is not a finite number"))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise JsonLimitError(
            _at(
                where,
                f"holds an unpaired surrogate (\\u{ord(text[error.start]):04x}), "
                "which is not text; send the whole character",
            )
        ) from None


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else f"the document {message}"

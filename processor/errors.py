"""Problems with a user's input, as data a person can read and a status document can carry."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located by a dotted path such as ``payload.steps``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(Exception):
    """A manifest that cannot run. Every problem is listed, not only the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, message: str, path: str = "") -> ManifestError:
        return cls([Problem(path, message)])


def _path(prefix: str, loc: Iterable[Any]) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def problems_from_validation(
    error: ValidationError, prefix: str = "", known_fields: Iterable[str] = ()
) -> list[Problem]:
    """Turn pydantic's errors into lines a person can act on.

    An unknown field is the commonest mistake (a typo in ``seed``); naming the closest known
    field turns a silent default into an obvious fix.
    """
    known = list(known_fields)
    problems = []
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        path = _path(prefix, loc)
        if item["type"] == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            message = "unknown field"
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean '{close[0]}'?"
            elif known:
                message += f"; known fields: {', '.join(known)}"
            problems.append(Problem(path, message))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required field is missing"
        elif "input" in item and not isinstance(item["input"], dict | list):
            # A whole object echoed back is noise; a scalar shows what was actually sent.
            shown = repr(item["input"])
            if len(shown) <= 80:
                message += f" (got {shown})"
        if item["type"] == "literal_error":
            message += _closest_choice(item)
        problems.append(Problem(path, message))
    return problems


def _closest_choice(item: Any) -> str:
    """A misspelt enum value ('eulr') gets the nearest allowed one named."""
    expected = re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", "")))
    close = difflib.get_close_matches(str(item.get("input")), expected, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""

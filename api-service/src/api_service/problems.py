"""The body of a 422: which fields are wrong and why, safe to send back whatever the input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline_shared.contract import MAX_REPORTED_PROBLEMS

_LONGEST_PART = 64


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe to send back: at most ``limit`` characters, and encodable."""
    # A lone surrogate cannot be encoded into the answer's UTF-8; show it escaped.
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validation_problems(errors: Sequence[Any], total: int | None = None) -> list[dict[str, Any]]:
    """At most ``MAX_REPORTED_PROBLEMS`` of ``errors`` as ``{type, loc, msg}``, plus a count of
    the rest (of ``total``, when ``errors`` holds only the first few). The client's input is
    not echoed: it may be huge, deep or unencodable."""
    total = len(errors) if total is None else total
    shown: list[dict[str, Any]] = [
        {
            "type": str(error["type"]),
            "loc": [
                part if isinstance(part, int) else printable(str(part), _LONGEST_PART)
                for part in error["loc"]
            ],
            "msg": printable(str(error["msg"])),
        }
        for error in errors[:MAX_REPORTED_PROBLEMS]
    ]
    if total > MAX_REPORTED_PROBLEMS:
        shown.append(
            {
                "type": "too_many_errors",
                "loc": [],
                "msg": f"and {total - MAX_REPORTED_PROBLEMS} more problems",
            }
        )
    return shown

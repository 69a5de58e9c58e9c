"""Reading a request body as JSON, refusing what ``json.loads`` would let through silently.

``json.loads`` keeps the last of two equal keys, reads ``NaN`` and
``Infinity``, turns ``1e400`` into infinity and ``1e-400`` into zero, rounds
``0.1000000000000000055511151231257827`` to the double nearest it (so the
email would show ``0.1``), and recurses until Python's stack limit. Each of
these changes what the client meant without a word, so here each is an error
naming where it happened.
The rest of the contract (sizes, depth, characters) is the models' to check.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from fastapi import HTTPException

from api_service.problems import validation_problems
from pipeline_shared.contract import (
    MAX_DATA_DEPTH,
    MAX_REPORTED_PROBLEMS,
    has_lone_surrogate,
    walk_json,
)

Location = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class BodyProblem:
    loc: Location
    msg: str
    type: str = "json_invalid"


class InvalidJsonBody(HTTPException):
    """The body is not JSON the api can take as the client meant it: a 422 like any invalid
    field (an ``HTTPException``, which FastAPI lets through its body parsing unchanged)."""

    def __init__(self, problems: list[BodyProblem], total: int | None = None) -> None:
        """``problems``: all of them, or the first few of ``total``."""
        super().__init__(
            422,
            validation_problems(
                [{"type": p.type, "loc": p.loc, "msg": p.msg} for p in problems], total
            ),
        )
        self.problems = problems
        self.total = len(problems) if total is None else total


class _Refused:
    """Stands in for a value the parser must not accept, until its place is found."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


class _WithDuplicates(dict[str, Any]):
    __slots__ = ("duplicates",)

    def __init__(self, pairs: list[tuple[str, Any]], duplicates: list[str]) -> None:
        super().__init__(pairs)
        self.duplicates = duplicates


_NONZERO_MANTISSA = re.compile(r"-?[0.]*[1-9]")
# A \u escape of a UTF-16 surrogate: json.loads pairs two of them into one
# character, and keeps a lone one as a string UTF-8 cannot encode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _Parser:
    """One parse: the hooks note that something is wrong, and where is found afterwards."""

    def __init__(self) -> None:
        self.suspect = False

    def object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) == len(pairs):
            return result
        self.suspect = True
        seen: set[str] = set()
        duplicates = []
        for key, _ in pairs:
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        return _WithDuplicates(pairs, duplicates)

    def constant(self, name: str) -> _Refused:
        self.suspect = True
        return _Refused(f"{name} is not a JSON number")

    def float(self, literal: str) -> float | _Refused:
        value = float(literal)
        if value in (float("inf"), float("-inf")):
            self.suspect = True
            return _Refused("number out of range (beyond ±1.8e308)")
        if value == 0 and _NONZERO_MANTISSA.match(literal):
            self.suspect = True
            return _Refused("number too small to represent (it would become 0)")
        if _rounded(literal, value):
            self.suspect = True
            return _Refused(
                f"number has more digits than a double keeps (it would be carried as {value!r})"
            )
        return value


def _rounded(literal: str, value: float) -> bool:
    """Whether the double ``value`` stands for another number than ``literal`` says: the
    pipeline writes a number as the shortest text that reads back as its double."""
    if value == 0:
        return False  # a zero written any way (the caller refused nonzero digits read as 0)
    mantissa = literal.partition("e")[0].partition("E")[0]
    if len(mantissa) <= 15 and abs(value) >= sys.float_info.min:
        return False  # 15 significant digits of a normal double always come back as written
    try:
        return Decimal(literal) != Decimal(repr(value))
    except ArithmeticError:  # an exponent beyond what Decimal takes (InvalidOperation)
        return True


_LONE = "contains a lone surrogate (half of a UTF-16 pair), which is not text"


def _problems_in(value: Any) -> tuple[list[BodyProblem], int]:
    """The first ``MAX_REPORTED_PROBLEMS`` problems, and how many there are: a body of a
    million duplicate keys must not take seconds to describe."""
    problems: list[BodyProblem] = []
    total = 0

    def note(found: Iterable[BodyProblem], count: int) -> None:
        nonlocal total
        room = MAX_REPORTED_PROBLEMS - len(problems)
        if room > 0:
            problems.extend(itertools.islice(found, room))
        total += count

    for item, where in walk_json(value, ("body",)):
        if isinstance(item, _Refused):
            note([BodyProblem(where, item.problem)], 1)
        elif isinstance(item, str):
            if has_lone_surrogate(item):
                note([BodyProblem(where, _LONE, "lone_surrogate")], 1)
        elif isinstance(item, dict):
            if isinstance(item, _WithDuplicates):
                note(
                    (
                        BodyProblem((*where, key), f"duplicate key {key!r}", "duplicate_key")
                        for key in item.duplicates
                    ),
                    len(item.duplicates),
                )
            lone = [k for k in item if has_lone_surrogate(k)]
            note(
                (BodyProblem((*where, k), f"a key {_LONE}", "lone_surrogate") for k in lone),
                len(lone),
            )
    return problems, total


MAX_BODY_DEPTH = 600
"""Deepest nesting a body may have, whatever thread reads it. How deep ``json.loads``
gets before its RecursionError depends on the stack it starts from (a worker
thread's is shallower than a request's on the event loop), and a body it read at
980 levels made later code (``json.dumps``, validation) fail with a 500 near the
interpreter's recursion limit of 1,000. Below this bound, the contract names the
field that nests too deeply (job data may nest ``MAX_DATA_DEPTH`` levels)."""

_TOO_DEEP = f"nested too deeply to read (a job's data may nest {MAX_DATA_DEPTH} levels)"


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` levels (without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json_body(body: bytes) -> Any:
    """The body's JSON value, or ``InvalidJsonBody`` listing what is wrong and where."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJsonBody(
            [BodyProblem(("body",), f"not valid UTF-8 (at byte {exc.start})")]
        ) from None
    parser = _Parser()
    try:
        value = json.loads(
            text,
            object_pairs_hook=parser.object,
            parse_constant=parser.constant,
            parse_float=parser.float,
        )
    except json.JSONDecodeError as exc:
        raise InvalidJsonBody(
            [BodyProblem(("body", exc.pos), f"not valid JSON: {exc.msg}")]
        ) from None
    except RecursionError:
        raise InvalidJsonBody([BodyProblem(("body",), _TOO_DEEP)]) from None
    except ValueError:
        # int() refuses a literal of more than sys.get_int_max_str_digits() digits.
        raise InvalidJsonBody(
            [BodyProblem(("body",), "a number has too many digits (beyond ±1.8e308)")]
        ) from None
    # Each level takes two characters at least: only a longer text can nest too deeply.
    if (
        len(text) > 2 * MAX_BODY_DEPTH
        and isinstance(value, dict | list)
        and _deeper_than(value, MAX_BODY_DEPTH)
    ):
        raise InvalidJsonBody([BodyProblem(("body",), _TOO_DEEP)])
    suspect = parser.suspect or _SURROGATE_ESCAPE.search(text) is not None
    if suspect:
        problems, total = _problems_in(value)
        if total:
            raise InvalidJsonBody(problems, total)
    return value

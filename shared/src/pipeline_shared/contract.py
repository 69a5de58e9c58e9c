"""The limits of a job: what any edge of the pipeline accepts, defined once.

The api applies them all to every request, so a job the api accepts is one
every later stage can carry and turn into an email. Downstream, events are
decoded in the ``TRUSTED`` context: their types are checked (a job's data, that
it is an object) and every header
field is still one line, one mailbox, no encoded-word (what keeps an email's
headers safe whoever published the message), but addresses are not parsed
again and data is not walked again. Only the services' own broker users may
publish events (``rabbitmq/definitions.json``).

* **Single-line fields** (subject, names, addresses) hold no control
  character and no character on which ``str.splitlines`` breaks (CR, LF,
  VT, FF, FS, GS, RS, NEL, U+2028, U+2029): nothing in them can end a header.
  Nor do they hold the bidirectional embedding, override and isolate controls
  (U+202A to U+202E, U+2066 to U+2069) or U+FEFF, with which a subject or a
  sender's name shows text other than it holds (``invoice\u202egnp.exe`` reads
  as ``invoiceexe.png``). The marks U+200E and U+200F, and the joiners emoji
  need, stay allowed.
* **Addresses** are one ``local@domain`` with an ASCII local part and no
  quoting, comments, whitespace, commas or encoded-words (``=?``); an
  internationalised domain is carried in its IDNA (punycode) form, the form
  every mail server reads.
* **Job data** nests at most ``MAX_DATA_DEPTH`` levels; its numbers are
  finite and within the range of a double (integers are carried exactly, not
  rounded); its strings hold no lone surrogate and no control character but
  TAB, LF and CR (its keys not even those).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterator
from typing import Annotated, Any

import email_validator
from pydantic import (
    AfterValidator,
    Field,
    JsonValue,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

MAX_DATA_DEPTH = 32
"""How deep ``data`` may nest: the object itself is level 1, each object or list inside adds one."""

SUBJECT_MAX_LENGTH = 200
NAME_MAX_LENGTH = 100
ADDRESS_MAX_LENGTH = 254  # RFC 5321's limit on a forward path, less the angle brackets

MAX_REPORTED_PROBLEMS = 20
"""An error answer lists at most this many problems, however bad the input."""

# Every character str.splitlines() breaks on, and every other control character
# (Unicode category Cc: C0, DEL and C1, which includes NEL).
_NOT_IN_A_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# In free text (data values) a line may end: TAB, LF and CR are allowed.
_NOT_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_REORDERING = re.compile(r"[\u202a-\u202e\u2066-\u2069\ufeff]")
_ENCODED_WORD = "=?"
_LARGEST_DOUBLE = float.fromhex("0x1.fffffffffffffp+1023")


class ContractViolation(ValueError):
    """A value outside the limits; ``path`` names where (``data.items.3``)."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        self.problem = problem
        self.path = path
        where = render_path(path)
        super().__init__(f"at {where}: {problem}" if where else problem)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")


def render_path(path: tuple[str | int, ...]) -> str:
    """``items.3.name``; a key that is not plain is quoted and escaped, and long ones cut."""
    parts = []
    for part in path:
        if isinstance(part, int) or _PLAIN_KEY.fullmatch(part):
            parts.append(str(part))
        else:
            shown = part if len(part) <= 40 else part[:40] + "…"
            parts.append(json.dumps(shown))
    return ".".join(parts)


# Control characters have no Unicode name; these are the ones people meet.
_CONTROL_NAMES = {
    "\x00": "NULL",
    "\t": "TAB",
    "\n": "LINE FEED",
    "\x0b": "VERTICAL TAB",
    "\x0c": "FORM FEED",
    "\r": "CARRIAGE RETURN",
    "\x1b": "ESCAPE",
    "\x7f": "DELETE",
    "\x85": "NEXT LINE",
}


def _describe_char(char: str) -> str:
    name = _CONTROL_NAMES.get(char) or unicodedata.name(char, "")
    return f"U+{ord(char):04X}{f' {name}' if name else ''}"


def check_single_line(value: str) -> str:
    """``value`` if it is one non-blank line without control characters, else ``ValueError``."""
    if found := _SURROGATE.search(value):
        raise ValueError(f"contains a lone surrogate ({_describe_char(found.group())})")
    if found := _NOT_IN_A_LINE.search(value):
        raise ValueError(
            f"must be a single line without control characters "
            f"(found {_describe_char(found.group())})"
        )
    if found := _REORDERING.search(value):
        raise ValueError(
            "must not contain bidirectional formatting characters, which make it show "
            f"other text than it holds (found {_describe_char(found.group())})"
        )
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _address_problem(value: str) -> str | None:
    if _ENCODED_WORD in value:
        return "must not contain an encoded-word ('=?')"
    if any(char.isspace() or char == "," for char in value):
        return "must be a single address, without whitespace or commas"
    return None


def check_address(value: str) -> str:
    """A recipient address, in the ASCII form mail servers read, or ``ValueError``.

    ``ada@bücher.de`` becomes ``ada@xn--bcher-kva.de``; a non-ASCII local part
    is refused, since the transports cannot promise SMTPUTF8 delivery.
    """
    check_single_line(value)
    if problem := _address_problem(value):
        raise ValueError(problem)
    try:
        valid = email_validator.validate_email(
            value,
            check_deliverability=False,
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
        )
    except email_validator.EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address: {exc}") from None
    # With SMTPUTF8 refused, the ASCII form always exists.
    return valid.ascii_email or valid.normalized


_DOMAIN_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def check_sender_address(value: str) -> str:
    """Like ``check_address``, but any syntactically valid domain will do.

    Reserved names (``example.com``, ``.test``, ``.local``, a single label)
    are allowed: the provider, not the pipeline, decides what it sends from.
    """
    check_single_line(value)
    if problem := _address_problem(value):
        raise ValueError(problem)
    local, at, domain = value.rpartition("@")
    if not at:
        raise ValueError("is not a valid email address: it has no @-sign")
    # The local part's rules do not depend on the domain: check it with one
    # that email_validator accepts, then the real domain by DNS syntax.
    try:
        email_validator.validate_email(
            f"{local}@example.com",
            check_deliverability=False,
            allow_smtputf8=False,
            allow_quoted_local=False,
        )
    except email_validator.EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address: {exc}") from None
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError("is not a valid email address: its domain is not a valid name") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise ValueError("is not a valid email address: its domain is not a valid name")
    return f"{local}@{ascii_domain}"


def _check_text(value: str, path: tuple[str | int, ...], *, key: bool) -> None:
    if found := _SURROGATE.search(value):
        raise ContractViolation(
            f"contains a lone surrogate ({_describe_char(found.group())})", path
        )
    if found := (_NOT_IN_A_LINE if key else _NOT_IN_TEXT).search(value):
        what = "a key" if key else "a string"
        raise ContractViolation(
            f"{what} contains the control character {_describe_char(found.group())}", path
        )


def _check_number(value: int | float, path: tuple[str | int, ...]) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ContractViolation("numbers must be finite (no NaN or Infinity)", path)
    elif abs(value) > _LARGEST_DOUBLE:
        raise ContractViolation("number out of range (beyond ±1.8e308)", path)


def walk_json(
    data: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[Any, tuple[str | int, ...]]]:
    """Every value in ``data`` with its path, in document order, without recursion (a
    value may be nested far deeper than Python's stack allows)."""
    pending = [(data, path)]
    while pending:
        value, where = pending.pop()
        yield value, where
        if isinstance(value, dict):
            pending.extend((item, (*where, key)) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            pending.extend((item, (*where, i)) for i, item in reversed(list(enumerate(value))))


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds half of a UTF-16 pair, which UTF-8 cannot encode."""
    return _SURROGATE.search(text) is not None


def check_json_data(data: Any) -> Any:
    """``data`` if it is within the limits of job data, else ``ContractViolation`` naming where."""
    for value, path in walk_json(data):
        if isinstance(value, str):
            _check_text(value, path, key=False)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float):
            _check_number(value, path)
        elif isinstance(value, dict):
            if len(path) >= MAX_DATA_DEPTH:
                raise ContractViolation(f"nested deeper than {MAX_DATA_DEPTH} levels", path)
            for key in value:
                if not isinstance(key, str):
                    raise ContractViolation("object keys must be strings", path)
                _check_text(key, (*path, key), key=True)
        elif isinstance(value, list):
            if len(path) >= MAX_DATA_DEPTH:
                raise ContractViolation(f"nested deeper than {MAX_DATA_DEPTH} levels", path)
        else:
            raise ContractViolation(f"{type(value).__name__} is not a JSON value", path)
    return data


TRUSTED: dict[str, Any] = {"trusted": True}
"""Validation context for what the pipeline itself wrote: events from the broker, and
events built from values already validated. A job is validated once, at the edge (the
api); downstream, the types are still checked (of the data, that it is an object),
and every header field is still one line, but addresses are not parsed again and
data not walked again."""


def _trusted(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and info.context.get("trusted") is True


def _job_data(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    if _trusted(info) and isinstance(value, dict):
        # Validated where it came in, and inside an object read from JSON nothing
        # but JSON can be: taken as it is. Rebuilding it value by value cost each
        # stage a millisecond for 20,000 small objects, on its event loop.
        return value
    # Before pydantic's own validation, which would recurse into a deep value.
    try:
        checked = value if _trusted(info) else check_json_data(value)
    except ContractViolation as exc:
        raise PydanticCustomError("job_data", "{problem}", {"problem": str(exc)}) from None
    return handler(checked)


def _recipient(value: str, info: ValidationInfo) -> str:
    if not _trusted(info):
        return check_address(value)
    # Still one line, one mailbox, no encoded-word: what keeps headers safe.
    check_single_line(value)
    local, at, domain = value.rpartition("@")
    problem = _address_problem(value) or (None if local and at and domain else "has no @-sign")
    if problem:
        raise ValueError(f"is not a valid email address: {problem}")
    return value


SingleLine = Annotated[str, AfterValidator(check_single_line)]

Subject = Annotated[
    str,
    Field(min_length=1, max_length=SUBJECT_MAX_LENGTH),
    AfterValidator(check_single_line),
]
"""An email subject: one line, 1 to 200 characters. Encoded-words in it are text."""

EmailAddress = Annotated[
    str,
    Field(max_length=ADDRESS_MAX_LENGTH, json_schema_extra={"format": "email"}),
    AfterValidator(_recipient),
]
"""One recipient address, carried in its ASCII (IDNA) form."""

SenderAddress = Annotated[str, AfterValidator(check_sender_address)]
"""A sender address; reserved and single-label domains are allowed."""

JobData = Annotated[dict[str, JsonValue], WrapValidator(_job_data)]
"""A job's data (and a step's result): a JSON object within the limits above."""

"""Logging set-up: one line per record, on stderr, with nothing private in it.

A line is readable text, or with ``LOG_FORMAT=json`` one JSON object
(``JsonLinesFormatter``) whose fields include those a caller passes with
``extra=`` (the messaging layer's ``job_id``, ``event_id``, ``outcome``...).

Every line goes through ``PrivateDataFormatter``: the values of the
service's secrets (tokens, API keys, passwords inside URLs) are replaced by
``***`` wherever they appear, tracebacks included, and email addresses are
masked (``a***@example.com``) unless ``LOG_SHOW_ADDRESSES`` is on.

The AMQP libraries log a lost broker connection, and every failed attempt to
reconnect, at ERROR; the messaging layer says the same once on loss and once on
recovery, so those records are demoted to DEBUG.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from pipeline_shared.settings import LogFormat, PipelineSettings

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# The credentials of a URL, ``scheme://user[:password]@``: the user name is not
# an address, and the host after the ``@`` is not its domain. Matched before
# the address at each position, so the pair is left as it is.
_URL_CREDENTIALS = r"(?P<credentials>[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~%!$&*+,;=:-]*@)"
# An address as it appears in text or in a URL's query string (%40 for @).
_ADDRESS = (
    r"(?P<first>[A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*"
    r"(?P<at>@|%40)(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
)
_ADDRESS_OR_CREDENTIALS = re.compile(f"{_URL_CREDENTIALS}|{_ADDRESS}")
_SHORTEST_SECRET = 4


def _mask(match: re.Match[str]) -> str:
    if match["credentials"] is not None:
        return match["credentials"]
    return f"{match['first']}***{match['at']}{match['domain']}"


def mask_addresses(text: str) -> str:
    """``ada@example.com`` -> ``a***@example.com``.

    A URL's credentials (``postgresql://pipeline:***@db.internal/``) are no
    address and stay as they are; passwords are hidden as secrets or by
    ``redact_url``, not here.
    """
    if "@" not in text and "%40" not in text:
        # Both alternatives need one; the scan would try the address pattern at
        # every position of the line (a quarter of a log line's cost).
        return text
    return _ADDRESS_OR_CREDENTIALS.sub(_mask, text)


# What the AMQP libraries log at ERROR when the connection drops and at every
# failed attempt to reconnect, by logger and the start of the message template.
_RECONNECTION_NOISE = (
    ("aiormq.connection", "error when creating transport"),
    ("aiormq.connection", "Unexpected connection close from remote"),
    ("aio_pika.robust_connection", "Reconnect attempt failed"),
)


def is_reconnection_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is an AMQP library's report of a lost connection or of
    a failed attempt to reconnect, which the messaging layer reports itself."""
    template = str(record.msg)
    if any(
        record.name == name and template.startswith(start) for name, start in _RECONNECTION_NOISE
    ):
        return True
    # A channel whose connection drops tries at once to reopen itself, fails,
    # and aio-pika reports that as an error of the channel's close callback.
    return (
        record.name == "aio_pika.tools"
        and template.startswith("Callback %r error")
        and isinstance(record.args, tuple)
        and bool(record.args)
        and "RobustChannel._on_close" in str(record.args[0])
    )


class ReconnectionNoiseFilter(logging.Filter):
    """Demotes the AMQP libraries' reconnection reports to DEBUG, and drops them
    unless DEBUG lines are wanted."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self._keep = level <= logging.DEBUG

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_reconnection_noise(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return self._keep


class PrivateDataFormatter(logging.Formatter):
    """A formatter that removes secrets and (optionally) addresses from the finished line."""

    def __init__(self, fmt: str, secrets: Iterable[str], show_addresses: bool) -> None:
        super().__init__(fmt)
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted(
            {s for s in secrets if len(s) >= _SHORTEST_SECRET}, key=len, reverse=True
        )
        self._show_addresses = show_addresses

    def hide(self, text: str) -> str:
        """``text`` with every secret replaced by ``***`` and, unless shown, addresses masked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text if self._show_addresses else mask_addresses(text)

    def format(self, record: logging.LogRecord) -> str:
        # The format names only standard attributes, so the fields a caller
        # passes with ``extra=`` (for the JSON lines) leave the text line as it is.
        return self.hide(super().format(record))


# The attributes every record has; any other came in through ``extra=`` and is
# a field of the JSON line.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Fields libraries add for their own console output (uvicorn's ANSI-coloured copy
# of the message), which mean nothing to a log collector.
_IGNORED_EXTRAS = frozenset({"color_message"})


class JsonLinesFormatter(PrivateDataFormatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``service``,
    ``logger``, ``message``, ``exception`` (the traceback, if any), then every field
    passed with ``extra=``.

    Secrets and addresses are hidden in the message and in every string field, as
    in the text lines. The object is written with non-ASCII and control characters
    escaped, so a record is always exactly one line whatever its message holds.
    """

    def __init__(self, service: str | None, secrets: Iterable[str], show_addresses: bool) -> None:
        super().__init__("%(message)s", secrets, show_addresses)
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields: dict[str, object] = {
            "time": time.replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _IGNORED_EXTRAS:
                fields.setdefault(key, value)
        return json.dumps(
            {key: self._json_value(value) for key, value in fields.items()}, ensure_ascii=True
        )

    def _json_value(self, value: object) -> object:
        """A value JSON can hold as it is (a number, a boolean, null), else its text
        with the private data hidden."""
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        return self.hide(value if isinstance(value, str) else str(value))


def configure_service_logging(settings: PipelineSettings, service: str) -> None:
    """``configure_logging`` as a service's settings ask, hiding its secrets; JSON
    lines name ``service``."""
    configure_logging(
        settings.log_level,
        secrets=settings.secret_values(),
        show_addresses=settings.log_show_addresses,
        log_format=settings.log_format,
        service=service,
    )


def configure_logging(
    level: str,
    *,
    secrets: Iterable[str] = (),
    show_addresses: bool = False,
    log_format: LogFormat = "text",
    service: str | None = None,
) -> None:
    """Send every logger's records to stderr at ``level``, as text lines or JSON
    lines (``log_format``), through the private-data formatter."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = (
        JsonLinesFormatter(service, secrets, show_addresses)
        if log_format == "json"
        else PrivateDataFormatter(FORMAT, secrets, show_addresses)
    )
    handler.setFormatter(formatter)
    handler.addFilter(ReconnectionNoiseFilter(logging.getLevelName(level)))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The AMQP libraries log each lost connection with a traceback; the
    # messaging layer logs losing and regaining the broker in one line each.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.ERROR))

"""With LOG_FORMAT=json each record is one JSON object on one line, as private as the text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from pipeline_shared.logs import FORMAT, JsonLinesFormatter, PrivateDataFormatter, configure_logging
from pipeline_shared.settings import PipelineSettings

TOKEN = "mt-token-5f1e2d3c"
PASSWORD = "hunter2-rabbit"
HANDLED = {
    "event_type": "JobRequested",
    "job_id": "5b1c1b4e-0000-4000-8000-000000000001",
    "event_id": "5b1c1b4e-0000-4000-8000-000000000002",
    "outcome": "acked",
    "attempt": 1,
    "duration_ms": 12.5,
    "trace_id": None,
}


class Captured:
    """A logger of its own writing through one formatter into a buffer."""

    def __init__(self, name: str, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines(keepends=True)

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines()]

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = True


@pytest.fixture
def json_log(request: pytest.FixtureRequest) -> Iterator[Captured]:
    formatter = JsonLinesFormatter("processor-service", (TOKEN, PASSWORD), show_addresses=False)
    captured = Captured(f"test-json-logs.{request.node.name}", formatter)
    yield captured
    captured.close()


def test_a_record_is_one_json_object_with_time_level_service_logger_and_message(
    json_log: Captured,
) -> None:
    json_log.logger.info("job %s: %s handled in %.0f ms", "j-1", "JobRequested", 12.3)

    [record] = json_log.records()
    assert record["level"] == "INFO"
    assert record["service"] == "processor-service"
    assert record["logger"] == json_log.logger.name
    assert record["message"] == "job j-1: JobRequested handled in 12 ms"
    time = datetime.fromisoformat(str(record["time"]))
    assert time.utcoffset() == timedelta(0)
    assert str(record["time"]).endswith("Z")


def test_the_fields_passed_with_extra_become_fields_of_the_line(json_log: Captured) -> None:
    json_log.logger.info("handled", extra=HANDLED)

    [record] = json_log.records()
    assert {key: record[key] for key in HANDLED} == HANDLED
    assert record["trace_id"] is None
    assert "exception" not in record


def test_the_text_line_ignores_the_fields_passed_with_extra() -> None:
    captured = Captured("test-json-logs.text", PrivateDataFormatter(FORMAT, (), False))
    try:
        captured.logger.info(
            "job %s: %s handled in %.0f ms", "j-1", "JobRequested", 3, extra=HANDLED
        )
        [line] = captured.lines()
    finally:
        captured.close()
    assert line.endswith(" INFO    test-json-logs.text: job j-1: JobRequested handled in 3 ms\n")
    assert "event_id" not in line
    assert HANDLED["event_id"] not in line


def test_no_secret_and_no_address_appears_in_a_json_line(json_log: Captured) -> None:
    try:
        raise ConnectionError(f"amqp://pipeline:{PASSWORD}@rabbit/ refused ada@example.com")
    except ConnectionError:
        json_log.logger.exception(
            "sending to grace@example.org with %s",
            TOKEN,
            extra={"recipient": "ada@example.com", "header": f"Bearer {TOKEN}", "url": PASSWORD},
        )

    [line] = json_log.lines()
    for private in (TOKEN, PASSWORD, "ada@example.com", "grace@example.org"):
        assert private not in line
    record = json.loads(line)
    assert record["message"] == "sending to g***@example.org with ***"
    assert record["recipient"] == "a***@example.com"
    assert record["header"] == "Bearer ***"
    assert record["url"] == "***"


def test_addresses_are_shown_in_json_when_asked() -> None:
    formatter = JsonLinesFormatter("mailer-service", (TOKEN,), show_addresses=True)
    captured = Captured("test-json-logs.shown", formatter)
    try:
        captured.logger.info("sent to ada@example.com", extra={"to": "ada@example.com"})
        [record] = captured.records()
    finally:
        captured.close()
    assert record["message"] == "sent to ada@example.com"
    assert record["to"] == "ada@example.com"


def test_an_exception_is_one_string_field_of_the_same_line(json_log: Captured) -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        json_log.logger.exception("unexpected error handling message %s", "m-1")

    [line] = json_log.lines()
    record = json.loads(line)
    assert isinstance(record["exception"], str)
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad\nvalue" in record["exception"]
    assert record["level"] == "ERROR"


@pytest.mark.parametrize(
    "message",
    [
        "two\nlines",
        "carriage\rreturn",
        "tab\tand nul\x00 and escape \x1b[31m",
        "line\u2028separator and paragraph\u2029separator",
        "déjà vu, 東京, 🙂",
        'quotes " and backslashes \\',
    ],
)
def test_any_message_stays_one_ascii_line_that_decodes_back_to_itself(
    json_log: Captured, message: str
) -> None:
    json_log.logger.warning("%s", message, extra={"reason": message})

    [line] = json_log.lines()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert line.isascii()
    assert all(char.isprintable() for char in line.rstrip("\n"))
    record = json.loads(line)
    assert record["message"] == message
    assert record["reason"] == message


def test_values_json_cannot_hold_are_written_as_text(json_log: Captured) -> None:
    json_log.logger.info("odd", extra={"ratio": float("nan"), "ids": ("a", "b"), "flag": True})

    [record] = json_log.records()
    assert record["ratio"] == "nan"
    assert record["ids"] == "('a', 'b')"
    assert record["flag"] is True


def test_log_format_is_text_by_default_and_json_when_set() -> None:
    assert PipelineSettings.model_fields["log_format"].default == "text"
    assert PipelineSettings(log_format="json").log_format == "json"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("aio_pika", "aiormq")}
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_in_json_writes_one_private_object_per_line_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", secrets=[TOKEN], log_format="json", service="mailer-service")

    logging.getLogger("mailer").info("sent to ada@example.com with %s", TOKEN)
    logging.getLogger("mailer").debug("not at INFO")

    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    record = json.loads(line)
    assert record["service"] == "mailer-service"
    assert record["logger"] == "mailer"
    assert record["message"] == "sent to a***@example.com with ***"

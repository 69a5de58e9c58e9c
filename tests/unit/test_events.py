"""The event contracts: envelope, validation and the tolerant-reader rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from pipeline_shared.contract import SUBJECT_MAX_LENGTH
from pipeline_shared.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    DataProcessed,
    EmailSent,
    Event,
    JobFailed,
    JobRequested,
    any_event_adapter,
    describe_validation_error,
)
from unit.fakes import data_processed, job_requested


def email_sent(**overrides: Any) -> EmailSent:
    fields: dict[str, Any] = {
        "job_id": uuid4(),
        "email": "ada@example.com",
        "transport": "outbox",
        "provider_message_id": "<abc@outbox.local>",
    }
    return EmailSent(**{**fields, **overrides})


def job_failed(**overrides: Any) -> JobFailed:
    fields: dict[str, Any] = {
        "job_id": uuid4(),
        "stage": "processor-service",
        "reason": "unknown processing step 'nope'",
        "error_type": "PermanentFailure",
    }
    return JobFailed(**{**fields, **overrides})


ONE_OF_EACH = [job_requested(), data_processed(), email_sent(), job_failed()]


def as_dict(event: Event) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(event.model_dump_json())
    return parsed


# --- envelope ---------------------------------------------------------------


def test_every_event_type_is_covered_by_these_tests() -> None:
    assert {type(event) for event in ONE_OF_EACH} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda event: type(event).__name__)
def test_an_event_survives_a_json_round_trip_unchanged(event: Event) -> None:
    again = type(event).model_validate_json(event.model_dump_json())

    assert again == event
    assert again.model_dump() == event.model_dump()


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda event: type(event).__name__)
def test_an_event_carries_the_envelope_with_its_own_class_name(event: Event) -> None:
    body = as_dict(event)

    assert body["event_type"] == type(event).__name__
    assert body["schema_version"] == SCHEMA_VERSION == 1
    assert UUID(body["event_id"]) == event.event_id
    assert UUID(body["job_id"]) == event.job_id
    assert datetime.fromisoformat(body["occurred_at"]).utcoffset() == timedelta(0)


def test_each_new_event_gets_its_own_random_uuid4_event_id() -> None:
    first, second = job_requested(), job_requested()

    assert first.event_id != second.event_id
    assert first.event_id.version == 4


def test_occurred_at_defaults_to_now_in_utc() -> None:
    before = datetime.now(UTC)
    event = job_requested()
    after = datetime.now(UTC)

    assert before <= event.occurred_at <= after
    assert event.occurred_at.utcoffset() == timedelta(0)


def test_occurred_at_given_in_another_offset_is_converted_to_utc() -> None:
    paris_summer = timezone(timedelta(hours=2))
    event = job_requested(occurred_at=datetime(2024, 6, 1, 12, 30, tzinfo=paris_summer))

    assert event.occurred_at.tzinfo is UTC
    assert event.occurred_at == datetime(2024, 6, 1, 10, 30, tzinfo=UTC)
    assert as_dict(event)["occurred_at"].startswith("2024-06-01T10:30:00")


def test_occurred_at_read_from_json_with_an_offset_is_converted_to_utc() -> None:
    body = as_dict(job_requested())
    body["occurred_at"] = "2024-01-01T08:00:00-05:00"

    event = JobRequested.model_validate_json(json.dumps(body))

    assert event.occurred_at.utcoffset() == timedelta(0)
    assert (event.occurred_at.hour, event.occurred_at.day) == (13, 1)


def test_a_naive_occurred_at_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        job_requested(occurred_at=datetime(2024, 6, 1, 12, 30))

    assert caught.value.errors()[0]["loc"] == ("occurred_at",)


def test_an_event_is_immutable() -> None:
    event = job_requested()

    with pytest.raises(ValidationError):
        event.subject = "changed"  # type: ignore[misc]


def test_an_event_type_that_does_not_match_the_class_is_rejected() -> None:
    body = as_dict(job_requested())
    body["event_type"] = "DataProcessed"

    with pytest.raises(ValidationError) as caught:
        JobRequested.model_validate(body)

    assert caught.value.errors()[0]["loc"] == ("event_type",)


# --- versioning -------------------------------------------------------------


def test_unknown_fields_are_ignored_by_the_reader() -> None:
    body = as_dict(job_requested())
    body["priority"] = "high"
    body["added_in_a_later_release"] = {"nested": True}

    event = JobRequested.model_validate_json(json.dumps(body))

    assert "priority" not in event.model_dump()
    assert not hasattr(event, "priority")
    assert event.email == "ada@example.com"


@pytest.mark.parametrize("version", [0, 2, 99])
def test_an_unknown_schema_version_is_rejected_naming_the_version(version: int) -> None:
    body = as_dict(job_requested())
    body["schema_version"] = version

    with pytest.raises(ValidationError) as caught:
        JobRequested.model_validate_json(json.dumps(body))

    message = describe_validation_error(caught.value, "JobRequested")
    assert f"unsupported schema_version {version}" in message
    assert f"reads {SCHEMA_VERSION}" in message


# --- field validation -------------------------------------------------------


@pytest.mark.parametrize("missing", ["job_id", "email", "data"])
def test_a_job_requested_without_a_required_field_is_rejected(missing: str) -> None:
    body = as_dict(job_requested())
    del body[missing]

    with pytest.raises(ValidationError) as caught:
        JobRequested.model_validate(body)

    assert [(error["loc"], error["type"]) for error in caught.value.errors()] == [
        ((missing,), "missing")
    ]


def test_a_data_processed_without_a_result_is_rejected() -> None:
    body = as_dict(data_processed())
    del body["result"]

    with pytest.raises(ValidationError, match="result"):
        DataProcessed.model_validate(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", "not-a-uuid"),
        ("data", [1, 2, 3]),
        ("data", "a string"),
        ("subject", 42),
        ("schema_version", "one"),
    ],
)
def test_a_field_of_the_wrong_type_is_rejected(field: str, value: object) -> None:
    body = as_dict(job_requested())
    body[field] = value

    with pytest.raises(ValidationError) as caught:
        JobRequested.model_validate_json(json.dumps(body))

    assert caught.value.errors()[0]["loc"][0] == field


def test_the_subject_is_optional() -> None:
    assert job_requested(subject=None).subject is None


def test_a_subject_of_the_maximum_length_is_accepted() -> None:
    subject = "x" * SUBJECT_MAX_LENGTH

    assert job_requested(subject=subject).subject == subject


def test_a_subject_over_200_characters_is_rejected() -> None:
    with pytest.raises(ValidationError, match="at most 200 characters"):
        job_requested(subject="x" * (SUBJECT_MAX_LENGTH + 1))


def test_an_empty_subject_is_rejected() -> None:
    with pytest.raises(ValidationError):
        job_requested(subject="")


@pytest.mark.parametrize(
    "subject",
    ["Hello\r\nBcc: victim@example.com", "Hello\nthere", "Hello\rthere", "Hello\x00there"],
    ids=["crlf", "lf", "cr", "nul"],
)
@pytest.mark.parametrize(
    "model", [job_requested, data_processed], ids=["JobRequested", "DataProcessed"]
)
def test_a_subject_with_a_line_break_or_nul_is_rejected(subject: str, model: Any) -> None:
    with pytest.raises(ValidationError, match="must be a single line"):
        model(subject=subject)


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "ada@",
        "@example.com",
        "ada@example..com",
        "ada@example.com\r\nBcc: eve@example.com",
    ],
)
def test_an_invalid_email_is_rejected(email: str) -> None:
    with pytest.raises(ValidationError) as caught:
        job_requested(email=email)

    assert caught.value.errors()[0]["loc"] == ("email",)


@pytest.mark.parametrize("step", ["Summarise", "9lives", "sum-marise", "summarise\n", "", "x" * 65])
def test_a_step_name_that_is_not_a_lower_case_identifier_is_rejected(step: str) -> None:
    with pytest.raises(ValidationError) as caught:
        job_requested(step=step)

    assert caught.value.errors()[0]["loc"] == ("step",)


def test_the_step_defaults_to_summarise() -> None:
    event = JobRequested(job_id=uuid4(), email="ada@example.com", data={})

    assert event.step == "summarise"


# --- reading any event ------------------------------------------------------


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda event: type(event).__name__)
def test_the_any_event_adapter_picks_the_class_named_by_event_type(event: Event) -> None:
    parsed = any_event_adapter.validate_json(event.model_dump_json())

    assert type(parsed) is type(event)
    assert parsed == event


def test_the_any_event_adapter_rejects_an_unknown_event_type() -> None:
    body = as_dict(job_failed())
    body["event_type"] = "JobExploded"

    with pytest.raises(ValidationError) as caught:
        any_event_adapter.validate_python(body)

    assert caught.value.errors()[0]["type"] == "union_tag_invalid"


def test_the_any_event_adapter_rejects_a_body_without_event_type() -> None:
    body = as_dict(job_failed())
    del body["event_type"]

    with pytest.raises(ValidationError, match="event_type"):
        any_event_adapter.validate_python(body)


# --- describing errors ------------------------------------------------------


def test_describe_validation_error_names_the_model_and_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        job_requested(email="ada.lovelace.private")

    message = describe_validation_error(caught.value, "JobRequested")

    assert message.startswith("invalid JobRequested: email: ")
    assert "not a valid email address" in message


def test_describe_validation_error_does_not_include_the_input_value() -> None:
    secret_email = "ada.lovelace.private"
    secret_subject = "Diagnosis for Ada\nLovelace"
    with pytest.raises(ValidationError) as caught:
        job_requested(email=secret_email, subject=secret_subject)

    message = describe_validation_error(caught.value, "JobRequested")

    assert "email:" in message
    assert "subject:" in message
    assert "lovelace" not in message.lower()
    assert "Diagnosis" not in message


def test_describe_validation_error_is_one_line_joining_every_problem() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequested.model_validate({"email": "nope", "step": "BAD"})

    message = describe_validation_error(caught.value, "JobRequested")

    assert "\n" not in message
    for field in ("job_id", "email", "step", "data"):
        assert f"{field}: " in message
    assert message.count("; ") == 3


def test_describe_validation_error_drops_pydantics_value_error_prefix() -> None:
    with pytest.raises(ValidationError) as caught:
        job_requested(subject="a\nb")

    message = describe_validation_error(caught.value, "JobRequested")

    assert message == (
        "invalid JobRequested: subject: must be a single line without control characters "
        "(found U+000A LINE FEED)"
    )


def test_describe_validation_error_calls_a_problem_with_the_whole_body_body() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequested.model_validate_json(b"[1, 2]")

    assert describe_validation_error(caught.value, "JobRequested").startswith(
        "invalid JobRequested: body: "
    )

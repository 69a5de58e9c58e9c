"""The acknowledgement policy, decoding bodies, AMQP properties and the queue topology."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from uuid import uuid4

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from pipeline_shared.errors import (
    BrokerUnavailable,
    Deferred,
    HandlerFailure,
    PermanentFailure,
    TransientFailure,
)
from pipeline_shared.events import EVENT_TYPES, DataProcessed, JobRequested
from pipeline_shared.messaging import (
    ATTEMPTS_HEADER,
    DEFAULT_RETRY_DELAYS,
    Disposition,
    PoisonMessage,
    attempts_of,
    copy_message,
    decode_event,
    deferral_delay,
    event_message,
    settle,
)
from pipeline_shared.topology import (
    DELIVERY_LIMIT,
    MAILER,
    PROCESSOR,
    RETIRED_BINDINGS,
    STAGES,
    STATUS,
    format_delay,
    retry_queue_arguments,
)
from unit.fakes import data_processed, job_requested

DELAYS = (1.0, 5.0, 30.0)

# --- settle -----------------------------------------------------------------


def test_a_handler_that_returns_is_acked() -> None:
    assert settle(None, 1, DELAYS) is Disposition.ACK
    assert settle(None, 99, ()) is Disposition.ACK


@pytest.mark.parametrize(
    "failure",
    [PermanentFailure("bad data"), PoisonMessage("not JSON")],
    ids=["permanent", "poison"],
)
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_permanent_failure_or_poison_is_dead_lettered_at_once(
    failure: Exception, attempts: int
) -> None:
    assert settle(failure, attempts, DELAYS) is Disposition.DEAD_LETTER


RETRYABLE = [
    TransientFailure("provider said 503"),
    BrokerUnavailable("not connected"),
    RuntimeError("a bug in the handler"),
    KeyError("missing"),
]


@pytest.mark.parametrize("failure", RETRYABLE, ids=lambda failure: type(failure).__name__)
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_retryable_failure_is_retried_while_delays_remain(
    failure: Exception, attempts: int
) -> None:
    assert settle(failure, attempts, DELAYS) is Disposition.RETRY


@pytest.mark.parametrize("failure", RETRYABLE, ids=lambda failure: type(failure).__name__)
@pytest.mark.parametrize("attempts", [4, 5, 100])
def test_a_retryable_failure_is_dead_lettered_once_the_delays_are_used_up(
    failure: Exception, attempts: int
) -> None:
    assert settle(failure, attempts, DELAYS) is Disposition.DEAD_LETTER


@pytest.mark.parametrize("attempts", [1, len(DELAYS), len(DELAYS) + 1, 1000])
def test_a_deferred_message_is_deferred_however_many_attempts_it_has_made(attempts: int) -> None:
    assert settle(Deferred("busy"), attempts, DELAYS) is Disposition.DEFER


def test_with_no_retry_delays_a_deferred_message_is_dead_lettered_like_a_transient_one() -> None:
    assert settle(Deferred("busy"), 1, ()) is Disposition.DEAD_LETTER


def test_with_no_retry_delays_a_transient_failure_is_dead_lettered_at_once() -> None:
    assert settle(TransientFailure("503"), 1, ()) is Disposition.DEAD_LETTER


def test_the_default_policy_tries_a_message_once_per_delay_plus_the_first_time() -> None:
    outcomes = [
        settle(TransientFailure("503"), attempt, DEFAULT_RETRY_DELAYS)
        for attempt in range(1, len(DEFAULT_RETRY_DELAYS) + 2)
    ]

    assert outcomes == [Disposition.RETRY] * len(DEFAULT_RETRY_DELAYS) + [Disposition.DEAD_LETTER]


def test_a_handler_failure_keeps_its_reason() -> None:
    failure: HandlerFailure = TransientFailure("provider said 503")

    assert failure.reason == "provider said 503"
    assert str(failure) == "provider said 503"


# --- decode_event -----------------------------------------------------------


def test_a_valid_body_decodes_to_the_event() -> None:
    event = job_requested()

    assert decode_event(event.model_dump_json().encode(), JobRequested, 1024 * 1024) == event


def test_a_body_exactly_at_the_size_limit_is_decoded() -> None:
    body = job_requested().model_dump_json().encode()

    assert decode_event(body, JobRequested, len(body)).email == "ada@example.com"


def test_a_body_over_the_size_limit_is_poison_mentioning_the_limit() -> None:
    body = job_requested().model_dump_json().encode()

    with pytest.raises(PoisonMessage) as caught:
        decode_event(body, JobRequested, len(body) - 1)

    assert str(caught.value) == (
        f"body of {len(body)} bytes exceeds the limit of {len(body) - 1} bytes"
    )


@pytest.mark.parametrize("body", [b"not json at all", b"{", b"\xff\xfe\x00", b""])
def test_a_body_that_is_not_json_is_poison(body: bytes) -> None:
    with pytest.raises(PoisonMessage, match=r"^invalid JobRequested: body: Invalid JSON"):
        decode_event(body, JobRequested, 1024)


def test_a_json_body_that_is_not_an_object_is_poison() -> None:
    with pytest.raises(PoisonMessage, match=r"^invalid JobRequested: body: "):
        decode_event(b"[1, 2, 3]", JobRequested, 1024)


def test_a_data_processed_body_read_as_job_requested_is_poison() -> None:
    body = data_processed().model_dump_json().encode()

    with pytest.raises(PoisonMessage, match=r"^invalid JobRequested: event_type: "):
        decode_event(body, JobRequested, 1024 * 1024)


def test_a_body_of_an_unknown_schema_version_is_poison_naming_the_version() -> None:
    body = job_requested().model_dump_json().replace('"schema_version":1', '"schema_version":7')

    with pytest.raises(PoisonMessage, match="unsupported schema_version 7"):
        decode_event(body.encode(), JobRequested, 1024 * 1024)


def test_a_poison_reason_does_not_include_the_personal_data_in_the_body() -> None:
    body = job_requested().model_dump_json().replace("ada@example.com", "ada.lovelace.at.home")

    with pytest.raises(PoisonMessage) as caught:
        decode_event(body.encode(), JobRequested, 1024 * 1024)

    assert "email:" in str(caught.value)
    assert "lovelace" not in str(caught.value)


def test_a_poison_message_keeps_the_validation_error_as_its_cause() -> None:
    with pytest.raises(PoisonMessage) as caught:
        decode_event(b"{}", DataProcessed, 1024)

    assert caught.value.__cause__ is not None
    assert type(caught.value.__cause__).__name__ == "ValidationError"


# --- event_message ----------------------------------------------------------


def test_the_amqp_message_carries_the_event_as_its_json_body() -> None:
    event = job_requested()

    message = event_message(event, "api-service")

    assert JobRequested.model_validate_json(message.body) == event


def test_the_amqp_message_properties_describe_the_event() -> None:
    event = data_processed(occurred_at=datetime(2024, 6, 1, 10, 30, tzinfo=UTC))

    message = event_message(event, "processor-service")

    assert message.message_id == str(event.event_id)
    assert message.correlation_id == str(event.job_id)
    assert message.type == "DataProcessed"
    assert message.app_id == "processor-service"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp == datetime(2024, 6, 1, 10, 30, tzinfo=UTC)


# --- attempts_of and copy_message -------------------------------------------


@dataclass
class FakeIncoming:
    """The attributes of an incoming message that attempts_of and copy_message read."""

    body: bytes = b'{"hello": "world"}'
    headers: dict[str, Any] | None = None
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    priority: int | None = None
    correlation_id: str | None = field(default_factory=lambda: str(uuid4()))
    reply_to: str | None = None
    message_id: str | None = field(default_factory=lambda: str(uuid4()))
    timestamp: datetime | None = datetime(2024, 6, 1, 10, 30, tzinfo=UTC)
    type: str | None = "JobRequested"
    app_id: str | None = "api-service"
    delivery_mode: int = 1


def incoming(**fields: Any) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage, FakeIncoming(**fields))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, 1),
        ({}, 1),
        ({ATTEMPTS_HEADER: 1}, 1),
        ({ATTEMPTS_HEADER: 4}, 4),
        ({ATTEMPTS_HEADER: 0}, 1),
        ({ATTEMPTS_HEADER: -3}, 1),
        ({ATTEMPTS_HEADER: "4"}, 1),
        ({"x-other": 9}, 1),
    ],
)
def test_attempts_are_read_from_the_header_and_default_to_the_first(
    headers: dict[str, Any] | None, expected: int
) -> None:
    assert attempts_of(incoming(headers=headers)) == expected


def test_a_copied_message_keeps_the_body_and_properties_and_adds_headers() -> None:
    original = FakeIncoming(headers={"x-trace": "abc", ATTEMPTS_HEADER: 1})

    copy = copy_message(cast(AbstractIncomingMessage, original), {ATTEMPTS_HEADER: 2, "x-new": "y"})

    assert copy.body == original.body
    assert copy.headers == {"x-trace": "abc", ATTEMPTS_HEADER: 2, "x-new": "y"}
    assert copy.message_id == original.message_id
    assert copy.correlation_id == original.correlation_id
    assert copy.type == original.type
    assert copy.app_id == original.app_id
    assert copy.content_type == original.content_type
    assert copy.timestamp == original.timestamp
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


def test_copying_a_message_without_headers_gives_just_the_new_headers() -> None:
    copy = copy_message(incoming(headers=None), {ATTEMPTS_HEADER: 2})

    assert copy.headers == {ATTEMPTS_HEADER: 2}


# --- topology ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "label"),
    [(5, "5s"), (1, "1s"), (600, "600s"), (0.25, "250ms"), (1.5, "1500ms"), (2.0, "2s")],
)
def test_a_delay_is_formatted_in_whole_seconds_or_milliseconds(seconds: float, label: str) -> None:
    assert format_delay(seconds) == label


def test_retry_queue_names_are_distinct_for_every_delay() -> None:
    delays = (*DEFAULT_RETRY_DELAYS, 0.25, 0.5, 1.5)

    names = [PROCESSOR.retry_queue(delay) for delay in delays]

    assert len(set(names)) == len(delays)
    assert PROCESSOR.retry_queue(5) == "processor.job.requested.retry.5s"
    assert PROCESSOR.retry_queue(0.25) == "processor.job.requested.retry.250ms"


def test_retry_queues_of_different_stages_do_not_collide() -> None:
    assert PROCESSOR.retry_queue(5) != MAILER.retry_queue(5)


def test_a_retry_queue_dead_letters_back_to_the_work_queue_after_its_delay() -> None:
    arguments = retry_queue_arguments(MAILER, 30)

    assert arguments["x-message-ttl"] == 30_000
    assert arguments["x-dead-letter-exchange"] == ""
    assert arguments["x-dead-letter-routing-key"] == "mailer.data.processed"
    assert arguments["x-queue-type"] == "quorum"


def test_a_fractional_delay_becomes_a_ttl_in_whole_milliseconds() -> None:
    assert retry_queue_arguments(PROCESSOR, 0.25)["x-message-ttl"] == 250


def test_a_work_queue_dead_letters_to_its_own_dlq_after_the_delivery_limit() -> None:
    arguments = PROCESSOR.queue_arguments()

    assert PROCESSOR.dead_letter_queue == "processor.job.requested.dlq"
    assert arguments["x-dead-letter-exchange"] == ""
    assert arguments["x-dead-letter-routing-key"] == PROCESSOR.dead_letter_queue
    assert arguments["x-delivery-limit"] == DELIVERY_LIMIT
    assert arguments["x-queue-type"] == "quorum"


def test_each_stage_is_bound_to_the_routing_key_of_the_event_it_consumes() -> None:
    assert STAGES == {"processor": PROCESSOR, "mailer": MAILER, "status": STATUS}
    assert PROCESSOR.routing_keys == (JobRequested.routing_key,)
    assert MAILER.routing_keys == (DataProcessed.routing_key,)
    # The read model follows every event but the one the api publishes (and records) itself.
    assert set(STATUS.routing_keys) == {e.routing_key for e in EVENT_TYPES} - {
        JobRequested.routing_key
    }
    assert ((STATUS.queue, JobRequested.routing_key),) == RETIRED_BINDINGS


@pytest.mark.parametrize(
    ("wait", "delay"),
    [(0.0, 1), (0.5, 1), (1.0, 1), (4.9, 1), (5.0, 5), (59.0, 30), (10_000.0, 600)],
)
def test_a_deferral_takes_the_longest_retry_delay_within_its_known_wait(
    wait: float, delay: float
) -> None:
    assert deferral_delay(wait, (1, 5, 30, 120, 600)) == delay


def test_a_deferral_with_no_delay_short_enough_takes_the_shortest() -> None:
    assert deferral_delay(0.5, (30, 2, 600)) == 2

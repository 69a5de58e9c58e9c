"""The job read model: a job's record derived from its events, whatever their order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api_service.read_model import JobEvent, JobRecord, apply
from pipeline_shared.events import DataProcessed, EmailSent, JobFailed, JobRequested

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
JOB = UUID("6a0e9f3c-5b1d-4c8e-9f27-d4b3a1e0c5f8")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def requested(second: float, **overrides: Any) -> JobRequested:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "occurred_at": at(second),
        "email": "ada@example.com",
        "subject": "Your report",
        "data": {"score": 7},
        "submitted_by": "key-0123456789abcdef",
    }
    return JobRequested(**{**fields, **overrides})


def processed(second: float, **overrides: Any) -> DataProcessed:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "occurred_at": at(second),
        "email": "ada@example.com",
        "step": "summarise",
        "data": {"score": 7},
        "result": {"field_count": 1},
    }
    return DataProcessed(**{**fields, **overrides})


def sent(second: float, **overrides: Any) -> EmailSent:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "occurred_at": at(second),
        "email": "ada@example.com",
        "transport": "mailtrap",
        "provider_message_id": "msg-1",
        "attempts": 1,
    }
    return EmailSent(**{**fields, **overrides})


def failed(second: float, **overrides: Any) -> JobFailed:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "occurred_at": at(second),
        "stage": "mailer-service",
        "reason": "the provider refused the message",
        "error_type": "PermanentFailure",
        "attempts": 2,
    }
    return JobFailed(**{**fields, **overrides})


def fold(events: Iterable[JobEvent]) -> JobRecord:
    record: JobRecord | None = None
    for event in events:
        record = apply(record, event)
    assert record is not None
    return record


# --- the happy path ----------------------------------------------------------


def test_a_requested_job_is_queued_and_created_when_it_was_requested() -> None:
    record = fold([requested(0)])

    assert record.job_id == str(JOB)
    assert record.status == "queued"
    assert record.created_at == record.updated_at == at(0)
    assert record.error is None
    assert record.attempts == 0
    assert record.provider_message_id is None


def test_a_job_moves_from_queued_to_processed_to_sent() -> None:
    queued = fold([requested(0)])
    after_processing = apply(queued, processed(1))
    after_sending = apply(after_processing, sent(2, attempts=3, provider_message_id="msg-42"))

    assert [queued.status, after_processing.status, after_sending.status] == [
        "queued",
        "processed",
        "sent",
    ]
    assert after_sending.created_at == at(0)
    assert after_sending.updated_at == at(2)
    assert after_sending.attempts == 3
    assert after_sending.provider_message_id == "msg-42"
    assert [entry.event for entry in after_sending.timeline] == [
        "JobRequested",
        "DataProcessed",
        "EmailSent",
    ]


def test_apply_leaves_the_record_it_was_given_unchanged() -> None:
    queued = fold([requested(0)])

    apply(queued, processed(1))

    assert queued.status == "queued"
    assert len(queued.timeline) == 1


# --- order and duplicates -----------------------------------------------------


def test_an_email_sent_arriving_before_the_request_still_ends_sent_created_at_the_request() -> None:
    record = fold([sent(2), requested(0)])

    assert record.status == "sent"
    assert record.created_at == at(0)
    assert record.updated_at == at(2)


def test_data_processed_arriving_before_the_request_ends_processed_created_at_the_request() -> None:
    record = fold([processed(1), requested(0)])

    assert record.status == "processed"
    assert record.created_at == at(0)


def test_without_a_request_the_job_is_created_at_its_earliest_event() -> None:
    record = fold([processed(5), failed(3)])

    assert record.created_at == at(3)
    assert record.status == "processed"


def test_a_duplicate_event_changes_nothing() -> None:
    first = requested(0)
    once = fold([first, processed(1)])

    again = apply(once, first)

    assert again == once
    assert len(again.timeline) == 2


def test_a_different_event_at_the_same_instant_is_not_taken_for_a_duplicate() -> None:
    once = fold([requested(0), processed(1)])

    with_another = apply(once, failed(1))

    assert len(with_another.timeline) == 3


def test_the_same_event_delivered_again_later_is_ignored_even_after_other_events() -> None:
    failure = failed(1, reason="boom")
    record = fold([requested(0), failure, processed(2), failure])

    assert [entry.event for entry in record.timeline] == [
        "JobRequested",
        "JobFailed",
        "DataProcessed",
    ]
    assert record.status == "processed"


def test_the_timeline_is_sorted_by_when_events_occurred_not_by_arrival() -> None:
    record = fold([sent(3), requested(0), failed(2), processed(1)])

    assert [entry.at for entry in record.timeline] == [at(0), at(1), at(2), at(3)]
    assert [entry.event for entry in record.timeline] == [
        "JobRequested",
        "DataProcessed",
        "JobFailed",
        "EmailSent",
    ]


def test_the_timeline_keeps_one_entry_per_event_with_its_id() -> None:
    events: list[JobEvent] = [requested(0), processed(1), sent(2)]

    record = fold(events)

    assert [entry.event_id for entry in record.timeline] == [str(e.event_id) for e in events]


# --- re-published events: one entry per fact ----------------------------------


def events_of(record: JobRecord) -> list[str]:
    return [entry.event for entry in record.timeline]


def test_an_email_sent_re_published_with_a_new_event_id_adds_no_second_entry() -> None:
    first = sent(2, attempts=1, provider_message_id="msg-1")
    # The mailer meets the job again (DataProcessed redelivered) and re-publishes.
    again = sent(9, attempts=3, provider_message_id="msg-1")

    record = fold([requested(0), processed(1), first, again])

    assert events_of(record) == ["JobRequested", "DataProcessed", "EmailSent"]
    assert record.timeline[-1].event_id == str(first.event_id)
    assert (record.status, record.attempts, record.updated_at) == ("sent", 1, at(2))


def test_a_re_published_email_sent_that_arrives_first_gives_way_to_the_earlier_one() -> None:
    request, processing = requested(0), processed(1)
    first = sent(2, attempts=1, provider_message_id="msg-first")
    again = sent(9, attempts=3, provider_message_id="msg-again")

    record = fold([again, request, processing, first])

    assert record == fold([request, processing, first])
    assert record.provider_message_id == "msg-first"


def test_data_processed_published_twice_by_a_killed_processor_is_one_entry() -> None:
    first, again = processed(1), processed(4)

    record = fold([requested(0), again, first])

    assert events_of(record) == ["JobRequested", "DataProcessed"]
    assert record.timeline[-1].event_id == str(first.event_id)
    assert (record.status, record.updated_at) == ("processed", at(1))


def test_a_re_published_event_at_the_same_instant_keeps_one_entry_whatever_the_order() -> None:
    one = sent(2, event_id=UUID(int=1), provider_message_id="msg-a")
    two = sent(2, event_id=UUID(int=2), provider_message_id="msg-b")

    request = requested(0)

    one_way = fold([request, one, two])
    other_way = fold([two, request, one, two])

    assert one_way == other_way
    assert events_of(one_way) == ["JobRequested", "EmailSent"]
    assert one_way.provider_message_id == "msg-a"


def test_a_job_failed_replayed_processed_and_failed_again_shows_the_latest_failure() -> None:
    record = fold(
        [
            failed(5, reason="mailer refused it", attempts=1),
            requested(0),
            processed(3),
            failed(1, reason="step raised", attempts=6),
        ]
    )

    assert events_of(record) == ["JobRequested", "DataProcessed", "JobFailed"]
    assert (record.status, record.error, record.attempts) == ("failed", "mailer refused it", 1)


def test_a_failure_published_twice_is_one_entry() -> None:
    record = fold([requested(0), failed(1, reason="boom"), failed(2, reason="boom")])

    assert events_of(record) == ["JobRequested", "JobFailed"]
    assert (record.status, record.error, record.updated_at) == ("failed", "boom", at(2))


def test_a_re_publication_that_changes_no_fact_returns_the_very_same_record() -> None:
    record = fold([requested(0), processed(1), sent(2)])

    assert apply(record, sent(7)) is record
    assert apply(record, processed(5)) is record


# --- failure and replay --------------------------------------------------------


def test_a_failed_job_reports_the_failure_reason() -> None:
    record = fold([requested(0), failed(1, reason="unknown processing step 'nope'")])

    assert record.status == "failed"
    assert record.error == "unknown processing step 'nope'"


def test_a_failed_job_that_is_replayed_and_processed_again_is_processed_without_error() -> None:
    record = fold([requested(0), failed(1), processed(2)])

    assert record.status == "processed"
    assert record.error is None


def test_a_replayed_job_whose_processing_arrives_before_the_old_failure_is_still_processed() -> (
    None
):
    record = fold([requested(0), processed(2), failed(1)])

    assert record.status == "processed"
    assert record.error is None


def test_a_failure_after_the_email_was_sent_leaves_the_job_sent() -> None:
    record = fold([requested(0), processed(1), sent(2), failed(3)])

    assert record.status == "sent"
    assert record.error is None


def test_the_error_is_the_reason_of_the_latest_failure_by_occurrence() -> None:
    record = fold(
        [
            requested(0),
            failed(3, reason="second failure"),
            failed(1, reason="first failure"),
        ]
    )

    assert record.status == "failed"
    assert record.error == "second failure"


# --- derived fields -----------------------------------------------------------


def test_attempts_is_zero_without_a_send_or_a_failure() -> None:
    assert fold([requested(0), processed(1)]).attempts == 0


def test_attempts_is_the_highest_attempt_count_of_sends_and_failures() -> None:
    record = fold([requested(0), failed(1, attempts=4), processed(2), sent(3, attempts=2)])

    assert record.attempts == 4


def test_attempts_counts_a_send_without_a_failure() -> None:
    assert fold([requested(0), sent(1, attempts=5)]).attempts == 5


def test_an_event_without_an_attempt_count_counts_as_none() -> None:
    record = fold([requested(0), failed(1, attempts=None), sent(2, attempts=None)])

    assert record.attempts == 0


def test_the_provider_message_id_comes_from_the_email_sent_event() -> None:
    record = fold([requested(0), processed(1), sent(2, provider_message_id="<id@mailtrap>")])

    assert record.provider_message_id == "<id@mailtrap>"


def test_the_caller_is_taken_from_the_request() -> None:
    assert fold([requested(0, submitted_by="key-aaaa")]).caller == "key-aaaa"


def test_the_caller_is_taken_from_a_request_that_arrives_after_other_events() -> None:
    first = fold([processed(1), sent(2)])
    assert first.caller is None

    record = apply(first, requested(0, submitted_by="key-late"))

    assert record.caller == "key-late"


@pytest.mark.parametrize("first", ["processed", "sent", "failed"])
def test_a_job_whose_request_was_never_recorded_is_its_callers_from_its_next_event(
    first: str,
) -> None:
    # The api records the jobs it accepts itself; if it stopped before writing
    # one, the job's later events (which carry the caller on) make it the caller's.
    record = fold([_KINDS[first](1, submitted_by="key-bbbb")])

    assert record.caller == "key-bbbb"


@pytest.mark.parametrize("other", ["key-0000", "key-zzzz"])
def test_a_later_event_naming_another_caller_never_takes_the_job_over(other: str) -> None:
    request = requested(0, submitted_by="key-mmmm")
    other_event = processed(1, submitted_by=other)

    assert fold([request, other_event]).caller == "key-mmmm"
    assert fold([other_event, request]).caller == "key-mmmm"


def test_the_trace_id_is_the_first_one_an_event_came_with() -> None:
    untraced = fold([processed(1)])
    assert untraced.trace_id is None

    email_sent = sent(2)
    record = apply(untraced, requested(0), "a" * 32)
    later = apply(apply(record, email_sent, "b" * 32), processed(1))

    assert record.trace_id == later.trace_id == "a" * 32
    assert apply(later, email_sent, "c" * 32) is later  # a known trace adds nothing


def test_a_job_requested_without_a_caller_has_none() -> None:
    assert fold([requested(0, submitted_by=None), processed(1)]).caller is None


# --- any order, any number of times -------------------------------------------

_KINDS: dict[str, Callable[..., JobEvent]] = {
    "requested": requested,
    "processed": processed,
    "sent": sent,
    "failed": failed,
}


_KEPT_AT_LATEST = {"JobFailed"}


def expected_facts(events: Iterable[JobEvent]) -> dict[str, JobEvent]:
    """Per event type, the event the timeline should keep: the earliest, but the
    latest JobFailed (ties in time broken by event id)."""
    kept: dict[str, JobEvent] = {}
    for event in sorted(events, key=lambda e: (e.occurred_at, str(e.event_id))):
        if event.event_type in _KEPT_AT_LATEST or event.event_type not in kept:
            kept[event.event_type] = event
    return kept


@st.composite
def job_histories(draw: st.DrawFn) -> tuple[list[JobEvent], list[JobEvent]]:
    """A job's events, some of them re-published (a copy with a new event id,
    at the same instant or later), and a delivery of them: any order, each at
    least once."""
    kinds = draw(st.lists(st.sampled_from(sorted(_KINDS)), min_size=1, max_size=7))
    seconds = draw(
        st.lists(
            st.integers(min_value=0, max_value=10_000),
            min_size=len(kinds),
            max_size=len(kinds),
            unique=True,
        )
    )
    events: list[JobEvent] = []
    for index, (kind, second) in enumerate(zip(kinds, seconds, strict=True)):
        extra: dict[str, Any] = {}
        if kind in ("sent", "failed"):
            extra["attempts"] = draw(st.none() | st.integers(min_value=1, max_value=9))
        if kind == "failed":
            extra["reason"] = f"failure {index}"
        if kind == "sent":
            extra["provider_message_id"] = f"msg-{index}"
        # Every event may name the job's caller (older producers: the request only),
        # and a later stage might name another, which must never win over the request.
        if kind == "requested":
            extra["submitted_by"] = "key-caller"
        else:
            extra["submitted_by"] = draw(st.sampled_from([None, "key-caller", "key-another"]))
        events.append(_KINDS[kind](second, **extra))
    originals = draw(st.lists(st.sampled_from(events), max_size=4))
    for original in originals:
        later = timedelta(seconds=draw(st.integers(min_value=0, max_value=10_000)))
        attempts = draw(st.none() | st.integers(min_value=1, max_value=9))
        update: dict[str, Any] = {"event_id": uuid4(), "occurred_at": original.occurred_at + later}
        if isinstance(original, (EmailSent, JobFailed)):
            update["attempts"] = attempts
        events.append(original.model_copy(update=update))
    duplicates = draw(st.lists(st.sampled_from(events), max_size=5))
    delivery = draw(st.permutations([*events, *duplicates]))
    return events, delivery


@settings(database=None, deadline=None, max_examples=300)
@given(job_histories())
def test_any_order_repetition_and_re_publication_of_the_same_events_gives_the_same_record(
    history: tuple[list[JobEvent], list[JobEvent]],
) -> None:
    events, delivery = history
    in_order = fold(sorted(events, key=lambda e: e.occurred_at))

    record = fold(delivery)

    assert record == in_order
    assert fold(reversed(delivery)) == record
    kinds = [entry.event for entry in record.timeline]
    assert len(kinds) == len(set(kinds)), "an event type appears twice in the timeline"
    assert set(kinds) == {e.event_type for e in events}
    kept = expected_facts(events)
    assert {entry.event_id for entry in record.timeline} == {str(e.event_id) for e in kept.values()}
    # The timeline is its facts; without a request, the caller may come from an
    # event that left none.
    assert record.timeline == fold(kept.values()).timeline


@settings(database=None, deadline=None, max_examples=300)
@given(job_histories())
def test_the_status_follows_the_rules_whatever_the_order(
    history: tuple[list[JobEvent], list[JobEvent]],
) -> None:
    events, delivery = history
    record = fold(delivery)
    kept = expected_facts(events)

    if "EmailSent" in kept:
        expected = "sent"
    else:
        latest = max(kept.values(), key=lambda e: (e.occurred_at, str(e.event_id)))
        expected = {
            "JobRequested": "queued",
            "DataProcessed": "processed",
            "JobFailed": "failed",
        }[latest.event_type]
    assert record.status == expected
    failure = kept.get("JobFailed")
    assert record.error == (
        failure.reason if expected == "failed" and isinstance(failure, JobFailed) else None
    )
    first_sent = kept.get("EmailSent")
    assert record.provider_message_id == (
        first_sent.provider_message_id if isinstance(first_sent, EmailSent) else None
    )
    counts = [getattr(e, "attempts", None) or 0 for e in kept.values()]
    assert record.attempts == max(counts)
    assert [e.at for e in record.timeline] == sorted(e.at for e in record.timeline)
    requests = [e for e in events if isinstance(e, JobRequested)]
    others = {e.submitted_by for e in events if e.submitted_by is not None}
    assert record.caller == ("key-caller" if requests else min(others, default=None))
    if requests:
        assert record.created_at == min(e.occurred_at for e in requests)
    assert record.updated_at == max(e.occurred_at for e in kept.values())


def test_events_that_occurred_at_the_same_instant_give_the_same_record_in_any_order() -> None:
    request, failure = requested(0), failed(0)

    one_way = fold([request, failure])
    other_way = fold([failure, request])

    assert one_way.status == other_way.status
    assert one_way == other_way


def test_a_new_job_id_starts_a_new_record() -> None:
    other = uuid4()

    record = apply(None, processed(0, job_id=other))

    assert record.job_id == str(other)
    assert record.caller is None
    assert record.status == "processed"

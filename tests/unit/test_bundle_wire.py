"""A bundle's layout: joined and cut back exactly, or refused as poison."""

from __future__ import annotations

import uuid

import aio_pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import PoisonMessage, bundle, copy_message
from pipeline_shared.settings import MAX_BUNDLE_EVENTS

bodies = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=20)


@given(bodies)
def test_a_joined_bundle_splits_back_into_exactly_its_events(items: list[bytes]) -> None:
    body = bundle.join(items)
    assert bundle.split(body, [len(item) for item in items]) == items


@given(bodies, st.data())
def test_a_changed_body_or_lengths_is_refused_or_cut_consistently(
    items: list[bytes], data: st.DataObject
) -> None:
    body = bytearray(bundle.join(items))
    lengths = [len(item) for item in items]
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    else:
        at = data.draw(st.integers(0, len(lengths) - 1))
        lengths[at] = max(1, lengths[at] + data.draw(st.integers(-3, 3)))
    try:
        cut = bundle.split(bytes(body), lengths)
    except PoisonMessage:
        return
    # Whatever is accepted is exactly what the body holds, in the lengths given.
    assert bundle.join(cut) == bytes(body)
    assert [len(item) for item in cut] == lengths


@pytest.mark.parametrize(
    "value",
    ["3", [], [0], [-1], [1.0], [True], [1, "2"], list(range(1, MAX_BUNDLE_EVENTS + 2)), {"a": 1}],
    ids=["text", "empty", "zero", "negative", "float", "bool", "mixed", "too-many", "table"],
)
def test_lengths_that_are_not_a_list_of_positive_integers_are_poison(value: object) -> None:
    with pytest.raises(PoisonMessage, match="x-bundle-lengths"):
        bundle.lengths_of({bundle.LENGTHS_HEADER: value})  # type: ignore[dict-item]


def test_a_message_without_lengths_is_not_a_bundle() -> None:
    assert bundle.lengths_of(None) is None
    assert bundle.lengths_of({"x-attempts": 2}) is None


def test_traces_that_do_not_match_the_events_are_ignored() -> None:
    trace = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    assert bundle.traces_of({bundle.TRACES_HEADER: [trace, {}]}, 2) == [trace, {}]
    assert bundle.traces_of({bundle.TRACES_HEADER: [trace]}, 2) == [{}, {}]
    assert bundle.traces_of({bundle.TRACES_HEADER: ["x", trace]}, 2) == [{}, trace]
    assert bundle.traces_of(None, 1) == [{}]


def job() -> JobRequested:
    return JobRequested.model_validate(
        {"job_id": uuid.uuid4(), "email": "ada@example.com", "data": {"n": 1}}
    )


def test_an_event_taken_out_of_a_bundle_is_the_message_it_would_have_been_alone() -> None:
    event = job()
    body = event.model_dump_json().encode()
    trace = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    carrier = bundle.bundle_message([body, body], [trace, {}], "JobRequested", "api-service")
    carrier.headers = {**(carrier.headers or {}), "x-attempts": 3}

    alone = bundle.item_message(carrier, body, event, trace)

    assert alone.body == body
    assert alone.message_id == str(event.event_id)
    assert alone.correlation_id == str(event.job_id)
    assert alone.type == "JobRequested"
    assert alone.app_id == "api-service"
    assert alone.headers == {"x-attempts": 3, **trace}
    # Sent again (a retry, a dead letter), it is a persistent message like any.
    copy = copy_message(alone, {"x-attempts": 4})
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert copy.message_id == str(event.event_id)
    assert copy.headers == {"x-attempts": 4, **trace}


@pytest.mark.parametrize(
    ("body", "job_id"),
    [
        (b'{"job_id": "%s"}', True),
        (b'{"job_id": 12}', False),
        (b"[1]", False),
        (b"not json", False),
        (b"[" * 10000, False),
    ],
)
def test_an_unreadable_event_still_names_its_job_when_it_can(body: bytes, job_id: bool) -> None:
    known = uuid.uuid4()
    if b"%s" in body:
        body = body % str(known).encode()
    carrier = bundle.bundle_message([body], [{}], "JobRequested", "api-service")
    alone = bundle.item_message(carrier, body, None, {})
    assert alone.correlation_id == (str(known) if job_id else None)
    assert alone.message_id is None


def test_decode_all_reads_a_lone_event_and_a_bundle_alike() -> None:
    events = [job(), job()]
    bodies = [event.model_dump_json().encode() for event in events]
    carrier = bundle.bundle_message(bodies, [{}, {}], "JobRequested", "api-service")

    assert bundle.decode_all(carrier.body, carrier.headers, JobRequested, 1 << 20) == events
    assert bundle.decode_all(bodies[0], None, JobRequested, 1 << 20) == events[:1]
    with pytest.raises(PoisonMessage):
        bundle.decode_all(carrier.body[:-1], carrier.headers, JobRequested, 1 << 20)


def test_an_events_trace_entry_sets_its_trace_context_and_nothing_else() -> None:
    event = job()
    body = event.model_dump_json().encode()
    carrier = bundle.bundle_message([body, body], [{}, {}], "JobRequested", "api-service")
    hostile = {
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "tracestate": 7,
        bundle.LENGTHS_HEADER: [1],
        "x-attempts": 99,
    }

    alone = bundle.item_message(carrier, body, event, hostile)  # type: ignore[arg-type]

    assert alone.headers == {"traceparent": hostile["traceparent"]}


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b'[{"a": 1}, {"b": [2]}]', 2),
        (b"[]", 0),
        (b'[{"a": 1}, 2]', 0),
        (b'{"a": 1}', 0),
        (b"[not json", 0),
        (b"[" + b",".join([b"{}"] * (MAX_BUNDLE_EVENTS + 1)) + b"]", 0),
    ],
    ids=["objects", "empty", "not-all-objects", "not-a-list", "not-json", "too-many"],
)
def test_salvage_recovers_the_objects_of_a_readable_array_and_nothing_else(
    body: bytes, count: int
) -> None:
    salvaged = bundle.salvage(body, 1 << 20)
    assert len(salvaged) == count
    if count:
        assert bundle.join(salvaged).replace(b" ", b"") == body.replace(b" ", b"")


def test_salvage_does_not_parse_a_body_over_the_limit() -> None:
    assert bundle.salvage(b'[{"a": 1}]', 5) == []

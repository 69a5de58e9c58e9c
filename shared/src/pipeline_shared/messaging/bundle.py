"""Bundles: several events of one type in one AMQP message.

Every message costs the broker and both clients about the same whatever it
carries, and a job is three hops, so events published together travel
together. A bundle's body is the JSON array of its events, each exactly as it
would be sent alone, so the management UI shows a readable body; its header
``x-bundle-lengths`` lists each event's length in bytes, which lets a consumer
cut the body back into the events without parsing it twice and judge each on
its own: one unreadable event is dead-lettered by itself, the others are
handled. ``x-bundle-traces`` carries each event's trace context (a table per
event, empty where there is none). A message without ``x-bundle-lengths`` is a
single event, as every message was before bundles.

Retry and dead-letter copies of a bundled event are single-event messages,
with the properties the event would have had alone, so the dead-letter queues
hold one job per message whatever way it came.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import aio_pika
import pydantic_core
from aio_pika.abc import FieldValue, HeadersType
from pydantic import TypeAdapter

from pipeline_shared import tracing
from pipeline_shared.events import Event
from pipeline_shared.messaging.wire import E, MessageLike, MessageView, PoisonMessage, decode_event
from pipeline_shared.settings import MAX_BUNDLE_EVENTS

LENGTHS_HEADER = "x-bundle-lengths"
TRACES_HEADER = "x-bundle-traces"
# Headers of a bundle that describe the bundle, not any one event in it.
_BUNDLE_HEADERS = frozenset({LENGTHS_HEADER, TRACES_HEADER, "x-delivery-count"})


def join(bodies: Sequence[bytes]) -> bytes:
    """The body of a bundle of the events encoded as ``bodies``."""
    return b"[" + b",".join(bodies) + b"]"


def lengths_of(headers: HeadersType | None) -> list[int] | None:
    """The event lengths a message's headers list, None if the message is not a bundle,
    or ``PoisonMessage`` if the list is not one of positive integers."""
    value = (headers or {}).get(LENGTHS_HEADER)
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or not 0 < len(value) <= MAX_BUNDLE_EVENTS
        or not all(type(length) is int and length > 0 for length in value)
    ):
        raise PoisonMessage(
            f"header {LENGTHS_HEADER} is not a list of 1 to {MAX_BUNDLE_EVENTS} positive lengths"
        )
    return list(value)  # type: ignore[arg-type]  # checked above


def split(body: bytes, lengths: Sequence[int]) -> list[bytes]:
    """The events' bodies a bundle's body holds, or ``PoisonMessage`` if the body is not
    exactly ``[`` + the events, ``lengths`` long and separated by commas, + ``]``."""
    expected = sum(lengths) + len(lengths) + 1
    if len(body) != expected:
        raise PoisonMessage(
            f"bundle body of {len(body)} bytes does not match its {LENGTHS_HEADER} "
            f"({len(lengths)} events, {expected} bytes)"
        )
    if body[:1] != b"[" or body[-1:] != b"]":
        raise PoisonMessage("bundle body is not a JSON array")
    bodies = []
    start = 1
    for length in lengths:
        end = start + length
        bodies.append(body[start:end])
        if body[end : end + 1] != (b"," if end < len(body) - 1 else b"]"):
            raise PoisonMessage(f"bundle body has no separator after its event at byte {start}")
        start = end + 1
    return bodies


def salvage(body: bytes, max_bytes: int) -> list[bytes]:
    """The events a bundle whose layout does not hold still readably carries, each as
    a body of its own (empty if the body is over ``max_bytes`` or not a JSON array of
    up to ``MAX_BUNDLE_EVENTS`` objects): so that each can fail with its job named."""
    if len(body) > max_bytes:
        return []
    try:
        parsed: Any = pydantic_core.from_json(body)
    except ValueError:
        return []
    if (
        not isinstance(parsed, list)
        or not 0 < len(parsed) <= MAX_BUNDLE_EVENTS
        or not all(isinstance(item, dict) for item in parsed)
    ):
        return []
    return [pydantic_core.to_json(item) for item in parsed]


def trace_bytes(trace: HeadersType) -> int:
    """About how many bytes ``trace`` adds to a bundle's ``x-bundle-traces``."""
    return sum(len(name) + len(str(value)) + 8 for name, value in trace.items()) + 8


def traces_of(headers: HeadersType | None, count: int) -> list[Mapping[str, FieldValue]]:
    """Each event's trace headers (empty where the bundle carries none)."""
    value = (headers or {}).get(TRACES_HEADER)
    if isinstance(value, list | tuple) and len(value) == count:
        return [entry if isinstance(entry, Mapping) else {} for entry in value]
    return [{} for _ in range(count)]


def bundle_message(
    bodies: Sequence[bytes],
    traces: Sequence[HeadersType],
    event_type: str,
    app_id: str,
) -> aio_pika.Message:
    """The AMQP message carrying the events encoded as ``bodies`` (of ``event_type``)."""
    headers: HeadersType = {LENGTHS_HEADER: [len(body) for body in bodies]}
    if any(traces):
        headers[TRACES_HEADER] = list(traces)
    return aio_pika.Message(
        body=join(bodies),
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(uuid.uuid4()),
        type=event_type,
        app_id=app_id,
        timestamp=datetime.now(UTC),
    )


def item_message(
    bundle: MessageLike,
    body: bytes,
    event: Event | None,
    trace: Mapping[str, FieldValue],
) -> MessageView:
    """One event of ``bundle`` as the message it would have been alone: its own id, job
    and trace, the bundle's other headers (``x-attempts``) and properties."""
    headers: HeadersType = {
        name: value for name, value in (bundle.headers or {}).items() if name not in _BUNDLE_HEADERS
    }
    # Only a trace context: nothing in the bundle's header may set another header.
    headers.update(
        (name, value) for name in tracing.HEADERS if isinstance(value := trace.get(name), str)
    )
    timestamp: datetime | None
    if event is not None:
        message_id: str | None = str(event.event_id)
        job_id: str | None = str(event.job_id)
        timestamp = event.occurred_at
    else:
        message_id, job_id, timestamp = None, _job_id_hint(body), bundle.timestamp
    return MessageView(
        body=body,
        headers=headers,
        content_type=bundle.content_type,
        content_encoding=bundle.content_encoding,
        priority=bundle.priority,
        correlation_id=job_id,
        reply_to=bundle.reply_to,
        message_id=message_id,
        timestamp=timestamp,
        type=bundle.type,
        app_id=bundle.app_id,
    )


def _job_id_hint(body: bytes) -> str | None:
    """The job an unreadable event names, if its body still says which."""
    try:
        parsed: Any = pydantic_core.from_json(body)
        return str(UUID(parsed["job_id"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def decode_all(
    body: bytes, headers: HeadersType | None, model: type[E] | TypeAdapter[E], max_bytes: int
) -> list[E]:
    """Every event a message carries, alone or bundled, for a reader outside a consumer
    (a test, a tool); ``PoisonMessage`` if any of them cannot be read."""
    lengths = lengths_of(headers)
    if lengths is None:
        return [decode_event(body, model, max_bytes)]
    return [decode_event(item, model, max_bytes) for item in split(body, lengths)]

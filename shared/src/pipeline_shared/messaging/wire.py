"""Events as AMQP messages: encoding, decoding and copying, and the headers the pipeline sets."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType
from pydantic import TypeAdapter, ValidationError

from pipeline_shared.contract import TRUSTED
from pipeline_shared.events import Event, describe_validation_error

ATTEMPTS_HEADER = "x-attempts"
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

E = TypeVar("E", bound=Event)


class PoisonMessage(Exception):
    """A body that cannot be an event for this queue: too big, not JSON, wrong schema."""


def decode_event(body: bytes, model: type[E] | TypeAdapter[E], max_bytes: int) -> E:
    """Parse ``body`` as ``model`` (an event class, or an adapter for a union of
    them), or raise ``PoisonMessage`` saying why not."""
    if len(body) > max_bytes:
        raise PoisonMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        # What the pipeline wrote was validated where it entered (the api).
        if isinstance(model, TypeAdapter):
            return model.validate_json(body, context=TRUSTED)
        return model.model_validate_json(body, context=TRUSTED)
    except ValidationError as exc:
        what = "event" if isinstance(model, TypeAdapter) else model.__name__
        raise PoisonMessage(describe_validation_error(exc, what)) from exc


def event_message(
    event: Event, app_id: str, headers: HeadersType | None = None, body: bytes | None = None
) -> aio_pika.Message:
    """The AMQP message for ``event`` (already encoded as ``body``, if given), with
    properties that read well in the management UI."""
    return aio_pika.Message(
        body=event.model_dump_json().encode() if body is None else body,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        correlation_id=str(event.job_id),
        type=event.event_type,
        app_id=app_id,
        timestamp=event.occurred_at,
    )


class MessageLike(Protocol):
    """What the consumer reads of a message it handles, copies or reports: an AMQP
    message, or one event of a bundle as the message it would have been alone."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> HeadersType: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class MessageView:
    """A message's properties without an AMQP message: cheap to make for each event
    of a bundle, made into one (``copy_message``) only when it is sent again."""

    body: bytes
    headers: HeadersType
    content_type: str | None
    content_encoding: str | None
    priority: int | None
    correlation_id: str | None
    reply_to: str | None
    message_id: str | None
    timestamp: datetime | None
    type: str | None
    app_id: str | None


def attempts_of(message: AbstractIncomingMessage) -> int:
    """Which attempt this delivery is (1 for the first), from ``x-attempts``."""
    value = (message.headers or {}).get(ATTEMPTS_HEADER, 1)
    return value if isinstance(value, int) and value >= 1 else 1


def copy_message(
    message: MessageLike, headers: HeadersType, *, without: Collection[str] = ()
) -> aio_pika.Message:
    """A persistent copy of ``message`` with the same body and properties, plus
    ``headers`` and less the headers named in ``without``."""
    # The queue's own count of this message's deliveries means nothing on a copy.
    dropped = {*without, "x-delivery-count"}
    kept = {k: v for k, v in (message.headers or {}).items() if k not in dropped}
    return aio_pika.Message(
        body=message.body,
        headers={**kept, **headers},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )

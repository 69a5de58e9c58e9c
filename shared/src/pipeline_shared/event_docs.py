"""The published event contract: an AsyncAPI 3 document and one JSON Schema per event.

Both are built here, as plain data, from the code the services run: the event
models (``events``), the topology (``topology``, as ``definitions`` renders it
for the broker) and the AMQP message the messaging layer makes of an event
(``messaging.event_message``). Nothing about the wire is restated by hand, so
the documents cannot drift from the code: ``scripts/render_event_docs.py``
writes them to ``docs/``, and a unit test fails when the committed files are
not what this module builds.

The AsyncAPI document has a channel per routing key on the ``events``
exchange (where producers publish) and one per stage's work queue (where
consumers read), an operation per publisher and event and per consumer, and
each event's payload schema under ``components.schemas``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic.json_schema import models_json_schema

from pipeline_shared.definitions import SERVICE_USERS, topology_definitions
from pipeline_shared.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    DataProcessed,
    EmailSent,
    Event,
    JobFailed,
    JobRequested,
)
from pipeline_shared.messaging import ATTEMPTS_HEADER, event_message
from pipeline_shared.messaging.bundle import LENGTHS_HEADER, TRACES_HEADER
from pipeline_shared.settings import MAX_BUNDLE_EVENTS
from pipeline_shared.topology import EXCHANGE, STAGES

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
"""The dialect pydantic writes; stated in each schema file so validators need not guess."""

_DESCRIPTION = f"""\
Events that travel between the email pipeline's services over RabbitMQ. A
message body is one event as a JSON object, or a bundle: a JSON array of
events of one type, each as it would be alone, with the header
`{LENGTHS_HEADER}` listing their lengths in bytes (every message that is an
`XBundle` below). Every event shares the envelope `event_id`, `event_type`,
`schema_version`, `job_id` and `occurred_at`.

Producers publish to the `{EXCHANGE}` exchange with the event's routing key;
each consuming stage reads its own work queue, bound to the routing keys it
needs.

`info.version` is the events' `schema_version`. Within a version only optional
fields are added, and consumers ignore fields they do not know; anything else
is a new version, which older consumers dead-letter rather than misread.

Generated from `pipeline_shared` by `make docs`; do not edit by hand.
"""


def event_name(event: type[Event]) -> str:
    """The event's name: its class name, which is also its ``event_type``."""
    return event.__name__


def event_json_schema(event: type[Event]) -> dict[str, Any]:
    """The JSON Schema (Draft 2020-12) of one event's message body."""
    return {"$schema": JSON_SCHEMA_DIALECT, **event.model_json_schema()}


def event_json_schemas(events: Sequence[type[Event]] = EVENT_TYPES) -> dict[str, dict[str, Any]]:
    """Each event's JSON Schema, by event name."""
    return {event_name(event): event_json_schema(event) for event in events}


def example_events() -> tuple[Event, ...]:
    """One job's journey, one event of each type, with fixed ids and times so
    that documents showing them render the same every time."""
    job_id = UUID("6f1c2e0a-3b4d-4c5e-8f90-a1b2c3d4e5f6")
    email = "ada@example.com"
    data = {"visits": [3, 5, 8], "signups": 4, "region": "EU"}
    at = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    return (
        JobRequested(
            event_id=UUID("0b6f0d6e-1a2b-4c3d-9e4f-5a6b7c8d9e01"),
            job_id=job_id,
            occurred_at=at,
            email=email,
            subject="Your weekly report",
            data=data,
            submitted_by="key-7d3a",
        ),
        DataProcessed(
            event_id=UUID("0b6f0d6e-1a2b-4c3d-9e4f-5a6b7c8d9e02"),
            job_id=job_id,
            occurred_at=at.replace(second=1),
            email=email,
            subject="Your weekly report",
            step="summarise",
            data=data,
            result={
                "field_count": 3,
                "numeric_fields": ["signups"],
                "numeric_summary": {"min": 4, "max": 4, "mean": 4.0},
                "list_lengths": {"visits": 3},
            },
            requested_at=at,
            submitted_by="key-7d3a",
        ),
        EmailSent(
            event_id=UUID("0b6f0d6e-1a2b-4c3d-9e4f-5a6b7c8d9e03"),
            job_id=job_id,
            occurred_at=at.replace(second=2),
            email=email,
            transport="mailtrap",
            provider_message_id="c0ffee00-0000-4000-8000-000000000001",
            attempts=1,
            submitted_by="key-7d3a",
        ),
        JobFailed(
            event_id=UUID("0b6f0d6e-1a2b-4c3d-9e4f-5a6b7c8d9e04"),
            job_id=job_id,
            occurred_at=at.replace(second=3),
            stage="processor-service",
            reason="step 'word_count' failed: the data has no field 'text'",
            error_type="PermanentFailure",
            attempts=1,
            submitted_by="key-7d3a",
        ),
    )


def build_asyncapi(events: Sequence[type[Event]] = EVENT_TYPES) -> dict[str, Any]:
    """The AsyncAPI 3 document of ``events`` over the pipeline's topology."""
    examples = {event_name(type(example)): example for example in example_events()}
    # The AMQP properties every event is published with, as the messaging layer sets them.
    sample = event_message(example_events()[0], app_id="event-docs")
    by_key = {event.routing_key: event for event in events}
    topology = topology_definitions()
    exchanges = {exchange["name"]: exchange for exchange in topology["exchanges"]}
    queues = {queue["name"]: queue for queue in topology["queues"]}
    bound_keys = {
        binding["routing_key"]
        for binding in topology["bindings"]
        if binding["source"] == EXCHANGE and binding["destination_type"] == "queue"
    }

    channels: dict[str, Any] = {}
    for event in events:
        _add_channel(
            channels,
            event.routing_key,
            {
                "address": event.routing_key,
                "title": f"{event_name(event)} on {EXCHANGE}",
                "description": f"Where `{event_name(event)}` is published, by routing key.",
                "messages": {
                    name: _ref("components", "messages", name) for name in _message_names(event)
                },
                "bindings": {"amqp": _exchange_binding(exchanges[EXCHANGE])},
            },
        )
    for stage in STAGES.values():
        received = [by_key[key] for key in stage.routing_keys if key in by_key]
        queue = queues[stage.queue]
        bound = [b for b in topology["bindings"] if b["destination"] == stage.queue]
        _add_channel(
            channels,
            stage.queue,
            {
                "address": stage.queue,
                "title": f"The {stage.name} stage's work queue",
                "description": (
                    f"Bound to `{EXCHANGE}` with "
                    + ", ".join(f"`{key}`" for key in stage.routing_keys)
                    + f". What its consumer gives up on goes to `{stage.dead_letter_queue}`."
                ),
                "messages": {
                    name: _ref("components", "messages", name)
                    for event in received
                    for name in _message_names(event)
                },
                "bindings": {"amqp": _queue_binding(queue, bound)},
            },
        )

    operations: dict[str, Any] = {}
    for user in SERVICE_USERS:
        for key in user.routing_keys:
            if key not in by_key:
                continue
            name = event_name(by_key[key])
            operations[f"{user.name}.publishes.{name}"] = {
                "action": "send",
                "channel": _ref("channels", key),
                "summary": f"{user.name} publishes {name}, with publisher confirms.",
                "messages": [
                    _ref("channels", key, "messages", message)
                    for message in _message_names(by_key[key])
                ],
                "bindings": {
                    "amqp": {
                        "deliveryMode": int(sample.delivery_mode),
                        "mandatory": key in bound_keys,
                        "timestamp": sample.timestamp is not None,
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            }
        consumed = user.consumes
        if consumed is None:
            continue
        operations[f"{user.name}.consumes.{consumed.queue}"] = {
            "action": "receive",
            "channel": _ref("channels", consumed.queue),
            "summary": (
                f"{user.name} consumes its work queue; each message is acknowledged "
                "only once its outcome is safe."
            ),
            "messages": [
                _ref("channels", consumed.queue, "messages", name)
                for name in channels[consumed.queue]["messages"]
            ],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
        }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Email pipeline events",
            "version": str(SCHEMA_VERSION),
            "description": _DESCRIPTION,
        },
        "defaultContentType": sample.content_type,
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {
                name: message
                for event in events
                for name, message in (
                    (event_name(event), _message(event, examples.get(event_name(event)))),
                    (_bundle_name(event), _bundle_message(event)),
                )
            },
            "schemas": {
                **_payload_schemas(events),
                HEADERS_SCHEMA: _headers_schema(),
                BUNDLE_HEADERS_SCHEMA: _bundle_headers_schema(),
            },
        },
    }


def _add_channel(channels: dict[str, Any], channel_id: str, channel: dict[str, Any]) -> None:
    if channel_id in channels:
        raise ValueError(f"two channels would be named {channel_id!r}")
    channels[channel_id] = channel


def _ref(*path: str) -> dict[str, str]:
    # Channel ids are routing keys and queue names: escaped as JSON Pointer requires.
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def _exchange_binding(exchange: dict[str, Any]) -> dict[str, Any]:
    return {
        "is": "routingKey",
        "exchange": {
            "name": exchange["name"],
            "type": exchange["type"],
            "durable": exchange["durable"],
            "autoDelete": exchange["auto_delete"],
        },
        "bindingVersion": AMQP_BINDING_VERSION,
    }


def _queue_binding(queue: dict[str, Any], bindings: list[dict[str, Any]]) -> dict[str, Any]:
    # The binding object has no place for queue arguments or the queue's own
    # bindings, which are part of its identity here: they go in extensions.
    return {
        "is": "queue",
        "queue": {
            "name": queue["name"],
            "durable": queue["durable"],
            "autoDelete": queue["auto_delete"],
        },
        "x-arguments": dict(queue["arguments"]),
        "x-bindings": [
            {"exchange": binding["source"], "routingKey": binding["routing_key"]}
            for binding in bindings
        ],
        "bindingVersion": AMQP_BINDING_VERSION,
    }


def _message(event: type[Event], example: Event | None) -> dict[str, Any]:
    name = event_name(event)
    summary = inspect.cleandoc(event.__doc__ or "").split("\n\n")[0].replace("``", "`")
    message: dict[str, Any] = {
        "name": name,
        "summary": " ".join(summary.split()),
        "correlationId": {
            "description": Event.model_fields["job_id"].description,
            "location": "$message.payload#/job_id",
        },
        "headers": _ref("components", "schemas", HEADERS_SCHEMA),
        "payload": _ref("components", "schemas", name),
        "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if example is not None:
        message["examples"] = [
            {"name": f"{name}-example", "payload": example.model_dump(mode="json")}
        ]
    return message


def _bundle_name(event: type[Event]) -> str:
    return f"{event_name(event)}Bundle"


def _message_names(event: type[Event]) -> tuple[str, str]:
    """The messages an event travels in: alone, and in a bundle."""
    return event_name(event), _bundle_name(event)


def _bundle_message(event: type[Event]) -> dict[str, Any]:
    name = event_name(event)
    return {
        "name": _bundle_name(event),
        "summary": f"Several `{name}` events published together, in one message.",
        "description": f"Each item is a `{name}` exactly as it would be sent alone; the "
        f"header `{LENGTHS_HEADER}` gives each item's length in bytes, in order. A consumer "
        "handles, retries and dead-letters each item on its own, and acks the message once "
        "every item's outcome is confirmed.",
        "headers": _ref("components", "schemas", BUNDLE_HEADERS_SCHEMA),
        "payload": {
            "type": "array",
            "minItems": 2,
            "maxItems": MAX_BUNDLE_EVENTS,
            "items": _ref("components", "schemas", name),
        },
        "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING_VERSION}},
    }


HEADERS_SCHEMA = "MessageHeaders"
BUNDLE_HEADERS_SCHEMA = "BundleHeaders"


def _bundle_headers_schema() -> dict[str, Any]:
    """The AMQP headers of a bundle (``messaging.bundle``)."""
    trace = _headers_schema()["properties"]
    return {
        "type": "object",
        "description": "AMQP headers of a bundle: how to cut its body into events, and each "
        "event's trace context.",
        "required": [LENGTHS_HEADER],
        "properties": {
            LENGTHS_HEADER: {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BUNDLE_EVENTS,
                "items": {"type": "integer", "minimum": 1},
                "description": "The length in bytes of each event in the body, in order: the "
                "body is `[`, the events separated by `,`, then `]`.",
            },
            TRACES_HEADER: {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "traceparent": trace["traceparent"],
                        "tracestate": trace["tracestate"],
                    },
                },
                "description": "Each event's W3C trace context, in order (an empty table where "
                "an event has none). Absent when no event has one.",
            },
        },
        "additionalProperties": True,
    }


def _headers_schema() -> dict[str, Any]:
    """The AMQP headers a message may carry: the job's trace, and on a retried copy its
    attempt (``messaging.wire``, ``tracing``). Consumers must accept others."""
    return {
        "type": "object",
        "description": "AMQP message headers. A consumer continues the trace and passes "
        "`traceparent` and `tracestate` on to what it publishes.",
        "properties": {
            "traceparent": {
                "type": "string",
                "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                "description": "W3C Trace Context: the job's trace id and the span that "
                "published the message. Absent on messages from older publishers.",
            },
            "tracestate": {
                "type": "string",
                "description": "W3C Trace Context: vendor entries, passed on unchanged.",
            },
            ATTEMPTS_HEADER: {
                "type": "integer",
                "minimum": 1,
                "description": "Which attempt a retried copy is (absent on the first).",
            },
        },
        "additionalProperties": True,
    }


def _payload_schemas(events: Sequence[type[Event]]) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(event, "validation") for event in events],
        ref_template="#/components/schemas/{model}",
    )
    definitions: dict[str, Any] = schemas.get("$defs", {})
    return definitions

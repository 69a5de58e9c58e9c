"""The Prometheus metrics every service shares, and their text for a scrape.

Metrics are defined once, here, on ``prometheus_client``'s default registry
(which also carries the process and Python runtime collectors): that is how
the client library is meant to be used, and defining a metric has no side
effect beyond registering its name. Each service exposes the registry on its
own: the api at ``GET /metrics``, a worker on ``METRICS_PORT``
(``pipeline_shared.probe_server``).

Labels take values from small fixed sets only (stage names, event types,
outcomes, failure kinds), never from message contents: a series per job or
per address would exhaust Prometheus. An event type the pipeline does not know
(the ``type`` property of a poison message from another producer) is counted
as ``unknown``.

=======================================  =========================================
metric                                   labels
=======================================  =========================================
``pipeline_events_consumed_total``       ``stage``, ``event_type``, ``outcome``:
                                         ``acked``, ``deferred``, ``retried``,
                                         ``dead_lettered``, ``requeued`` (could not
                                         be settled, or given back at a stop)
``pipeline_handling_failures_total``     ``stage``, ``event_type``, ``failure``:
                                         ``poison``, ``permanent``, ``transient``,
                                         ``broker_unavailable``, ``unexpected``
``pipeline_handling_duration_seconds``   ``stage``, ``outcome``: delivery to
                                         settled, the retry or dead-letter copy
                                         and ``JobFailed`` included
``pipeline_messages_in_flight``          ``stage``
``pipeline_events_published_total``      ``event_type``, ``outcome``: ``confirmed``,
                                         ``refused`` (nacked, unroutable, not
                                         connected), ``unknown`` (no confirm)
=======================================  =========================================
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest

from pipeline_shared.errors import (
    BrokerUnavailable,
    Deferred,
    PermanentFailure,
    PublishOutcomeUnknown,
    TransientFailure,
)
from pipeline_shared.events import EVENT_TYPES, Event

UNKNOWN_EVENT_TYPE = "unknown"
_KNOWN_EVENT_TYPES = frozenset(model.__name__ for model in EVENT_TYPES)

# Handling takes milliseconds when all is well and up to HANDLER_TIMEOUT_SECONDS
# (60 s by default) when it is not.
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

EVENTS_CONSUMED = Counter(
    "pipeline_events_consumed",
    "Messages a consumer took from its stage's work queue, by what became of them.",
    ["stage", "event_type", "outcome"],
)
HANDLING_FAILURES = Counter(
    "pipeline_handling_failures",
    "Messages whose handling failed, by kind of failure (deferrals are not failures).",
    ["stage", "event_type", "failure"],
)
HANDLING_DURATION = Histogram(
    "pipeline_handling_duration_seconds",
    "Time from a message's delivery to its settlement (ack, retry or dead letter).",
    ["stage", "outcome"],
    buckets=HANDLING_BUCKETS,
)
IN_FLIGHT = Gauge(
    "pipeline_messages_in_flight",
    "Messages delivered to this process and not yet settled.",
    ["stage"],
)
EVENTS_PUBLISHED = Counter(
    "pipeline_events_published",
    "Events published to the events exchange, by the broker's answer.",
    ["event_type", "outcome"],
)
MESSAGES_PUBLISHED = Counter(
    "pipeline_messages_published",
    "Messages the broker confirmed on the events exchange: one event alone, or a bundle "
    "of several (confirmed events over these is the events a message carried on average).",
    ["event_type"],
)


def event_type_label(event: Event | None, message_type: str | None) -> str:
    """The ``event_type`` label of a delivered message: the decoded event's type, else
    the message's ``type`` property if it names an event we know, else ``unknown``."""
    if event is not None:
        return event.event_type
    return message_type if message_type in _KNOWN_EVENT_TYPES else UNKNOWN_EVENT_TYPE


def failure_label(failure: BaseException) -> str | None:
    """The ``failure`` label of a handler's exception; None for a deferral, which is
    no failure."""
    # Imported here: the messaging package imports this module.
    from pipeline_shared.messaging import PoisonMessage

    if isinstance(failure, Deferred):
        return None
    if isinstance(failure, PoisonMessage):
        return "poison"
    if isinstance(failure, PermanentFailure):
        return "permanent"
    if isinstance(failure, TransientFailure):
        return "transient"
    if isinstance(failure, BrokerUnavailable):
        return "broker_unavailable"
    return "unexpected"


_OUTCOMES = {
    "ack": "acked",
    "defer": "deferred",
    "retry": "retried",
    "dead-letter": "dead_lettered",
}


def message_settled(
    stage: str,
    event: Event | None,
    message_type: str | None,
    disposition: str,
    failure: BaseException | None,
    since: float,
) -> None:
    """Count one message of ``stage`` settled as ``disposition`` (a ``Disposition``'s
    value), its failure if any, and the time since ``since`` (``time.perf_counter()``
    at its delivery)."""
    event_type = event_type_label(event, message_type)
    outcome = _OUTCOMES[disposition]
    EVENTS_CONSUMED.labels(stage, event_type, outcome).inc()
    HANDLING_DURATION.labels(stage, outcome).observe(time.perf_counter() - since)
    kind = None if failure is None else failure_label(failure)
    if kind is not None:
        HANDLING_FAILURES.labels(stage, event_type, kind).inc()


def message_requeued(stage: str, event: Event | None, message_type: str | None) -> None:
    """Count one message given back to its queue unsettled: it will be delivered again."""
    EVENTS_CONSUMED.labels(stage, event_type_label(event, message_type), "requeued").inc()


def track_in_flight(stage: str) -> Callable[[object], None]:
    """Count a message in flight in ``stage``; the returned callback (for a task's
    ``add_done_callback``) counts it out again."""
    gauge = IN_FLIGHT.labels(stage)
    gauge.inc()
    return lambda _: gauge.dec()


PublishMethod = TypeVar("PublishMethod", bound=Callable[[Any, Event], Awaitable[None]])


def count_publishes(publish: PublishMethod) -> PublishMethod:
    """Decorate a ``publish(event)`` method to count each call by the broker's answer."""

    @functools.wraps(publish)
    async def counted(self: object, event: Event) -> None:
        try:
            await publish(self, event)
        except PublishOutcomeUnknown:
            EVENTS_PUBLISHED.labels(event.event_type, "unknown").inc()
            raise
        except BrokerUnavailable:
            EVENTS_PUBLISHED.labels(event.event_type, "refused").inc()
            raise
        EVENTS_PUBLISHED.labels(event.event_type, "confirmed").inc()

    return cast(PublishMethod, counted)


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry's metrics in the format the scraper's ``Accept`` header asks for
    (OpenMetrics or the Prometheus text format), and its content type."""
    try:
        encoder, content_type = choose_encoder(accept or "")
    except (ValueError, TypeError):  # the library's parse of a version that is not one
        return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4
    return encoder(REGISTRY), content_type

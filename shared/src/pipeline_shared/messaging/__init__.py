"""The messaging layer over aio-pika that every service uses.

One module per concern: ``broker`` (the connection and publishing),
``coalesce`` and ``bundle`` (events published together, as one message),
``declare`` (the topology), ``consumer`` (deliveries and their settling),
``handling`` (one event's handler and outcome), ``policy``
(the acknowledgement rules, pure), ``acks`` (writing acks, many in one frame),
``wire`` (events as AMQP messages) and ``refusals`` (the broker's
configuration errors). The names a service needs are here.

``Broker`` owns one robust connection: it declares the topology (or, when
its broker user may not configure, only checks that it exists), publishes
events with publisher confirms and the ``mandatory`` flag, and starts
consumers. A ``Consumer`` decodes each delivery into an event, calls the
service's handler and applies the acknowledgement policy (``settle``):

============================  ===============================================
handler outcome               what happens to the message
============================  ===============================================
returns                       ack
``Deferred``                  copied to a retry queue (the longest delay within
                              its known wait, else the shortest) with
                              ``x-attempts`` unchanged, then acked
``TransientFailure``,         copied to the stage's retry queue for the next
unexpected exception,         delay (header ``x-attempts`` + 1), then acked;
``BrokerUnavailable``         after the last delay: dead-lettered
``PermanentFailure``          dead-lettered at once
undecodable body (poison)     dead-lettered at once
============================  ===============================================

Dead-lettering copies the message, with its properties and the headers
``x-error-reason``, ``x-error-type``, ``x-attempts``, ``x-failed-service`` and
``x-failed-at``, to the stage's ``.dlq`` queue, publishes ``JobFailed`` when
the job is known, and only then acks. Every copy is confirmed by the broker
before the original is acked, so a crash in between duplicates a message
but never loses one.
"""

from pipeline_shared.messaging.broker import Broker, vhost_of
from pipeline_shared.messaging.consumer import Consumer
from pipeline_shared.messaging.declare import declare_topology, topology_names, verify_topology
from pipeline_shared.messaging.handling import (
    Handler,
    delivery_attempt,
    delivery_size,
    handled_fields,
)
from pipeline_shared.messaging.policy import (
    DEFAULT_RETRY_DELAYS,
    Disposition,
    Outcome,
    deferral_delay,
    settle,
)
from pipeline_shared.messaging.wire import (
    ATTEMPTS_HEADER,
    DEFAULT_MAX_EVENT_BYTES,
    PoisonMessage,
    attempts_of,
    copy_message,
    decode_event,
    event_message,
)

__all__ = [
    "ATTEMPTS_HEADER",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_RETRY_DELAYS",
    "Broker",
    "Consumer",
    "Disposition",
    "Handler",
    "Outcome",
    "PoisonMessage",
    "attempts_of",
    "copy_message",
    "declare_topology",
    "decode_event",
    "deferral_delay",
    "delivery_attempt",
    "delivery_size",
    "event_message",
    "handled_fields",
    "settle",
    "topology_names",
    "verify_topology",
    "vhost_of",
]

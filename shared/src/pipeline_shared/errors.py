"""The failures a handler may raise, which decide what becomes of its message.

Handlers never ack or reject messages themselves: they return normally (done)
or raise one of these, and the messaging layer applies the acknowledgement
policy (see ``pipeline_shared.messaging``).
"""

from __future__ import annotations

from collections.abc import Sequence


class HandlerFailure(Exception):
    """Base class: a handler could not complete its message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentFailure(HandlerFailure):
    """Retrying cannot help (bad data, rejected by the provider with a 4xx)."""


class TransientFailure(HandlerFailure):
    """Retrying later may succeed (provider 429/5xx, network error, timeout)."""


class Deferred(TransientFailure):
    """Not now, for a reason that ends by itself (another worker holds the job right now,
    the provider's logs cannot show a send yet): the message is tried again after a retry
    delay without spending an attempt, so waiting can never use up a job's retries.

    ``wait_seconds`` says how long the wait is known to last: the message then takes the
    longest retry delay that does not overshoot it (the shortest when none fits)."""

    def __init__(self, reason: str, wait_seconds: float = 0.0) -> None:
        super().__init__(reason)
        self.wait_seconds = wait_seconds


class BrokerUnavailable(Exception):
    """The broker cannot take a message right now: not connected, the publish
    was nacked, returned as unroutable, or not confirmed in time."""


class PublishOutcomeUnknown(BrokerUnavailable):
    """The message was sent but its confirm never came (a timeout, a connection lost
    while waiting): the broker may or may not have taken it. Publishing the very
    same message again is safe, since consumers key on the job."""


class TopologyMissing(Exception):
    """Exchanges or queues the service needs are not on the broker, and its broker
    user may only check them, not declare them.

    A configuration error rather than a passing outage: the services report it
    once and do not retry (the workers exit, the api stays unready).
    """

    def __init__(self, missing: Sequence[str], vhost: str) -> None:
        self.missing = tuple(missing)
        self.vhost = vhost
        shown = ", ".join(self.missing[:_SHOWN_MISSING])
        more = len(self.missing) - _SHOWN_MISSING
        if more > 0:
            shown += f" and {more} more"
        hint = (
            "load rabbitmq/definitions.json into the broker (docker compose does at boot), "
            "or start once a service whose broker user may configure them"
        )
        if all(".retry." in name for name in self.missing):
            hint += "; do RETRY_DELAYS match the delays the definitions were rendered with?"
        super().__init__(
            f"the broker lacks {shown} in vhost {vhost!r}, and this service's user "
            f"may not declare them: {hint}"
        )


_SHOWN_MISSING = 3


class BrokerRefused(Exception):
    """The broker refused something no retry can change: the service's login, its
    vhost, a queue or exchange already declared with other arguments, access to
    its queue.

    A configuration error like ``TopologyMissing``: the services report it once,
    with the broker's own words and what to change, and do not retry (the
    workers exit, the api stays unready).
    """

    def __init__(self, refused: str, reply_text: str, remedy: str) -> None:
        self.refused = refused
        self.reply_text = reply_text
        self.remedy = remedy
        super().__init__(f"the broker refused {refused} ({reply_text}): {remedy}")

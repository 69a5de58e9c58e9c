"""The failures a handler may raise, which decide what becomes of its message.

Handlers never ack or reject messages themselves: they return normally (done)
or raise one of these, and the messaging layer applies the acknowledgement
policy (see ``pipeline_shared.messaging``).
"""

from __future__ import annotations


class HandlerFailure(Exception):
    """Base class: a handler could not complete its message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentFailure(HandlerFailure):
    """Retrying cannot help (bad data, rejected by the provider with a 4xx)."""


class TransientFailure(HandlerFailure):
    """Retrying later may succeed (provider 429/5xx, network error, timeout)."""


class BrokerUnavailable(Exception):
    """The broker cannot take a message right now: not connected, the publish
    was nacked, returned as unroutable, or not confirmed in time."""

"""The acknowledgement policy: what becomes of a delivered message, by its handler's outcome.

Pure functions; the consumer (``consumer.py``) carries out what they decide.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Literal

from pipeline_shared.errors import Deferred, PermanentFailure
from pipeline_shared.messaging.wire import PoisonMessage

DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1, 5, 30, 120, 600)


class Disposition(enum.Enum):
    """What becomes of a delivered message."""

    ACK = "ack"
    DEFER = "defer"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


def settle(
    failure: BaseException | None, attempts: int, retry_delays: Sequence[float]
) -> Disposition:
    """The acknowledgement policy: map a handler's outcome to a disposition.

    ``attempts`` counts this delivery (1 for the first); there is one retry per
    entry of ``retry_delays``.
    """
    if failure is None:
        return Disposition.ACK
    if isinstance(failure, PermanentFailure | PoisonMessage):
        return Disposition.DEAD_LETTER
    if isinstance(failure, Deferred) and retry_delays:
        return Disposition.DEFER
    if attempts <= len(retry_delays):
        return Disposition.RETRY
    return Disposition.DEAD_LETTER


Outcome = Literal["acked", "retried", "deferred", "dead_lettered", "requeued"]
"""What became of a handled message, as its log line's ``outcome`` field says."""


def deferral_delay(wait_seconds: float, retry_delays: Sequence[float]) -> float:
    """The retry delay a deferred message takes: the longest one within the known
    wait, so a long wait costs few round trips; the shortest if none fits."""
    fitting = [delay for delay in retry_delays if delay <= wait_seconds]
    return max(fitting) if fitting else min(retry_delays)

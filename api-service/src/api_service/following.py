"""status-service follows the job events into the read model, and says so when it cannot.

``JobFollower`` keeps one consumer of ``api.job.status`` running for the
process's life. Whatever stops it (the broker refusing the queue to its
user, the consumer's channel closing, a connection that cannot be made) is
logged once, named by ``problem`` (which ``/readyz`` reports), and mended by
starting the consumer again after a growing pause. Without this, a consumer
that failed once left every job ``queued`` for ever while ``/readyz`` said
all was well.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from api_service.connecting import words
from pipeline_shared.events import any_event_adapter
from pipeline_shared.messaging import Broker, Consumer, Handler
from pipeline_shared.probe_server import NOT_CONNECTED
from pipeline_shared.topology import STATUS

log = logging.getLogger("status.following")

STARTING = "starting to follow the job events"
STOPPED_CHECKS = 3


class JobFollower:
    def __init__(
        self,
        broker: Broker,
        handler: Handler[Any],
        *,
        prefetch: int,
        max_event_bytes: int,
        handler_timeout: float | None = None,
        check_every: float = 1.0,
        first_pause: float = 1.0,
        longest_pause: float = 30.0,
    ) -> None:
        self._broker = broker
        self._handler = handler
        self._prefetch = prefetch
        self._max_event_bytes = max_event_bytes
        self._handler_timeout = handler_timeout
        self._check_every = check_every
        self._first_pause = first_pause
        self._longest_pause = longest_pause
        self._consumer: Consumer[Any] | None = None
        self._problem: str | None = STARTING

    @property
    def problem(self) -> str | None:
        """Why job events are not being followed right now, or None while they are."""
        if self._problem in (None, STARTING) and not self._broker.is_ready:
            return NOT_CONNECTED
        return self._problem

    async def run(self) -> None:
        """Follow until cancelled, starting the consumer again whenever it stops."""
        pause = self._first_pause
        while True:
            try:
                await self._broker.connect_until_ready()
                self._consumer = await self._broker.consume(
                    STATUS,
                    any_event_adapter,
                    self._handler,
                    prefetch=self._prefetch,
                    max_event_bytes=self._max_event_bytes,
                    handler_timeout=self._handler_timeout,
                    # Each event is logged by the service that handled it; the read
                    # model's copy of the line is noise (and CPU) at INFO.
                    handled_level=logging.DEBUG,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._report(f"cannot follow the job events on {STATUS.queue}: {words(exc)}")
                await asyncio.sleep(pause)
                pause = min(2 * pause, self._longest_pause)
                continue
            if self._problem == STARTING:
                log.info(
                    "following the job events on %s (prefetch %d)", STATUS.queue, self._prefetch
                )
            elif self._problem is not None:
                log.info("following the job events on %s again", STATUS.queue)
            self._problem = None
            pause = self._first_pause
            await self._until_stopped(self._consumer)
            self._report(
                f"stopped following the job events on {STATUS.queue}: "
                "its consumer was cancelled or its channel closed"
            )
            await self._discard_consumer()

    async def stop(self, grace_seconds: float) -> None:
        """Let in-flight events finish (see ``Consumer.stop``). Cancel ``run`` first: still
        watching, it would take the stopping consumer for a failed one, cut its grace
        short and start another."""
        if self._consumer is not None:
            await self._consumer.stop(grace_seconds)
            self._consumer = None

    async def _until_stopped(self, consumer: Consumer[Any]) -> None:
        # A dropped connection is the robust connection's to restore (and
        # ``problem`` says "not connected" meanwhile); a consumer that stays
        # stopped while the connection is up (its channel closed, or the
        # broker cancelled it) is ours to start again. Checked a few times
        # over, since a restored connection restores its consumers a moment
        # after itself. A poll: the condition spans two objects whose
        # callbacks also fire on every reconnection.
        stopped_checks = 0
        while stopped_checks < STOPPED_CHECKS:
            await asyncio.sleep(self._check_every)
            if not self._broker.is_ready or await consumer.is_consuming():
                stopped_checks = 0
            else:
                stopped_checks += 1

    async def _discard_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.stop(0)
            except Exception as exc:  # its channel is gone already
                log.debug("discarding the stopped consumer: %s", exc)

    def _report(self, problem: str) -> None:
        if problem != self._problem:
            log.error("%s; trying again with back-off", problem)
        self._problem = problem

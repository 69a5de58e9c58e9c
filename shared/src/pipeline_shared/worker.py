"""Running a worker process: one event loop, stopped cleanly by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pipeline_shared.events import Event
from pipeline_shared.messaging import Broker, Handler
from pipeline_shared.topology import Stage

log = logging.getLogger("pipeline.worker")

E = TypeVar("E", bound=Event)


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``service(stop)`` in a fresh event loop; SIGTERM/SIGINT set ``stop``.

    This is the process's only ``asyncio.run``.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await service(stop)

    asyncio.run(main())


async def serve_stage(
    broker: Broker,
    stage: Stage,
    model: type[E],
    handler: Handler[E],
    *,
    prefetch: int,
    max_event_bytes: int,
    shutdown_timeout: float,
    stop: asyncio.Event,
) -> None:
    """Connect (waiting for the broker if need be), consume ``stage`` until ``stop``
    is set, then shut down within ``shutdown_timeout``."""
    connecting = asyncio.create_task(broker.connect_until_ready())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        log.info("stopped before the broker was reached")
        return
    stopping.cancel()
    try:
        consumer = await broker.consume(
            stage, model, handler, prefetch=prefetch, max_event_bytes=max_event_bytes
        )
        log.info("consuming %s (prefetch %d)", stage.queue, prefetch)
        await stop.wait()
        log.info("stopping: no new messages from %s", stage.queue)
        await consumer.stop(shutdown_timeout)
    finally:
        await broker.close()
        log.info("stopped")

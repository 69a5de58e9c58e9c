"""Running a worker process: one event loop, stopped cleanly by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TypeVar

from aiormq.exceptions import ChannelAccessRefused
from pydantic import TypeAdapter

from pipeline_shared.errors import BrokerRefused, TopologyMissing
from pipeline_shared.events import Event
from pipeline_shared.heap import settle_heap
from pipeline_shared.messaging import Broker, Consumer, Handler
from pipeline_shared.topology import Stage

try:
    import uvloop
except ImportError:  # not built for this platform (Windows): asyncio's own loop
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger("pipeline.worker")

E = TypeVar("E", bound=Event)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``service(stop)`` in a fresh event loop; SIGTERM/SIGINT set ``stop``.

    The loop is uvloop's, as the api's is under uvicorn: the services' own consumer
    takes a quarter to a third less CPU per message on it than on asyncio's
    (bench/README.md). This is the process's only event loop. Once the service has stopped,
    further signals are ignored: a supervisor that sends SIGINT and then
    SIGTERM must still see the exit code 0 of a clean stop.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(stop.set)

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)
        await service(stop)

    settle_heap()  # everything the worker runs on is imported by now
    try:
        if uvloop is not None:
            uvloop.run(main())
        else:
            asyncio.run(main())
    finally:
        ignore_stop_signals()


def ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def serve_stage(
    broker: Broker,
    stage: Stage,
    model: type[E] | TypeAdapter[E],
    handler: Handler[E],
    *,
    prefetch: int,
    max_event_bytes: int,
    shutdown_timeout: float,
    stop: asyncio.Event,
    handler_timeout: float | None = None,
    on_consuming: Callable[[Consumer[E]], None] | None = None,
) -> None:
    """Connect (waiting for the broker if need be), consume ``stage`` until ``stop``
    is set, then shut down within ``shutdown_timeout``. ``on_consuming`` receives the
    consumer once it consumes (``Readiness.watch`` of the worker's ``/readyz``).

    A broker that lacks the topology, or refuses what no retry changes (the
    service's login, its vhost, a queue declared with other arguments, its
    queue to its user), is a configuration error: the process exits with one
    line quoting the broker and saying what to change.
    """
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
        connecting.result()
    except (TopologyMissing, BrokerRefused) as exc:
        raise SystemExit(f"{broker.app_id}: {exc}") from None
    try:
        try:
            consumer = await broker.consume(
                stage,
                model,
                handler,
                prefetch=prefetch,
                max_event_bytes=max_event_bytes,
                handler_timeout=handler_timeout,
            )
        except ChannelAccessRefused as exc:
            refused = BrokerRefused(
                f"to let it consume {stage.queue!r}",
                exc.args[-1] if exc.args else "access refused",
                f"grant the user {broker.user!r} read permission on the queue {stage.queue!r} "
                f"in the vhost {broker.vhost!r} (rabbitmqctl set_permissions)",
            )
            raise SystemExit(f"{broker.app_id}: {refused}") from None
        log.info("consuming %s (prefetch %d)", stage.queue, prefetch)
        if on_consuming is not None:
            on_consuming(consumer)
        await stop.wait()
        log.info("stopping: no new messages from %s", stage.queue)
        await consumer.stop(shutdown_timeout)
    finally:
        await broker.close()
        log.info("stopped")

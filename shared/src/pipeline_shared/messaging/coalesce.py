"""Gathering the events published at about the same time into bundles.

Each ``submit`` joins the open bundle of its routing key and waits for that
bundle's confirm, so the rule stays what it was for one event: a publish
returns once the broker has its event, and raises if it may not. A bundle
goes out at the end of the event loop's turn in which it was opened, unless
``in_flight`` bundles of its key still await their confirms: then it keeps
collecting until one of them is answered, it is full, or ``max_wait`` has
passed. Under light load every event leaves at once, alone; under heavy load
bundles grow to what the broker's confirm time lets gather, and no event waits
more than ``max_wait`` longer than it would have alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from aio_pika.abc import HeadersType

from pipeline_shared.events import Event
from pipeline_shared.messaging.bundle import trace_bytes

MAX_TRACE_BYTES = 64 * 1024
"""The most bytes of trace headers one bundle carries: AMQP headers travel in one
frame (128 KiB unless the broker says otherwise), and a frame too large costs the
connection."""


@dataclass(frozen=True, slots=True)
class Item:
    """One event to publish, its encoded body and its trace headers."""

    event: Event
    body: bytes
    trace: HeadersType


@dataclass(eq=False)
class _Open:
    items: list[Item] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    size: int = 1  # the body's closing bracket; each item adds itself and a separator
    trace_size: int = 0


Settle = Callable[[BaseException | None], None]
Start = Callable[[str, list[Item], Settle], None]
"""Sends one bundle (or a lone event) of a routing key and calls ``settle`` once
with its outcome; raises, having sent nothing, if it cannot be sent now."""


class Coalescer:
    """Bundles of at most ``max_events`` events and ``max_bytes`` bytes, handed to ``start``."""

    def __init__(
        self,
        start: Start,
        *,
        max_events: int,
        max_bytes: int,
        in_flight: int = 1,
        max_wait: float = 0.005,
    ) -> None:
        self._start = start
        self._max_wait = max_wait
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._in_flight_limit = in_flight
        self._open: dict[str, _Open] = {}
        self._in_flight: dict[str, int] = {}
        self._scheduled: set[str] = set()

    async def submit(self, routing_key: str, item: Item) -> None:
        """Publish ``item`` in a bundle of ``routing_key``; return once it is confirmed."""
        loop = asyncio.get_running_loop()
        trace = trace_bytes(item.trace) if item.trace else 0
        bundle = self._open.get(routing_key)
        if bundle is not None and (
            len(bundle.items) >= self._max_events
            or bundle.size + len(item.body) + 1 > self._max_bytes
            or bundle.trace_size + trace > MAX_TRACE_BYTES
        ):
            self._flush(routing_key)
            bundle = None
        if bundle is None:
            bundle = self._open[routing_key] = _Open()
            # However busy the key, the bundle leaves within max_wait.
            loop.call_later(self._max_wait, self._flush_if_open, routing_key, bundle)
        # A future for each caller: one giving up (cancelled) leaves the others waiting.
        done: asyncio.Future[None] = loop.create_future()
        bundle.items.append(item)
        bundle.waiters.append(done)
        bundle.size += len(item.body) + 1
        bundle.trace_size += trace
        if len(bundle.items) >= self._max_events:
            self._flush(routing_key)
        elif (
            routing_key not in self._scheduled
            and self._in_flight.get(routing_key, 0) < self._in_flight_limit
        ):
            self._scheduled.add(routing_key)
            loop.call_soon(self._flush, routing_key)
        await done

    def _flush_if_open(self, routing_key: str, bundle: _Open) -> None:
        if self._open.get(routing_key) is bundle:
            self._flush(routing_key)

    def _flush(self, routing_key: str) -> None:
        self._scheduled.discard(routing_key)
        bundle = self._open.pop(routing_key, None)
        if bundle is None:
            return
        self._in_flight[routing_key] = self._in_flight.get(routing_key, 0) + 1
        try:
            self._start(routing_key, bundle.items, partial(self._settled, routing_key, bundle))
        except Exception as exc:  # nothing was sent: every waiter hears why
            self._settled(routing_key, bundle, exc)

    def _settled(self, routing_key: str, bundle: _Open, outcome: BaseException | None) -> None:
        self._in_flight[routing_key] -= 1
        for done in bundle.waiters:
            resolve(done, outcome)
        # What gathered while this bundle waited for its confirm goes now.
        if routing_key in self._open and routing_key not in self._scheduled:
            self._flush(routing_key)


def resolve(done: asyncio.Future[None], outcome: BaseException | None) -> None:
    """Tell the caller awaiting ``done`` how its publish went, unless it gave up."""
    if done.done():
        return
    if outcome is None:
        done.set_result(None)
    else:
        done.set_exception(outcome)

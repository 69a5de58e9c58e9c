"""Settling deliveries many at a time: one ``basic.ack`` for a run of them.

A consumer's handlers finish in any order. ``Settlements`` collects the acks
and nacks they ask for and writes them once per turn of the event loop: the
acks of a run of deliveries that starts at the channel's oldest unsettled one
become a single ``basic.ack`` with ``multiple`` set, which costs the broker and
the client one frame instead of one per message. An ack that cannot join such
a run (an older delivery is still being handled) is written alone in the same
turn: nothing waits for a slow neighbour, so a long handler never holds the
others' acks, or the prefetch window they free.

Every delivery is settled once. Each is kept with the channel it came on (a
robust connection reopens a channel under a new object, whose delivery tags
start again at 1), an ack once asked for is written even if its caller stops
waiting, a nack for a delivery already being acked is dropped, nacks go out
before acks, and every write of a channel happens under one lock, in order:
so a ``multiple`` ack never covers a delivery still being handled or given
back, and no delivery is settled twice (the broker closes a channel that
does). A caller's ``ack`` returns once its frame was written, or raises what
writing it raised, as ``IncomingMessage.ack`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import AbstractChannel


@dataclass(eq=False)
class _Channel:
    """What one AMQP channel has delivered and not yet settled, and what is to be written."""

    channel: AbstractChannel
    unsettled: dict[int, None] = field(default_factory=dict)  # in delivery order
    acks: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    nacks: list[tuple[AbstractIncomingMessage, asyncio.Future[None]]] = field(default_factory=list)
    scheduled: bool = False
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)


class Settlements:
    """The acks and nacks of one consumer, written in batches (see the module docstring)."""

    def __init__(self) -> None:
        # The state of each delivery's own channel, from delivery to settlement.
        self._of: dict[AbstractIncomingMessage, _Channel] = {}
        self._current: _Channel | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """Note a delivery, before its handler runs."""
        tag = message.delivery_tag
        if tag is None:
            return
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            return  # closed already: the broker requeues the delivery
        if self._current is None or self._current.channel is not channel:
            self._current = _Channel(channel)  # a new channel: its tags start again
        self._current.unsettled[tag] = None
        self._of[message] = self._current

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack the message in the next write; return once that write is done."""
        state = self._of.pop(message, None)
        tag = message.delivery_tag
        if state is None or tag is None:
            await message.ack()  # not noted (or its channel gone): as aio-pika does
            return
        done = asyncio.get_running_loop().create_future()
        state.acks[tag] = done
        self._schedule(state)
        # Asked for, the ack is written even if this caller stops waiting (a stop's
        # timeout): a nack after it would settle the delivery twice.
        await asyncio.shield(done)

    async def nack(self, message: AbstractIncomingMessage) -> None:
        """Give the message back to its queue, unless it was settled already (its ack
        asked for, say, by a stop that then ran out of time)."""
        state = self._of.pop(message, None)
        tag = message.delivery_tag
        if state is None or tag is None:
            if tag is None:
                await message.nack(requeue=True)
            return
        done = asyncio.get_running_loop().create_future()
        state.nacks.append((message, done))
        self._schedule(state)
        await done

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The message will not be settled here (its channel is gone, and with it the
        broker's record of the delivery: the broker requeues it)."""
        state = self._of.pop(message, None)
        if state is not None and message.delivery_tag is not None:
            state.unsettled.pop(message.delivery_tag, None)

    def _schedule(self, state: _Channel) -> None:
        if not state.scheduled:
            state.scheduled = True
            asyncio.get_running_loop().call_soon(self._start_writing, state)

    def _start_writing(self, state: _Channel) -> None:
        state.scheduled = False
        # A failed write reaches its callers through their futures, not the loop.
        write = asyncio.ensure_future(self._write(state))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write(self, state: _Channel) -> None:
        async with state.writing:
            nacks, state.nacks = state.nacks, []
            acks, state.acks = state.acks, {}
            try:
                await self._write_taken(state, nacks, acks)
            finally:
                # A write cut short (the channel closed under it, which aiormq reports
                # by cancelling) fails what it had not written yet, rather than leave
                # its callers waiting for ever.
                gone = ChannelInvalidStateError("the channel closed before the ack was written")
                for done in [*acks.values(), *(done for _, done in nacks)]:
                    if not done.done():
                        done.set_exception(gone)

    @staticmethod
    async def _write_taken(
        state: _Channel,
        nacks: list[tuple[AbstractIncomingMessage, asyncio.Future[None]]],
        acks: dict[int, asyncio.Future[None]],
    ) -> None:
        for message, done in nacks:
            assert message.delivery_tag is not None
            state.unsettled.pop(message.delivery_tag, None)
            await _settle([done], message.nack(requeue=True))
        run: list[int] = []
        for tag in state.unsettled:
            if tag not in acks:
                break
            run.append(tag)
        for tag in acks:
            state.unsettled.pop(tag, None)
        if run:
            await _settle(
                [acks[tag] for tag in run],
                state.channel.basic_ack(delivery_tag=run[-1], multiple=True),
            )
        for tag, done in acks.items():
            if tag not in run:
                await _settle([done], state.channel.basic_ack(delivery_tag=tag))


async def _settle(waiting: list[asyncio.Future[None]], write: Awaitable[object]) -> None:
    try:
        await write
    except Exception as exc:
        for done in waiting:
            if not done.done():
                done.set_exception(exc)
        return
    for done in waiting:
        if not done.done():
            done.set_result(None)

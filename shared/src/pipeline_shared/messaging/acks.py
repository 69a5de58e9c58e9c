"""Settling deliveries many at a time: one ``basic.ack`` for a run of them.

A consumer's handlers finish in any order. ``Settlements`` collects the acks
and nacks they ask for and writes them once per turn of the event loop: the
acks of a run of deliveries that starts at the channel's oldest unsettled one
become a single ``basic.ack`` with ``multiple`` set, which costs the broker and
the client one frame instead of one per message. An ack that cannot join such
a run (an older delivery is still being handled) is written alone in the same
turn: nothing waits for a slow neighbour, so a long handler never holds the
others' acks, or the prefetch window they free.

Nacks go out first and alone, and every write of a channel happens under one
lock, in order, so a ``multiple`` ack never covers a delivery that was given
back, nor one another write has settled already (the broker closes a channel
that settles a delivery twice). A caller's ``ack`` returns once its frame was
written, or raises what writing it raised, as ``IncomingMessage.ack`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
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
        self._channels: dict[int, _Channel] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """Note a delivery, before its handler runs."""
        tag = message.delivery_tag
        if tag is not None:
            self._state(message).unsettled[tag] = None

    async def ack(self, message: AbstractIncomingMessage) -> None:
        tag = message.delivery_tag
        if tag is None:
            await message.ack()
            return
        state = self._state(message)
        done = asyncio.get_running_loop().create_future()
        state.acks[tag] = done
        self._schedule(state)
        await done

    async def nack(self, message: AbstractIncomingMessage) -> None:
        """Give the message back to its queue."""
        if message.delivery_tag is None:
            await message.nack(requeue=True)
            return
        state = self._state(message)
        done = asyncio.get_running_loop().create_future()
        state.nacks.append((message, done))
        self._schedule(state)
        await done

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The message will not be settled here (its channel is gone: the broker
        requeues it)."""
        for state in self._channels.values():
            if message.delivery_tag is not None:
                state.unsettled.pop(message.delivery_tag, None)

    def _state(self, message: AbstractIncomingMessage) -> _Channel:
        channel = message.channel
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:
            # A robust connection reopens the channel under a new object, whose
            # delivery tags start again at 1: forget the channels that closed.
            for key in [k for k, s in self._channels.items() if s.channel.is_closed]:
                del self._channels[key]
            state = self._channels[id(channel)] = _Channel(channel)
        return state

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
            for message, done in nacks:
                assert message.delivery_tag is not None
                state.unsettled.pop(message.delivery_tag, None)
                await _settle(done, message.nack(requeue=True))
            run: list[int] = []
            for tag in state.unsettled:
                if tag not in acks:
                    break
                run.append(tag)
            for tag in acks:
                state.unsettled.pop(tag, None)
            if run:
                await _settle_all(
                    [acks.pop(tag) for tag in run],
                    state.channel.basic_ack(delivery_tag=run[-1], multiple=True),
                )
            for tag, done in acks.items():
                await _settle(done, state.channel.basic_ack(delivery_tag=tag))


async def _settle(done: asyncio.Future[None], write: Awaitable[object]) -> None:
    await _settle_all([done], write)


async def _settle_all(waiting: list[asyncio.Future[None]], write: Awaitable[object]) -> None:
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

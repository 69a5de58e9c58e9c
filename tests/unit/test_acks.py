"""The rules by which acks are batched: the frames written for each order of completion.

The channel here records frames instead of sending them; what the broker does
with them is tested against the real one in tests/integration/test_batched_acks.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from pipeline_shared.messaging.acks import Settlements

pytestmark = pytest.mark.unit


class RecordingChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.is_closed = False

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))


class Delivery:
    def __init__(self, channel: RecordingChannel, tag: int) -> None:
        self.channel, self.delivery_tag = channel, tag

    async def nack(self, requeue: bool = True) -> None:
        self.channel.frames.append(("nack", self.delivery_tag, False))


def deliveries(settlements: Settlements, channel: RecordingChannel, count: int) -> list[Any]:
    made = [Delivery(channel, tag) for tag in range(1, count + 1)]
    for delivery in made:
        settlements.delivered(cast(AbstractIncomingMessage, delivery))
    return made


async def test_acks_in_one_turn_from_the_oldest_delivery_are_one_multiple_ack() -> None:
    channel, settlements = RecordingChannel(), Settlements()
    messages = deliveries(settlements, channel, 5)

    await asyncio.gather(*(settlements.ack(m) for m in messages))

    assert channel.frames == [("ack", 5, True)]


async def test_an_ack_behind_a_delivery_still_handled_goes_alone_and_at_once() -> None:
    channel, settlements = RecordingChannel(), Settlements()
    first, second, third = deliveries(settlements, channel, 3)

    await asyncio.gather(settlements.ack(second), settlements.ack(third))
    assert channel.frames == [("ack", 2, False), ("ack", 3, False)]

    await settlements.ack(first)
    assert channel.frames[-1] == ("ack", 1, True)


async def test_a_nack_goes_first_and_no_multiple_ack_covers_it() -> None:
    channel, settlements = RecordingChannel(), Settlements()
    first, second, third = deliveries(settlements, channel, 3)

    await asyncio.gather(settlements.ack(first), settlements.nack(second), settlements.ack(third))

    # 2 is settled (given back) before the ack of 1..3 reaches the broker.
    assert channel.frames == [("nack", 2, False), ("ack", 3, True)]


async def test_a_run_never_passes_a_delivery_still_being_handled() -> None:
    channel, settlements = RecordingChannel(), Settlements()
    messages = deliveries(settlements, channel, 6)

    await asyncio.gather(*(settlements.ack(m) for m in (messages[0], messages[1], messages[4])))

    assert channel.frames == [("ack", 2, True), ("ack", 5, False)]
    await asyncio.gather(settlements.ack(messages[2]), settlements.ack(messages[3]))
    # 5 is settled already: the run 3..4 ends at 4, and 5 is not settled again.
    assert channel.frames[2:] == [("ack", 4, True)]


async def test_a_reopened_channel_starts_its_own_runs() -> None:
    settlements = Settlements()
    old, new = RecordingChannel(), RecordingChannel()
    deliveries(settlements, old, 2)
    old.is_closed = True
    fresh = deliveries(settlements, new, 1)[0]  # tag 1 again, on the new channel

    await settlements.ack(fresh)

    assert new.frames == [("ack", 1, True)]
    assert old.frames == []


async def test_forgetting_a_delivery_of_a_closed_channel_leaves_the_new_channels_alone() -> None:
    # After a reconnect, an old handler finishing (its channel gone) must not erase
    # the new channel's delivery with the same tag: a run would then pass over it.
    settlements = Settlements()
    old, new = RecordingChannel(), RecordingChannel()
    stale = deliveries(settlements, old, 3)
    old.is_closed = True
    first, second, third = deliveries(settlements, new, 3)  # tags 1-3 again

    for message in stale:
        settlements.forget(message)
    await asyncio.gather(settlements.ack(second), settlements.ack(third))

    # 1 is still being handled on the new channel: 2 and 3 go alone.
    assert new.frames == [("ack", 2, False), ("ack", 3, False)]
    await settlements.ack(first)
    assert new.frames[-1] == ("ack", 1, True)


async def test_an_ack_its_caller_stopped_waiting_for_is_written_and_a_later_nack_dropped() -> None:
    # A stop's timeout may cancel the wait for an ack; the stop then gives the
    # message back. Settling it twice would close the channel.
    channel, settlements = RecordingChannel(), Settlements()
    (message,) = deliveries(settlements, channel, 1)

    waiting = asyncio.ensure_future(settlements.ack(message))
    await asyncio.sleep(0)
    waiting.cancel()
    await settlements.nack(message)
    await asyncio.sleep(0.01)

    assert channel.frames == [("ack", 1, True)]


async def test_a_write_cut_short_by_cancellation_fails_every_ack_it_held() -> None:
    class Closing(RecordingChannel):
        async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            raise asyncio.CancelledError  # how aiormq ends writes on a closing channel

    channel, settlements = Closing(), Settlements()
    _, second, third = deliveries(settlements, channel, 3)  # 1 still being handled

    results = await asyncio.wait_for(
        asyncio.gather(settlements.ack(second), settlements.ack(third), return_exceptions=True),
        5,
    )

    assert all(isinstance(r, ChannelInvalidStateError) for r in results), results


async def test_a_failed_write_is_raised_to_every_ack_it_carried() -> None:
    class Broken(RecordingChannel):
        async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            raise ConnectionResetError("gone")

    channel, settlements = Broken(), Settlements()
    messages = deliveries(settlements, channel, 3)

    results = await asyncio.gather(*(settlements.ack(m) for m in messages), return_exceptions=True)

    assert [type(r) for r in results] == [ConnectionResetError] * 3

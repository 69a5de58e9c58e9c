"""How publishes gather into bundles (``Coalescer``), with a recorded ``start``."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from pipeline_shared.events import JobRequested
from pipeline_shared.messaging.bundle import trace_bytes
from pipeline_shared.messaging.coalesce import MAX_TRACE_BYTES, Coalescer, Item, Settle


def item(size: int = 10) -> Item:
    event = JobRequested.model_validate(
        {"job_id": uuid.uuid4(), "email": "ada@example.com", "data": {}}
    )
    return Item(event, b"x" * size, {})


async def turns(count: int) -> None:
    """Let the event loop run ``count`` turns."""
    for _ in range(count):
        await asyncio.sleep(0)


class Recorder:
    """A ``start`` that records each bundle and confirms it in the next turn of the loop,
    or, if told to, holds every confirm until ``release``; ``fail`` settles bundles with
    that error, ``refuse`` raises it (nothing sent)."""

    def __init__(
        self,
        hold: bool = False,
        fail: BaseException | None = None,
        refuse: BaseException | None = None,
    ) -> None:
        self.sent: list[list[Item]] = []
        self.hold = hold
        self.fail = fail
        self.refuse = refuse
        self.held: list[Settle] = []

    def __call__(self, routing_key: str, items: list[Item], settle: Settle) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append(items)
        if self.hold:
            self.held.append(settle)
        else:
            asyncio.get_running_loop().call_soon(settle, self.fail)

    def release(self) -> None:
        held, self.held = self.held, []
        for settle in held:
            settle(self.fail)


async def test_a_lone_publish_leaves_at_once_alone() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20)
    one = item()
    await asyncio.wait_for(coalescer.submit("job.requested", one), 1)
    assert send.sent == [[one]]


async def test_publishes_of_one_turn_of_the_loop_leave_together_in_order() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20)
    items = [item() for _ in range(10)]
    await asyncio.gather(*(coalescer.submit("job.requested", i) for i in items))
    assert send.sent == [items]


async def test_routing_keys_never_share_a_bundle() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20)
    a, b = item(), item()
    await asyncio.gather(coalescer.submit("job.requested", a), coalescer.submit("email.sent", b))
    assert sorted(map(len, send.sent)) == [1, 1]


@pytest.mark.parametrize(("count", "max_events", "sizes"), [(10, 4, [4, 4, 2]), (3, 1, [1, 1, 1])])
async def test_a_full_bundle_leaves_and_the_next_one_starts(
    count: int, max_events: int, sizes: list[int]
) -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_events=max_events, max_bytes=1 << 20)
    items = [item() for _ in range(count)]
    await asyncio.gather(*(coalescer.submit("job.requested", i) for i in items))
    assert [len(bundle) for bundle in send.sent] == sizes
    assert [i for bundle in send.sent for i in bundle] == items


async def test_a_bundle_never_exceeds_its_bytes_and_a_large_event_goes_alone() -> None:
    send = Recorder()
    # Each 10-byte event takes 11 bytes of a bundle; the brackets take 2.
    coalescer = Coalescer(send, max_events=64, max_bytes=35)
    items = [item(10), item(10), item(10), item(50), item(10)]
    await asyncio.gather(*(coalescer.submit("job.requested", i) for i in items))
    assert [[len(i.body) for i in bundle] for bundle in send.sent] == [[10, 10, 10], [50], [10]]
    for bundle in send.sent:
        if len(bundle) > 1:
            assert sum(len(i.body) + 1 for i in bundle) + 1 <= 35


async def test_while_bundles_await_their_confirm_the_next_one_gathers() -> None:
    send = Recorder(hold=True)
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20, in_flight=1)
    first = asyncio.ensure_future(coalescer.submit("job.requested", item()))
    await turns(10)
    assert len(send.sent) == 1
    later = [asyncio.ensure_future(coalescer.submit("job.requested", item())) for _ in range(5)]
    await turns(10)
    assert len(send.sent) == 1  # waiting for the first confirm

    send.release()
    await turns(1)
    assert len(send.sent) == 2  # what gathered leaves the moment a slot is free
    send.release()
    await asyncio.wait_for(asyncio.gather(first, *later), 1)
    assert [len(bundle) for bundle in send.sent] == [1, 5]


async def test_every_event_of_a_failed_bundle_hears_why_and_the_next_bundle_is_unaffected() -> None:
    send = Recorder(fail=ConnectionError("gone"))
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20)
    outcomes = await asyncio.gather(
        *(coalescer.submit("job.requested", item()) for _ in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [ConnectionError] * 3

    send.fail = None
    await asyncio.wait_for(coalescer.submit("job.requested", item()), 1)
    assert [len(bundle) for bundle in send.sent] == [3, 1]


async def test_a_bundle_that_cannot_be_sent_fails_its_events_and_frees_its_slot() -> None:
    send = Recorder(refuse=ConnectionError("not connected"))
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20, in_flight=1)
    outcomes = await asyncio.gather(
        *(coalescer.submit("job.requested", item()) for _ in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [ConnectionError] * 3
    assert send.sent == []

    send.refuse = None
    await asyncio.wait_for(coalescer.submit("job.requested", item()), 1)
    assert [len(bundle) for bundle in send.sent] == [1]


async def test_a_confirm_reaches_its_callers_in_the_next_turn_of_the_loop() -> None:
    send = Recorder(hold=True)
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20)
    waiting = [asyncio.ensure_future(coalescer.submit("job.requested", item())) for _ in range(3)]
    await turns(5)
    assert not any(w.done() for w in waiting)
    send.release()
    await turns(1)
    assert all(w.done() for w in waiting)


async def test_a_caller_giving_up_does_not_cancel_the_others_events() -> None:
    send = Recorder(hold=True)
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20)
    impatient = asyncio.ensure_future(coalescer.submit("job.requested", item()))
    patient = asyncio.ensure_future(coalescer.submit("job.requested", item()))
    await turns(10)
    assert len(send.sent) == 1
    impatient.cancel()
    await turns(2)
    send.release()
    await asyncio.wait_for(patient, 1)
    assert impatient.cancelled()
    assert [len(bundle) for bundle in send.sent] == [2]


async def test_a_bundle_waiting_for_a_slot_still_leaves_within_max_wait() -> None:
    send = Recorder(hold=True)
    coalescer = Coalescer(send, max_events=64, max_bytes=1 << 20, in_flight=1, max_wait=0.01)
    first = asyncio.ensure_future(coalescer.submit("job.requested", item()))
    await turns(10)
    second = asyncio.ensure_future(coalescer.submit("job.requested", item()))
    await turns(10)
    assert len(send.sent) == 1  # the first has the only slot, and is never answered

    await asyncio.sleep(0.05)
    assert len(send.sent) == 2
    for waiting in (first, second):
        waiting.cancel()


async def test_a_bundle_never_carries_more_trace_headers_than_fit_a_frame() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_events=1000, max_bytes=1 << 30)
    state = "v=" + "a" * 500
    traced = [
        Item(
            item().event,
            b"x",
            {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": state},
        )
        for _ in range(400)
    ]
    await asyncio.gather(*(coalescer.submit("job.requested", i) for i in traced))

    assert len(send.sent) > 1
    for bundle in send.sent:
        assert sum(trace_bytes(i.trace) for i in bundle) <= MAX_TRACE_BYTES

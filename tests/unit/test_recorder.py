"""Group commit of the job read model: batching, failures and reads of unwritten events."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

import pytest
from opentelemetry.trace import SpanKind
from sqlalchemy.exc import OperationalError

from api_service import recorder as recorder_module
from api_service.read_model import JobEvent
from api_service.recorder import JobRecorder
from pipeline_shared import tracing
from unit.fakes import job_requested


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Writes:
    """A ``write_batch`` that records its batches; ``gate`` holds the first write."""

    def __init__(self, *, hold_first: bool = False, fail: Exception | None = None) -> None:
        self.batches: list[list[JobEvent]] = []
        self.traces: list[dict[str, str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.gate.set()
        self.fail = fail

    def __call__(self, events: Sequence[JobEvent], traces: Mapping[str, str]) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(events))
        self.traces.append(dict(traces))
        if self.fail is not None:
            raise self.fail


async def test_events_arriving_during_a_write_go_into_the_next_transaction_together() -> None:
    writes = Writes(hold_first=True)
    recorder = JobRecorder(writes)
    first = asyncio.create_task(recorder.record(job_requested()))
    await asyncio.to_thread(writes.entered.wait, 10)

    later = [job_requested() for _ in range(50)]
    waiting = [asyncio.create_task(recorder.record(event)) for event in later]
    await asyncio.sleep(0.01)
    writes.gate.set()
    await asyncio.gather(first, *waiting)

    assert [len(batch) for batch in writes.batches] == [1, 50]
    assert writes.batches[1] == later


async def test_a_batch_is_never_larger_than_the_limit() -> None:
    writes = Writes()
    recorder = JobRecorder(writes, max_batch=7)

    await asyncio.gather(*(recorder.record(job_requested()) for _ in range(20)))

    assert [len(batch) for batch in writes.batches] == [7, 7, 6]


async def test_a_failed_write_fails_every_record_of_its_batch_and_the_next_goes_on() -> None:
    writes = Writes(fail=RuntimeError("database is locked"))
    recorder = JobRecorder(writes)

    results = await asyncio.gather(
        *(recorder.record(job_requested()) for _ in range(3)), return_exceptions=True
    )
    writes.fail = None
    await recorder.record(job_requested())

    assert [type(result) for result in results] == [RuntimeError] * 3
    assert len(writes.batches) == 2


async def test_an_accepted_job_reads_back_before_its_write_and_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = Writes(hold_first=True)
    recorder = JobRecorder(writes)
    event = job_requested(submitted_by="caller-1")
    job_id = str(event.job_id)

    recorder.note(event)
    pending = recorder.pending(job_id).onto(None)

    assert pending is not None
    assert (pending.status, pending.caller) == ("queued", "caller-1")
    assert recorder.pending("some-other-job").onto(None) is None
    writes.gate.set()
    await recorder.close()
    assert writes.batches == [[event]]
    assert recorder.pending(job_id).onto(None) is None  # written: the store answers now


def database_away() -> OperationalError:
    return OperationalError("INSERT", {}, Exception("database is locked"))


async def test_a_noted_job_whose_write_fails_is_written_on_a_later_attempt(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing else writes an accepted job (its JobRequested does not come back
    # through the broker): a failed write is tried again, and until then the job
    # reads back from memory.
    caplog.set_level(logging.INFO, "api.recorder")
    monkeypatch.setattr(recorder_module, "NOTE_FIRST_PAUSE", 0.01)
    writes = Writes(fail=database_away())
    recorder = JobRecorder(writes)
    events = [job_requested(), job_requested()]

    for event in events:
        recorder.note(event)
    await wait_until(lambda: len(writes.batches) >= 3)
    meanwhile = [recorder.pending(str(e.job_id)).onto(None) for e in events]
    writes.fail = None
    await wait_until(
        lambda: all(recorder.pending(str(e.job_id)).onto(None) is None for e in events)
    )
    await recorder.close()

    assert [record.status if record else None for record in meanwhile] == ["queued", "queued"]
    written = {e.event_id for batch in writes.batches for e in batch}
    assert written == {e.event_id for e in events}
    # One line for the outage and one when it is over, not one per job or attempt.
    assert caplog.text.count("could not record an accepted job (OperationalError)") == 1
    assert "accepted jobs held back: 2 recorded, 0 left to their next events" in caplog.text


async def test_a_noted_job_still_unwritten_at_close_is_tried_once_more_then_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = Writes(fail=database_away())
    recorder = JobRecorder(writes)  # the first pause (0.5 s) outlasts the test
    event = job_requested()

    recorder.note(event)
    await wait_until(lambda: len(writes.batches) == 1)
    await asyncio.wait_for(recorder.close(), 5)

    assert writes.batches == [[event], [event]]
    assert f"job {event.job_id}: not recorded before stopping (OperationalError)" in caplog.text
    assert recorder.pending(str(event.job_id)).onto(None) is None


async def test_a_write_that_fails_for_another_reason_is_not_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = Writes(fail=ValueError("a bug"))
    recorder = JobRecorder(writes)
    event = job_requested()

    first = recorder.note(event)

    assert await first is False
    await recorder.close()
    assert writes.batches == [[event]]
    assert f"job {event.job_id}: could not record it (ValueError('a bug'))" in caplog.text


async def test_no_more_than_max_held_back_jobs_wait_in_memory_for_the_database(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "MAX_HELD_BACK", 1)
    writes = Writes(fail=database_away())
    recorder = JobRecorder(writes)
    held, dropped = job_requested(), job_requested()

    recorder.note(held)
    await wait_until(lambda: len(writes.batches) == 1)
    recorder.note(dropped)
    await wait_until(lambda: recorder.pending(str(dropped.job_id)).onto(None) is None)

    assert recorder.pending(str(held.job_id)).onto(None) is not None  # still held
    assert f"job {dropped.job_id}: not recorded (OperationalError) and 1 jobs" in caplog.text
    await recorder.close()


async def test_each_job_is_recorded_with_the_trace_it_was_handled_in() -> None:
    writes = Writes(hold_first=True)
    recorder = JobRecorder(writes)
    traced, untraced = job_requested(), job_requested()

    with tracing.span("request", SpanKind.SERVER, parent=tracing.new_root()) as span:
        trace_id = tracing.trace_id_of(span)
        recorder.note(traced)
        in_trace = recorder.pending(str(traced.job_id)).onto(None)
    recorder.note(untraced)  # outside any trace
    writes.gate.set()
    await recorder.close()

    assert trace_id is not None
    assert len(trace_id) == 32
    assert in_trace is not None
    assert in_trace.trace_id == trace_id
    written = {job: trace for batch in writes.traces for job, trace in batch.items()}
    assert written == {str(traced.job_id): trace_id}


async def test_a_job_noted_with_its_own_trace_keeps_it_inside_another_one() -> None:
    # A batch hands its jobs on with their own traces, from within the request's.
    writes = Writes()
    recorder = JobRecorder(writes)
    event = job_requested()

    with tracing.span("request", SpanKind.SERVER, parent=tracing.new_root()):
        recorder.note(event, "ab" * 16)
    await recorder.close()

    assert writes.traces == [{str(event.job_id): "ab" * 16}]

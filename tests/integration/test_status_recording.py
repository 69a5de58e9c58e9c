"""status-service, in-process against the real broker and store: it records the job
events into the api's store, answers its probes, and stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_service.following import JobFollower
from api_service.read_model import JobRecord
from api_service.settings import StatusSettings
from api_service.status_service import serve
from api_service.store import JobStore
from pipeline_shared import metrics
from pipeline_shared.messaging import Broker
from support.services import free_port
from unit.fakes import data_processed

CALLER = "key:reports"


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(settings: StatusSettings) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def readyz(port: int) -> tuple[int, object]:
    """The service's /readyz (0 while nothing answers); asked without blocking the
    event loop the service runs on."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            answer = await client.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.HTTPError:
        return 0, None
    return answer.status_code, answer.json().get("detail")


def answering(port: int, status: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await readyz(port))[0] == status

    return check


async def test_status_service_records_each_event_in_the_api_store_and_is_ready_meanwhile(
    broker_url: str, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'api-state.sqlite3'}"
    port = free_port()
    settings = StatusSettings(
        _env_file=None,
        rabbitmq_url=broker_url,
        database_url=database_url,
        metrics_port=port,
        shutdown_timeout_seconds=5,
    )
    store = await asyncio.to_thread(JobStore.open, database_url)
    publisher = Broker(broker_url, app_id="test-publisher", retry_delays=(1,))
    await publisher.connect()
    before = metrics.EVENTS_CONSUMED.labels("status", "DataProcessed", "acked")._value.get()
    try:
        async with running(settings) as task:
            await until(answering(port, 200), "status-service ready")
            events = [data_processed(submitted_by=CALLER) for _ in range(5)]
            for event in events:
                await publisher.publish(event)

            async def recorded() -> list[JobRecord | None]:
                return [await store.get(str(e.job_id), CALLER) for e in events]

            deadline = asyncio.get_running_loop().time() + 20
            while None in (records := await recorded()):
                assert asyncio.get_running_loop().time() < deadline, "events not recorded"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            assert {r.status for r in records if r is not None} == {"processed"}

            # Counted after the ack, which follows the commit the store already shows.
            def acked() -> float:
                counter = metrics.EVENTS_CONSUMED.labels("status", "DataProcessed", "acked")
                return float(counter._value.get()) - before

            while acked() < len(events):
                assert asyncio.get_running_loop().time() < deadline, "acks never counted"
                await asyncio.sleep(0.02)
            assert acked() == len(events)
        assert task.done()
        assert task.exception() is None
        assert (await readyz(port))[0] == 0, "the probe endpoint outlived the service"
    finally:
        await publisher.close()
        await store.close()


async def test_status_service_is_unready_saying_why_while_its_broker_is_unreachable(
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = StatusSettings(
        _env_file=None,
        rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        database_url=f"sqlite:///{tmp_path / 'api-state.sqlite3'}",
        metrics_port=port,
        shutdown_timeout_seconds=1,
    )
    async with running(settings):
        await until(answering(port, 503), "the probe endpoint")
        status, detail = await readyz(port)
        assert (status, detail) == (503, "not connected to the message broker")


async def test_a_stop_lets_a_slow_write_finish_without_calling_it_a_failure(
    broker_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A write longer than the follower's three one-second checks: a follower still
    # watching while its consumer stops took that for a failed consumer, cut the
    # grace short and logged an ERROR.
    database_url = f"sqlite:///{tmp_path / 'api-state.sqlite3'}"
    writing = threading.Event()
    original = JobStore.record_batch

    def slow_write(self: JobStore, *args: Any, **kwargs: Any) -> None:
        writing.set()
        time.sleep(3.5)
        original(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "record_batch", slow_write)
    settings = StatusSettings(
        _env_file=None,
        rabbitmq_url=broker_url,
        database_url=database_url,
        metrics_port=0,
        shutdown_timeout_seconds=10,
    )
    event = data_processed(submitted_by=CALLER)
    publisher = Broker(broker_url, app_id="test-publisher", retry_delays=(1,))
    await publisher.connect()
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, stop))
    try:
        await publisher.publish(event)
        deadline = asyncio.get_running_loop().time() + 20
        while not writing.is_set():
            assert asyncio.get_running_loop().time() < deadline, "the event never reached a write"
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(serving, 15)
    finally:
        stop.set()
        await publisher.close()

    store = await asyncio.to_thread(JobStore.open, database_url)
    try:
        record = await store.get(str(event.job_id), CALLER)
    finally:
        await store.close()
    assert record is not None
    assert record.status == "processed"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not any("waiting up to 0 s" in r.getMessage() for r in caplog.records)


async def test_a_store_that_cannot_be_opened_stops_it_with_one_line(tmp_path: Path) -> None:
    settings = StatusSettings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'no-such-folder' / 'api-state.sqlite3'}",
        metrics_port=0,
    )
    with pytest.raises(SystemExit, match="status-service: cannot open the job records at sqlite"):
        await serve(settings, asyncio.Event())


async def test_a_follower_that_dies_of_a_bug_stops_it_rather_than_stay_ready(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: JobFollower) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(JobFollower, "run", broken)
    settings = StatusSettings(
        _env_file=None,
        rabbitmq_url=broker_url,
        database_url=f"sqlite:///{tmp_path / 'api-state.sqlite3'}",
        metrics_port=0,
    )
    with pytest.raises(SystemExit, match="stopped following: RuntimeError"):
        await serve(settings, asyncio.Event())

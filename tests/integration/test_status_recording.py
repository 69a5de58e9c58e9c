"""status-service, in-process against the real broker and store: it records the job
events into the api's store, answers its probes, and stops cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

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
            after = metrics.EVENTS_CONSUMED.labels("status", "DataProcessed", "acked")._value.get()
            assert after - before == len(events)
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

"""The api's follower of job events, against the real broker: it never stalls silently."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from api_service.following import JobFollower
from pipeline_shared.events import Event
from pipeline_shared.messaging import Broker
from pipeline_shared.topology import STATUS
from support.broker_users import ServiceUsers, committed_definitions
from support.rabbit import Management
from unit.fakes import data_processed

STATUS_USER = "status-service"


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds, or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def users(management: Management, vhost: str, broker_url: str) -> Iterator[ServiceUsers]:
    """The file's least-privilege users on this vhost, whose topology guest declares."""

    async def declare() -> None:
        admin = Broker(broker_url, app_id="test-admin", retry_delays=(1,))
        await admin.connect()
        await admin.close()

    asyncio.run(declare())
    users = ServiceUsers.create(management, committed_definitions())
    users.grant(vhost)
    yield users
    users.delete()


def set_status_read(users: ServiceUsers, management: Management, vhost: str, read: str) -> None:
    rule = next(r for r in committed_definitions()["permissions"] if r["user"] == STATUS_USER)
    management.set_permissions(
        vhost, users.names[STATUS_USER], rule["configure"], rule["write"], read
    )


@asynccontextmanager
async def running_follower(
    users: ServiceUsers, vhost: str
) -> AsyncIterator[tuple[JobFollower, list[Any]]]:
    """A follower logged in as the api's user, recording the events it is handed."""
    broker = Broker(users.url(STATUS_USER, vhost), app_id="status-service", retry_delays=(1,))
    seen: list[Any] = []

    async def record(event: Any) -> None:
        seen.append(event)

    follower = JobFollower(
        broker, record, prefetch=8, max_event_bytes=1 << 20, check_every=0.1, first_pause=0.2
    )
    running = asyncio.create_task(follower.run())
    try:
        yield follower, seen
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await follower.stop(1)
        await broker.close()


async def publish(broker_url: str, event: Event) -> None:
    publisher = Broker(broker_url, app_id="test-publisher", retry_delays=(1,))
    await publisher.connect()
    await publisher.publish(event)
    await publisher.close()


async def test_a_follower_refused_its_queue_names_the_refusal_and_recovers_when_granted(
    users: ServiceUsers, management: Management, vhost: str, broker_url: str
) -> None:
    set_status_read(users, management, vhost, "^$")  # the api's user may not read its queue
    async with running_follower(users, vhost) as (follower, seen):
        await until(lambda: "ACCESS_REFUSED" in (follower.problem or ""), "the refusal reported")
        assert STATUS.queue in (follower.problem or "")
        event = data_processed()
        await publish(broker_url, event)  # waits in api.job.status meanwhile

        set_status_read(users, management, vhost, r"^api\.job\.status$")

        await until(lambda: follower.problem is None, "following again")
        await until(lambda: len(seen) == 1, "the waiting event handled")
        assert seen[0].event_id == event.event_id


async def test_a_follower_whose_consumer_is_cancelled_starts_consuming_again(
    users: ServiceUsers, management: Management, vhost: str, broker_url: str
) -> None:
    async with running_follower(users, vhost) as (follower, seen):
        await until(lambda: follower.problem is None, "following")
        # The broker cancels every consumer of a deleted queue, and the
        # connection stays up: nothing but the follower will start it again.
        management.delete_queue(vhost, STATUS.queue)
        await until(lambda: follower.problem is not None, "the stop noticed")
        admin = Broker(broker_url, app_id="test-admin", retry_delays=(1,))
        await admin.connect()  # declares the queue again, as a service with rights would

        await until(lambda: follower.problem is None, "following again", timeout=20)
        event = data_processed()
        await admin.publish(event)
        await until(lambda: [e.event_id for e in seen] == [event.event_id], "handled")
        await admin.close()

"""status-service: follows the job events into the job records the api serves.

The api answers ``GET /jobs`` from its store, and records each job it accepts
there itself; every later event of a job (``DataProcessed``, ``EmailSent``,
``JobFailed``) reaches the store through this process, from the queue
``api.job.status``. It is a process of its own, not a task in the api's,
because the events come at the pipeline's pace: while a backlog drains they
are thousands a second, and on the api's event loop they stood in front of
the requests a user waits on (bench/README.md, "Session 9"). On its own
it runs at the workers' lower CPU priority, and scales apart from the api.

It is part of the api's deployment: the api's package, image and
``DATABASE_URL``, with a broker user of its own (``status-service``: it reads
``api.job.status`` and publishes nothing). Its ``/readyz`` (``METRICS_PORT``,
9103) is 503 naming the reason while the job events are not being followed
(``following.JobFollower``).
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import SQLAlchemyError

from api_service.following import JobFollower
from api_service.read_model import JobEvent
from api_service.recorder import JobRecorder
from api_service.settings import StatusSettings
from api_service.store import JobStore
from pipeline_shared import tracing
from pipeline_shared.logs import configure_service_logging
from pipeline_shared.messaging import Broker
from pipeline_shared.probe_server import serving
from pipeline_shared.settings import load_settings, redact_url
from pipeline_shared.worker import run_until_signalled

SERVICE = "status-service"

log = logging.getLogger("status")


class RecordJobEvent:
    """The read model's handler: fold each job event into its job's record, in the
    recorder's next batch; the message is acked once that batch is committed."""

    def __init__(self, recorder: JobRecorder) -> None:
        self._recorder = recorder

    async def __call__(self, event: JobEvent) -> None:
        await self._recorder.record(event)


class FollowingReadiness:
    """``/readyz``: ready while the follower follows (``JobFollower.problem``)."""

    def __init__(self, follower: JobFollower) -> None:
        self._follower = follower

    async def problem(self) -> str | None:
        return self._follower.problem


async def serve(settings: StatusSettings, stop: asyncio.Event) -> None:
    try:
        store = await asyncio.to_thread(JobStore.open, settings.database_url)
    except SQLAlchemyError as exc:
        raise SystemExit(
            f"{SERVICE}: cannot open the job records at {redact_url(settings.database_url)}: "
            f"{type(exc).__name__}"
        ) from exc
    log.info("job records at %s", redact_url(settings.database_url))
    broker = Broker.from_settings(settings, app_id=SERVICE)
    recorder = JobRecorder(store.record_batch)
    follower = JobFollower(
        broker,
        RecordJobEvent(recorder),
        prefetch=settings.status_prefetch,
        max_event_bytes=settings.max_event_bytes,
        handler_timeout=settings.handler_timeout_seconds,
    )
    try:
        async with serving(settings, FollowingReadiness(follower), SERVICE):
            following = asyncio.create_task(follower.run())
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if following.done():
                    # It mends every failure it knows; anything else is a bug that
                    # must not leave /readyz saying "ready" over a dead follower.
                    raise SystemExit(f"{SERVICE}: stopped following: {following.exception()!r}")
            finally:
                following.cancel()
                stopping.cancel()
                await asyncio.gather(following, stopping, return_exceptions=True)
            await follower.stop(settings.shutdown_timeout_seconds)
    finally:
        await broker.close()
        await recorder.close()
        await store.close()


def main() -> None:
    settings = load_settings(StatusSettings, SERVICE)
    configure_service_logging(settings, SERVICE)
    with tracing.configured(SERVICE):
        run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()

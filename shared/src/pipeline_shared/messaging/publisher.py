"""``Publisher``: a publishing connection (``publish_connection``) kept open.

When the connection is lost, the publisher tells its owner (``Reporter``) and
connects again every ``reconnect_interval`` seconds (the URL's, as aio-pika
reads it) until it is back or closed. Meanwhile ``publish`` raises ``NotSent``:
nothing waits for a connection that may not come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from pamqp.commands import Basic
from pamqp.common import FieldTable

from pipeline_shared.messaging.publish_connection import (
    BrokerClosed,
    Endpoint,
    NotSent,
    PublishConnection,
    Settle,
    describe,
)
from pipeline_shared.probe_server import NOT_CONNECTED

log = logging.getLogger("pipeline.messaging")


class Reporter(Protocol):
    """Who hears of the connection's losses and returns (the ``Broker``, which logs them)."""

    def went_down(self, which: str, reason: str) -> None: ...
    def came_back(self, which: str) -> None: ...


class Publisher:
    def __init__(
        self,
        url: str,
        *,
        client_properties: FieldTable,
        connect_timeout: float,
        reporter: Reporter,
    ) -> None:
        self._endpoint = Endpoint.from_url(url)
        self._client_properties = client_properties
        self._connect_timeout = connect_timeout
        self._reporter = reporter
        self._connection: PublishConnection | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self) -> None:
        """Connect once (raising ``BrokerClosed``, ``OSError`` or ``TimeoutError``);
        from then on, connect again whenever the connection is lost."""
        self._connection = await self._connect()
        self._keeper = asyncio.create_task(self._keep_open(), name="publisher keeper")
        self._keeper.add_done_callback(_report_death)

    @property
    def ready(self) -> bool:
        return self._connection is not None and self._connection.ready

    def problem(self) -> str | None:
        """Why a publish would not be sent now, or None."""
        if self._connection is None:
            return NOT_CONNECTED
        return self._connection.problem()

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        *,
        mandatory: bool,
        timeout: float,
        settle: Settle,
    ) -> None:
        """Write one message; ``settle`` is called once with its outcome (see
        ``PublishConnection.publish``). Raises ``NotSent`` if it cannot be sent now."""
        if self._connection is None:
            raise NotSent(NOT_CONNECTED)
        self._connection.publish(
            exchange,
            routing_key,
            body,
            properties,
            mandatory=mandatory,
            timeout=timeout,
            settle=settle,
        )

    async def close(self) -> None:
        """Wait (up to the connect timeout) for the confirms still due, then close."""
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._connection is not None:
            await self._connection.close(self._connect_timeout)

    async def _connect(self) -> PublishConnection:
        return await PublishConnection.connect(
            self._endpoint, self._client_properties, self._connect_timeout
        )

    async def _keep_open(self) -> None:
        while True:
            assert self._connection is not None
            # Shielded: cancelling the keeper (close) must not cancel the connection's future.
            reason = await asyncio.shield(self._connection.lost)
            if self._closed:
                return
            self._connection = None
            self._reporter.went_down("publishing", describe(reason))
            self._connection = await self._reconnect()
            self._reporter.came_back("publishing")

    async def _reconnect(self) -> PublishConnection:
        while True:
            await asyncio.sleep(self._endpoint.reconnect_interval)
            try:
                return await self._connect()
            except (OSError, TimeoutError, BrokerClosed) as exc:
                self._reporter.went_down("publishing", describe(exc))
            except Exception as exc:  # a bug must not end the reconnecting for good
                log.exception("publishing connection: could not connect; trying again")
                self._reporter.went_down("publishing", describe(exc))


def _report_death(keeper: asyncio.Task[None]) -> None:
    if not keeper.cancelled() and keeper.exception() is not None:
        log.error(
            "the publishing connection's keeper stopped; this service cannot publish "
            "until it is restarted",
            exc_info=keeper.exception(),
        )

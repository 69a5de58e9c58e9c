"""The api's broker connection: made in the background, and explained while it is not.

The api answers (``/healthz``, and 503s for jobs) while its broker is away.
``BrokerConnector.run`` keeps trying to connect until it works; from then on the
robust connection restores itself. What no retry of the same attempt fixes (the
broker refusing the api's user or vhost, the topology missing) is logged once,
named by ``problem`` (which ``/readyz`` reports), and tried again after a growing
pause: an operator may fix it without restarting the api.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline_shared.messaging import Broker
from pipeline_shared.probe_server import NOT_CONNECTED

log = logging.getLogger("api.connecting")


class BrokerConnector:
    def __init__(
        self, broker: Broker, *, first_pause: float = 1.0, longest_pause: float = 30.0
    ) -> None:
        self._broker = broker
        self._first_pause = first_pause
        self._longest_pause = longest_pause
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """Why jobs cannot be accepted right now, or None while they can."""
        if self._broker.is_ready:
            return None
        return self._problem or NOT_CONNECTED

    async def run(self) -> None:
        """Connect, trying again with back-off; return once connected."""
        pause = self._first_pause
        while True:
            try:
                await self._broker.connect_until_ready()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                problem = f"cannot accept jobs: {words(exc)}"
                if problem != self._problem:
                    log.error("%s; trying again with back-off", problem)
                self._problem = problem
                await asyncio.sleep(pause)
                pause = min(2 * pause, self._longest_pause)
                continue
            if self._problem is not None:
                log.info("connected to the message broker")
            self._problem = None
            return


def words(exc: BaseException) -> str:
    """The broker's own words when it gave some, else the exception's."""
    text = str(exc).strip()
    return text or type(exc).__name__

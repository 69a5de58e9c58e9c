"""What the services print when they lose the broker and get it back.

The README promises one line when a service loses the broker and one when it
regains it. The services connect through a TCP proxy the test owns; cutting
it is a broker outage to them, reopening it the broker's return. They log at
DEBUG, so the test can see that they really retried during the outage, and
that each retry is a DEBUG line, not a WARNING or a library's ERROR.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from e2e.conftest import Pipeline
from pipeline_shared.topology import MAILER, PROCESSOR, STATUS
from support.services import Service
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

LOSS = "WARNING pipeline.messaging: lost the broker connection"
RETRY = "DEBUG   pipeline.messaging: still no broker connection"
# aiormq's own report of each failed attempt (at DEBUG once demoted): counted
# to know the services retried, whatever the messaging layer says about it.
ATTEMPT = "aiormq.connection: error when creating transport"
REGAIN = "INFO    pipeline.messaging: reconnected to"
RETRIES = 3
# A log line as the services write it: date, time, level, logger, message.
_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) ")


def lines_at(text: str, *levels: str) -> list[str]:
    """The log lines of ``text`` at any of ``levels`` (tracebacks and other
    continuation lines belong to the line above them and are left out)."""
    return [
        line
        for line in text.splitlines()
        if (match := _LINE.match(line)) is not None and match["level"] in levels
    ]


def output_since(service: Service, offset: int) -> str:
    return service.output()[offset:]


def assert_one_loss_and_one_regain(text: str, report: str) -> None:
    """One WARNING, the loss; one INFO of the messaging layer, the recovery;
    no ERROR at all."""
    warnings = lines_at(text, "WARNING")
    assert len(warnings) == 1, report
    assert LOSS in warnings[0], report
    assert lines_at(text, "ERROR", "CRITICAL") == [], report
    messaging_info = [line for line in lines_at(text, "INFO") if "pipeline.messaging" in line]
    assert len(messaging_info) == 1, report
    assert REGAIN in messaging_info[0], report


def wait_every_consumer(pipeline: Pipeline) -> None:
    """Every service consumes its queue, status-service (the api's read model)
    included: an outage that strikes while a consumer is still being set up is
    another test."""

    def consuming() -> bool:
        return all(
            pipeline.management.consumers(pipeline.vhost, stage.queue) == 1
            for stage in (PROCESSOR, MAILER, STATUS)
        )

    wait_for(consuming, what="a consumer on each service's queue")


def test_each_service_logs_one_warning_on_loss_and_one_info_on_regain_and_retries_at_debug(
    pipeline_factory: PipelineFactory, broker_url: str, proxy: TcpProxy
) -> None:
    # aio-pika reads reconnect_interval from the URL: retries every 0.2 s
    # instead of 5 s make the outage short and still hold several of them.
    through_proxy = urlsplit(broker_url)._replace(
        netloc=f"guest:guest@127.0.0.1:{proxy.port}", query="reconnect_interval=0.2"
    )
    pipeline = pipeline_factory(RABBITMQ_URL=through_proxy.geturl(), LOG_LEVEL="DEBUG")
    pipeline.start()
    wait_every_consumer(pipeline)
    services = pipeline.services
    before = {service.command: len(service.output()) for service in services}

    proxy.cut()

    def retried_enough() -> bool:
        return all(
            output_since(service, before[service.command]).count(ATTEMPT) >= RETRIES
            for service in services
        )

    wait_for(retried_enough, what=f"every service to retry {RETRIES} times")
    proxy.open()
    wait_for(
        lambda: all(REGAIN in output_since(s, before[s.command]) for s in services),
        what="every service to reconnect",
    )

    for service in services:
        text = output_since(service, before[service.command])
        assert_one_loss_and_one_regain(text, f"{service.command} after the cut:\n{text}")
        assert text.count(RETRY) >= RETRIES, f"{service.command} after the cut:\n{text}"

    # Still working: both workers consume again after the outage.
    wait_every_consumer(pipeline)


def test_a_connection_the_broker_closes_is_one_warning_with_its_reason_and_one_info(
    pipeline_factory: PipelineFactory, broker_url: str, vhost: str
) -> None:
    """As when the broker shuts down or an operator closes the connection: the
    broker says why (Connection.Close), and the warning carries its words."""
    pipeline = pipeline_factory(RABBITMQ_URL=f"{broker_url}?reconnect_interval=0.2")
    pipeline.start()
    wait_every_consumer(pipeline)
    services = pipeline.services
    before = {service.command: len(service.output()) for service in services}
    client = pipeline.management.client

    def service_connections() -> dict[str, list[str]]:
        """Each service's connections (consuming, publishing), by the service their
        names start with, to their broker names."""
        response = client.get(f"/api/vhosts/{quote(vhost, safe='')}/connections")
        response.raise_for_status()
        found: dict[str, list[str]] = {}
        for connection in response.json():
            name = connection.get("client_properties", {}).get("connection_name", "")
            found.setdefault(name.split(" ")[0], []).append(connection["name"])
        return found

    def both_of_each() -> list[str]:
        found = service_connections()
        return (
            [name for s in services for name in found[s.command]]
            if all(len(found.get(s.command, [])) == 2 for s in services)
            else []
        )

    # Both connections of every service at once: still one line for the loss, one for the return.
    for name in wait_for(both_of_each, what="two connections from each service"):
        client.delete(
            f"/api/connections/{quote(name, safe='')}", headers={"X-Reason": "test outage"}
        ).raise_for_status()
    wait_for(
        lambda: all(REGAIN in output_since(s, before[s.command]) for s in services),
        what="every service to reconnect",
    )

    for service in services:
        text = output_since(service, before[service.command])
        report = f"{service.command} after the close:\n{text}"
        assert_one_loss_and_one_regain(text, report)
        assert "(ConnectionClosed: CONNECTION_FORCED - test outage)" in text, report

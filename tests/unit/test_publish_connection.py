"""The publishing connection's protocol logic (``PublishConnection``), fed a broker's bytes.

A scripted broker on an in-memory transport: what the connection writes is
parsed back into frames, and the broker's answers are handed to
``data_received`` in whatever pieces a network might cut them into. The real
broker is in tests/integration/test_publisher.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame, header
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.heartbeat import Heartbeat

from pipeline_shared.messaging.publish_connection import (
    BrokerClosed,
    ChannelClosed,
    ConfirmTimeout,
    ConnectionLost,
    Endpoint,
    Nacked,
    NotSent,
    PublishConnection,
    Unroutable,
    client_properties,
)

ENDPOINT = Endpoint.from_url("amqp://ada:s%3Acret@broker.test:5673/my%2Fvhost?heartbeat=0")


class Transport(asyncio.Transport):
    """Collects what the connection writes; closing it tells the protocol, a turn later."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self._gone()

    def abort(self) -> None:
        self._gone()

    def _gone(self) -> None:
        if not self.closed and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closed = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def frames_in(data: bytes | bytearray) -> list[tuple[int, Any]]:
    """Every (channel, frame) in ``data``, after the protocol header."""
    data = bytes(data)
    if data.startswith(b"AMQP"):
        data = data[8:]
    found = []
    while data:
        used, channel, value = frame.unmarshal(data)
        found.append((channel, value))
        data = data[used:]
    return found


def server(value: Frame | header.ContentHeader | ContentBody, channel: int = 1) -> bytes:
    return frame.marshal(value, channel)


class Broker:
    """Plays the broker's side over ``Transport``."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.connection: PublishConnection | None = None
        self.read = 0

    def sent(self) -> list[tuple[int, Any]]:
        """Frames the connection wrote since the last call."""
        new = self.transport.written[self.read :]
        self.read = len(self.transport.written)
        return frames_in(new)

    def feed(self, data: bytes) -> None:
        assert self.connection is not None
        self.connection.data_received(data)

    async def open(self) -> PublishConnection:
        self.connection = connection = PublishConnection(ENDPOINT, client_properties("test"))
        self.transport.protocol = connection
        connection.connection_made(self.transport)
        # The handshake is a conversation: answer each step as the broker would.
        opening = asyncio.ensure_future(connection._open())
        await asyncio.sleep(0)
        assert self.transport.written.startswith(b"AMQP\x00\x00\x09\x01")
        self.feed(
            server(
                commands.Connection.Start(
                    server_properties={}, mechanisms="AMQPLAIN PLAIN", locales="en_US"
                ),
                0,
            )
        )
        await asyncio.sleep(0)
        self.feed(server(commands.Connection.Tune(channel_max=2047, frame_max=4096), 0))
        await asyncio.sleep(0)
        self.feed(server(commands.Connection.OpenOk(), 0))
        await asyncio.sleep(0)
        self.feed(server(commands.Channel.OpenOk()))
        await asyncio.sleep(0)
        self.feed(server(commands.Confirm.SelectOk()))
        await asyncio.wait_for(opening, 1)
        return connection


class Outcomes:
    """Collects each publish's outcome, by publish."""

    def __init__(self) -> None:
        self.got: dict[int, BaseException | None] = {}

    def settle(self, n: int) -> Any:
        def settled(outcome: BaseException | None) -> None:
            assert n not in self.got, f"publish {n} settled twice"
            self.got[n] = outcome

        return settled


def publish(
    connection: PublishConnection,
    outcomes: Outcomes,
    n: int,
    body: bytes = b"{}",
    *,
    message_id: str | None = None,
    mandatory: bool = True,
    timeout: float = 5.0,
) -> None:
    connection.publish(
        "pipeline",
        "job.requested",
        body,
        Basic.Properties(message_id=message_id or f"m{n}", delivery_mode=2),
        mandatory=mandatory,
        timeout=timeout,
        settle=outcomes.settle(n),
    )


async def test_the_handshake_logs_in_with_the_urls_user_and_vhost_and_selects_confirms() -> None:
    broker = Broker()
    connection = await broker.open()
    sent = [value for _, value in frames_in(broker.transport.written)]
    start_ok = next(v for v in sent if isinstance(v, commands.Connection.StartOk))
    assert start_ok.mechanism == "PLAIN"
    assert start_ok.response == "\0ada\0s:cret"
    assert start_ok.client_properties["connection_name"] == "test"
    tune_ok = next(v for v in sent if isinstance(v, commands.Connection.TuneOk))
    assert (tune_ok.frame_max, tune_ok.heartbeat) == (4096, 0)
    assert next(v for v in sent if isinstance(v, commands.Connection.Open)).virtual_host == (
        "my/vhost"
    )
    assert any(isinstance(v, commands.Confirm.Select) for v in sent)
    assert connection.ready


async def test_a_broker_that_refuses_the_login_is_raised_in_its_own_words() -> None:
    broker = Broker()
    broker.connection = connection = PublishConnection(ENDPOINT, client_properties("test"))
    broker.transport.protocol = connection
    connection.connection_made(broker.transport)
    opening = asyncio.ensure_future(connection._open())
    await asyncio.sleep(0)
    broker.feed(
        server(commands.Connection.Start(server_properties={}, mechanisms="PLAIN"), 0)
        + server(
            commands.Connection.Close(
                reply_code=403,
                reply_text="ACCESS_REFUSED - Login was refused",
                class_id=0,
                method_id=0,
            ),
            0,
        )
    )
    with pytest.raises(BrokerClosed, match="ACCESS_REFUSED - Login was refused"):
        await asyncio.wait_for(opening, 1)
    assert not connection.ready


async def test_a_publish_writes_its_frames_at_once_split_to_the_frame_size() -> None:
    broker = Broker()
    connection = await broker.open()
    broker.sent()
    body = bytes(range(256)) * 40  # 10,240 bytes: three body frames of at most 4,088
    publish(connection, Outcomes(), 1, body)
    sent = broker.sent()
    assert [type(value) for _, value in sent] == [
        Basic.Publish,
        header.ContentHeader,
        ContentBody,
        ContentBody,
        ContentBody,
    ]
    assert {channel for channel, _ in sent} == {1}
    method, content = sent[0][1], sent[1][1]
    assert (method.exchange, method.routing_key, method.mandatory) == (
        "pipeline",
        "job.requested",
        True,
    )
    assert content.body_size == len(body)
    assert content.properties.message_id == "m1"
    assert b"".join(value.value for _, value in sent[2:]) == body
    # No frame over frame_max (4,096 here), header and end byte included.
    written = bytes(broker.transport.written)
    position = written.index(b"\x01\x00\x01", len(written) - len(body) - 200)
    while position < len(written):
        size = int.from_bytes(written[position + 3 : position + 7], "big")
        assert size + 8 <= 4096
        position += size + 8


async def test_properties_too_large_for_one_frame_are_not_sent() -> None:
    broker = Broker()
    connection = await broker.open()
    broker.sent()
    with pytest.raises(NotSent, match="more than one frame holds"):
        connection.publish(
            "pipeline",
            "job.requested",
            b"{}",
            Basic.Properties(message_id="m", headers={"big": "x" * 5000}),
            mandatory=True,
            timeout=5,
            settle=Outcomes().settle(1),
        )
    assert broker.sent() == []
    publish(connection, outcomes := Outcomes(), 2)
    broker.feed(server(Basic.Ack(delivery_tag=1)))  # the refused one took no number
    assert outcomes.got == {2: None}


async def test_each_publish_is_settled_by_its_own_confirm_or_a_multiple_one() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    for n in range(1, 6):
        publish(connection, outcomes, n)
    broker.feed(server(Basic.Ack(delivery_tag=2)))
    assert outcomes.got == {2: None}
    broker.feed(server(Basic.Ack(delivery_tag=4, multiple=True)))
    assert outcomes.got == {1: None, 2: None, 3: None, 4: None}
    broker.feed(server(Basic.Nack(delivery_tag=5)))
    assert isinstance(outcomes.got[5], Nacked)


async def test_a_returned_message_is_unroutable_when_its_confirm_comes() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1, message_id="slow")
    publish(connection, outcomes, 2, message_id="nowhere")
    broker.feed(
        server(
            Basic.Return(
                reply_code=312,
                reply_text="NO_ROUTE",
                exchange="pipeline",
                routing_key="job.requested",
            )
        )
        + server(header.ContentHeader(0, 2, Basic.Properties(message_id="nowhere")))
        + server(ContentBody(b"{}"))
        + server(Basic.Ack(delivery_tag=2))
    )
    assert list(outcomes.got) == [2]
    assert isinstance(outcomes.got[2], Unroutable)
    assert "NO_ROUTE" in str(outcomes.got[2])
    broker.feed(server(Basic.Ack(delivery_tag=1)))
    assert outcomes.got[1] is None


def returned(message_id: str, routing_key: str = "job.requested") -> bytes:
    return (
        server(
            Basic.Return(
                reply_code=312, reply_text="NO_ROUTE", exchange="pipeline", routing_key=routing_key
            )
        )
        + server(header.ContentHeader(0, 2, Basic.Properties(message_id=message_id)))
        + server(ContentBody(b"{}"))
    )


async def test_two_waiting_copies_of_one_message_are_each_returned_in_their_turn() -> None:
    # Copies of one event (same message id) to queues that are gone: each return
    # names the earliest copy not yet returned.
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1, message_id="same")
    publish(connection, outcomes, 2, message_id="same")
    broker.feed(returned("same") + returned("same") + server(Basic.Ack(2, multiple=True)))
    assert isinstance(outcomes.got[1], Unroutable)
    assert isinstance(outcomes.got[2], Unroutable)


async def test_a_return_names_its_routing_key_so_a_copy_elsewhere_is_not_blamed() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1, message_id="same")
    connection.publish(
        "pipeline",
        "elsewhere",
        b"{}",
        Basic.Properties(message_id="same"),
        mandatory=True,
        timeout=5,
        settle=outcomes.settle(2),
    )
    broker.feed(returned("same", "elsewhere") + server(Basic.Ack(2, multiple=True)))
    assert outcomes.got[1] is None
    assert isinstance(outcomes.got[2], Unroutable)


async def test_a_mandatory_message_without_an_id_gets_one_and_its_return_counts() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    broker.sent()
    connection.publish(
        "pipeline",
        "job.requested",
        b"{}",
        Basic.Properties(),
        mandatory=True,
        timeout=5,
        settle=outcomes.settle(1),
    )
    given = next(v for _, v in broker.sent() if isinstance(v, header.ContentHeader))
    assert given.properties.message_id
    broker.feed(returned(given.properties.message_id) + server(Basic.Ack(1)))
    assert isinstance(outcomes.got[1], Unroutable)


async def test_a_confirm_that_never_comes_is_a_timeout_and_a_late_one_changes_nothing() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1, timeout=0.05)
    publish(connection, outcomes, 2, timeout=5)
    await asyncio.sleep(0.01)
    broker.feed(server(Heartbeat(), 0))  # the broker still talks
    await asyncio.sleep(0.1)
    assert isinstance(outcomes.got.pop(1), ConfirmTimeout)
    assert connection.ready
    broker.feed(server(Basic.Ack(delivery_tag=2, multiple=True)))
    assert outcomes.got == {2: None}


async def test_a_broker_silent_past_a_confirms_time_is_dropped_and_the_rest_unknown() -> None:
    # A half-open TCP connection: not an ack, not a heartbeat. Waiting for heartbeats
    # (minutes) would time every publish out one by one.
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1, timeout=0.02)
    publish(connection, outcomes, 2, timeout=5)
    await asyncio.sleep(0.1)
    assert isinstance(outcomes.got[1], ConfirmTimeout)
    assert isinstance(outcomes.got[2], ConnectionLost)
    assert broker.transport.closed
    assert connection.lost.done()


async def test_a_channel_the_broker_closes_fails_what_waits_and_is_opened_again() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1)
    broker.sent()
    broker.feed(
        server(
            commands.Channel.Close(
                reply_code=403, reply_text="ACCESS_REFUSED - no write", class_id=60, method_id=40
            )
        )
    )
    failure = outcomes.got[1]
    assert isinstance(failure, ChannelClosed)
    assert (failure.reply_code, failure.reply_text) == (403, "ACCESS_REFUSED - no write")
    assert failure.outcome_known  # the only one waiting: the one refused
    assert [type(v) for _, v in broker.sent()] == [commands.Channel.CloseOk, commands.Channel.Open]
    with pytest.raises(NotSent, match="reopened"):
        publish(connection, outcomes, 2)

    broker.feed(server(commands.Channel.OpenOk()))
    assert [type(v) for _, v in broker.sent()] == [commands.Confirm.Select]
    broker.feed(server(commands.Confirm.SelectOk()))
    assert connection.ready
    publish(connection, outcomes, 3)
    broker.feed(server(Basic.Ack(delivery_tag=1)))  # a new channel counts from 1 again
    assert outcomes.got[3] is None


async def test_a_channel_closed_while_several_wait_leaves_each_outcome_unknown() -> None:
    # The broker took those it handled before the refused one: which, it does not say.
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    for n in (1, 2, 3):
        publish(connection, outcomes, n)
    broker.feed(
        server(
            commands.Channel.Close(
                reply_code=404, reply_text="NOT_FOUND - no exchange", class_id=60, method_id=40
            )
        )
    )
    for n in (1, 2, 3):
        failure = outcomes.got[n]
        assert isinstance(failure, ChannelClosed)
        assert not failure.outcome_known


async def test_a_channel_that_cannot_be_reopened_drops_the_connection() -> None:
    broker = Broker()
    connection = await broker.open()
    close = server(
        commands.Channel.Close(reply_code=403, reply_text="ACCESS_REFUSED", class_id=0, method_id=0)
    )
    broker.feed(close)
    broker.feed(close)  # the reopened channel refused too
    assert broker.transport.closed
    assert connection.lost.done()


async def test_a_connection_the_broker_closes_fails_every_publish_as_unknown() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1)
    publish(connection, outcomes, 2)
    broker.sent()
    broker.feed(
        server(
            commands.Connection.Close(
                reply_code=320, reply_text="CONNECTION_FORCED - shutdown", class_id=0, method_id=0
            ),
            0,
        )
    )
    assert all(isinstance(outcomes.got[n], ConnectionLost) for n in (1, 2))
    assert not outcomes.got[1].outcome_known  # type: ignore[union-attr]
    assert [type(v) for _, v in broker.sent()] == [commands.Connection.CloseOk]
    reason = await asyncio.wait_for(connection.lost, 1)
    assert isinstance(reason, BrokerClosed)
    assert "CONNECTION_FORCED" in str(reason)
    with pytest.raises(NotSent):
        publish(connection, outcomes, 3)


async def test_a_blocked_connection_refuses_publishes_until_unblocked() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    broker.feed(server(commands.Connection.Blocked(reason="low on memory"), 0))
    with pytest.raises(NotSent, match="low on memory"):
        publish(connection, outcomes, 1)
    broker.feed(server(commands.Connection.Unblocked(), 0))
    publish(connection, outcomes, 2)
    broker.feed(server(Basic.Ack(delivery_tag=1)))
    assert outcomes.got == {2: None}


def _cuts(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda points: [
            data[a:b]
            for a, b in zip([0, *sorted(points)], [*sorted(points), len(data)], strict=True)
        ]
    )


_ANSWERS = (
    server(Basic.Ack(delivery_tag=1))
    + server(commands.Connection.Blocked(reason="x"), 0)
    + server(commands.Connection.Unblocked(), 0)
    + server(
        Basic.Return(
            reply_code=312, reply_text="NO_ROUTE", exchange="pipeline", routing_key="job.requested"
        )
    )
    + server(header.ContentHeader(0, 5, Basic.Properties(message_id="m3")))
    + server(ContentBody(b"hello"))
    + server(Basic.Ack(delivery_tag=3, multiple=True))
)


@given(pieces=_cuts(_ANSWERS))
def test_frames_cut_anywhere_by_the_network_settle_the_same(pieces: list[bytes]) -> None:
    async def scenario() -> dict[int, BaseException | None]:
        broker = Broker()
        connection = await broker.open()
        outcomes = Outcomes()
        for n in (1, 2, 3):
            publish(connection, outcomes, n)
        for piece in pieces:
            broker.feed(piece)
        return outcomes.got

    got = asyncio.run(scenario())
    assert got[1] is None
    assert got[2] is None
    assert isinstance(got[3], Unroutable)


async def test_a_stream_that_is_not_amqp_drops_the_connection() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1)
    broker.feed(b"\x01\x00\x01\x00\x00\x00\x04abcdX")  # a frame whose end byte is wrong
    assert broker.transport.closed
    assert isinstance(outcomes.got[1], ConnectionLost)


async def test_closing_waits_for_the_confirms_still_due_then_says_goodbye() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1)
    broker.sent()
    closing = asyncio.ensure_future(connection.close(within=5))
    await asyncio.sleep(0.01)
    with pytest.raises(NotSent):
        publish(connection, outcomes, 2)
    assert broker.sent() == []  # not before the confirm
    broker.feed(server(Basic.Ack(delivery_tag=1)))
    assert outcomes.got == {1: None}
    await asyncio.sleep(0.01)
    assert [type(v) for _, v in broker.sent()] == [commands.Connection.Close]
    broker.feed(server(commands.Connection.CloseOk(), 0))
    await asyncio.wait_for(closing, 1)
    assert broker.transport.closed


async def test_closing_does_not_wait_past_its_time_for_confirms() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1)
    await asyncio.wait_for(connection.close(within=0.05), 2)
    assert isinstance(outcomes.got[1], ConnectionLost)
    assert broker.transport.closed


async def test_the_end_of_the_brokers_stream_stops_publishing_at_once() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()
    publish(connection, outcomes, 1)
    assert connection.eof_received() is False
    assert isinstance(outcomes.got[1], ConnectionLost)
    with pytest.raises(NotSent):
        publish(connection, outcomes, 2)


async def test_a_paused_transport_refuses_publishes_until_it_resumes() -> None:
    broker = Broker()
    connection = await broker.open()
    connection.pause_writing()
    with pytest.raises(NotSent, match="not reading"):
        publish(connection, Outcomes(), 1)
    connection.resume_writing()
    publish(connection, Outcomes(), 2)


async def test_a_settle_callback_may_publish_again_from_within_a_confirm() -> None:
    broker = Broker()
    connection = await broker.open()
    outcomes = Outcomes()

    def then_more(outcome: BaseException | None) -> None:
        outcomes.got[1] = outcome
        publish(connection, outcomes, 2)

    connection.publish(
        "pipeline",
        "job.requested",
        b"{}",
        Basic.Properties(message_id="m1"),
        mandatory=True,
        timeout=5,
        settle=then_more,
    )
    broker.feed(server(Basic.Ack(delivery_tag=1)) + server(Basic.Ack(delivery_tag=2)))
    assert outcomes.got == {1: None, 2: None}


async def test_heartbeats_are_sent_and_a_silent_broker_is_dropped() -> None:
    broker = Broker()
    broker.connection = connection = PublishConnection(
        Endpoint.from_url("amqp://guest:guest@broker.test/?heartbeat=1"), client_properties("t")
    )
    broker.transport.protocol = connection
    connection.connection_made(broker.transport)
    opening = asyncio.ensure_future(connection._open())
    for answer in (
        server(commands.Connection.Start(server_properties={}, mechanisms="PLAIN"), 0),
        server(commands.Connection.Tune(channel_max=10, frame_max=4096, heartbeat=60), 0),
        server(commands.Connection.OpenOk(), 0),
        server(commands.Channel.OpenOk()),
        server(commands.Confirm.SelectOk()),
    ):
        await asyncio.sleep(0)
        broker.feed(answer)
    await asyncio.wait_for(opening, 1)
    tune_ok = next(v for _, v in broker.sent() if isinstance(v, commands.Connection.TuneOk))
    assert tune_ok.heartbeat == 1
    await asyncio.sleep(0.6)
    assert any(isinstance(v, Heartbeat) for _, v in broker.sent())
    await asyncio.wait_for(connection.lost, 3)  # nothing came back for 2 heartbeats
    assert broker.transport.closed

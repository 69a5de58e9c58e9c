"""Publishing over a connection of its own: AMQP 0-9-1 on an asyncio protocol, confirms pipelined.

aio-pika publishes through aiormq's queues and tasks: a publish is put on a
write queue for a writer task, and its confirm is read by a reader task,
queued for the channel's own reader task and scheduled once more before the
publisher hears of it. Each of those steps waits for a turn of the event loop,
and a busy loop's turn takes milliseconds: measured in the api during a
backlog's drain, a confirm that the broker sent in 3 ms reached its request
after 10-30 (bench/README.md, "Session 10"). Here a publish writes its frames to
the socket in the call, and ``data_received`` settles every publish a confirm
covers in the turn the confirm arrives in.

The connection carries publishes only, as RabbitMQ advises: when the broker
holds back a fast publisher (credit flow, a resource alarm), a consuming
connection's acks must not wait behind it.

``PublishConnection`` is one connection with channel 1 in confirm mode;
``publisher.Publisher`` keeps one open, connecting again when it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import uuid
from base64 import b64decode
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from pamqp import commands, frame, header
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.common import FieldTable
from pamqp.constants import FRAME_END, FRAME_HEADER_SIZE
from pamqp.exceptions import PAMQPException
from pamqp.heartbeat import Heartbeat

from pipeline_shared.probe_server import NOT_CONNECTED

log = logging.getLogger("pipeline.messaging")

Settle = Callable[[BaseException | None], None]
"""Called once per publish: with None once the broker confirmed it, or with why not."""

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
DEFAULT_HEARTBEAT = 60
DEFAULT_RECONNECT_INTERVAL = 5.0
WRITE_BUFFER_LIMIT = 32 * 1024 * 1024
"""Bytes written and not yet taken by the kernel beyond which publishes are refused:
the broker has stopped reading (a resource alarm, a hung node), and what is queued
here could only wait for the confirm timeout."""
_CHANNEL = 1
_FRAME = struct.Struct(">BHI")
_ACK = struct.Struct(">HHQB")  # class 60, method 80, delivery tag, flags
_ACK_PAYLOAD_SIZE = _ACK.size
_BASIC_ACK = (60, 80)
_PUBLISH_FRAMES_CACHED = 256
_HEARTBEAT = Heartbeat().marshal()


class PublishFailed(Exception):
    """The broker did not take a message, or may not have (``outcome_known``)."""

    outcome_known = True


class NotSent(PublishFailed):
    """Nothing was sent: no connection, the channel being reopened, or the broker
    holding publishers back."""


class Unroutable(PublishFailed):
    """The broker returned a mandatory message: no queue is bound to its routing key."""


class Nacked(PublishFailed):
    """The broker could not take the message (basic.nack)."""


class ChannelClosed(PublishFailed):
    """The broker closed the channel over a publish, e.g. ACCESS_REFUSED, and every
    publish still awaiting its confirm on that channel gets this. The broker took
    those it had handled before the one it refused, and dropped the rest; which was
    which it does not say, so the outcome is known only when one publish waited."""

    def __init__(self, reply_code: int, reply_text: str, *, outcome_known: bool) -> None:
        super().__init__(reply_text or f"reply code {reply_code}")
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.outcome_known = outcome_known


class ConnectionLost(PublishFailed):
    """The connection went while the confirm was awaited: the message may have been taken."""

    outcome_known = False


class ConfirmTimeout(PublishFailed):
    """No confirm within the time allowed: the message may have been taken."""

    outcome_known = False


class BrokerClosed(Exception):
    """The broker closed the connection (Connection.Close), in its own words."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(reply_text or f"reply code {reply_code}")
        self.reply_code = reply_code
        self.reply_text = reply_text


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, read from an AMQP URL as aio-pika reads it."""

    host: str
    port: int
    tls: bool
    user: str
    password: str
    vhost: str
    heartbeat: int
    reconnect_interval: float
    query: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        scheme = parts.scheme or "amqp"
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or DEFAULT_PORTS.get(scheme, 5672),
            tls=scheme == "amqps",
            user=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=unquote(parts.path[1:]) or "/",
            heartbeat=int(query.get("heartbeat", DEFAULT_HEARTBEAT)),
            reconnect_interval=float(query.get("reconnect_interval", DEFAULT_RECONNECT_INTERVAL)),
            query=query,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for amqps://, from the same URL options aio-pika reads
        (cafile, capath, cadata, certfile, keyfile, no_verify_ssl)."""
        if not self.tls:
            return None
        cadata = self.query.get("cadata")
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=self.query.get("cafile"),
            capath=self.query.get("capath"),
            cadata=b64decode(cadata) if cadata else None,
        )
        if self.query.get("certfile"):
            context.load_cert_chain(self.query["certfile"], self.query.get("keyfile"))
        if self.query.get("no_verify_ssl", "0") != "0":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


ReturnKey = tuple[str, str, str]
"""A mandatory publish as a returned message names it: exchange, routing key, message id."""


@dataclass(slots=True)
class _Pending:
    tag: int
    settle: Settle
    timer: asyncio.TimerHandle
    returnable: ReturnKey | None
    sent_at: float
    returned: Unroutable | None = None


def client_properties(connection_name: str) -> FieldTable:
    """What the connection tells the broker about itself; the management UI shows the name."""
    return {
        "connection_name": connection_name,
        "product": "pipeline-shared publisher",
        "capabilities": {
            "authentication_failure_close": True,
            "basic.nack": True,
            "connection.blocked": True,
            "publisher_confirms": True,
        },
    }


def method_frame(method: Frame, channel: int = _CHANNEL) -> bytes:
    return frame.marshal(method, channel)


class PublishConnection(asyncio.Protocol):
    """One AMQP connection whose channel 1 publishes in confirm mode.

    Use ``await connect(endpoint, ...)``; then ``publish`` any number of messages
    without waiting, each settled when its confirm (or its failure) arrives;
    ``lost`` resolves, with the reason, when the connection is gone.
    """

    def __init__(self, endpoint: Endpoint, client_properties: FieldTable) -> None:
        self._endpoint = endpoint
        self._client_properties = client_properties
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._handshake: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._opened = False
        self._channel_open = False
        self._frame_max = 131072
        self._heartbeat = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._last_received = self._loop.time()
        self._next_tag = 1
        self._pending: dict[int, _Pending] = {}
        self._order: deque[int] = deque()
        self._returnable: dict[ReturnKey, deque[int]] = {}
        """Mandatory publishes awaiting their confirm, in order, by how a return names
        them: the broker returns a channel's messages in the order they came."""
        self._closing = False
        self._drained: asyncio.Future[None] | None = None
        self._returning: Basic.Return | None = None
        self._blocked: str | None = None
        self._paused = False
        self._publish_frames: dict[tuple[str, str, bool], bytes] = {}
        self.lost: asyncio.Future[BaseException] = self._loop.create_future()
        self._transport_gone: asyncio.Future[None] = self._loop.create_future()

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, endpoint: Endpoint, client_properties: FieldTable, within: float
    ) -> PublishConnection:
        """Connect, log in, open the vhost and channel 1 in confirm mode; raise
        ``BrokerClosed`` if the broker refuses, ``OSError`` or ``TimeoutError`` if it
        cannot be reached in ``within`` seconds."""
        connection = cls(endpoint, client_properties)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                await loop.create_connection(
                    lambda: connection,
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.ssl_context(),
                    server_hostname=endpoint.host if endpoint.tls else None,
                )
                await connection._open()
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _open(self) -> None:
        assert self._transport is not None
        self._transport.write(b"AMQP\x00\x00\x09\x01")
        start = await self._expect(commands.Connection.Start)
        mechanisms = start.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode("latin-1")
        if "PLAIN" not in (mechanisms or "").split():
            raise BrokerClosed(0, f"the broker does not offer PLAIN (it offers {mechanisms})")
        credentials = f"\0{self._endpoint.user}\0{self._endpoint.password}"
        self._write(
            method_frame(
                commands.Connection.StartOk(
                    client_properties=self._client_properties,
                    mechanism="PLAIN",
                    response=credentials,
                    locale="en_US",
                ),
                0,
            )
        )
        tune = await self._expect(commands.Connection.Tune)
        self._frame_max = tune.frame_max or self._frame_max
        # As aio-pika: the client's heartbeat, which the broker accepts.
        self._heartbeat = self._endpoint.heartbeat
        self._write(
            method_frame(
                commands.Connection.TuneOk(
                    channel_max=tune.channel_max,
                    frame_max=self._frame_max,
                    heartbeat=self._heartbeat,
                ),
                0,
            )
            + method_frame(commands.Connection.Open(virtual_host=self._endpoint.vhost), 0)
        )
        await self._expect(commands.Connection.OpenOk)
        self._write(method_frame(commands.Channel.Open()) + method_frame(commands.Confirm.Select()))
        await self._expect(commands.Channel.OpenOk)
        await self._expect(commands.Confirm.SelectOk)
        self._opened = self._channel_open = True
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)
        if self._heartbeat > 0:
            self._heartbeat_timer = self._loop.call_later(self._heartbeat / 2, self._beat)

    async def _expect(self, kind: type[Any]) -> Any:
        received = await self._handshake.get()
        if isinstance(received, BaseException):
            raise received
        if not isinstance(received, kind):
            raise BrokerClosed(0, f"expected {kind.__name__}, got {received!r}")
        return received

    # --- publishing ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._channel_open and not self.lost.done()

    def problem(self) -> str | None:
        """Why a publish would not be sent now, or None."""
        if self.lost.done() or self._closing:
            return NOT_CONNECTED
        if self._transport is None or self._transport.is_closing():
            return "the connection to the broker is closing"
        if not self._channel_open:
            return "the publishing channel is being reopened"
        if self._blocked is not None:
            return f"the broker holds publishers back ({self._blocked})"
        if self._paused:
            return "the broker is not reading what this service sends"
        return None

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
        """Write one message; ``settle`` is called once with its outcome. Raises
        ``NotSent`` (and calls nothing) if it cannot be sent now."""
        problem = self.problem()
        if problem is not None:
            raise NotSent(problem)
        assert self._transport is not None
        message_id = properties.message_id
        if mandatory and message_id is None:
            # A return names its message by id: one without gets one (as aio-pika did).
            message_id = properties.message_id = uuid.uuid4().hex
        try:
            data = self._frames(exchange, routing_key, body, properties, mandatory)
            self._transport.write(data)
        except NotSent:
            raise
        except Exception as exc:  # nothing reached the socket: not sent, say why
            raise NotSent(f"could not send the message ({exc!r})") from exc
        # The broker numbers the publishes it reads; only one written counts.
        tag = self._next_tag
        self._next_tag += 1
        returnable = (exchange, routing_key, message_id) if message_id and mandatory else None
        self._pending[tag] = _Pending(
            tag,
            settle,
            self._loop.call_later(timeout, self._expire, tag),
            returnable,
            self._loop.time(),
        )
        self._order.append(tag)
        if returnable is not None:
            self._returnable.setdefault(returnable, deque()).append(tag)

    def _frames(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        mandatory: bool,
    ) -> bytes:
        key = (exchange, routing_key, mandatory)
        publish_frame = self._publish_frames.get(key)
        if publish_frame is None:
            if len(self._publish_frames) >= _PUBLISH_FRAMES_CACHED:
                self._publish_frames.clear()
            publish_frame = self._publish_frames[key] = method_frame(
                Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            )
        content = frame.marshal(header.ContentHeader(0, len(body), properties), _CHANNEL)
        if len(content) > self._frame_max:
            # The broker would close the whole connection over it.
            raise NotSent(
                f"the message's properties take {len(content)} bytes, more than one "
                f"frame holds ({self._frame_max})"
            )
        parts = [publish_frame, content]
        size = self._frame_max - FRAME_HEADER_SIZE - 1
        for start in range(0, len(body), size):
            parts.append(frame.marshal(ContentBody(body[start : start + size]), _CHANNEL))
        return b"".join(parts)

    def _expire(self, tag: int) -> None:
        pending = self._pending.pop(tag, None)
        if pending is None:
            return
        self._forget(pending)
        self._trim_order()
        _call(pending.settle, ConfirmTimeout("no confirm in time"))
        self._check_drained()
        if (
            self._blocked is None
            and self._last_received < pending.sent_at
            and self._transport is not None
            and not self.lost.done()
        ):
            # Not a byte, not a heartbeat, while a confirm was due: a connection
            # that is gone without a word (a half-open TCP connection). Drop it
            # and connect again rather than let every publish time out.
            log.debug("publishing connection: nothing from the broker in time; dropping it")
            self._lose(ConnectionResetError("the broker stopped answering"))
            self._transport.abort()

    def _confirm(self, tag: int, multiple: bool, nacked: bool) -> None:
        if multiple:
            order = self._order
            while order and order[0] <= tag:
                pending = self._pending.pop(order.popleft(), None)
                if pending is not None:
                    self._settle(pending, nacked)
        else:
            pending = self._pending.pop(tag, None)
            if pending is not None:
                self._settle(pending, nacked)
            self._trim_order()
        self._check_drained()

    def _trim_order(self) -> None:
        order = self._order
        while order and order[0] not in self._pending:
            order.popleft()

    def _settle(self, pending: _Pending, nacked: bool) -> None:
        pending.timer.cancel()
        self._forget(pending)
        if nacked:
            _call(pending.settle, Nacked("the broker refused the message (nack)"))
        else:
            _call(pending.settle, pending.returned)

    def _forget(self, pending: _Pending) -> None:
        if pending.returnable is None:
            return
        tags = self._returnable.get(pending.returnable)
        if tags is None:
            return
        if tags and tags[0] == pending.tag:
            tags.popleft()
        else:
            with contextlib.suppress(ValueError):
                tags.remove(pending.tag)
        if not tags:
            del self._returnable[pending.returnable]

    def _fail_all(self, error: PublishFailed) -> None:
        pending, self._pending = self._pending, {}
        self._order.clear()
        self._returnable.clear()
        for entry in pending.values():
            entry.timer.cancel()
            _call(entry.settle, error)
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._pending and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- receiving -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        buffer = self._buffer
        buffer += data
        position = 0
        available = len(buffer)
        try:
            while available - position >= FRAME_HEADER_SIZE:
                kind, channel, size = _FRAME.unpack_from(buffer, position)
                end = position + FRAME_HEADER_SIZE + size
                if end >= available:
                    break
                if buffer[end] != FRAME_END:
                    raise BrokerClosed(0, "the broker's stream is not AMQP 0-9-1 framing")
                if kind == 1 and size == _ACK_PAYLOAD_SIZE and channel == _CHANNEL:
                    class_id, method_id, tag, flags = _ACK.unpack_from(
                        buffer, position + FRAME_HEADER_SIZE
                    )
                    if (class_id, method_id) == _BASIC_ACK:
                        self._confirm(tag, bool(flags & 1), nacked=False)
                        position = end + 1
                        continue
                _, _, value = frame.unmarshal(bytes(buffer[position : end + 1]))
                position = end + 1
                self._on_frame(channel, value)
        except (BrokerClosed, PAMQPException, ValueError) as exc:
            log.error("publishing connection: %s; closing it", exc)
            self.abort()
            return
        finally:
            del buffer[:position]

    def _on_frame(self, channel: int, value: Any) -> None:
        if isinstance(value, Heartbeat):
            return
        if channel == 0:
            self._on_connection_frame(value)
        elif not self._opened:
            self._handshake.put_nowait(value)
        elif not self._channel_open:
            self._on_reopening_frame(value)
        elif isinstance(value, Basic.Ack | Basic.Nack):
            self._confirm(value.delivery_tag, value.multiple, isinstance(value, Basic.Nack))
        elif isinstance(value, Basic.Return):
            self._returning = value
        elif isinstance(value, header.ContentHeader):
            self._returned(value)
        elif isinstance(value, commands.Channel.Close):
            self._channel_closed(value)
        elif not isinstance(value, ContentBody):  # a returned message's body: not needed
            log.debug("publishing connection: ignored %r", value)

    def _on_connection_frame(self, value: Any) -> None:
        if isinstance(value, commands.Connection.Close):
            self._write(method_frame(commands.Connection.CloseOk(), 0))
            self._lose(BrokerClosed(value.reply_code or 0, value.reply_text))
            if self._transport is not None:
                self._transport.close()
        elif isinstance(value, commands.Connection.CloseOk):
            self._lose(ConnectionResetError("closed by this service"))
            if self._transport is not None:
                self._transport.close()
        elif isinstance(value, commands.Connection.Blocked):
            self._blocked = value.reason or "blocked"
            log.warning("the broker holds this service's publishing back (%s)", self._blocked)
        elif isinstance(value, commands.Connection.Unblocked):
            self._blocked = None
            log.info("the broker takes this service's messages again")
        elif not self._opened:
            self._handshake.put_nowait(value)
        else:
            log.debug("publishing connection: ignored %r", value)

    def _returned(self, content: header.ContentHeader) -> None:
        """A returned message's header: the earliest waiting publish it names is
        unroutable (its confirm follows)."""
        returning, self._returning = self._returning, None
        message_id = content.properties.message_id
        if returning is None or message_id is None:
            return
        tags = self._returnable.get(
            (returning.exchange or "", returning.routing_key or "", message_id)
        )
        for tag in tags or ():
            pending = self._pending.get(tag)
            if pending is not None and pending.returned is None:
                pending.returned = Unroutable(
                    f"{returning.reply_text} (reply code {returning.reply_code})"
                )
                return

    def _channel_closed(self, close: commands.Channel.Close) -> None:
        """The broker closed the channel: every publish awaiting its confirm fails with
        the broker's words, and the channel is opened again."""
        self._channel_open = False
        self._write(method_frame(commands.Channel.CloseOk()))
        log.debug("the broker closed the publishing channel (%s); reopening it", close.reply_text)
        self._fail_all(
            ChannelClosed(
                close.reply_code or 0, close.reply_text, outcome_known=len(self._pending) == 1
            )
        )
        self._write(method_frame(commands.Channel.Open()))

    def _on_reopening_frame(self, value: Any) -> None:
        if isinstance(value, commands.Channel.OpenOk):
            self._write(method_frame(commands.Confirm.Select()))
        elif isinstance(value, commands.Confirm.SelectOk):
            self._next_tag = 1
            self._channel_open = True
        elif isinstance(value, commands.Channel.Close):
            # Opening it again was refused too: this connection cannot publish.
            self._write(method_frame(commands.Channel.CloseOk()))
            self._lose(BrokerClosed(value.reply_code or 0, value.reply_text))
            self.abort()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def eof_received(self) -> bool:
        # The broker closed its side: nothing more will be read, so nothing more is sent.
        self._lose(ConnectionResetError("the broker closed the connection"))
        return False  # and the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc or ConnectionResetError("the broker closed the connection"))
        if not self._transport_gone.done():
            self._transport_gone.set_result(None)

    def _lose(self, reason: BaseException) -> None:
        if self.lost.done():
            return
        self._channel_open = False
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        self.lost.set_result(reason)
        self._handshake.put_nowait(reason)
        self._fail_all(ConnectionLost(f"lost the connection ({describe(reason)})"))

    # --- keeping it alive, and closing ---------------------------------------------------------

    def _beat(self) -> None:
        if self.lost.done() or self._transport is None:
            return
        if self._loop.time() - self._last_received > 2 * self._heartbeat:
            log.debug("publishing connection: no heartbeat from the broker; dropping it")
            self._lose(ConnectionResetError("missed the broker's heartbeats"))
            self._transport.abort()
            return
        self._write(_HEARTBEAT)
        self._heartbeat_timer = self._loop.call_later(self._heartbeat / 2, self._beat)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def close(self, within: float = 5.0) -> None:
        """Take no more publishes, wait up to ``within`` seconds for the confirms still
        due, and close the connection as the protocol asks (Connection.Close, then
        Close-Ok). What is still unconfirmed then fails as of unknown outcome."""
        if self._transport is None:
            return
        if self.lost.done():
            await self._closed()
            return
        self._closing = True
        deadline = self._loop.time() + within
        if self._pending:
            self._drained = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), within)
        if self.lost.done():
            await self._closed()
            return
        self._channel_open = False
        self._write(
            method_frame(
                commands.Connection.Close(
                    reply_code=200, reply_text="closing", class_id=0, method_id=0
                ),
                0,
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(self.lost), max(deadline - self._loop.time(), 0.5)
            )
        self.abort()
        await self._closed()

    async def _closed(self) -> None:
        # The socket closes in a later turn of the loop (connection_lost): wait for it,
        # so that nothing is left open when the loop itself ends.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._transport_gone), 1)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._lose(ConnectionResetError("closed by this service"))


def describe(reason: BaseException) -> str:
    """A loss's reason as one phrase: the broker's words, or the error's type."""
    if isinstance(reason, BrokerClosed):  # worded as aio-pika's connection words it
        return f"ConnectionClosed: {reason.reply_text}"
    text = str(reason)
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def _call(settle: Settle, outcome: BaseException | None) -> None:
    try:
        settle(outcome)
    except Exception:
        log.exception("a publish's settle callback failed")

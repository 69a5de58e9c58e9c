"""A TCP proxy the test owns, to take the broker away and bring it back.

The machine's shared RabbitMQ is never stopped: the services connect through
this proxy, and ``cut()`` closes every proxied connection and stops
listening, which is what a broker outage looks like to a client.

It also knows just enough AMQP 0-9-1 to lose a publisher confirm on purpose:
``cut_after_next_publish()`` lets the next ``basic.publish`` reach the broker
whole, then forwards nothing more on that connection and drops it a moment
later, so the broker routes the message but its ``basic.ack`` never reaches
the client: a publish whose outcome the client cannot know.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

# AMQP 0-9-1 framing: type (1 byte), channel (2), payload size (4), payload, 0xCE.
_PROTOCOL_HEADER = b"AMQP"
_PROTOCOL_HEADER_SIZE = 8  # b"AMQP\x00\x00\x09\x01"
_FRAME_PREFIX = struct.Struct(">BHI")
_FRAME_END = 0xCE
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME = 1, 2, 3
_BASIC_PUBLISH = (60, 40)  # class basic, method publish
_METHOD_IDS = struct.Struct(">HH")
_BODY_SIZE = struct.Struct(">Q")  # in a content header: class-id (2), weight (2), body size (8)


class _PublishFrames:
    """Splits a client's byte stream into whole AMQP 0-9-1 frames and tells which
    frame completes a ``basic.publish`` (its method frame, content header and body
    frames; other channels' frames may come in between).

    Bytes are passed on in whole frames, so a frame split across reads waits for
    its end. A stream that is not AMQP 0-9-1, or stops being well framed, is
    passed on untouched from then on.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False
        self._passthrough = False
        self._publishing: dict[int, int | None] = {}
        """Per channel with a publish under way: body bytes still due (None: no header yet)."""

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The bytes to forward now, in pieces: ``(piece, whether it ends a publish)``."""
        if self._passthrough:
            return [(data, False)] if data else []
        self._buffer += data
        buffer = self._buffer
        pieces: list[tuple[bytes, bool]] = []
        start = position = 0
        if not self._started:
            if buffer[:4] != _PROTOCOL_HEADER[: len(buffer[:4])]:
                return self._give_up()
            if len(buffer) < _PROTOCOL_HEADER_SIZE:
                return []
            self._started = True
            position = _PROTOCOL_HEADER_SIZE
        while len(buffer) - position >= _FRAME_PREFIX.size:
            kind, channel, size = _FRAME_PREFIX.unpack_from(buffer, position)
            end = position + _FRAME_PREFIX.size + size + 1
            if len(buffer) < end:
                break
            if buffer[end - 1] != _FRAME_END:
                del buffer[:start]
                return pieces + self._give_up()
            payload = position + _FRAME_PREFIX.size
            position = end
            if self._completes_publish(kind, channel, size, buffer, payload):
                pieces.append((bytes(buffer[start:position]), True))
                start = position
        if start < position:
            pieces.append((bytes(buffer[start:position]), False))
        del buffer[:position]
        return pieces

    def _completes_publish(
        self, kind: int, channel: int, size: int, buffer: bytearray, payload: int
    ) -> bool:
        if kind == _METHOD_FRAME:
            self._publishing.pop(channel, None)
            if size >= _METHOD_IDS.size and _METHOD_IDS.unpack_from(buffer, payload) == (
                _BASIC_PUBLISH
            ):
                self._publishing[channel] = None
            return False
        if channel not in self._publishing:
            return False
        if kind == _HEADER_FRAME and size >= 4 + _BODY_SIZE.size:
            due = _BODY_SIZE.unpack_from(buffer, payload + 4)[0]
        elif kind == _BODY_FRAME and self._publishing[channel] is not None:
            due = (self._publishing[channel] or 0) - size
        else:
            return False
        if due > 0:
            self._publishing[channel] = due
            return False
        del self._publishing[channel]
        return True

    def _give_up(self) -> list[tuple[bytes, bool]]:
        self._passthrough = True
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [(rest, False)] if rest else []


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and the broker's."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    muted: bool = False
    """Nothing more is forwarded either way: the link is about to be dropped."""


@dataclass(frozen=True)
class _PublishCut:
    delay: float
    stop_listening: bool


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = listen_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._armed: _PublishCut | None = None
        self._cutting: set[asyncio.Task[None]] = set()
        self._publish_cuts = 0

    def _call(self, coro: Coroutine[Any, Any, object]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def publish_cuts(self) -> int:
        """How many connections were dropped by ``cut_after_next_publish``, so far."""
        return self._publish_cuts

    @property
    def armed(self) -> bool:
        """Whether a ``cut_after_next_publish`` still waits for its publish."""
        return self._armed is not None

    def open(self) -> None:
        """Start accepting connections and forwarding them to the target."""
        self._call(self._open())

    def cut(self) -> None:
        """Stop accepting and drop every open connection."""
        self._call(self._cut())

    def cut_after_next_publish(self, delay: float = 0.075, *, stop_listening: bool = False) -> None:
        """Lose the confirm of the next message a client publishes.

        The first ``basic.publish`` any proxied connection sends from now on is
        forwarded whole (method, content header and body frames); from then on
        that connection forwards nothing either way, so the broker routes the
        message but its confirm (``basic.ack``) never reaches the client, and
        ``delay`` seconds later both of its sides are dropped. With
        ``stop_listening`` the proxy also stops accepting connections then, as
        ``cut()`` does, until ``open()``; otherwise the client may connect
        again at once and everything is forwarded as before. Once only.
        """
        self._call(self._arm(_PublishCut(delay, stop_listening)))

    def close(self) -> None:
        self._call(self._shut_down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _arm(self, cut: _PublishCut) -> None:
        self._armed = cut

    async def _open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _shut_down(self) -> None:
        for task in list(self._cutting):
            task.cancel()
        await asyncio.gather(*self._cutting, return_exceptions=True)
        await self._cut()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        link = _Link(client_writer, upstream_writer)
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(
            self._pipe_publishes(client_reader, link),
            self._pipe_unless_muted(upstream_reader, link),
            return_exceptions=True,
        )
        self._writers.difference_update((client_writer, upstream_writer))

    async def _pipe_publishes(self, reader: asyncio.StreamReader, link: _Link) -> None:
        """Client to broker, frame by frame, watching for the publish to cut after."""
        frames = _PublishFrames()
        try:
            while data := await reader.read(65536):
                if link.muted:
                    continue
                for piece, ends_publish in frames.feed(data):
                    link.upstream.write(piece)
                    if ends_publish and self._armed is not None:
                        self._mute_and_drop(link, self._armed)
                        break
                await link.upstream.drain()
        finally:
            if not link.muted:
                link.upstream.transport.abort()

    async def _pipe_unless_muted(self, reader: asyncio.StreamReader, link: _Link) -> None:
        """Broker to client, until the link is muted."""
        try:
            while data := await reader.read(65536):
                if link.muted:
                    continue
                link.client.write(data)
                await link.client.drain()
        finally:
            if not link.muted:
                link.client.transport.abort()

    def _mute_and_drop(self, link: _Link, cut: _PublishCut) -> None:
        # Muted in the same step as the publish's last frame is written, so
        # nothing the broker answers to it can be forwarded.
        self._armed = None
        link.muted = True
        task = self._loop.create_task(self._drop_later(link, cut))
        self._cutting.add(task)
        task.add_done_callback(self._cutting.discard)

    async def _drop_later(self, link: _Link, cut: _PublishCut) -> None:
        await asyncio.sleep(cut.delay)
        if cut.stop_listening:
            await self._cut()
        link.client.transport.abort()
        link.upstream.transport.abort()
        self._publish_cuts += 1

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
